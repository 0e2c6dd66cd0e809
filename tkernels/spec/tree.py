"""Speculation trees on the ``parents`` contract, their static templates and server formats.

A tree of ``n`` nodes is ``parents: int32[n]`` in BFS order: ``parents[0] == -1`` (node 0 is the
last committed token, whose logits predict the depth-1 children) and, for ``i >= 1``,
``0 <= parents[i] < i`` with ``parents[1:]`` non-decreasing (BFS dequeues parents in order, so a
node's children are contiguous and every depth is a contiguous slice). A batch of trees is
ragged: ``parents`` holds LOCAL indices per request and ``cu_nodes: int32[B+1]`` the offsets.

Trees hold at most :data:`MAX_TREE_NODES` nodes wherever a kernel or server takes them.

Every function works on CPU or device tensors; depths and ancestor bits use pointer doubling
(log2 n vectorised gathers), never a per-node Python loop. Only :func:`validate_parents`
and the list-returning :func:`leaf_paths` read values back to the host.

A *shape* (:class:`TreeShape`) adds ``ranks``: node ``i`` is its parent's ``ranks[i]``-th best
candidate (column ``ranks[i]`` of Token Recycling's adjacency row, the ``ranks[i]``-th top-k
token of a draft head). Drafters fill a shape with tokens; the verifier only needs ``parents``.

This module is the import path of both halves: the contract's functions and the server formats
live in :mod:`tkernels.spec.tree_contract`, the shapes and templates in
:mod:`tkernels.spec.tree_shapes`.
"""

from __future__ import annotations

from .tree_contract import (
    MAX_TREE_NODES,
    TOP_K,
    _check_cu_nodes,  # noqa: F401  (tkernels.spec.verify checks ragged offsets with it)
    ancestor_bits,
    ancestor_mask,
    ancestor_words,
    best_path,
    depths,
    leaf_paths,
    positions,
    retrieve_indices,
    select_subtree,
    to_sglang,
    to_vllm_linear,
    unpack_ancestor_bits,
    validate_parents,
)
from .tree_shapes import (
    TR_80_WIDTHS,
    TreeShape,
    chain,
    from_child_counts,
    from_rank_paths,
    from_widths,
    token_recycling_template,
    token_recycling_tree,
)

__all__ = [
    "MAX_TREE_NODES",
    "TOP_K",
    "TreeShape",
    "validate_parents",
    "depths",
    "positions",
    "ancestor_words",
    "ancestor_bits",
    "ancestor_mask",
    "unpack_ancestor_bits",
    "leaf_paths",
    "retrieve_indices",
    "best_path",
    "select_subtree",
    "chain",
    "from_child_counts",
    "from_rank_paths",
    "from_widths",
    "token_recycling_template",
    "token_recycling_tree",
    "to_sglang",
    "to_vllm_linear",
    "TR_80_WIDTHS",
]
