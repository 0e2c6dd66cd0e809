"""Token Recycling drafter (Luo et al. 2024, "Turning Trash into Treasure").

The target's own verification logits are "trash" after a step: their top-k at every tree node
say which tokens the target expects after that node's token. Token Recycling keeps them in an
adjacency matrix ``[V, k]`` (row t = the target's latest top-k after token t, best first),
shared by all requests and kept across them, and drafts by walking a tree shape through it:
node i's token is ``adjacency[token of parents[i], ranks[i]]``. Batched: one gather per tree
level for the whole batch, no per-token Python loop.

Next to the ids it keeps the target's probabilities of them (softmax of the recycled logits):
the confidence EAGLE-2 reads from its draft head, here for free. :meth:`TokenRecycling.draft_best`
grows every request its own tree, best nodes first by the path product of those (calibrated)
probabilities, instead of one shape for the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tkernels.checks import fail, integer, probabilities, require

from .tree import TOP_K, TreeShape

__all__ = ["TokenRecycling", "top_k_probs"]


class TokenRecycling:
    """Adjacency-matrix drafter: ``adjacency`` int32 ``[vocab_size, k]`` and the target's
    probabilities of those ids ``probs`` fp16 ``[vocab_size, k]`` (V * k * (4 + 2) bytes).

    A row never written holds tokens 0..k-1 with probability 0: valid ids, merely unlikely
    guesses that verification rejects and that :meth:`draft_best` never expands.
    """

    def __init__(self, vocab_size: int, k: int = TOP_K, device: torch.device | str = "cpu"):
        vocab_size = integer("vocab_size", vocab_size, minimum=1)
        if not 1 <= integer("k", k, minimum=1) <= vocab_size:
            fail("k", f"must be in [1, vocab_size={vocab_size}], got {k}")
        self.k = k
        self.adjacency = torch.arange(k, dtype=torch.int32, device=device).repeat(vocab_size, 1)
        self.probs = torch.zeros(vocab_size, k, dtype=torch.float16, device=device)

    @property
    def vocab_size(self) -> int:
        return self.adjacency.shape[0]

    @property
    def memory_bytes(self) -> int:
        """Size of the state: vocab_size * k * (4 + 2) bytes (e.g. 128256 * 8 * 6 = 6.2 MB)."""
        return sum(t.numel() * t.element_size() for t in (self.adjacency, self.probs))

    def draft(self, last_tokens: torch.Tensor, shape: TreeShape):
        """Fill ``shape`` from every request's last committed token.

        Returns the ragged batch ``(draft_tokens int64[B*n], parents int32[B*n], cu_nodes
        int32[B+1])``, every request drafting the same shape, node 0 = its last token.
        """
        self._check_ids("last_tokens", last_tokens)
        if not isinstance(shape, TreeShape):
            fail("shape", f"must be a TreeShape (parents and ranks), got {type(shape).__name__}")
        if int(shape.ranks.max()) >= self.k:
            raise ValueError(f"shape uses rank {int(shape.ranks.max())} but the adjacency keeps k={self.k}")
        device = self.adjacency.device
        batch, n = last_tokens.numel(), len(shape)
        parents = shape.parents.to(device).long()
        ranks = shape.ranks.to(device).long()
        tokens = torch.empty(batch, n, dtype=torch.int64, device=device)
        tokens[:, 0] = last_tokens.to(device)
        for start, end in shape.levels:
            parent_tokens = tokens[:, parents[start:end]]
            tokens[:, start:end] = self.adjacency[parent_tokens, ranks[start:end]].long()
        cu_nodes = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device=device)
        return tokens.flatten(), shape.parents.to(device).repeat(batch), cu_nodes

    def draft_best(
        self,
        last_tokens: torch.Tensor,
        num_nodes: int,
        accept_prob: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
        max_depth: int = 16,
    ):
        """Every request's own best ``num_nodes``-node tree (root included) below its last token.

        A node's score is the product, along its root path, of ``accept_prob(stored probability,
        depth)`` (default: the stored probability itself); the tree is the ``num_nodes`` nodes of
        highest score over the adjacency's k-ary expansion (depth <= ``max_depth``). Scores do
        not grow along a path, so those nodes form a tree, and its expected accepted tokens
        ``1 + sum of non-root scores`` is the best of any tree of that size (the tests check it
        against exhaustive search). Batched as a beam: per depth, one gather of the frontier's
        rows and a top-(num_nodes - 1) of its children for all requests; the beam holds every
        node of the final tree (an ancestor of a kept node scores at least as high).

        Returns ``(tokens int64[B, n], parents int32[B, n], scores float64[B, n], probs
        float32[B, n])``: each row a tree in BFS order (local parents, node 0 = the last token,
        score 1, probability 1), ``probs`` the stored probability each node was scored from
        (what :meth:`ConfidenceTreePolicy.update` learns the calibration from). ``n`` is
        ``num_nodes``, fewer only when the expansion has fewer nodes. Ties between a parent and
        a child go to the parent (the shallower node), so any prefix of the score order that
        :meth:`ConfidenceTreePolicy.choose` keeps is a tree too.
        """
        self._check_ids("last_tokens", last_tokens)
        num_nodes, max_depth = integer("num_nodes", num_nodes, minimum=1), integer("max_depth", max_depth, minimum=1)
        device = self.adjacency.device
        batch, width = last_tokens.numel(), num_nodes - 1  # the beam: at most every kept node of a depth
        front_tokens = last_tokens.to(device).long()[:, None]
        front_scores = torch.ones(batch, 1, dtype=torch.float64, device=device)
        levels = []  # per depth: (tokens, scores, probs, parent slot in the previous level, rank), [B, w] each
        for depth in range(1, max_depth + 1):
            if width == 0:
                break
            probs = self.probs[front_tokens].float()  # [B, w, k]
            p = probs if accept_prob is None else accept_prob(probs, depth)
            scores = (front_scores[:, :, None] * p.double()).flatten(1)
            scores, slot = scores.topk(min(width, scores.shape[1]), dim=1)  # best first
            parent_slot, rank = slot // self.k, slot % self.k
            front_tokens = self.adjacency[front_tokens.gather(1, parent_slot), rank].long()
            front_scores = scores
            levels.append((front_tokens, scores, probs.flatten(1).gather(1, slot), parent_slot, rank))
            kept = torch.cat([lv[1] for lv in levels], 1)
            if kept.shape[1] >= width and bool((scores[:, 0] <= kept.topk(width, dim=1).values[:, -1]).all()):
                break  # no deeper node can beat the width-th best: scores only fall with depth
        # keep the best ``width`` beam nodes (shallower first on ties) ...
        all_scores = torch.cat([torch.ones(batch, 1, dtype=torch.float64, device=device)] + [lv[1] for lv in levels], 1)
        n = min(num_nodes, all_scores.shape[1])
        order = all_scores.argsort(dim=1, descending=True, stable=True)  # columns go by depth: ties to the shallower
        keep = torch.zeros_like(all_scores, dtype=torch.bool).scatter_(1, order[:, :n], True)
        # ... and lay them out in BFS order: per depth, by new parent index, then rank
        out_tokens = torch.empty(batch, n, dtype=torch.int64, device=device)
        out_parents = torch.empty(batch, n, dtype=torch.int64, device=device)
        out_scores = torch.empty(batch, n, dtype=torch.float64, device=device)
        out_probs = torch.empty(batch, n, dtype=torch.float32, device=device)
        out_tokens[:, 0], out_parents[:, 0], out_scores[:, 0], out_probs[:, 0] = last_tokens.to(device), -1, 1.0, 1.0
        placed = torch.ones(batch, dtype=torch.int64, device=device)  # nodes laid out so far
        index = torch.zeros(batch, 1, dtype=torch.int64, device=device)  # previous level's slots -> output index
        start = 1
        for tokens, scores, probs, parent_slot, rank in levels:
            chosen = keep[:, start:start + tokens.shape[1]]
            start += tokens.shape[1]
            parent = index.gather(1, parent_slot)
            key = torch.where(chosen, parent * self.k + rank, torch.iinfo(torch.int64).max)
            order = key.argsort(dim=1)
            place = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=device).expand_as(order))
            index = torch.where(chosen, placed[:, None] + place, -1)
            b, j = chosen.nonzero(as_tuple=True)
            at = index[b, j]
            out_tokens[b, at], out_parents[b, at], out_scores[b, at], out_probs[b, at] = tokens[b, j], parent[b, j], scores[b, j], probs[b, j]
            placed += chosen.sum(1)
        return out_tokens, out_parents.int(), out_scores, out_probs

    def update(self, logits: torch.Tensor, draft_tokens: torch.Tensor) -> None:
        """Recycle verification logits at ALL tree nodes: row ``draft_tokens[i]`` := top-k of
        ``logits[i]`` and their softmax probabilities.

        A token drafted at several nodes of one step keeps the last node's top-k list.
        """
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [total_nodes, {self.vocab_size}], got {tuple(logits.shape)}")
        if not isinstance(draft_tokens, torch.Tensor) or draft_tokens.shape != logits.shape[:1]:
            raise ValueError(f"draft_tokens must be [{logits.shape[0]}] like logits' rows, got {tuple(draft_tokens.shape)}")
        ids, probs = self.top_k(logits)
        self.recycle_topk(ids, draft_tokens, probs)

    def top_k(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What :meth:`update` keeps of logits ``[rows, vocab_size]``: :func:`top_k_probs` with this k."""
        return top_k_probs(logits, self.k)

    def recycle_topk(self, topk_ids: torch.Tensor, draft_tokens: torch.Tensor, topk_probs: torch.Tensor | None = None) -> None:
        """:meth:`update` for callers that keep only the target's top-k ids (``[nodes, k]``,
        best first), not whole logits rows; ``topk_probs`` (same shape) are their probabilities,
        0 when not given (unknown: :meth:`draft_best` does not expand those rows)."""
        if topk_ids.dim() != 2 or topk_ids.shape != (draft_tokens.numel(), self.k):
            raise ValueError(f"topk_ids must be [{draft_tokens.numel()}, {self.k}], got {tuple(topk_ids.shape)}")
        if topk_probs is not None and topk_probs.shape != topk_ids.shape:
            raise ValueError(f"topk_probs must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_probs.shape)}")
        self._check_ids("draft_tokens", draft_tokens)
        self._check_ids("topk_ids", topk_ids)
        if topk_probs is not None:
            require(probabilities("topk_probs", topk_probs))
        rows = draft_tokens.to(self.adjacency.device).long()
        # a token at several nodes keeps the last node's list (an index_put with repeated
        # indices keeps an unspecified one): the rule per-request overlays copy
        order = torch.arange(rows.numel(), device=rows.device)
        last = torch.full((self.vocab_size,), -1, dtype=torch.int64, device=rows.device).scatter_reduce_(0, rows, order, "amax")
        keep = last[rows] == order
        self.adjacency[rows[keep]] = topk_ids.to(self.adjacency.device, torch.int32)[keep]
        self.probs[rows[keep]] = 0.0 if topk_probs is None else topk_probs.to(self.probs.device, self.probs.dtype)[keep]

    def _check_ids(self, name: str, ids: torch.Tensor) -> None:
        """Token ids index the adjacency: outside [0, vocab) they would wrap or fail (and stored
        top-k ids outside it would leave the vocabulary in every later draft)."""
        if name == "last_tokens":
            _check_last_tokens(ids)
        elif not isinstance(ids, torch.Tensor) or ids.dtype.is_floating_point or ids.dtype.is_complex \
                or ids.dtype == torch.bool:
            fail(name, f"must be an integer tensor of token ids, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.numel() and not bool(((ids >= 0) & (ids < self.vocab_size)).all()):
            raise ValueError(f"{name}: token ids must lie in [0, {self.vocab_size}) (the vocab), "
                             f"got range [{int(ids.min())}, {int(ids.max())}]")

    def candidate_ranks(self, parent_tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Rank of ``next_tokens[i]`` in row ``parent_tokens[i]`` (-1 when not among the k).

        Called before :meth:`update` on an accepted path (+ bonus), it says which candidate rank
        the target chose at each depth, the observation the dynamic tree policy learns from.
        """
        self._check_ids("parent_tokens", parent_tokens)
        if not isinstance(next_tokens, torch.Tensor) or next_tokens.shape != parent_tokens.shape \
                or next_tokens.dtype.is_floating_point or next_tokens.dtype == torch.bool:
            fail("next_tokens", f"must be an integer tensor of parent_tokens' shape {tuple(parent_tokens.shape)}, "
                                f"got {getattr(next_tokens, 'shape', type(next_tokens).__name__)}")
        rows = self.adjacency[parent_tokens.to(self.adjacency.device).long()]
        hit = rows == next_tokens.to(self.adjacency.device).unsqueeze(-1)
        rank = hit.int().argmax(-1)
        return torch.where(hit.any(-1), rank, torch.full_like(rank, -1))


def top_k_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k ids of logits ``[rows, vocab]`` (int64 ``[rows, k]``, best first) and their
    softmax probabilities (float32 ``[rows, k]``): what Token Recycling keeps of a row."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        fail("logits", f"must be a floating-point [rows, vocab] tensor, got {getattr(logits, 'shape', type(logits))}")
    if integer("k", k, minimum=1) > logits.shape[1]:
        fail("k", f"must be at most the vocabulary ({logits.shape[1]}), got {k}")
    logits = logits.float()
    top = logits.topk(k, dim=-1)
    return top.indices, (top.values - logits.logsumexp(-1, keepdim=True)).exp()


def _check_last_tokens(last_tokens: torch.Tensor) -> None:
    if last_tokens.dim() != 1 or last_tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"last_tokens must be a 1-D integer tensor [B], got {tuple(last_tokens.shape)} {last_tokens.dtype}")
