"""SGLang plugin, loaded by SGLang through the ``sglang.srt.plugins`` entry point.

SGLang's ``load_plugins()`` calls :func:`register` in every process it starts (CLI, Engine, each
scheduler process), so it is idempotent and cheap: it imports nothing heavy (not even SGLang)
and launches no kernel. It registers no hook yet; each hook, when added, calls
:func:`tkernels.plugins.sglang.compat.require_supported_sglang` first, so an unsupported SGLang
fails loudly only when a tkernels feature is actually patched in.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("tkernels")

REGISTERED = False


def register() -> None:
    global REGISTERED
    if REGISTERED:
        return
    REGISTERED = True
    logger.info("tkernels: SGLang plugin registered (no hooks yet)")
