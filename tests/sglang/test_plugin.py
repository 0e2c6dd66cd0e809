"""SGLang's own plugin loader runs tkernels' entry point; the version gate is clear."""

import logging
from importlib.metadata import PackageNotFoundError, entry_points

import pytest

import tkernels.plugins.sglang as plugin
from tkernels.plugins.sglang import compat


def test_entry_point_is_declared():
    (ep,) = [ep for ep in entry_points(group="sglang.srt.plugins") if ep.name == "tkernels"]
    assert ep.value == "tkernels.plugins.sglang:register"


def test_register_is_idempotent(monkeypatch, caplog):
    monkeypatch.setattr(plugin, "REGISTERED", False)
    with caplog.at_level(logging.INFO, logger="tkernels"):
        plugin.register()
        plugin.register()
    assert plugin.REGISTERED
    assert [r.getMessage() for r in caplog.records] == ["tkernels: SGLang plugin registered (no hooks yet)"]


@pytest.mark.sglang
def test_load_plugins_calls_register(monkeypatch):
    import sglang.srt.plugins

    monkeypatch.setattr(sglang.srt.plugins, "_plugins_loaded", False)
    monkeypatch.setattr(plugin, "REGISTERED", False)
    monkeypatch.delenv("SGLANG_PLUGINS", raising=False)
    sglang.srt.plugins.load_plugins()
    assert plugin.REGISTERED


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
