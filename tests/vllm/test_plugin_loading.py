"""vLLM's own plugin loader runs tkernels' entry point, and the plugin changes no output."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.vllm


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "tkernels"]
    assert ep.value == "tkernels.plugins.vllm:register"


def test_load_general_plugins_calls_register(monkeypatch):
    import vllm.plugins

    import tkernels.plugins.vllm as plugin

    monkeypatch.setattr(vllm.plugins, "plugins_loaded", False)
    monkeypatch.setattr(plugin, "REGISTERED", False)
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    vllm.plugins.load_general_plugins()
    assert plugin.REGISTERED


def test_unsupported_vllm_version_is_a_clear_error():
    from tkernels.plugins.vllm.compat import require_supported_vllm

    assert require_supported_vllm("0.32.0") == "0.32.0"
    assert require_supported_vllm("0.33.1+cu130") == "0.33.1+cu130"
    with pytest.raises(RuntimeError, match=r"vLLM 0.40.0 is not supported .*>=0.32,<0.34"):
        require_supported_vllm("0.40.0")


def _demo(plugins: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    out = subprocess.run(
        [sys.executable, "-m", "tkernels.cli.demo", "--model", "tiny", "--json", "--max-tokens", "12"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_engine_with_plugin_generates_same_greedy_tokens_as_without():
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()  # build before the two engines race for it
    with ThreadPoolExecutor(2) as pool:
        with_plugin, without = pool.map(_demo, [None, ""])
    assert with_plugin["plugin_registered"] and not without["plugin_registered"]
    assert with_plugin["token_ids"] == without["token_ids"]
    assert all(len(t) == 12 for t in with_plugin["token_ids"])
