"""Tree shapes (:class:`TreeShape`: ``parents`` and each node's candidate rank), their
constructors and Token Recycling's templates; :mod:`tkernels.spec.tree` re-exports them."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from tkernels.checks import integer

from .tree_contract import TOP_K, depths, validate_parents

__all__ = [
    "TreeShape",
    "chain",
    "from_child_counts",
    "from_rank_paths",
    "from_widths",
    "token_recycling_template",
    "token_recycling_tree",
    "TR_80_WIDTHS",
]


# --- shapes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeShape:
    """A tree (``parents``) whose nodes are ranked candidates of their parent (``ranks``, root -1)."""

    parents: torch.Tensor  # int32[n]
    ranks: torch.Tensor  # int32[n]

    def __post_init__(self):
        validate_parents(self.parents)
        if self.ranks.shape != self.parents.shape or int(self.ranks[0]) != -1 or bool((self.ranks[1:] < 0).any()):
            raise ValueError("ranks must match parents' shape, be -1 at the root and >= 0 elsewhere")

    def __len__(self) -> int:
        return self.parents.numel()

    @cached_property
    def levels(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every depth >= 1 (contiguous in BFS order)."""
        ends = torch.bincount(depths(self.parents.cpu()).long()).cumsum(0).tolist()
        return list(itertools.pairwise(ends))

    def truncate(self, n: int) -> TreeShape:
        """The first ``n`` nodes in BFS order (always a tree, since ``parents[i] < i``)."""
        if not 1 <= integer("n", n) <= len(self):
            raise ValueError(f"n must be in [1, {len(self)}], got {n}")
        return TreeShape(self.parents[:n].clone(), self.ranks[:n].clone())

    def to(self, device) -> TreeShape:
        return TreeShape(self.parents.to(device), self.ranks.to(device))


def from_child_counts(child_counts: Sequence[int]) -> TreeShape:
    """Shape from each node's number of children (integers >= 0), nodes in BFS order; children
    take ranks 0..c-1."""
    parents, ranks = [-1], [-1]
    for node, count in enumerate(child_counts):
        count = integer(f"child_counts[{node}]", count, minimum=0)
        if node >= len(parents):
            raise ValueError(f"child_counts names node {node} but only {len(parents)} nodes exist before it")
        parents += [node] * count
        ranks += list(range(count))
    return TreeShape(torch.tensor(parents, dtype=torch.int32), torch.tensor(ranks, dtype=torch.int32))


def from_rank_paths(rank_paths: Sequence[Sequence[int]]) -> TreeShape:
    """Shape from Medusa-style rank paths (``(0,)``, ``(0, 1)``, ...; every prefix must be listed).

    Nodes are ordered by depth, then parent, then rank, which is BFS order.
    """
    ranked = [tuple(integer(f"rank_paths[{i}]", r, minimum=0) for r in p) for i, p in enumerate(rank_paths)]
    paths = sorted({p for p in ranked if p}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents, ranks = [-1], [-1]
    for p in paths:
        if p[:-1] not in index:
            raise ValueError(f"rank_paths has {p} but not its prefix {p[:-1]}")
        index[p] = len(parents)
        parents.append(index[p[:-1]])
        ranks.append(p[-1])
    # sorting by (len, path) orders same-depth nodes by their parents' paths, i.e. by parent index
    return TreeShape(torch.tensor(parents, dtype=torch.int32), torch.tensor(ranks, dtype=torch.int32))


def chain(n: int) -> TreeShape:
    """A linear draft of ``n - 1`` tokens (rank 0 at every depth)."""
    n = integer("n", n, minimum=1)
    return from_child_counts([1] * (n - 1))


# Token Recycling's static tree (Luo et al. 2024, "Turning Trash into Treasure"), written from
# the paper's description: 80 nodes drawn from the adjacency matrix's top-k (k = 8) candidates,
# wide at shallow depths and narrowing with depth. Our reading, as a rule: a node at depth d
# whose root path used candidate ranks summing to s gets max(0, W[d] - s) children (ranks
# 0, 1, ...), so the fan-out falls with depth and with how unlikely the path already is. With
# W = TR_80_WIDTHS the tree has exactly 80 nodes counting the root (79 draft tokens; 80 query
# tokens in the verify step): 1, 8, 21, 20, 15, 6, 7, 1, 1 nodes at depths 0..8.
TR_80_WIDTHS: tuple[int, ...] = (8, 6, 4, 3, 2, 2, 1, 1)


def from_widths(widths: Sequence[int]) -> TreeShape:
    """Shape from the rank-sum fan-out rule above: max(0, widths[d] - rank sum) children."""
    widths = [integer(f"widths[{d}]", w, minimum=0) for d, w in enumerate(widths)]
    child_counts, rank_sums, node_depths = [], [0], [0]
    node = 0
    while node < len(rank_sums):  # BFS: children are appended behind the queue's tail
        d, s = node_depths[node], rank_sums[node]
        count = max(0, widths[d] - s) if d < len(widths) else 0
        child_counts.append(count)
        rank_sums += [s + r for r in range(count)]
        node_depths += [d + 1] * count
        node += 1
    return from_child_counts(child_counts)


def token_recycling_template() -> TreeShape:
    """Token Recycling's static 80-node tree (see :data:`TR_80_WIDTHS`)."""
    return from_widths(TR_80_WIDTHS)


def token_recycling_tree(min_nodes: int = 1, depth: int | None = None, k: int = TOP_K) -> TreeShape:
    """Token Recycling's fan-out rule past the paper's tree: :data:`TR_80_WIDTHS` widened by the
    smallest ``e >= 0`` (every width + e, at most ``k``, the adjacency's columns) that gives at
    least ``min_nodes`` nodes, root included. One rule for every tree past 80 nodes (e = 1: 173
    nodes, e = 2: 392), so wider trees keep the template's shape instead of a new one.

    Args:
        min_nodes: the fewest nodes wanted, >= 1 (the template itself up to 80).
        depth: if given, the tree is cut or extended to exactly ``depth`` levels below the
            root; the levels past the template's 8 are the top-1 chain alone (never widened).
        k: the largest fan-out (adjacency columns), >= 1.

    Returns:
        :class:`TreeShape`, BFS order, ranks < ``k``.
    """
    integer("min_nodes", min_nodes, minimum=1)
    integer("k", k, minimum=1)
    if depth is not None:
        integer("depth", depth, minimum=1)
    base = TR_80_WIDTHS if depth is None else TR_80_WIDTHS[:depth]
    chain_tail = () if depth is None else (1,) * max(0, depth - len(TR_80_WIDTHS))  # not widened: one chain
    for extra in range(k):
        shape = from_widths(tuple(min(k, w + extra) for w in base) + chain_tail)
        if len(shape) >= min_nodes:
            return shape
    raise ValueError(f"min_nodes: the rule's widest tree at k = {k} has {len(shape)} nodes, got {min_nodes}")
