"""The drafters' data: :class:`DraftTree` (one request's draft) and :class:`RetrievalCalibration`
(the acceptance estimates of retrieval candidates); :mod:`tkernels.spec.drafters` re-exports both."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tkernels.checks import real

__all__ = ["DraftTree", "RetrievalCalibration"]


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
        """Learn from tested candidates: their ``(depth, match length, share)`` and whether the
        target picked them. One decay per call."""
        if len(features) != len(accepted):
            raise ValueError(f"accepted: one per feature tuple, got {len(accepted)} for {len(features)}")
        self.tested *= self.decay
        self.accepted *= self.decay
        if not len(features):
            return
        # The cells of all candidates at once (a server's step tests ~1000): cell()'s bins, vectorised.
        f = np.asarray(features, dtype=np.float64).reshape(-1, 3)
        d = np.maximum(np.searchsorted(self.DEPTH_BINS, f[:, 0], side="right") - 1, 0)
        m = np.maximum(np.searchsorted(self.MATCH_BINS, f[:, 1], side="right") - 1, 0)
        s = np.where(f[:, 2] >= 1, 0, np.where(f[:, 2] >= 0.5, 1, 2))
        flat = (d * len(self.MATCH_BINS) + m) * self.SHARE_BINS + s
        size = self.tested.numel()
        self.tested += torch.from_numpy(np.bincount(flat, minlength=size).astype(np.float64)).view_as(self.tested)
        ok = np.asarray(accepted, dtype=np.float64)
        self.accepted += torch.from_numpy(np.bincount(flat, weights=ok, minlength=size)).view_as(self.accepted)
