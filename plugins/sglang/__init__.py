"""SGLang plugin, loaded by SGLang through the ``sglang.srt.plugins`` entry point.

SGLang's ``load_plugins()`` calls :func:`register` in every process it starts (CLI before
argument parsing, Engine, each scheduler process), then applies the hooks registered here. So
:func:`register` is idempotent and cheap: it checks the SGLang version from package metadata,
adds the attention backend name, and registers hooks by dotted target name; the hook bodies
import tkernels' SGLang modules (and SGLang's internals) only when SGLang first calls them.

What each feature is selected by (nothing changes behind the user's back):

- ``--attention-backend tkernels``: :class:`tkernels.plugins.sglang.attention.TkernelsAttnBackend`;
- ``TKERNELS_SGLANG=budget`` (with ``--enable-mixed-chunk``): the decode-maximal chunk budget,
  :mod:`tkernels.plugins.sglang.budget`;
- ``TKERNELS_SGLANG=token_recycling`` (with ``--speculative-algorithm NGRAM``): the Token
  Recycling drafter and tkernels' tree verification, :mod:`tkernels.plugins.sglang.drafter`;
  ``--enable-mixed-chunk`` then stays on when overlap scheduling is off,
  :mod:`tkernels.plugins.sglang.mixed_chunk`.

On SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) with no ``sgl_kernel`` importable,
:func:`register` also puts tkernels' stand-in for the ``sgl_kernel`` ops that engine calls on the
import path (:mod:`tkernels.plugins.sglang.cpu`, docs/sglang.md).

Features combine: ``TKERNELS_SGLANG=budget,token_recycling``. An SGLang outside the supported
range makes :func:`register` raise (SGLang logs it and starts without tkernels, so
``--attention-backend tkernels`` is then rejected by the CLI).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("tkernels")

# The features, their variable and the backend's name live in compat.py (attention.py reads them
# too); re-exported here, where users and tests find them.
from tkernels.plugins.sglang.compat import BACKEND_NAME, ENV_FEATURES, FEATURES, selected_features  # noqa: E402, F401

REGISTERED = False



def create_attention_backend(model_runner):
    from tkernels.plugins.sglang.attention import TkernelsAttnBackend

    return TkernelsAttnBackend(model_runner)


def get_prefill_adder_class(scheduler):
    """REPLACE hook of ``Scheduler.get_prefill_adder_class``."""
    from tkernels.plugins.sglang.budget import prefill_adder_for

    return prefill_adder_for(scheduler)


def check_budget_at_start(result, scheduler, *args, **kwargs):
    """AFTER hook of ``Scheduler.init_chunked_prefill``: impossible flags fail at start-up, not at
    the first request."""
    from tkernels.plugins.sglang.budget import scheduler_policy

    scheduler_policy(scheduler)


def create_worker(worker_cls, *args, **kwargs):
    """AFTER hook of ``SpeculativeAlgorithm.create_worker``: NGRAM -> the Token Recycling worker."""
    from tkernels.plugins.sglang.drafter import replace_ngram_worker

    return replace_ngram_worker(worker_cls)


def eagle_sample(original, *args, **kwargs):
    """AROUND hook of ``eagle_utils.eagle_sample``: tkernels' tree verification for tkernels' drafts."""
    from tkernels.plugins.sglang.verify import eagle_sample as tkernels_eagle_sample

    return tkernels_eagle_sample(original, *args, **kwargs)


def keep_mixed_chunk(result, *args, **kwargs):
    from tkernels.plugins.sglang.mixed_chunk import keep_mixed_chunk as keep

    return keep(result, *args, **kwargs)


def supports_mixed_chunk(original, *args, **kwargs):
    from tkernels.plugins.sglang.mixed_chunk import supports_mixed_chunk as supports

    return supports(original, *args, **kwargs)


def register() -> None:
    global REGISTERED
    if REGISTERED:
        return
    from tkernels.plugins.sglang.compat import require_supported_sglang

    version = require_supported_sglang()  # before anything touches SGLang's internals
    features = selected_features()

    from tkernels.plugins.sglang.cpu import install_stand_in

    install_stand_in()  # before any import of SGLang's CPU paths (see cpu.py for the processes it reaches)

    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_attention_backend)
    if "budget" in features:
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.init_chunked_prefill",
                              check_budget_at_start, HookType.AFTER)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.get_prefill_adder_class",
                              get_prefill_adder_class, HookType.REPLACE)
    if "token_recycling" in features:
        HookRegistry.register("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.create_worker",
                              create_worker, HookType.AFTER)
        HookRegistry.register("sglang.srt.speculative.eagle_utils.eagle_sample", eagle_sample, HookType.AROUND)
        HookRegistry.register("sglang.srt.arg_groups.speculative_hook._handle_ngram", keep_mixed_chunk, HookType.AFTER)
        HookRegistry.register("sglang.srt.speculative.spec_info.SpeculativeAlgorithm.supports_mixed_chunk",
                              supports_mixed_chunk, HookType.AROUND)
        logger.info("tkernels: speculation trees and prefill chunks never share a step (SGLang runs mixed steps "
                    "as plain decodes); mixed chunks with NGRAM need --disable-overlap-schedule (see the README)")
    REGISTERED = True
    logger.info("tkernels: SGLang plugin registered (SGLang %s; attention backend '%s'; features: %s)",
                version, BACKEND_NAME, ", ".join(features) or "none")
