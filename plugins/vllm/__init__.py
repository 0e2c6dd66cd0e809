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
    logger.info("tkernels: vLLM plugin registered (vLLM %s)", version)


BACKEND_PATH = "tkernels.plugins.vllm.attention.TkernelsAttentionBackend"
CPU_TEST_ENV = "TKERNELS_VLLM_CPU_TEST_BACKEND"


def register_attention_backend() -> None:
    """Register this backend as vLLM's ``CUSTOM`` one (and, in CPU test mode, as ``CPU_ATTN``).

    Idempotent; called from the plugin's ``register()`` in every vLLM process.
    """
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    if os.environ.get(CPU_TEST_ENV) != "1":
        return
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError(
            f"tkernels: {CPU_TEST_ENV}=1 runs the attention kernel under Triton's CPU interpreter: "
            "set TRITON_INTERPRET=1 as well (before any Triton kernel is defined)"
        )
    if not AttentionBackendEnum.CPU_ATTN.is_overridden():
        logger.warning("tkernels: %s=1: vLLM's CPU_ATTN backend is replaced by tkernels' mixed-batch attention "
                       "under the Triton interpreter (for tests; slow)", CPU_TEST_ENV)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)

