"""The parents contract of :mod:`tkernels.spec.tree` (its module doc): the limits, validation,
the views derived from ``parents`` (depths, positions, ancestor bits and masks, paths,
subtrees) and the servers' formats."""

from __future__ import annotations

import itertools

import torch

from tkernels.checks import integer

__all__ = [
    "MAX_TREE_NODES",
    "TOP_K",
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
    "to_sglang",
    "to_vllm_linear",
]

# The largest tree every kernel and server path takes (attention's tree tiles, verification,
# KV compaction, the vLLM and SGLang plugins): 256 nodes, root included, so 255 draft tokens.
MAX_TREE_NODES = 256
# Candidates per token in Token Recycling's adjacency matrix (the paper's k): the templates'
# widest fan-out, the policies' ranks and every drafter's default.
TOP_K = 8


def _check_parents_tensor(parents) -> None:
    """The cheap part of :func:`validate_parents` (no host read): a 1-D int32/int64 tensor."""
    if not isinstance(parents, torch.Tensor) or parents.dim() != 1:
        raise ValueError(f"parents must be a 1-D tensor, got {getattr(parents, 'shape', type(parents))}")
    if parents.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents must be int32 (or int64), got {parents.dtype}")


def _check_cu_nodes_tensor(parents: torch.Tensor, cu_nodes) -> None:
    """The cheap part of :func:`_check_cu_nodes` (no host read): a 1-D int32/int64 tensor
    beside ``parents``."""
    if not isinstance(cu_nodes, torch.Tensor):
        raise ValueError(f"cu_nodes must be a 1-D int32 tensor [B+1], got {type(cu_nodes).__name__}")
    if cu_nodes.dim() != 1 or cu_nodes.numel() < 1 or cu_nodes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_nodes must be a 1-D int32 tensor [B+1], got {tuple(cu_nodes.shape)} {cu_nodes.dtype}")
    if cu_nodes.device != parents.device:
        raise ValueError(f"cu_nodes is on {cu_nodes.device} but parents is on {parents.device}")


def _check_cu_nodes(parents: torch.Tensor, cu_nodes: torch.Tensor) -> torch.Tensor:
    """Raise unless ``cu_nodes`` is a valid offsets tensor for ``parents``; returns it on the host."""
    _check_cu_nodes_tensor(parents, cu_nodes)
    cu = cu_nodes.cpu()
    if int(cu[0]) != 0 or int(cu[-1]) != parents.numel() or bool((cu[1:] <= cu[:-1]).any()):
        raise ValueError(
            "cu_nodes must start at 0, end at len(parents) and increase strictly (every tree has "
            f"at least its root), got {cu.tolist()} for {parents.numel()} nodes"
        )
    return cu


def validate_parents(parents: torch.Tensor, cu_nodes: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` naming ``parents`` unless it is a valid BFS tree (or ragged batch)."""
    _check_parents_tensor(parents)
    if parents.numel() == 0:
        raise ValueError("parents is empty: a tree has at least its root (node 0)")
    if cu_nodes is None:
        cu = torch.tensor([0, parents.numel()])
    else:
        _check_cu_nodes(parents, cu_nodes)
        cu = cu_nodes.cpu().long()
    p = parents.cpu().long()
    sizes = cu[1:] - cu[:-1]
    local = torch.arange(p.numel()) - torch.repeat_interleave(cu[:-1], sizes)
    previous = torch.cat([p[:1], p[:-1]])
    ok = torch.where(local == 0, p == -1, (p >= 0) & (p < local) & ((local < 2) | (p >= previous)))
    if bool(ok.all()):  # the common case: one vectorised pass, no per-request loop
        return
    b = int(torch.searchsorted(cu, int((~ok).nonzero()[0]), right=True)) - 1
    tree, where = p[int(cu[b]):int(cu[b + 1])], "" if cu_nodes is None else f" (request {b})"
    if int(tree[0]) != -1:
        raise ValueError(f"parents[0] must be -1 (node 0 is the root){where}, got {int(tree[0])}")
    idx = torch.arange(tree.numel())
    bad = ((tree < 0) | (tree >= idx))[1:].nonzero()
    if bad.numel():
        i = int(bad[0]) + 1
        raise ValueError(f"parents[{i}] = {int(tree[i])} must satisfy 0 <= parents[i] < i{where}")
    i = int((tree[2:] < tree[1:-1]).nonzero()[0]) + 2
    raise ValueError(
        f"parents is not in BFS order{where}: parents[{i}] = {int(tree[i])} < "
        f"parents[{i - 1}] = {int(tree[i - 1])} (parents[1:] must be non-decreasing)"
    )


def _global_parents(parents: torch.Tensor, cu_nodes: torch.Tensor | None, checked: bool = False) -> torch.Tensor:
    """int64 parents in global indices (-1 for roots), so ragged batches reuse the 1-tree code.
    Checks the types and ``cu_nodes`` (one host read); the values are checked by the callers'
    pointer doubling (:func:`_doubling`). ``checked``: the caller checked both already."""
    if not checked:
        _check_parents_tensor(parents)
    p = parents.long()
    if cu_nodes is None:
        return p
    if not checked:
        _check_cu_nodes(parents, cu_nodes)
    counts = (cu_nodes[1:] - cu_nodes[:-1]).long()
    offsets = torch.repeat_interleave(cu_nodes[:-1].long(), counts)
    return torch.where(p >= 0, p + offsets, p)


def _check_range(parents: torch.Tensor) -> None:
    n = parents.numel()
    if bool(((parents < -1) | (parents >= n)).any()):
        raise ValueError(f"parents holds an index outside [-1, {n}); see validate_parents")


def _doubling(parents: torch.Tensor):
    """Pointer doubling over global parents: round k yields ``(has, hop)`` where ``hop[i]`` is
    node i's ancestor 2**k generations up (valid where ``has``); the caller folds that node's
    value into node i's before the next round. ceil(log2 n) rounds reach every root, so a
    64-deep tree costs 6 rounds, not 64; a chain that never reaches a root raises."""
    _check_range(parents)
    hop = parents
    for _ in range(max(parents.numel() - 1, 1).bit_length()):
        has = hop >= 0
        if not bool(has.any()):
            return
        safe = hop.clamp(min=0)
        yield has, safe
        hop = torch.where(has, hop[safe], hop)
    if bool((hop >= 0).any()):
        raise ValueError("parents is not a tree: a parent chain never reaches the root; see validate_parents")


def depths(parents: torch.Tensor, cu_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """Depth of every node (root 0), int32, same device."""
    p = _global_parents(parents, cu_nodes)
    depth = (p >= 0).long()  # distance to the current hop (the parent)
    for has, hop in _doubling(p):
        depth = depth + torch.where(has, depth[hop], 0)
    return depth.int()


def positions(parents: torch.Tensor, start: int | torch.Tensor = 0, cu_nodes: torch.Tensor | None = None) -> torch.Tensor:
    """Position ids of the tree tokens: ``start`` (node 0's position; int or int[B]) + depth.

    ``start``: a non-negative integer (every tree), or an integer tensor on ``parents``' device,
    0-d or with one entry per tree (``B = len(cu_nodes) - 1``, 1 without ``cu_nodes``).
    """
    d = depths(parents, cu_nodes).long()
    if not isinstance(start, torch.Tensor):
        return d + integer("start", start, minimum=0)
    trees = 1 if cu_nodes is None else cu_nodes.numel() - 1
    if start.dtype.is_floating_point or start.dtype.is_complex or start.dtype == torch.bool or start.dim() > 1 \
            or (start.dim() == 1 and start.numel() != trees):
        raise ValueError(f"start: must be an int or an integer tensor of one entry per tree ({trees}), "
                         f"got {start.dtype} {tuple(start.shape)}")
    if start.device != parents.device:
        raise ValueError(f"start: is on {start.device} but parents is on {parents.device}")
    if start.dim() == 1 and cu_nodes is not None:
        start = torch.repeat_interleave(start.long(), (cu_nodes[1:] - cu_nodes[:-1]).long(), output_size=parents.numel())
    return d + start.long()


def ancestor_words(max_nodes: int) -> int:
    """How many 64-bit words :func:`ancestor_bits` packs a row of a ``max_nodes``-node tree into."""
    max_nodes = integer("max_nodes", max_nodes, minimum=0)
    return max(1, -(-max_nodes // 64))


def ancestor_bits(parents: torch.Tensor, cu_nodes: torch.Tensor | None = None, words: int | None = None) -> torch.Tensor:
    """Bit-packed attention rows, int64[n, words]: bit ``j % 64`` of word ``j // 64`` is set iff
    ``j`` is ``i`` or an ancestor of ``i``.

    Bits are LOCAL node indices; ``words`` defaults to :func:`ancestor_words` of the largest tree
    (bit 63 of a word is its sign bit). Kernels may read a row as 32-bit words: on little-endian
    GPUs and CPUs, bit ``j`` is bit ``j % 32`` of int32 word ``j // 32`` of the same memory.
    This is the one derivation of ancestor sets; :func:`ancestor_mask` unpacks it.
    """
    _check_parents_tensor(parents)
    if cu_nodes is None:
        n_max = parents.numel()
    else:  # one host read: the check's copy of cu_nodes gives the largest tree too
        cu = _check_cu_nodes(parents, cu_nodes)
        n_max = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        sizes = cu_nodes[1:] - cu_nodes[:-1]
    needed = ancestor_words(n_max)
    if words is None:
        words = needed
    elif integer("words", words, minimum=1) < needed:
        raise ValueError(f"words: a tree of {n_max} nodes needs {needed} 64-bit words per row, got {words}")
    local = torch.arange(parents.numel(), device=parents.device)
    if cu_nodes is not None:
        local = local - torch.repeat_interleave(cu_nodes[:-1].long(), sizes.long(), output_size=parents.numel())
    one = torch.ones((), dtype=torch.int64, device=parents.device)
    bits = torch.zeros((parents.numel(), words), dtype=torch.int64, device=parents.device)
    rows = torch.arange(parents.numel(), device=parents.device)
    bits[rows, local // 64] = torch.bitwise_left_shift(one, local % 64)  # every node sees itself
    for has, hop in _doubling(_global_parents(parents, cu_nodes, checked=True)):
        bits = bits | torch.where(has[:, None], bits[hop], 0)
    return bits


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """bool[n, n] tree attention mask of one tree: ``mask[i, j]`` iff j is i or an ancestor of i
    (:func:`ancestor_bits` unpacked)."""
    _check_parents_tensor(parents)
    return unpack_ancestor_bits(ancestor_bits(parents), parents.numel())


def unpack_ancestor_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """bool[rows, n]: bits 0..n-1 of each row of packed :func:`ancestor_bits` rows (int64
    [rows, words]), i.e. whether each of a tree's first ``n`` nodes is the row's node or an
    ancestor of it."""
    j = torch.arange(n, device=bits.device)
    words = bits[:, j // 64]  # [rows, n]: the word holding bit j of each row
    return (torch.bitwise_right_shift(words, j % 64) & 1).bool()


def _leaves(parents: torch.Tensor) -> torch.Tensor:
    is_parent = torch.zeros(parents.numel(), dtype=torch.bool, device=parents.device)
    is_parent[parents.long()[1:]] = True
    return (~is_parent).nonzero().flatten()


def retrieve_indices(parents: torch.Tensor) -> torch.Tensor:
    """int64[num_leaves, max_depth+1]: the root-to-leaf node paths, leaves in index order, -1 padded.

    Validates ``parents`` (:func:`validate_parents`) for itself, :func:`leaf_paths` and :func:`best_path`.
    """
    validate_parents(parents)
    p = parents.long()
    leaves = _leaves(p)
    d = depths(p).long()
    width = int(d.max()) + 1
    out = torch.full((leaves.numel(), width), -1, dtype=torch.int64, device=p.device)
    rows = torch.arange(leaves.numel(), device=p.device)
    node, col = leaves, d[leaves]
    while True:  # walk every leaf up at once, writing each node at its depth's column
        out[rows, col] = node
        node = p[node]
        keep = node >= 0
        if not bool(keep.any()):
            return out
        rows, node, col = rows[keep], node[keep], col[keep] - 1


def leaf_paths(parents: torch.Tensor) -> list[list[int]]:
    """Root-to-leaf node paths (host lists), leaves in index order."""
    return [[i for i in row if i >= 0] for row in retrieve_indices(parents).tolist()]


def best_path(parents: torch.Tensor, node_scores: torch.Tensor | None = None) -> torch.Tensor:
    """Node indices (root first, int64) of the root-to-leaf path with the highest score sum.

    With ``node_scores`` = each node's path probability (product of acceptance probabilities
    from the root), the sum along a path is that linear draft's expected accepted length, so
    this is the best linear draft inside the tree. Without scores: the first-child chain, which
    for rank-ordered shapes is the top-1 chain. Ties go to the lowest leaf index.
    """
    paths = retrieve_indices(parents)
    if node_scores is None:  # +1 on first children, a sure loss on any other: the first-child chain
        first = torch.ones_like(parents, dtype=torch.bool)
        first[1:] = parents[1:] != parents[:-1]
        node_scores = torch.where(first, 1.0, -float(parents.numel()))
    elif node_scores.shape != parents.shape:
        raise ValueError(f"node_scores must have shape {tuple(parents.shape)}, got {tuple(node_scores.shape)}")
    totals = torch.where(paths >= 0, node_scores.double()[paths.clamp(min=0)], 0.0).sum(1)
    best = paths[int(totals.argmax())]
    return best[best >= 0]


def select_subtree(parents: torch.Tensor, keep: torch.Tensor, cu_nodes: torch.Tensor | None = None):
    """Keep the nodes where ``keep`` (bool, parents' shape) of a ragged batch of trees.

    ``keep`` must hold every root and every kept node's parent (a pruned tree, e.g. a prefix of
    a best-first order). Returns ``(index int64[m], parents int32[m], cu_nodes int32[B+1])``:
    the kept nodes' old (global) indices and the pruned trees, still in BFS order (dropping
    nodes keeps the order of the rest, and parents are renumbered monotonically).
    """
    _check_parents_tensor(parents)
    if not isinstance(keep, torch.Tensor) or keep.shape != parents.shape or keep.dtype != torch.bool:
        raise ValueError(f"keep must be a bool tensor of parents' shape {tuple(parents.shape)}, got {tuple(keep.shape)} {keep.dtype}")
    if cu_nodes is None:
        cu_nodes = torch.tensor([0, parents.numel()], dtype=torch.int32, device=parents.device)
    else:
        _check_cu_nodes(parents, cu_nodes)
    g = _global_parents(parents, cu_nodes)
    _check_range(g)
    if not bool(torch.where(g >= 0, ~keep | keep[g.clamp(min=0)], keep).all()):
        raise ValueError("keep must hold every root and the parent of every kept node")
    new_index = keep.long().cumsum(0) - 1
    cu = torch.cat([cu_nodes.new_zeros(1), keep.long().cumsum(0)[cu_nodes[1:].long() - 1].to(cu_nodes.dtype)])
    index = keep.nonzero().flatten()
    request_start = torch.repeat_interleave(cu[:-1].long(), (cu[1:] - cu[:-1]).long())
    kept_parents = g[index]
    local = torch.where(kept_parents >= 0, new_index[kept_parents.clamp(min=0)] - request_start, -1)
    return index, local.int(), cu.int()


# --- server formats -------------------------------------------------------------------------


def to_sglang(draft_tokens: torch.Tensor, parents: torch.Tensor, cu_nodes: torch.Tensor | None = None):
    """SGLang's NGRAM format (``NGRAMWorker._prepare_draft_tokens``): ``(tokens int64[total],
    mask int64[sum n_b * n_b])``.

    Per request, ``mask[i * n + j]`` is 1 iff j is i or an ancestor of i; requests' flattened
    masks are concatenated in batch order.
    """
    if draft_tokens.shape != parents.shape:
        raise ValueError(f"draft_tokens must have parents' shape {tuple(parents.shape)}, got {tuple(draft_tokens.shape)}")
    if cu_nodes is None:
        return draft_tokens.long(), ancestor_mask(parents).flatten().long()
    _check_cu_nodes(parents, cu_nodes)
    bounds = cu_nodes.tolist()
    masks = [ancestor_mask(parents[s:e]).flatten() for s, e in itertools.pairwise(bounds)]
    return draft_tokens.long(), torch.cat(masks).long()


def to_vllm_linear(draft_tokens: torch.Tensor, parents: torch.Tensor, node_scores: torch.Tensor | None = None) -> torch.Tensor:
    """vLLM's linear draft: the tokens of :func:`best_path` without the root (int64[depth])."""
    if draft_tokens.shape != parents.shape:
        raise ValueError(f"draft_tokens must have parents' shape {tuple(parents.shape)}, got {tuple(draft_tokens.shape)}")
    return draft_tokens.long()[best_path(parents, node_scores)[1:]]
