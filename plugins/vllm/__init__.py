"""vLLM plugin, loaded by vLLM through the ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` once in every process it starts (front end, engine core, workers),
so it is idempotent and cheap: it imports nothing heavy and launches no kernel. Features are
selected explicitly with vLLM's own flags (see the README's plugin section), never switched on
behind the user's back. An unsupported vLLM only gets a warning here (a server that does not
use tkernels' features keeps working); each feature raises when it is actually selected.
"""

from __future__ import annotations

import logging

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
    logger.info("tkernels: vLLM plugin registered (vLLM %s)", version)
