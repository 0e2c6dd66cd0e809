"""SGLang's own plugin loader runs tkernels' entry point; the version gate is clear."""

import logging
from importlib.metadata import PackageNotFoundError, entry_points

import pytest

import tkernels.plugins.sglang as plugin
from tkernels.plugins.sglang import compat


def test_entry_point_is_declared():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "tkernels"]
    assert ep.value == "tkernels.plugins.sglang:register"


@pytest.fixture
def fresh_registry(monkeypatch):
    """A clean plugin state: tkernels not registered yet, SGLang's hook and backend tables restored after."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry

    monkeypatch.setattr(plugin, "REGISTERED", False)
    monkeypatch.setattr(HookRegistry, "_hooks", type(HookRegistry._hooks)(list))
    monkeypatch.setattr(HookRegistry, "apply_hooks", classmethod(lambda cls: None))  # no patching in tests
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    yield HookRegistry
    while plugin.BACKEND_NAME in ATTENTION_BACKEND_CHOICES:
        ATTENTION_BACKEND_CHOICES.remove(plugin.BACKEND_NAME)
    ATTENTION_BACKENDS.pop(plugin.BACKEND_NAME, None)


@pytest.mark.sglang
def test_register_is_idempotent(fresh_registry, monkeypatch, caplog):
    monkeypatch.setenv(plugin.ENV_FEATURES, "budget")
    with caplog.at_level(logging.INFO, logger="tkernels"):
        plugin.register()
        plugin.register()
    assert plugin.REGISTERED
    assert [r.getMessage() for r in caplog.records] == [
        f"tkernels: SGLang plugin registered (SGLang {compat.installed_version('sglang')}; attention backend "
        "'tkernels'; features: budget)"]
    assert len(fresh_registry._hooks["sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class"]) == 1
    assert len(fresh_registry._hooks["sglang.srt.managers.scheduler.Scheduler.init_chunked_prefill"]) == 1


HOOKS = {
    "budget": ["sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class",
               "sglang.srt.managers.scheduler.Scheduler.init_chunked_prefill"],
    "token_recycling": ["sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker",
                        "sglang.srt.speculative.eagle_utils.eagle_sample",
                        "sglang.srt.arg_groups.speculative_hook._handle_ngram",
                        "sglang.srt.speculative.spec_info.SpeculativeAlgorithm.supports_mixed_chunk"],
}


@pytest.mark.sglang
@pytest.mark.parametrize("features", ["", "budget", "token_recycling", "budget,token_recycling"])
def test_load_plugins_registers_everything(fresh_registry, monkeypatch, features):
    import sglang.srt.plugins
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.server_args import prepare_server_args

    monkeypatch.setattr(sglang.srt.plugins, "_plugins_loaded", False)
    monkeypatch.setenv(plugin.ENV_FEATURES, features)
    sglang.srt.plugins.load_plugins()
    assert plugin.REGISTERED
    assert ATTENTION_BACKENDS[plugin.BACKEND_NAME] is plugin.create_attention_backend
    expected = sorted(t for f in filter(None, features.split(",")) for t in HOOKS[f])
    assert sorted(t for t, hooks in fresh_registry._hooks.items() if hooks) == expected
    args = prepare_server_args(["--model-path", "dummy", "--attention-backend", "tkernels"])
    assert args.attention_backend == "tkernels"


def test_unknown_feature_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(plugin.ENV_FEATURES, "budget, tree")
    with pytest.raises(ValueError, match=r"TKERNELS_SGLANG: unknown features \['tree'\]; known: budget, token_recycling"):
        plugin.selected_features()


@pytest.mark.parametrize("version", ["0.5.23", "0.5.23.post1", "0.5.24rc0", "0.5.99+cu130"])
def test_supported_sglang_versions(version):
    assert compat.require_supported_sglang(version) == version


@pytest.mark.parametrize("version", ["0.5.22", "0.4.30", "0.6", "0.6.0rc1", "1.0.0"])
def test_unsupported_sglang_version_is_a_clear_error(version):
    with pytest.raises(RuntimeError, match=rf"SGLang {version} is not supported .*sglang>=0\.5\.23,<0\.6"):
        compat.require_supported_sglang(version)


def test_missing_sglang_is_a_clear_error(monkeypatch):
    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(compat, "installed_version", not_installed)
    with pytest.raises(RuntimeError, match=r"SGLang is not installed .*sglang>=0\.5\.23,<0\.6"):
        compat.require_supported_sglang()


def test_unparsable_sglang_version_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot parse the SGLang version 'dev'"):
        compat.require_supported_sglang("dev")
