"""The ``dynamic`` method of :class:`~tkernels.spec.drafters.TreeDrafter`: Token Recycling under
the online per-(depth, rank) acceptance estimates of :class:`~tkernels.spec.tree_policy.DynamicTreePolicy`.

A node's estimate is ``p[depth, rank]`` (the chance that the target picks its parent's
``rank``-th recycled candidate), its score the product along its path. Two kinds of tree:

* *policy trees* (no ``candidates``): every request's tree is the policy's best
  ``num_nodes``-node tree (:func:`~tkernels.spec.tree_policy.greedy_tree` over the estimates),
  filled from the adjacency, every node drafted: a fixed node count, as SGLang's NGRAM buffers
  need. The policy learns from every committed depth.
* *scored trees* (a ``candidates`` shape, e.g. the TR template's fan-out): the shape filled
  from the adjacency, scores zeroed below any node whose adjacency row the target never wrote
  (such rows hold placeholder tokens 0..k-1), then the best ``num_nodes`` nodes with a positive
  score (a tree: a parent scores at least its children), or with ``path`` the best path cut at
  its first zero-score node (a linear draft, possibly empty). The policy learns only through
  written rows: placeholders say nothing about recycled ones.
"""

from __future__ import annotations

import torch

from ..draft_tree import DraftTree
from ..token_recycling import TokenRecycling
from ..tree import TreeShape, best_path, depths
from ..tree_policy import DynamicTreePolicy, greedy_tree

__all__ = ["DynamicDrafting"]


class DynamicDrafting:
    """State and rules of the ``dynamic`` method (module doc): the policy, and which adjacency
    rows the target has written (``recycled``, bool [vocab], on the adjacency's device)."""

    def __init__(self, recycling: TokenRecycling, max_depth: int | None = None, candidates: TreeShape | None = None,
                 path: bool = False):
        if path and candidates is None:
            raise ValueError("path: the best path is taken from a candidates shape; give candidates")
        self.recycling, self.candidates, self.path = recycling, candidates, path
        # the policy's default depth builds trees of MAX_TREE_NODES
        self.policy = DynamicTreePolicy(k=recycling.k, **({} if max_depth is None else {"max_depth": max_depth}))
        self.recycled = torch.zeros(recycling.vocab_size, dtype=torch.bool, device=recycling.adjacency.device)
        if candidates is not None:
            node_depths = depths(candidates.parents).long()
            self._levels = [(node_depths == d).nonzero().flatten() for d in range(1, int(node_depths.max()) + 1)]
            self._node_depths = node_depths

    def policy_shape(self, num_nodes: int) -> TreeShape:
        """The policy's best ``num_nodes``-node tree under its current estimates."""
        return greedy_tree(self.policy.accept_probs(), num_nodes)[0]

    def draft(self, roots: torch.Tensor, num_nodes: int) -> list[DraftTree]:
        """One tree per root (int64 [B], the requests' last committed tokens); module doc."""
        if self.candidates is None:
            shape = self.policy_shape(num_nodes)
            tokens, parents, _ = self.recycling.draft(roots, shape)
            n = len(shape)
            return [DraftTree(tokens[b * n:(b + 1) * n], parents[b * n:(b + 1) * n]) for b in range(roots.numel())]
        tree_tokens, _, _ = self.recycling.draft(roots, self.candidates)
        tree_tokens = tree_tokens.view(roots.numel(), -1)
        scores = self._node_scores(tree_tokens)
        shape_parents = self.candidates.parents.long()
        trees = []
        for b in range(roots.numel()):
            nodes = self._select(scores[b], num_nodes)
            # the kept nodes hold every parent, ascending: a parent's local index is its rank there
            local = torch.searchsorted(nodes, shape_parents[nodes[1:]])
            trees.append(DraftTree(tree_tokens[b, nodes], torch.cat([local.new_tensor([-1]), local]).int(),
                                   scores[b, nodes].double()))
        return trees

    def _node_scores(self, tree_tokens: torch.Tensor) -> torch.Tensor:
        """[B, n] path probabilities, zero below any node whose adjacency row is unwritten."""
        p = self.policy.accept_probs().float()
        depth, ranks = self._node_depths, self.candidates.ranks.long()
        node_p = torch.ones(len(self.candidates))
        node_p[1:] = p[depth[1:] - 1, ranks[1:]]
        scores = torch.ones_like(tree_tokens, dtype=torch.float32)
        parents = self.candidates.parents.long()
        for level in self._levels:  # parents' scores are final before their children's
            par = parents[level]
            scores[:, level] = scores[:, par] * node_p[level] * self.recycled[tree_tokens[:, par]]
        return scores

    def _select(self, scores: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """The drafted nodes of the candidates (root first, ascending = BFS order) from one row's scores."""
        if self.path:  # the best path, cut at its first zero-score node (whose descendants are zero)
            path = best_path(self.candidates.parents, scores)
            return path[scores[path] > 0]
        # Stable sort: a parent scores at least its children and comes first, so ties keep the
        # set closed under ancestors.
        best = scores.argsort(descending=True, stable=True)[:num_nodes]
        return best[scores[best] > 0].sort().values

    def observe_ranks(self, parent_tokens: torch.Tensor, next_tokens: torch.Tensor, num_observed: torch.Tensor) -> None:
        """Teach the policy which candidate rank the target chose at each committed depth:
        ``next_tokens[b, j]`` followed ``parent_tokens[b, j]`` (int [B, W]; the first
        ``num_observed[b]`` entries of row b count), read against the rows the drafts were made
        from (call before this step's :meth:`recycle`). Scored trees: a request's observations
        stop at its first unwritten row."""
        ranks = self.recycling.candidate_ranks(parent_tokens.flatten(), next_tokens.flatten()).view(parent_tokens.shape)
        if self.candidates is not None:
            known = self.recycled[parent_tokens.to(self.recycled.device).long()].cpu()
            counted = torch.arange(known.shape[1]) < num_observed.cpu().long()[:, None]
            num_observed = (known & counted).int().cumprod(1).sum(1)
        self.policy.update(ranks, num_observed)

    def recycle(self, tokens: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor | None = None) -> None:
        """Row ``tokens[i]`` := the target's top-k after it (:meth:`TokenRecycling.recycle_topk`), now written."""
        self.recycling.recycle_topk(topk_ids, tokens, topk_probs)
        self.recycled[tokens.to(self.recycled.device).long()] = True
