"""Mixed chunks with the Token Recycling drafter (SGLang's NGRAM path).

SGLang 0.5.23 switches ``--enable-mixed-chunk`` off for NGRAM (``_handle_ngram``) and its
validation refuses the pair (``SpeculativeAlgorithm.supports_mixed_chunk``), because with overlap
scheduling NGRAM's relay does not write the output tokens that a mixed step reads back. Without
overlap (``--disable-overlap-schedule``) the scheduler stashes those tokens itself, as it does for
EAGLE, so with ``TKERNELS_SGLANG=token_recycling`` the plugin keeps mixed chunks on when the user
asked for them and overlap is off; otherwise it leaves SGLang's decision and says why.

What SGLang does not have is a step that verifies trees AND runs a prefill chunk: a mixed step
runs every running request as a plain one-token decode (EAGLE's rule too), and trees resume at
the next decode-only step. So decode-maximal budgets and speculation alternate, they do not
share a step.
"""

from __future__ import annotations

import logging

from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

logger = logging.getLogger("tkernels")


def keep_mixed_chunk(result, server_args, *args, **kwargs) -> None:
    """AFTER hook of ``speculative_hook._handle_ngram``."""
    if not server_args.enable_mixed_chunk:  # the user's flag (declarations never change raw inputs)
        return
    if resolving_view(server_args).disable_overlap_schedule:
        declare_resolution(server_args, "tkernels.keep_mixed_chunk", enable_mixed_chunk=True)
        logger.info("tkernels: --enable-mixed-chunk kept for NGRAM (Token Recycling, overlap off); mixed steps "
                    "decode running requests one plain token each, trees resume in decode-only steps")
    else:
        logger.info("tkernels: --enable-mixed-chunk stays off for NGRAM: with overlap scheduling NGRAM's relay "
                    "does not write the tokens a mixed step reads; add --disable-overlap-schedule to keep it")


def supports_mixed_chunk(original, algorithm, *args, **kwargs) -> bool:
    """AROUND hook of ``SpeculativeAlgorithm.supports_mixed_chunk``: NGRAM too (overlap gated above)."""
    return original(algorithm, *args, **kwargs) or algorithm.is_ngram()
