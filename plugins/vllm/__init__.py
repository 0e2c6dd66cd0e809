"""vLLM plugin, loaded by vLLM through the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process it starts (front end, engine core, workers),
so it is idempotent and cheap: it imports nothing heavy and launches no kernel. Features are
selected explicitly with vLLM's own flags (see the README's plugin section), never switched on
behind the user's back. An unsupported vLLM only gets a warning here (a server that does not
use tkernels' features keeps working); each feature raises when it is actually selected.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("tkernels")

REGISTERED = False


def register() -> None:
    global REGISTERED
    if REGISTERED:
        return
    from tkernels.plugins.vllm.compat import require_supported_vllm

    REGISTERED = True
    try:
        version = require_supported_vllm()
    except RuntimeError as err:
        logger.warning("%s", err)
        return
    register_attention_backend()
    from tkernels.plugins.vllm.patches import install_failed_request_handling, install_request_validation
    from tkernels.plugins.vllm.settings import install_config_check

    install_config_check()  # tkernels' settings checked as soon as vLLM has built its configuration
    try:  # inert unless the tree proposer is configured (see patches.py), which then checks them again
        install_request_validation()
        install_failed_request_handling()
    except RuntimeError as err:
        logger.warning("%s", err)
    logger.info("tkernels: vLLM plugin registered (vLLM %s)", version)


BACKEND_PATH = "tkernels.plugins.vllm.attention.TkernelsAttentionBackend"
CPU_ATTENTION_ENV = "TKERNELS_VLLM_CPU_ATTENTION"
# vLLM-CPU ignores --attention-backend and always runs its CPU_ATTN backend, which has no tree
# mask: the tree proposer there needs tkernels' attention in its place, asked for with
# TKERNELS_VLLM_CPU_ATTENTION: "reference" runs the plain-PyTorch references (attention, tree
# verification, KV compaction), fast enough to serve a real model on CPU; "interpreter" runs
# tkernels' Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1; tests only, slow).
CPU_ATTENTION_MODES = {"reference": "reference", "interpreter": "1"}
# The variable's first name, for tests: "1" (interpreter) or "reference"; still read.
CPU_TEST_ENV = "TKERNELS_VLLM_CPU_TEST_BACKEND"
CPU_TEST_MODES = ("1", "reference")
CPU_ATTENTION_HINT = (f"set {CPU_ATTENTION_ENV}=reference (tkernels' attention as its PyTorch reference; or "
                      f"{CPU_ATTENTION_ENV}=interpreter with TRITON_INTERPRET=1, the Triton kernels under the interpreter)")


def cpu_test_mode() -> str | None:
    """The CPU attention mode asked for in ``TKERNELS_VLLM_CPU_ATTENTION`` (``reference`` |
    ``interpreter``) or its older name ``TKERNELS_VLLM_CPU_TEST_BACKEND`` (``reference`` | ``1``):
    ``"reference"``, ``"1"`` (the interpreter) or None when neither is set (or both are empty)."""
    named = os.environ.get(CPU_ATTENTION_ENV) or None
    if named is not None and named not in CPU_ATTENTION_MODES:
        raise ValueError(f"tkernels: {CPU_ATTENTION_ENV} must be one of {tuple(CPU_ATTENTION_MODES)} or unset, "
                         f"got {named!r}")
    mode = os.environ.get(CPU_TEST_ENV) or None
    if mode is not None and mode not in CPU_TEST_MODES:
        raise ValueError(f"tkernels: {CPU_TEST_ENV} must be one of {CPU_TEST_MODES} or unset, got {mode!r} "
                         f"(its user-facing name: {CPU_ATTENTION_ENV}=reference|interpreter)")
    if named is None:
        return mode
    if mode is not None and mode != CPU_ATTENTION_MODES[named]:
        raise ValueError(f"tkernels: {CPU_ATTENTION_ENV}={named} and {CPU_TEST_ENV}={mode} (its older name) disagree: "
                         f"set one of them")
    return CPU_ATTENTION_MODES[named]


def register_attention_backend() -> None:
    """Register this backend as vLLM's ``CUSTOM`` one (and, in a CPU test mode, as ``CPU_ATTN``).

    Idempotent; called from the plugin's ``register()`` in every vLLM process.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    mode = cpu_test_mode()
    if mode is None:
        return
    import triton

    if mode == "1" and not triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"tkernels: {CPU_ATTENTION_ENV}=interpreter ({CPU_TEST_ENV}=1) runs the attention kernel under Triton's "
            "CPU interpreter: set TRITON_INTERPRET=1 as well (before any Triton kernel is defined)"
        )
    if not AttentionBackendEnum.CPU_ATTN.is_overridden():
        how = "under the Triton interpreter" if mode == "1" else "as its PyTorch reference"
        logger.warning("tkernels: %s=%s: vLLM's CPU_ATTN backend is replaced by tkernels' mixed-batch attention "
                       "%s", CPU_ATTENTION_ENV, {v: k for k, v in CPU_ATTENTION_MODES.items()}[mode], how)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)

