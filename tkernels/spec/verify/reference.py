"""Plain-PyTorch references of tree verification (vectorised over requests): the same inputs and
outputs as the kernels, float64 probabilities."""

from __future__ import annotations

import torch

from tkernels.checks import fail, require
from tkernels.spec.tree import _check_cu_nodes
from tkernels.spec.verify.inputs import (
    ACCEPT_COLUMN,
    DRAW_COLUMN,
    _check_sampling,
    _check_tree_batch,
    _children,
    _describe,
    _processing,
    _processing_checks,
)


def target_probs(logits, cu_nodes, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """The processed target distribution p(v) of every node, float64[total_nodes, vocab]
    (one-hot at the first maximum for greedy requests). ``logits`` [total_nodes, vocab]
    floating point, ``cu_nodes`` int32[B+1] (every request at least one node), the sampling
    parameters as :func:`verify_sampling` takes them."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point() or not logits.shape[1]:
        fail("logits", f"must be a floating-point [total_nodes, vocab] tensor with vocab > 0, got {_describe(logits)}")
    _check_cu_nodes(logits[:, 0], cu_nodes)
    require(*_processing_checks(cu_nodes.numel() - 1, logits.device, temperature, top_k, top_p))
    inv_temp, thr, greedy = _processing(logits, cu_nodes, temperature, top_k, top_p)
    x = logits.float()
    scaled = torch.where(x >= thr[:, None], x * inv_temp[:, None], float("-inf"))
    probs = torch.softmax(scaled.double(), dim=-1)
    if logits.shape[0]:
        one_hot = torch.nn.functional.one_hot(x.argmax(-1), logits.shape[1]).double()
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _inverse_cdf_reference(probs: torch.Tensor, u: torch.Tensor):
    """(token, margin): the kernels' inverse-CDF rule; margin = distance of the target to the
    nearest cumulative boundary, relative to the total (small = rounding may flip the token)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = u.double()[:, None] * total
    token = (cdf <= target).sum(-1)
    last_positive = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    token = torch.where(token < probs.shape[1], token, last_positive)
    margin = ((cdf - target).abs() / total).amin(-1)
    return token, margin


class _Walk:
    """Vectorised per-request walk state shared by the references."""

    def __init__(self, draft_tokens, parents, cu_nodes, width):
        self.starts = cu_nodes[:-1].long()
        batch, n = cu_nodes.numel() - 1, draft_tokens.numel()
        self.first_child, self.num_children = _children(parents, cu_nodes)
        self.max_children = int(self.num_children.max()) if n else 0
        self.draft_tokens = draft_tokens
        self.cur = self.starts.clone()
        self.alive = torch.ones(batch, dtype=torch.bool, device=parents.device)
        self.count = torch.zeros(batch, dtype=torch.long, device=parents.device)
        self.tokens = torch.full((batch, width), -1, dtype=torch.int64, device=parents.device)
        self.nodes = torch.full((batch, width), -1, dtype=torch.int32, device=parents.device)
        self.nodes[:, 0] = 0
        self.margin = torch.full((batch,), float("inf"), dtype=torch.float64, device=parents.device)

    def step(self, step: int, child: torch.Tensor, bonus: torch.Tensor) -> None:
        """Record one visited node: descend to ``child`` (global, -1: none) or stop with ``bonus``."""
        advance = self.alive & (child >= 0)
        rows = self.alive.nonzero().flatten()
        token = torch.where(advance, self.draft_tokens[child.clamp(min=0)], bonus)
        self.tokens[rows, step] = token[rows]
        grow = advance.nonzero().flatten()
        if grow.numel():
            self.nodes[grow, step + 1] = (child - self.starts)[grow].int()
        self.count += advance.long()
        self.cur = torch.where(advance, child, self.cur)
        self.alive = advance

    def children(self, r: int) -> torch.Tensor:
        """Global index of the current nodes' r-th child (-1 where there is none)."""
        c = self.first_child[self.cur] + r
        return torch.where(r < self.num_children[self.cur], c, -1)

    def result(self):
        return self.tokens, self.nodes, (self.count + 1).int()


def _walk_reference(node_token, node_margin, draft_tokens, parents, cu_nodes, width):
    """Descend to the first child whose token is the node's target token (greedy / target-only)."""
    walk = _Walk(draft_tokens, parents, cu_nodes, width)
    for step in range(width):
        if not bool(walk.alive.any()):
            break
        target = node_token[walk.cur]
        walk.margin = torch.where(walk.alive, torch.minimum(walk.margin, node_margin[walk.cur]), walk.margin)
        child = torch.full_like(walk.cur, -1)
        for r in reversed(range(walk.max_children)):  # reversed: the first matching child wins
            c = walk.children(r)
            hit = (c >= 0) & (draft_tokens[c.clamp(min=0)] == target)
            child = torch.where(hit, c, child)
        walk.step(step, child, target)
    return walk


def verify_greedy_reference(logits, draft_tokens, parents, cu_nodes, *, checked=None):
    """Plain-PyTorch :func:`verify_greedy` (same inputs, ``checked`` too; same outputs)."""
    width = _check_tree_batch(logits, draft_tokens, parents, cu_nodes, checked=checked).width
    # The first maximum, as argmax (ties and NaN alike, tested); max(dim)'s CPU kernel is 3-5x
    # faster than argmax's (fp32 / bf16 rows of a 49k vocabulary), the one vocabulary-wide pass
    # of every verified node on vLLM-CPU.
    argmax = logits.max(-1).indices if logits.numel() else draft_tokens.clone()
    no_margin = torch.full(argmax.shape, float("inf"), dtype=torch.float64, device=logits.device)
    return _walk_reference(argmax, no_margin, draft_tokens, parents, cu_nodes, width).result()


def _sampling_reference(logits, draft_tokens, parents, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, width):
    """The walk behind :func:`verify_sampling_reference` on validated inputs (``width`` = max depth + 1)."""
    probs = target_probs(logits, cu_nodes, temperature, top_k, top_p)
    if draft_probs is None:
        token, margin = _inverse_cdf_reference(probs, uniforms[:, DRAW_COLUMN])
        return _walk_reference(token, margin, draft_tokens, parents, cu_nodes, width)
    walk = _Walk(draft_tokens, parents, cu_nodes, width)
    rows = torch.arange(walk.cur.numel(), device=logits.device)
    for step in range(width):
        if not bool(walk.alive.any()):
            break
        p_node = probs[walk.cur]
        p, q = p_node, draft_probs[walk.cur].double()
        child = torch.full_like(walk.cur, -1)
        for r in range(walk.max_children):
            c = walk.children(r)
            tested = walk.alive & (c >= 0) & (child < 0)
            t = draft_tokens[c.clamp(min=0)]
            u = uniforms[c.clamp(min=0), ACCEPT_COLUMN].double()
            p_t, q_t = p[rows, t], q[rows, t]
            gap = (u * q_t - p_t).abs() / torch.maximum(u * q_t, p_t).clamp(min=1e-300)  # relative, like rounding
            walk.margin = torch.where(tested, torch.minimum(walk.margin, gap), walk.margin)
            accept = tested & (u * q_t < p_t)
            child = torch.where(accept, c, child)
            reject = (tested & ~accept)[:, None]
            residual = (p - q).clamp(min=0)
            residual_total = residual.sum(-1, keepdim=True)
            new_p = torch.where(residual_total > 0, residual / residual_total.clamp(min=1e-300), p_node)
            new_q = q.clone()
            new_q[rows, t] = 0
            q_total = new_q.sum(-1, keepdim=True)
            new_q = torch.where(q_total > 0, new_q / q_total.clamp(min=1e-300), 0.0)
            p, q = torch.where(reject, new_p, p), torch.where(reject, new_q, q)
        bonus, margin = _inverse_cdf_reference(p, uniforms[walk.cur, DRAW_COLUMN])
        stops = walk.alive & (child < 0)
        walk.margin = torch.where(stops, torch.minimum(walk.margin, margin), walk.margin)
        walk.step(step, child, bonus)
    return walk


def verify_sampling_reference(
    logits, draft_tokens, parents, cu_nodes, temperature, top_k=None, top_p=None, *, uniforms, draft_probs=None,
    checked=None,
):
    """Plain-PyTorch :func:`verify_sampling` on the same ``uniforms`` (float64 probabilities;
    ``checked`` as the kernels')."""
    shape = _check_tree_batch(logits, draft_tokens, parents, cu_nodes, checked=checked, finite=checked is None)
    if uniforms is None:
        fail("uniforms", "the reference takes the kernels' uniforms: a float32[total_nodes, 2] tensor")
    _check_sampling(logits, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, shape.row_max,
                    checked is not None)
    width = shape.width
    return _sampling_reference(logits, draft_tokens, parents, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, width).result()
