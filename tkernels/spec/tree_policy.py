"""Hardware-aware dynamic sparse trees: pick each step's tree from live acceptance estimates.

Model: at depth d, the target's next token is the parent's rank-r candidate with probability
``p[d, r]`` (at most one rank matches, so siblings' events are disjoint). A node's *path
probability* is the product of ``p`` along its root path, and a tree's expected accepted
tokens per step is ``1 + sum of its nodes' path probabilities`` (the 1 is the bonus token).
Path probabilities shrink along a path, so the ``m`` nodes of highest path probability form
a tree, and it is the best ``m``-node tree: best-first expansion (Medusa / EAGLE-2) is exact
here; the tests check it against exhaustive search (Sequoia's DP solves the same problem).

Per step, with ``B`` requests drafting ``m`` nodes each, the policy picks ``m`` maximising
``E[accepted](m) / T(B * m)`` (plus other tokens sharing the step, see :meth:`choose`), where
``T`` is the GPU's verify-step time. On an H100 with a Llama-3-8B target a step costs x1.02 of a
1-token step at 64 tokens, x1.07 at 128, x1.22 at 256: at batch 1 trees of 128+ nodes pay, at
batch 32 a few nodes per request.
"""

from __future__ import annotations

import heapq
import math
from typing import Protocol

import numpy as np
import torch

from tkernels.checks import fail, integer, real

from .tree import TOP_K, TreeShape, from_rank_paths

__all__ = [
    "StepTime",
    "greedy_tree",
    "DynamicTreePolicy",
    "ConfidenceTreePolicy",
    "tested_nodes",
]

# ConfidenceTreePolicy.record_kept's prior: this many kept nodes' worth of scores, all accepted
# (factor 1), so the first verified steps move the factor and a step or two no longer dominates
KEPT_PRIOR = 4.0


class StepTime(Protocol):
    """A verify-step latency model; ``tkernels autotune`` supplies a per-GPU one.

    ``step_time(batch_tokens)``: µs of a step of ``batch_tokens`` query tokens, attention
    unpriced. The policies price attention too when they are given the requests' context
    (``choose(..., context=c)``): they then call ``step_time(batch_tokens, requests=B,
    context=c)``, a step whose ``B`` requests each hold ``c`` cached tokens, which every query
    token attends to (:class:`tkernels.sched.latency_model.LatencyModel` implements both). On a
    machine where attention is slow against the matmuls (a CPU; long contexts) a draft node costs
    mostly its attention, and a model without it would size trees several times too large."""

    def step_time(self, batch_tokens: int, requests: int = 0, context: int = 0) -> float: ...


def _step_times(step_time: StepTime, tokens, requests: int, context: int) -> torch.Tensor:
    """float64 µs of one step per entry of ``tokens`` (query tokens), from ``requests`` requests
    over ``context`` cached tokens each; with no context the one-argument form (a StepTime that
    does not price attention need not take the others). A model that prices many steps at once
    (``step_times``, :class:`~tkernels.sched.latency_model.LatencyModel`'s: ``step_time``
    vectorised) prices them in one call: a server's step weighs every candidate count of its
    batch's nodes (hundreds), each a Python call otherwise."""
    step_times = getattr(step_time, "step_times", None)
    if step_times is not None:
        return torch.from_numpy(np.asarray(step_times(np.asarray(tokens, dtype=np.int64), requests, context),
                                           dtype=np.float64))
    if context:
        return torch.tensor([step_time.step_time(int(t), requests=requests, context=context) for t in tokens],
                            dtype=torch.float64)
    return torch.tensor([step_time.step_time(int(t)) for t in tokens], dtype=torch.float64)


def greedy_tree(accept_probs: torch.Tensor, num_nodes: int):
    """Best ``num_nodes``-node tree (root included) under ``accept_probs[d, r]`` = p(depth d+1, rank r).

    Returns ``(shape, expected)`` where ``expected[m - 1]`` is the expected accepted tokens
    (bonus counted) of the best m-node tree, for every m <= len(shape): the best m-node tree is
    the first m nodes the expansion picked. ``len(shape) < num_nodes`` only when every
    depth/rank is used up.
    """
    if not isinstance(accept_probs, torch.Tensor) or accept_probs.dim() != 2 or accept_probs.numel() == 0:
        fail("accept_probs", f"must be a non-empty [max_depth, k] tensor, got {getattr(accept_probs, 'shape', accept_probs)}")
    integer("num_nodes", num_nodes, minimum=1)
    p = accept_probs.detach().double().cpu()
    if not bool(((p >= 0) & (p <= 1)).all()):  # NaN fails too
        fail("accept_probs", "must lie in [0, 1] (no NaN)")
    max_depth, k = p.shape
    order = p.argsort(dim=1, descending=True, stable=True).tolist()  # ranks, best first, per depth
    p = p.tolist()
    # heap entries: (-path probability, tie-break, rank path, index in its depth's order, parent's path probability)
    heap = [(-p[0][order[0][0]], 0, (order[0][0],), 0, 1.0)]
    picked, weights, tie = [], [], 1
    while heap and len(picked) < num_nodes - 1:
        neg_w, _, path, j, parent_w = heapq.heappop(heap)
        picked.append(path)
        weights.append(-neg_w)
        d = len(path)
        if d < max_depth:  # its best child
            heapq.heappush(heap, (neg_w * p[d][order[d][0]], tie, path + (order[d][0],), 0, -neg_w))
            tie += 1
        if j + 1 < k:  # its next sibling
            sibling = order[d - 1][j + 1]
            heapq.heappush(heap, (-parent_w * p[d - 1][sibling], tie, path[:-1] + (sibling,), j + 1, parent_w))
            tie += 1
    expected = 1.0 + torch.tensor([0.0] + weights, dtype=torch.float64).cumsum(0)
    return from_rank_paths(picked), expected


class DynamicTreePolicy:
    """Online per-(depth, rank) acceptance estimates + per-step tree choice.

    The default ``max_depth`` (32 levels of ``k`` = 8 ranks) lets :meth:`choose` build trees of
    up to :data:`~tkernels.spec.tree.MAX_TREE_NODES` nodes.

    Estimates are decayed counts: every :meth:`update` multiplies the counts by ``decay``
    before adding the new observations, so old steps fade (window ~ 1 / (1 - decay) steps).
    ``prior`` (default: 0.5 * 0.5**rank at every depth) enters as ``prior_weight``
    pseudo-observations per depth, so a fresh policy is not wildly over- or under-confident.
    """

    def __init__(
        self,
        k: int = TOP_K,
        max_depth: int = 32,
        decay: float = 0.99,
        step_time: StepTime | None = None,
        prior: torch.Tensor | None = None,
        prior_weight: float = 2.0,
    ):
        _check_decay(decay)
        k, max_depth = integer("k", k, minimum=1), integer("max_depth", max_depth, minimum=1)
        prior_weight = real("prior_weight", prior_weight, positive=True)
        self.k, self.max_depth, self.decay = k, max_depth, decay
        self.step_time = step_time or _default_step_time()
        if prior is None:
            prior = (0.5 * 0.5 ** torch.arange(k, dtype=torch.float64)).expand(max_depth, k)
        if prior.shape != (max_depth, k):
            raise ValueError(f"prior must be [max_depth={max_depth}, k={k}], got {tuple(prior.shape)}")
        self.hits = prior.double() * prior_weight  # decayed count of "rank r chosen at depth d"
        self.trials = torch.full((max_depth,), float(prior_weight), dtype=torch.float64)  # decayed visits

    def accept_probs(self) -> torch.Tensor:
        """Current estimates p[d, r], float64 [max_depth, k]."""
        return self.hits / self.trials[:, None]

    def update(self, accepted_ranks: torch.Tensor, num_observed: torch.Tensor) -> None:
        """Learn from one verify step.

        ``accepted_ranks`` int[B, W]: entry d is the candidate rank (-1: none of the k) that the
        target chose at depth d+1 below the accepted depth-d node; only the first
        ``num_observed[b]`` entries of row b count (a request with a accepted draft tokens
        observes a+1 depths: the bonus token's rank is observed too, see
        :meth:`TokenRecycling.candidate_ranks`). Depths beyond ``max_depth`` are ignored.
        """
        _check_integer_tensor("accepted_ranks", accepted_ranks)
        _check_integer_tensor("num_observed", num_observed)
        if accepted_ranks.dim() != 2 or num_observed.shape != accepted_ranks.shape[:1]:
            raise ValueError(f"accepted_ranks must be [B, W] and num_observed [B], got {tuple(accepted_ranks.shape)}, {tuple(num_observed.shape)}")
        # numpy on the host, in place on the estimates' memory: a server updates every step, and
        # these are a few hundred entries (torch calls would cost more than the counting)
        ranks = accepted_ranks[:, : self.max_depth].cpu().numpy()
        if ranks.size and int(ranks.min()) < -1:  # -1: none of the k; ranks >= k count as none too
            fail("accepted_ranks", f"must be >= -1 (-1: none of the k candidates), got {int(ranks.min())}")
        depth = np.arange(ranks.shape[1])
        seen = depth < num_observed.cpu().numpy()[:, None]
        hit = seen & (ranks >= 0) & (ranks < self.k)
        hits, trials = self.hits.numpy(), self.trials.numpy()
        hits *= self.decay
        trials *= self.decay
        trials[:ranks.shape[1]] += seen.sum(0)
        hits += np.bincount((depth * self.k + ranks)[hit], minlength=self.max_depth * self.k).reshape(self.max_depth, self.k)

    def choose(self, batch_size: int, max_nodes: int, other_tokens: int = 0, context: int = 0) -> TreeShape:
        """This step's tree for each of ``batch_size`` requests, at most ``max_nodes`` nodes.

        Maximises useful tokens per second, ``(other_tokens + B * E[accepted](m)) / T(other_tokens
        + B * m)``: ``other_tokens`` (e.g. a prefill chunk sharing the step) count as useful work,
        so a step already full of them leaves little room for speculative nodes. ``context``: the
        requests' cached tokens (mean), which every node attends to: ``T`` prices that attention
        (:class:`StepTime`; 0: unpriced).
        """
        batch_size, max_nodes = integer("batch_size", batch_size, minimum=1), integer("max_nodes", max_nodes, minimum=1)
        other_tokens, context = integer("other_tokens", other_tokens, minimum=0), integer("context", context, minimum=0)
        shape, expected = greedy_tree(self.accept_probs(), max_nodes)
        sizes = range(1, expected.numel() + 1)
        times = _step_times(self.step_time, [other_tokens + batch_size * m for m in sizes], batch_size, context)
        goodput = (other_tokens + batch_size * expected) / times
        best = int(goodput.argmax()) + 1  # argmax takes the first: ties go to the smaller tree
        return shape if best == len(shape) else greedy_tree(self.accept_probs(), best)[0]


def tested_nodes(parents, cu_nodes, accepted_nodes, num_accepted) -> tuple[torch.Tensor, torch.Tensor]:
    """Which nodes of a verified ragged batch were tested and which accepted: ``(tested,
    on_path)``, bool [total nodes] (CPU). A non-root node is tested when its parent is on the
    accepted path (the target then either chose it or not); ``on_path`` holds the roots and the
    accepted drafts. ``accepted_nodes int[B, W]`` / ``num_accepted int[B]``: verification's
    accepted path per request (root first, local indices)."""
    from .tree import validate_parents

    validate_parents(parents, cu_nodes)
    if accepted_nodes.dim() != 2 or num_accepted.shape != (cu_nodes.numel() - 1,) or accepted_nodes.shape[0] != num_accepted.numel():
        raise ValueError(f"accepted_nodes must be [B, W] and num_accepted [B] with B = {cu_nodes.numel() - 1}, "
                         f"got {tuple(accepted_nodes.shape)}, {tuple(num_accepted.shape)}")
    _check_integer_tensor("accepted_nodes", accepted_nodes)
    _check_integer_tensor("num_accepted", num_accepted)
    p, cu = parents.cpu().long(), cu_nodes.cpu().long()
    local_nodes, counts = accepted_nodes.cpu().long(), num_accepted.cpu().long()
    if counts.numel() and not bool(((counts >= 1) & (counts <= local_nodes.shape[1])).all()):
        fail("num_accepted", f"must lie in [1, {local_nodes.shape[1]}] (the root counts), got {counts.tolist()}")
    used = torch.arange(local_nodes.shape[1]) < counts[:, None]
    if not bool(torch.where(used, (local_nodes >= 0) & (local_nodes < (cu[1:] - cu[:-1])[:, None]), True).all()):
        fail("accepted_nodes", "must hold local node indices of their request's tree in the first num_accepted entries")
    nodes = local_nodes + cu[:-1, None]
    on_path = torch.zeros(p.numel(), dtype=torch.bool)
    on_path[nodes[torch.arange(nodes.shape[1]) < num_accepted.cpu().long()[:, None]]] = True
    local = torch.arange(p.numel()) - torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    parent = torch.where(p >= 0, p + (torch.arange(p.numel()) - local), 0)
    return (p >= 0) & on_path[parent], on_path


def _check_decay(decay) -> None:
    if real("decay", decay, positive=True) > 1:
        fail("decay", f"must be in (0, 1], got {decay}")


def _check_integer_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        fail(name, f"must be an integer tensor, got {getattr(t, 'dtype', type(t).__name__)}")


def _default_step_time() -> StepTime:
    """The running GPU's step-latency model (per-GPU config, else the analytic H100-class
    default of :mod:`tkernels.sched.latency_model`) for a Llama-3-8B-shaped target."""
    from tkernels.sched.latency_model import LLAMA3_8B, LatencyModel, LatencyRates

    return LatencyModel(LLAMA3_8B, LatencyRates.from_config())


class ConfidenceTreePolicy:
    """Per-request trees from Token Recycling's stored probabilities (EAGLE-2-style confidence,
    training-free): online calibration + per-step choice of the batch's nodes.

    A candidate's stored probability ``q`` is the target's probability of it after its parent
    token in whatever context last verified that token, not this one, so it misstates the
    chance that the target picks it now. Calibration: per (depth, ``q`` bin) cell, decayed sums
    of the candidates' acceptances and of their ``q`` over every *tested* candidate (its parent
    was accepted), and ``accept_prob(q, depth) = min(1, q * accepted / sum q)``: a per-cell
    factor, so the order by ``q`` within a cell is kept, and scores estimate real acceptance
    probabilities, which :meth:`choose`'s latency objective needs. Bins are powers of two
    (``q`` in (1/2, 1], (1/4, 1/2], ..., the last takes the rest); depths past ``max_depth``
    share its cell. The prior is factor 1 with ``prior_weight`` pseudo-observations per cell.
    Every :meth:`update` multiplies the sums by ``decay`` first (window ~ 1 / (1 - decay) steps).

    Kept nodes: :meth:`choose` keeps the batch's best-scoring nodes, and a node's score is an
    estimate, so the kept ones are those whose estimates came out high: as a set they are
    overconfident even where every estimate is unbiased (on the CPU VM at 26 requests the hybrid's
    kept nodes scored 1.36x the drafts the target accepted; docs/step_profile.md, tenth round),
    and a step priced on them drafts past what pays. :meth:`record_kept` learns, from every
    verified step, the ratio of the kept nodes' accepted count to their summed scores (decayed
    sums, ``decay``; a prior of :data:`KEPT_PRIOR` nodes at ratio 1), and :meth:`choose`
    multiplies the scores by it (:meth:`kept_factor`): one factor keeps their order and moves the
    size.
    """

    def __init__(
        self,
        max_depth: int = 8,
        bins: int = 8,
        decay: float = 0.995,
        prior_weight: float = 1.0,
        step_time: StepTime | None = None,
    ):
        _check_decay(decay)
        max_depth, bins = integer("max_depth", max_depth, minimum=1), integer("bins", bins, minimum=1)
        prior_weight = real("prior_weight", prior_weight, positive=True)
        self.max_depth, self.bins, self.decay = max_depth, bins, decay
        self.step_time = step_time or _default_step_time()
        typical_q = 2.0 ** -(torch.arange(bins, dtype=torch.float64) + 0.5)  # a q inside each bin
        self.mass = (prior_weight * typical_q).expand(max_depth, bins).clone()  # decayed sum of tested q
        self.accepted = self.mass.clone()  # decayed sum of acceptances (prior: factor 1)
        self.kept_scores = self.kept_accepted = KEPT_PRIOR  # record_kept's decayed sums (prior: factor 1)

    def _cells(self, probs: torch.Tensor, depth: int | torch.Tensor):
        # NaN goes to the last bin (its estimate stays NaN, which choose() refuses) instead of
        # becoming an out-of-range index
        q_bin = (-torch.log2(probs.double().nan_to_num(0.0).clamp(min=1e-30))).floor().clamp(0, self.bins - 1).long()
        d = (torch.as_tensor(depth, device=probs.device).long().clamp(1, self.max_depth) - 1).expand_as(q_bin)
        return d, q_bin

    def factors(self) -> torch.Tensor:
        """Current calibration factors, float64 [max_depth, bins]."""
        return self.accepted / self.mass

    def accept_prob(self, probs: torch.Tensor, depth: int | torch.Tensor) -> torch.Tensor:
        """Calibrated acceptance probability (float64, ``probs``' shape) of candidates with
        stored probabilities ``probs`` at ``depth`` (an int or a tensor broadcasting to it);
        :meth:`TokenRecycling.draft_best`'s ``accept_prob``."""
        # Types only: the values are the drafter's stored probabilities (checked where they are
        # stored, TokenRecycling.recycle_topk) and reading them here would cost a device sync.
        if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
            fail("probs", f"must be a floating-point tensor of probabilities, got {getattr(probs, 'dtype', type(probs).__name__)}")
        if not isinstance(depth, torch.Tensor):
            integer("depth", depth, minimum=1)
        d, q_bin = self._cells(probs, depth)
        factor = self.factors().to(probs.device)[d, q_bin]
        return (probs.double() * factor).clamp(max=1.0)

    def accept_prob_host(self):
        """:meth:`accept_prob` for one host float at a time, from a snapshot of the current
        factors: ``f(prob, depth) -> float`` (a per-node host loop's estimate, without tensor
        calls; the same cells and clamping)."""
        factors = self.factors().tolist()
        bins, max_depth = self.bins, self.max_depth
        bin_of: dict[float, int] = {}  # stored probabilities are fp16 values: few distinct ones repeat

        def accept_prob(prob: float, depth: int) -> float:
            q_bin = bin_of.get(prob)
            if q_bin is None:
                q_bin = bin_of[prob] = min(max(math.floor(-math.log2(max(prob, 1e-30))), 0), bins - 1)
            return min(prob * factors[min(max(depth, 1), max_depth) - 1][q_bin], 1.0)

        return accept_prob

    def kept_factor(self) -> float:
        """The kept nodes' accepted count over their summed scores (:meth:`record_kept`), which
        :meth:`choose` multiplies the scores by."""
        return self.kept_accepted / self.kept_scores

    def record_kept(self, scores, accepted) -> None:
        """Learn from one verified step's kept (drafted) nodes: their scores as :meth:`choose`
        was given them (float [m], before its factor) and whether each was accepted (bool [m]).
        One decay per call."""
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        accepted = np.asarray(accepted).reshape(-1)
        if accepted.dtype != np.bool_ or accepted.shape != scores.shape:
            fail("accepted", f"must be bools, one per score ({scores.size}), got {accepted.dtype} {accepted.shape}")
        if not (np.isfinite(scores).all() and (scores >= 0).all()):
            fail("scores", "must be finite and >= 0")
        self.kept_scores = self.kept_scores * self.decay + float(scores.sum())
        self.kept_accepted = self.kept_accepted * self.decay + float(np.count_nonzero(accepted))

    def update(self, node_probs, parents, cu_nodes, accepted_nodes, num_accepted) -> None:
        """Learn from one verify step of the ragged batch ``(parents, cu_nodes)`` that
        :meth:`TokenRecycling.draft_best` drafted (``node_probs``: its ``probs`` at those nodes)
        and verification's ``accepted_nodes int[B, W]`` / ``num_accepted int[B]`` (root and
        accepted drafts, local indices). Candidates below a rejected node say nothing."""
        from .tree import depths

        if node_probs.shape != parents.shape:
            raise ValueError(f"node_probs must have parents' shape {tuple(parents.shape)}, got {tuple(node_probs.shape)}")
        tested, on_path = tested_nodes(parents, cu_nodes, accepted_nodes, num_accepted)
        self.record(node_probs.cpu()[tested], depths(parents.cpu(), cu_nodes.cpu())[tested], on_path[tested])

    def record(self, probs: torch.Tensor, depth: torch.Tensor, accepted: torch.Tensor) -> None:
        """Learn from tested candidates: stored probabilities ``probs`` float [m], ``depth`` int
        [m], ``accepted`` bool [m] (the target chose the candidate). One decay per call."""
        # numpy on the host, in place on the sums' memory: a server records ~1000 nodes a step,
        # and torch calls on them would cost more than the sums
        probs, depth, accepted = (t.cpu() if isinstance(t, torch.Tensor) else t for t in (probs, depth, accepted))
        if not isinstance(probs, torch.Tensor) or probs.dim() != 1 or not probs.is_floating_point() \
                or not ((p := probs.detach().double().numpy()) >= 0).all() or not (p <= 1).all():
            fail("probs", "must be a 1-D float tensor of probabilities in [0, 1] (no NaN)")
        _check_integer_tensor("depth", depth)
        if depth.shape != probs.shape or (depth.numel() and int(depth.min()) < 1):
            fail("depth", f"must be [{probs.numel()}] like probs, every depth >= 1, got {tuple(depth.shape)}")
        if not isinstance(accepted, torch.Tensor) or accepted.dtype != torch.bool or accepted.shape != probs.shape:
            fail("accepted", f"must be a bool tensor [{probs.numel()}] like probs, got {getattr(accepted, 'shape', accepted)}")
        # _cells' cells (no NaN here), then the sums in node order (np.add.at, as torch's serial
        # index_put_(accumulate=True): the same float64 additions)
        q_bin = np.minimum(np.maximum(np.floor(-np.log2(np.maximum(p, 1e-30))), 0), self.bins - 1).astype(np.int64)
        cell = (np.minimum(np.maximum(depth.numpy().astype(np.int64), 1), self.max_depth) - 1) * self.bins + q_bin
        mass, hits = self.mass.view(-1).numpy(), self.accepted.view(-1).numpy()
        mass *= self.decay
        hits *= self.decay
        np.add.at(mass, cell, p)
        np.add.at(hits, cell, accepted.numpy().astype(np.float64))

    def choose(self, scores: torch.Tensor, other_tokens: int = 0, context: int = 0) -> torch.Tensor:
        """Which nodes of :meth:`TokenRecycling.draft_best`'s trees to verify: bool [B, n].

        ``scores`` float [B, n] (node 0 = root, rows in BFS order) estimate each node's chance
        of acceptance, so keeping the batch's ``j`` best non-root nodes yields ``B + their sum``
        expected tokens in a step of ``B + j`` tokens (the scores times :meth:`kept_factor`, what
        kept nodes turned out to be worth). Maximises useful tokens per second,
        ``(other_tokens + B + sum) / T(other_tokens + B + j)`` over j: one budget for the batch,
        spent where the scores are highest, so requests get different trees. ``context``: the
        requests' cached tokens (mean), priced as :meth:`DynamicTreePolicy.choose` prices them.
        """
        if not isinstance(scores, torch.Tensor) or scores.dim() != 2 or scores.shape[1] < 1 or not scores.is_floating_point():
            raise ValueError(f"scores must be a float tensor [B, n] with n >= 1, got {getattr(scores, 'shape', scores)}")
        other_tokens, context = integer("other_tokens", other_tokens, minimum=0), integer("context", context, minimum=0)
        batch, n = scores.shape
        rest = scores[:, 1:].double().cpu().reshape(-1)
        if not bool(torch.isfinite(rest).all()):
            fail("scores", "must be finite (no NaN or inf)")
        order = rest.argsort(descending=True, stable=True)  # ties: lower (row, node) first, parents before children
        worth = (rest[order] * self.kept_factor()).clamp(max=1.0)
        expected = other_tokens + batch + torch.cat([torch.zeros(1, dtype=torch.float64), worth.cumsum(0)])
        times = _step_times(self.step_time, range(other_tokens + batch, other_tokens + batch + order.numel() + 1), batch,
                            context)
        best = int((expected / times).argmax())  # the first maximum: ties go to the smaller step
        keep = torch.zeros(batch * (n - 1), dtype=torch.bool)
        keep[order[:best]] = True
        return torch.cat([torch.ones(batch, 1, dtype=torch.bool), keep.view(batch, n - 1)], 1).to(scores.device)
