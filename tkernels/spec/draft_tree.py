"""The drafters' data: :class:`DraftTree` (one request's draft), :class:`DraftBatch` (a step's
drafts as one ragged batch, what a server's step carries from drafting to learning) and
:class:`RetrievalCalibration` (the acceptance estimates of retrieval candidates);
:mod:`tkernels.spec.drafters` re-exports the three."""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tkernels.checks import real

__all__ = ["DraftBatch", "DraftTree", "RetrievalCalibration", "offsets", "ragged_arange"]


@dataclass
class DraftTree:
    """One request's draft: a tree in BFS order (the ``parents`` contract of :mod:`tkernels.spec.tree`).

    ``tokens`` int64 [n] (node 0 = the last committed token), ``parents`` int32 [n]; ``scores``
    float64 [n], the estimated probability that the target accepts each node's path (root 1;
    None for methods without estimates: ``pld``, ``tr_static``); ``tr_probs`` float32 [n], the
    stored Token Recycling probability of the nodes TR proposed (NaN elsewhere; None without
    TR); ``retrieval`` per node the retrieval features ``(depth, match length, share)`` of the
    nodes retrieval proposed (None elsewhere; None without retrieval); ``key`` the request's id
    given to :meth:`TreeDrafter.draft`.
    """

    tokens: torch.Tensor
    parents: torch.Tensor
    scores: torch.Tensor | None = None
    tr_probs: torch.Tensor | None = None
    retrieval: Sequence[tuple[int, int, float] | None] | None = None
    key: Hashable | None = None

    def __len__(self) -> int:
        return self.tokens.numel()

    def select(self, nodes: torch.Tensor) -> DraftTree:
        """The sub-tree of ``nodes`` (int64, ascending, holding node 0 and every kept node's
        parent), still in BFS order: dropping nodes keeps the order of the rest."""
        nodes = nodes.long().cpu()
        new = torch.full((len(self),), -1, dtype=torch.int64)
        new[nodes] = torch.arange(nodes.numel())
        old_parents = self.parents.long()[nodes]
        parents = torch.where(old_parents >= 0, new[old_parents.clamp(min=0)], -1)
        if bool((parents[1:] < 0).any()) or int(nodes[0]) != 0:
            raise ValueError("nodes: must hold the root and the parent of every kept node")
        return DraftTree(self.tokens[nodes], parents.int(), None if self.scores is None else self.scores[nodes],
                         None if self.tr_probs is None else self.tr_probs[nodes], _take(self.retrieval, nodes), self.key)


def features_of(features, nodes: torch.Tensor) -> list:
    """The retrieval features of ``nodes`` as a list (:func:`_take`, then read at once)."""
    taken = _take(features, nodes)
    return [] if taken is None else taken.tolist() if hasattr(taken, "tolist") else list(taken)


def _take(features, nodes: torch.Tensor):
    """The retrieval features of ``nodes``: a compiled draft's lazy view keeps being one
    (``take``, an array gather), a list is indexed node by node."""
    if features is None:
        return None
    if hasattr(features, "take"):
        return features.take(nodes.numpy())
    return [features[i] for i in nodes.tolist()]


class RetrievalCalibration:
    """Acceptance estimates of retrieval candidates, learned online.

    Cells: the candidate's depth (1, 2, 3-4, 5-8, 9+), the length of the match its context
    started from (1, 2, 3-4, 5-8, 9-16, 17+ tokens) and its share of the context's earlier
    continuations (1, [1/2, 1), below 1/2). Per cell decayed counts of tested candidates (their
    parent was accepted) and accepted ones; the estimate is their ratio after ``prior_weight``
    pseudo-tests at the prior ``share * min(0.95, 0.35 + 0.12 (depth - 1) + 0.08 (match - 1))``
    (cell lower edges): a copy is likelier to go on the longer it has gone on and the longer
    the match it started from. That rule was read off replays of retrieval drafts on greedy
    SmolLM2 answers to held-out dev questions (the 3rd and 4th of each category, not the
    benchmark's first two): depth 1 after a 1-token match accepted 34%, depth 5-8 about 80%.
    Every :meth:`record` multiplies the counts by ``decay``.
    """

    DEPTH_BINS = (1, 2, 3, 5, 9)  # lower edges
    MATCH_BINS = (1, 2, 3, 5, 9, 17)
    SHARE_BINS = 3

    def __init__(self, prior_weight: float = 2.0, decay: float = 0.995):
        if real("decay", decay, positive=True) > 1:
            raise ValueError(f"decay: must be in (0, 1], got {decay}")
        real("prior_weight", prior_weight, positive=True)
        self.prior_weight, self.decay = prior_weight, decay
        shape = (len(self.DEPTH_BINS), len(self.MATCH_BINS), self.SHARE_BINS)
        self.tested = torch.zeros(shape, dtype=torch.float64)
        self.accepted = torch.zeros(shape, dtype=torch.float64)
        depth = torch.tensor(self.DEPTH_BINS, dtype=torch.float64)[:, None]
        match = torch.tensor(self.MATCH_BINS, dtype=torch.float64)[None, :]
        self._prior = (0.35 + 0.12 * (depth - 1) + 0.08 * (match - 1)).clamp(max=0.95)  # [depth, match] at share 1

    @staticmethod
    def _bin(value: int, edges: tuple[int, ...]) -> int:
        return max(i for i, edge in enumerate(edges) if value >= edge) if value >= edges[0] else 0

    def cell(self, depth: int, match: int, share: float) -> tuple[int, int, int]:
        return (self._bin(depth, self.DEPTH_BINS), self._bin(match, self.MATCH_BINS),
                0 if share >= 1 else 1 if share >= 0.5 else 2)

    def accept_prob(self, share: float, context_len: int, support: int, depth: int) -> float:
        """Estimated chance that the target picks a candidate (its parent accepted);
        :meth:`SuffixAutomaton.continuations`' ``accept_prob`` (the match length is the
        context's length less the depth above the candidate)."""
        d, m, s = self.cell(depth, context_len - depth + 1, share)
        return float((self.accepted[d, m, s] + self.prior_weight * float(self._prior[d, m]) * share)
                     / (self.tested[d, m, s] + self.prior_weight))

    def record(self, features: Sequence[tuple[int, int, float]], accepted: Sequence[bool]) -> None:
        """Learn from tested candidates: their ``(depth, match length, share)`` (tuples, or a float
        array [n, 3]) and whether the target picked them. One decay per call."""
        if len(features) != len(accepted):
            raise ValueError(f"accepted: one per feature tuple, got {len(accepted)} for {len(features)}")
        tested, accepted_sums = self.tested.numpy(), self.accepted.numpy()  # in place: numpy's calls cost less
        tested *= self.decay
        accepted_sums *= self.decay
        if not len(features):
            return
        # The cells of all candidates at once (a server's step tests ~1000): cell()'s bins, vectorised.
        f = np.asarray(features, dtype=np.float64).reshape(-1, 3)
        d = np.maximum(np.searchsorted(self.DEPTH_BINS, f[:, 0], side="right") - 1, 0)
        m = np.maximum(np.searchsorted(self.MATCH_BINS, f[:, 1], side="right") - 1, 0)
        s = np.where(f[:, 2] >= 1, 0, np.where(f[:, 2] >= 0.5, 1, 2))
        flat = (d * len(self.MATCH_BINS) + m) * self.SHARE_BINS + s
        size = tested.size
        tested += np.bincount(flat, minlength=size).reshape(tested.shape)
        accepted_sums += np.bincount(flat, weights=np.asarray(accepted, dtype=np.float64), minlength=size).reshape(tested.shape)


def ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` without a Python loop."""
    starts, counts = np.asarray(starts, np.int64), np.asarray(counts, np.int64)
    return np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()), dtype=np.int64)


def offsets(sizes) -> np.ndarray:
    """Ragged offsets ``[0, cumsum(sizes)...]`` (int64 [len(sizes) + 1]) of per-row counts."""
    sizes = np.asarray(sizes, np.int64)
    cu = np.zeros(sizes.shape[0] + 1, np.int64)
    np.cumsum(sizes, out=cu[1:])
    return cu


class DraftBatch:
    """A step's drafts as one ragged batch: tree ``b``'s nodes are ``cu[b]:cu[b + 1]`` of every
    per-node field (the fields of :class:`DraftTree`, trees concatenated in order), so a server's
    step drafts, prices, hands over and learns its trees without a Python object per request.

    ``tokens`` int64 [N], ``parents`` int32 [N] (local indices, BFS), ``cu`` int64 numpy [B + 1];
    optional ``scores`` float64 [N], ``tr_probs`` float32 [N] (NaN where TR did not propose),
    ``retrieval`` the nodes' retrieval features (a compiled draft's lazy
    :class:`~tkernels.spec.drafting.compiled.Features`, or a list of tuples / None); ``keys`` the
    requests' ids; ``node_depths`` int64 numpy [N] when the drafter knows them (else computed
    once, on first use: :attr:`depths`). :meth:`trees` gives the :class:`DraftTree` views.
    """

    __slots__ = ("_depths", "cu", "keys", "parents", "retrieval", "scores", "tokens", "tr_probs")

    def __init__(self, tokens: torch.Tensor, parents: torch.Tensor, cu: np.ndarray, keys: Sequence[Hashable] | None = None,
                 scores: torch.Tensor | None = None, tr_probs: torch.Tensor | None = None, retrieval=None,
                 node_depths: np.ndarray | None = None):
        self.tokens, self.parents, self.cu = tokens, parents, cu
        self.keys = list(keys) if keys is not None else [None] * (cu.shape[0] - 1)
        self.scores, self.tr_probs, self.retrieval, self._depths = scores, tr_probs, retrieval, node_depths

    def __len__(self) -> int:
        return self.cu.shape[0] - 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.cu)

    @property
    def num_nodes(self) -> int:
        return int(self.cu[-1])

    @property
    def depths(self) -> np.ndarray:
        """Every node's depth (root 0), int64 numpy [N]."""
        if self._depths is None:
            from .tree import depths

            self._depths = depths(self.parents, torch.from_numpy(self.cu)).numpy().astype(np.int64)
        return self._depths

    def global_parents(self) -> np.ndarray:
        """Every node's parent as an index into the batch's nodes (-1 at the roots)."""
        parents = self.parents.numpy().astype(np.int64)
        return np.where(parents >= 0, parents + np.repeat(self.cu[:-1], self.sizes), -1)

    @classmethod
    def from_trees(cls, trees: Sequence[DraftTree]) -> DraftBatch:
        """One batch of ``trees`` (copies; fields a tree lacks are filled: NaN TR probabilities,
        no retrieval features)."""
        sizes = np.fromiter((len(t) for t in trees), np.int64, len(trees))
        return cls._join(trees, sizes.tolist(), sizes, [t.key for t in trees], None)

    @classmethod
    def cat(cls, batches: Sequence[DraftBatch]) -> DraftBatch:
        """The trees of ``batches``, in order, as one batch."""
        if len(batches) == 1:
            return batches[0]
        sizes = np.concatenate([b.sizes for b in batches]) if batches else np.zeros(0, np.int64)
        depths = np.concatenate([b.depths for b in batches]) if batches else None
        return cls._join(batches, [b.num_nodes for b in batches], sizes, [k for b in batches for k in b.keys], depths)

    @classmethod
    def _join(cls, parts, nodes: list[int], sizes: np.ndarray, keys: list, depths: np.ndarray | None) -> DraftBatch:
        """``parts`` (trees or batches, ``nodes[i]`` nodes each) concatenated field by field, into
        trees of ``sizes``; a field some part lacks is filled (NaN TR probabilities, no retrieval
        features), one every part lacks stays None."""
        if not sizes.size:
            return cls(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), offsets(sizes), [])
        tokens = torch.cat([p.tokens for p in parts])
        parents = torch.cat([p.parents for p in parts]).int()
        scores = None if any(p.scores is None for p in parts) else torch.cat([p.scores for p in parts])
        tr_probs = None if all(p.tr_probs is None for p in parts) else torch.cat(
            [p.tr_probs if p.tr_probs is not None else torch.full((m,), float("nan")) for p, m in zip(parts, nodes)])
        retrieval = None if all(p.retrieval is None for p in parts) else _cat_features(
            [p.retrieval if p.retrieval is not None else [None] * m for p, m in zip(parts, nodes)])
        return cls(tokens, parents, offsets(sizes), keys, scores, tr_probs, retrieval, depths)

    def trees(self) -> list[DraftTree]:
        """One :class:`DraftTree` per request (views of the batch's fields)."""
        sizes = self.sizes.tolist()
        fields = [f.split(sizes) if f is not None else [None] * len(sizes)
                  for f in (self.tokens, self.parents, self.scores, self.tr_probs)]
        bounds = self.cu.tolist()
        features = [None] * len(sizes) if self.retrieval is None else \
            [self.retrieval[a:b] if isinstance(self.retrieval, list) else self.retrieval.slice(a, b)
             for a, b in itertools.pairwise(bounds)]
        return [DraftTree(*row, retrieval, key) for *row, retrieval, key in zip(*fields, features, self.keys)]

    def _gather(self, nodes: np.ndarray, cu: np.ndarray, parents: torch.Tensor, keys) -> DraftBatch:
        index = torch.from_numpy(nodes)
        return DraftBatch(self.tokens[index], parents, cu, keys,
                          None if self.scores is None else self.scores[index],
                          None if self.tr_probs is None else self.tr_probs[index], _take(self.retrieval, index),
                          self.depths[nodes])

    def rows(self, rows: np.ndarray, counts: np.ndarray | None = None) -> DraftBatch:
        """Trees ``rows`` (indices, in that order), each cut to its first ``counts`` nodes (a BFS
        prefix: still a tree; None: whole)."""
        rows = np.asarray(rows, np.int64)
        sizes = self.sizes[rows] if counts is None else np.asarray(counts, np.int64)
        if rows.shape[0] == len(self) and (rows == np.arange(len(self))).all() and (sizes == self.sizes).all():
            return self  # every tree, whole (a server's common step): nothing to gather
        nodes = ragged_arange(self.cu[:-1][rows], sizes)
        return self._gather(nodes, offsets(sizes), self.parents[torch.from_numpy(nodes)], [self.keys[r] for r in rows])

    def select(self, keep: np.ndarray) -> DraftBatch:
        """The sub-trees of the nodes where ``keep`` (bool [N]) holds: every kept node's parent and
        every root must be kept; BFS order is kept (as :meth:`DraftTree.select`)."""
        keep = np.asarray(keep, bool)
        nodes = np.flatnonzero(keep)
        new = np.cumsum(keep) - 1  # a kept node's index in the new batch
        rows = np.repeat(np.arange(len(self)), self.sizes)[nodes]
        cu = offsets(np.bincount(rows, minlength=len(self)))
        parent = self.global_parents()[nodes]
        if not keep[self.cu[:-1][self.sizes > 0]].all() or not keep[parent[parent >= 0]].all():
            raise ValueError("keep: must hold every root and the parent of every kept node")
        parents = np.where(parent >= 0, new[np.maximum(parent, 0)] - cu[:-1][rows], -1)
        return self._gather(nodes, cu, torch.from_numpy(parents.astype(np.int32)), self.keys)


def _cat_features(parts: list):
    """Retrieval features of several trees as one: lazy arrays stay one (``cat``), lists concatenate."""
    arrays = [p for p in parts if hasattr(p, "cat")]
    if arrays:
        return type(arrays[0]).cat(parts)
    return [f for p in parts for f in p]
