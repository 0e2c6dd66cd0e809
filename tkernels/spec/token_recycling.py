"""Token Recycling drafter (Luo et al. 2024, "Turning Trash into Treasure").

The target's own verification logits are "trash" after a step: their top-k at every tree node
say which tokens the target expects after that node's token. Token Recycling keeps them in an
adjacency matrix ``[V, k]`` (row t = the target's latest top-k after token t, best first),
shared by all requests and kept across them, and drafts by walking a tree shape through it:
node i's token is ``adjacency[token of parents[i], ranks[i]]``. Batched: one gather per tree
level for the whole batch, no per-token Python loop.
"""

from __future__ import annotations

import torch

from .tree import TreeShape

__all__ = ["TokenRecycling"]


class TokenRecycling:
    """Adjacency-matrix drafter; ``adjacency`` is int32 ``[vocab_size, k]`` (V * k * 4 bytes).

    A row never written by :meth:`update` holds tokens 0..k-1: valid ids, merely unlikely
    guesses that verification rejects.
    """

    def __init__(self, vocab_size: int, k: int = 8, device: torch.device | str = "cpu"):
        if vocab_size < 1 or not 1 <= k <= vocab_size:
            raise ValueError(f"need vocab_size >= 1 and 1 <= k <= vocab_size, got vocab_size={vocab_size}, k={k}")
        self.k = k
        self.adjacency = torch.arange(k, dtype=torch.int32, device=device).repeat(vocab_size, 1)

    @property
    def vocab_size(self) -> int:
        return self.adjacency.shape[0]

    @property
    def memory_bytes(self) -> int:
        """Size of the adjacency matrix: vocab_size * k * 4 bytes (e.g. 128256 * 8 * 4 = 4.1 MB)."""
        return self.adjacency.numel() * self.adjacency.element_size()

    def draft(self, last_tokens: torch.Tensor, shape: TreeShape):
        """Fill ``shape`` from every request's last committed token.

        Returns the ragged batch ``(draft_tokens int64[B*n], parents int32[B*n], cu_nodes
        int32[B+1])``, every request drafting the same shape, node 0 = its last token.
        """
        if last_tokens.dim() != 1 or last_tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"last_tokens must be a 1-D integer tensor [B], got {tuple(last_tokens.shape)} {last_tokens.dtype}")
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

    def update(self, logits: torch.Tensor, draft_tokens: torch.Tensor) -> None:
        """Recycle verification logits at ALL tree nodes: row ``draft_tokens[i]`` := top-k of ``logits[i]``.

        A token drafted at several nodes of one step keeps one of their top-k lists.
        """
        if logits.dim() != 2 or logits.shape[1] != self.vocab_size:
            raise ValueError(f"logits must be [total_nodes, {self.vocab_size}], got {tuple(logits.shape)}")
        if draft_tokens.shape != logits.shape[:1]:
            raise ValueError(f"draft_tokens must be [{logits.shape[0]}] like logits' rows, got {tuple(draft_tokens.shape)}")
        self.recycle_topk(logits.topk(self.k, dim=-1).indices, draft_tokens)

    def recycle_topk(self, topk_ids: torch.Tensor, draft_tokens: torch.Tensor) -> None:
        """:meth:`update` for callers that keep only the target's top-k ids (``[nodes, k]``,
        best first), not whole logits rows."""
        if topk_ids.dim() != 2 or topk_ids.shape != (draft_tokens.numel(), self.k):
            raise ValueError(f"topk_ids must be [{draft_tokens.numel()}, {self.k}], got {tuple(topk_ids.shape)}")
        self.adjacency[draft_tokens.to(self.adjacency.device).long()] = topk_ids.to(self.adjacency.device, torch.int32)

    def candidate_ranks(self, parent_tokens: torch.Tensor, next_tokens: torch.Tensor) -> torch.Tensor:
        """Rank of ``next_tokens[i]`` in row ``parent_tokens[i]`` (-1 when not among the k).

        Called before :meth:`update` on an accepted path (+ bonus), it says which candidate rank
        the target chose at each depth, the observation the dynamic tree policy learns from.
        """
        rows = self.adjacency[parent_tokens.to(self.adjacency.device).long()]
        hit = rows == next_tokens.to(self.adjacency.device).unsqueeze(-1)
        rank = hit.int().argmax(-1)
        return torch.where(hit.any(-1), rank, torch.full_like(rank, -1))
