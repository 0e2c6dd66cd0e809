"""Continuous speculative decoding for autoregressive models with diffusion heads.

Exact rule (the default). Draft and target heads share the schedule (so the per-step sigmas)
and the start point ``x_S``. The draft runs its chain, giving a trajectory ``x_{S..0}``; the
target evaluates the means of all of its transitions in one call, and the draft token is kept
with probability ``min(1, p(x_{0:S}) / q(x_{0:S}))`` (ratio of joint trajectory densities).
This is speculative sampling on the trajectory space, so the kept-or-resampled trajectory is
distributed as ``p`` and its end point ``x_0`` as the target's token law.

On rejection the token is drawn from the residual ``(p - q)^+ / ||(p - q)^+||`` by
acceptance-rejection with proposal ``p`` and bound ``M = 1``: draw a target trajectory ``y``,
keep it with probability ``max(0, 1 - q(y)/p(y))``. Each try succeeds with probability
``a = TV(p, q)`` (the rejection probability), so tries are geometric with mean ``1/a``.

Fallback after ``max_tries`` failed tries: the token is a FRESH target sample (never a zero
token; counted in :attr:`SpeculationStats.fallbacks`). The output law per token is then
``p + a (1 - a)^K (p - r)`` (``r`` the residual, ``K = max_tries``): the total-variation error
is at most ``a (1 - a)^K`` = the probability that a token reaches the fallback, which the
counter estimates. With no fallback the sampler is exact.

Lossy options: ``inner_temperature`` (CSpD's relaxed ratio, ``exp(log_ratio / T)``, T = 42 in
its release) inflates acceptance and biases the output towards the draft. ``prefill`` (the
first fraction of tokens drawn by the target alone) is exact, it only trades speed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from tkernels.checks import fail, integer, real
from tkernels.continuous import acceptance
from tkernels.continuous.diffusion import DiffusionHead, chain_means, sample_chain


def _use_kernels(device: torch.device) -> bool:
    # Triton kernels run on GPUs, or anywhere under the interpreter (TRITON_INTERPRET=1, as in
    # the tests); a plain CPU run (the demo) uses the torch references, which compute the same.
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def trajectory_log_ratio(x, mu_p, mu_q, sigma) -> torch.Tensor:
    fn = acceptance.trajectory_log_ratio if _use_kernels(x.device) else acceptance.trajectory_log_ratio_reference
    return fn(x, mu_p, mu_q, sigma)


def first_rejection(log_ratio, uniforms) -> torch.Tensor:
    fn = acceptance.first_rejection if _use_kernels(log_ratio.device) else acceptance.first_rejection_reference
    return fn(log_ratio, uniforms)


@dataclass
class SpeculationStats:
    """Counters; ``*_calls`` count batched calls (one call serves every row of the batch)."""

    drafted: int = 0  # draft tokens proposed and checked
    accepted: int = 0  # draft tokens kept
    residual_tokens: int = 0  # tokens drawn from (p - q)^+ after a rejection
    residual_tries: int = 0  # target trajectories drawn for those (fallback samples included)
    fallbacks: int = 0  # residual tokens that reached max_tries and took a fresh target sample
    target_backbone_calls: int = 0
    target_head_calls: int = 0  # sequential head evaluations (a chain costs S, a verification 1)
    draft_backbone_calls: int = 0
    draft_head_calls: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"acceptance_rate": self.acceptance_rate}


def _check_heads(target: DiffusionHead, draft: DiffusionHead) -> None:
    if target.token_dim != draft.token_dim:
        raise ValueError(f"draft token_dim {draft.token_dim} != target token_dim {target.token_dim}")
    if not torch.equal(target.schedule.sigmas, draft.schedule.sigmas):
        raise ValueError("draft and target heads must share the schedule (same per-step sigmas)")


def _check_inner_temperature(inner_temperature: float | None) -> None:
    if inner_temperature is not None:
        real("inner_temperature", inner_temperature, positive=True, what="number or None (exact)")


def _check_conditions(z_p, z_q) -> int:
    """``z_p`` and ``z_q``: condition tensors ``[N, ...]`` with one row per token; returns N."""
    for name, z in (("z_p", z_p), ("z_q", z_q)):
        if not isinstance(z, torch.Tensor) or z.dim() < 2:
            fail(name, f"must be a [N, C] condition tensor (one row per token), got {getattr(z, 'shape', type(z))}")
    if z_q.shape[0] != z_p.shape[0]:
        fail("z_q", f"must have z_p's {z_p.shape[0]} rows (one per token), got {z_q.shape[0]}")
    if z_q.device != z_p.device:
        fail("z_q", f"is on {z_q.device} but z_p is on {z_p.device}")
    return z_p.shape[0]


def _check_labels(labels) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        fail("labels", f"must be a 1-D tensor [B] (one class label per row), got {getattr(labels, 'shape', type(labels))}")


def _randn(shape, generator, device) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=device)


def _chain_shape(rows: int, head: DiffusionHead) -> tuple[int, int, int]:
    return rows, head.schedule.num_steps, head.token_dim


def accept_counts(log_ratio: torch.Tensor, generator: torch.Generator, inner_temperature: float | None = None) -> torch.Tensor:
    """Number of draft tokens kept per row of a ``[rows, window]`` log-ratio (int64 ``[rows]``).

    ``inner_temperature`` (lossy, CSpD): accept with ``min(1, exp(log_ratio / T))``.
    """
    _check_inner_temperature(inner_temperature)
    if inner_temperature is not None:
        log_ratio = log_ratio / inner_temperature
    uniforms = torch.rand(log_ratio.shape, generator=generator, device=log_ratio.device)
    return first_rejection(log_ratio, uniforms).long()


def sample_residual(
    target: DiffusionHead,
    draft: DiffusionHead,
    z_p: torch.Tensor,
    z_q: torch.Tensor,
    generator: torch.Generator,
    *,
    max_tries: int,
    plain: torch.Tensor | None = None,
    stats: SpeculationStats | None = None,
) -> torch.Tensor:
    """Tokens ``x_0 [N, D]`` whose trajectories are drawn from ``(p - q)^+`` (see module doc).

    ``plain`` (bool ``[N]``): rows that want a plain target sample instead (their first try is
    kept; a speculation window's bonus token), batched with the residual rows so that each try
    costs one target chain for all of them.
    """
    integer("max_tries", max_tries, minimum=1)
    n = _check_conditions(z_p, z_q)
    if plain is not None and (not isinstance(plain, torch.Tensor) or plain.dtype != torch.bool
                              or plain.shape != (n,) or plain.device != z_p.device):
        fail("plain", f"must be a bool tensor [{n}] on {z_p.device} (one per row of z_p) or None, "
                      f"got {getattr(plain, 'shape', type(plain))} {getattr(plain, 'dtype', '')}")
    stats = SpeculationStats() if stats is None else stats
    dims, device = target.token_dim, z_p.device
    sigmas = target.schedule.sigmas.to(device)
    plain = torch.zeros(n, dtype=torch.bool, device=device) if plain is None else plain
    out = torch.empty(n, dims, device=device)
    tries = torch.zeros(n, dtype=torch.long, device=device)
    todo = torch.arange(n, device=device)
    stats.residual_tokens += int((~plain).sum())
    while todo.numel():
        x_start = _randn((todo.numel(), dims), generator, device)
        xs, mus_p = sample_chain(target, z_p[todo], x_start, _randn(_chain_shape(todo.numel(), target), generator, device))
        mus_q = chain_means(draft, z_q[todo], x_start, xs)
        log_ratio = trajectory_log_ratio(xs, mus_p, mus_q, sigmas)
        fallback = (tries[todo] >= max_tries) & ~plain[todo]
        uniforms = torch.rand(todo.numel(), generator=generator, device=device)
        keep = plain[todo] | fallback | (uniforms < -torch.expm1(-log_ratio))  # 1 - q/p, <= 0 if q >= p
        stats.residual_tries += int((~plain[todo]).sum())
        stats.fallbacks += int(fallback.sum())
        stats.target_head_calls += target.schedule.num_steps
        stats.draft_head_calls += 1
        tries[todo] += 1
        out[todo[keep]] = xs[keep, -1]
        todo = todo[~keep]
    return out


def speculative_sample(
    target: DiffusionHead,
    draft: DiffusionHead,
    z_p: torch.Tensor,
    z_q: torch.Tensor,
    generator: torch.Generator,
    *,
    max_tries: int = 1000,
    inner_temperature: float | None = None,
    stats: SpeculationStats | None = None,
) -> torch.Tensor:
    """One speculative token per row (window 1): ``x_0 [N, D]`` distributed as the target's.

    The draft proposes from ``z_q``; the target checks with ``z_p`` (rows independent).
    """
    _check_heads(target, draft)
    n = _check_conditions(z_p, z_q)
    # Checked up front: a rejection may not happen in this call, a bad argument is bad anyway.
    integer("max_tries", max_tries, minimum=1)
    _check_inner_temperature(inner_temperature)
    stats = SpeculationStats() if stats is None else stats
    device = z_p.device
    x_start = _randn((n, draft.token_dim), generator, device)
    xs, mus_q = sample_chain(draft, z_q, x_start, _randn(_chain_shape(n, draft), generator, device))
    mus_p = chain_means(target, z_p, x_start, xs)
    log_ratio = trajectory_log_ratio(xs, mus_p, mus_q, target.schedule.sigmas.to(device))
    accepted = accept_counts(log_ratio[:, None], generator, inner_temperature) == 1
    stats.drafted += n
    stats.accepted += int(accepted.sum())
    stats.draft_head_calls += draft.schedule.num_steps
    stats.target_head_calls += 1
    out = xs[:, -1].clone()
    rejected = (~accepted).nonzero()[:, 0]
    if rejected.numel():
        out[rejected] = sample_residual(target, draft, z_p[rejected], z_q[rejected], generator, max_tries=max_tries, stats=stats)
    return out


class ARDiffusionModel(Protocol):
    """A causal (raster-order) backbone plus a diffusion head, MAR-style."""

    head: DiffusionHead
    num_tokens: int

    def conditions(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``tokens [B, L, D]``, ``labels [B]`` -> ``z [B, L, C]`` where ``z[:, i]`` conditions
        token ``i`` and depends on ``tokens[:, :i]`` only (strictly causal)."""
        ...


def generate(model: ARDiffusionModel, labels: torch.Tensor, generator: torch.Generator, *, stats: SpeculationStats | None = None, tokens: torch.Tensor | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Plain autoregressive sampling of positions ``start .. stop-1`` (default: all) into
    ``tokens [B, L, D]`` (a new zero buffer by default); one backbone call and one chain per position."""
    _check_labels(labels)
    head, length, device = model.head, model.num_tokens, labels.device
    stop = length if stop is None else integer("stop", stop, minimum=0)
    if stop > length:
        fail("stop", f"must be at most the model's num_tokens ({length}), got {stop}")
    if integer("start", start, minimum=0) > stop:
        fail("start", f"must be at most stop ({stop}), got {start}")
    want = (labels.shape[0], length, head.token_dim)
    if tokens is not None and (not isinstance(tokens, torch.Tensor) or tuple(tokens.shape) != want):
        fail("tokens", f"must be a {list(want)} tensor (labels' rows, num_tokens, token_dim) or None, "
                       f"got {getattr(tokens, 'shape', type(tokens))}")
    stats = SpeculationStats() if stats is None else stats
    if tokens is None:
        tokens = torch.zeros(labels.shape[0], length, head.token_dim, device=device)
    for i in range(start, stop):
        z = model.conditions(tokens, labels)[:, i]
        x_start = _randn((labels.shape[0], head.token_dim), generator, device)
        xs, _ = sample_chain(head, z, x_start, _randn(_chain_shape(labels.shape[0], head), generator, device))
        tokens[:, i] = xs[:, -1]
        stats.target_backbone_calls += 1
        stats.target_head_calls += head.schedule.num_steps
    return tokens


def generate_speculative(
    target: ARDiffusionModel,
    draft: ARDiffusionModel,
    labels: torch.Tensor,
    generator: torch.Generator,
    *,
    window: int = 4,
    max_tries: int = 1000,
    inner_temperature: float | None = None,
    prefill: float = 0.0,
    stats: SpeculationStats | None = None,
) -> torch.Tensor:
    """Speculative autoregressive sampling: ``tokens [B, L, D]`` distributed as :func:`generate`
    with ``target`` (exact unless ``inner_temperature`` is set or a fallback is counted).

    Per round and row: the draft proposes up to ``window`` tokens; one target backbone call and
    one target head call (all tokens x all steps) give the log-ratios; the first rejected
    position is redrawn from the residual, or, if all were kept, the target adds a bonus token.
    ``prefill``: fraction of the first tokens drawn by the target alone.
    """
    _check_heads(target.head, draft.head)
    _check_inner_temperature(inner_temperature)
    _check_labels(labels)
    integer("window", window, minimum=1)
    integer("max_tries", max_tries, minimum=1)
    if real("prefill", prefill, minimum=0, what="fraction in [0, 1]") > 1:
        fail("prefill", f"must be a fraction in [0, 1], got {prefill}")
    if draft.num_tokens != target.num_tokens:
        raise ValueError(f"draft num_tokens {draft.num_tokens} != target num_tokens {target.num_tokens}")
    stats = SpeculationStats() if stats is None else stats
    length, dims, num_steps, device = target.num_tokens, target.head.token_dim, target.head.schedule.num_steps, labels.device
    sigmas = target.head.schedule.sigmas.to(device)
    n_prefill = round(prefill * length)
    tokens = generate(target, labels, generator, stats=stats, stop=n_prefill)
    pos = torch.full((labels.shape[0],), n_prefill, dtype=torch.long, device=device)
    while bool((pos < length).any()):
        active = (pos < length).nonzero()[:, 0]
        rows, p, buf, lab = active.numel(), pos[active], tokens[active], labels[active]
        arange = torch.arange(rows, device=device)
        valid = (length - p).clamp(max=window)
        w_round = int(valid.max())
        positions = (p[:, None] + torch.arange(w_round + 1, device=device)).clamp(max=length - 1)  # [rows, W+1]
        x_start = _randn((rows, w_round, dims), generator, device)
        xs = x_start.new_empty(rows, w_round, num_steps, dims)
        mus_q = torch.empty_like(xs)
        z_q = []
        for j in range(w_round):
            z_q.append(draft.conditions(buf, lab)[arange, positions[:, j]])
            xs[:, j], mus_q[:, j] = sample_chain(draft.head, z_q[j], x_start[:, j], _randn(_chain_shape(rows, draft.head), generator, device))
            drafted_here = j < valid
            buf[arange[drafted_here], positions[drafted_here, j]] = xs[drafted_here, j, -1]
        z_q = torch.stack(z_q, dim=1)  # [rows, W, C_q]
        stats.draft_backbone_calls += w_round
        stats.draft_head_calls += w_round * num_steps
        z_p = target.conditions(buf, lab)[arange[:, None], positions]  # [rows, W+1, C_p]
        flat = rows * w_round
        mus_p = chain_means(target.head, z_p[:, :w_round].reshape(flat, -1), x_start.reshape(flat, dims), xs.reshape(flat, num_steps, dims))
        log_ratio = trajectory_log_ratio(xs.reshape(flat, num_steps, dims), mus_p, mus_q.reshape(flat, num_steps, dims), sigmas)
        stats.target_backbone_calls += 1
        stats.target_head_calls += 1
        n_acc = torch.minimum(accept_counts(log_ratio.reshape(rows, w_round), generator, inner_temperature), valid)
        stats.drafted += int(valid.sum())
        stats.accepted += int(n_acc.sum())
        nxt = p + n_acc  # the target's own token goes here: residual after a rejection, else bonus
        needs = (nxt < length).nonzero()[:, 0]
        if needs.numel():
            rejected = n_acc[needs] < valid[needs]
            buf[needs, nxt[needs]] = sample_residual(
                target.head, draft.head, z_p[needs, n_acc[needs]], z_q[needs, n_acc[needs].clamp(max=w_round - 1)],
                generator, max_tries=max_tries, plain=~rejected, stats=stats,
            )
        # Drafts after `nxt` stay in buf as junk: causality hides them until they are overwritten.
        tokens[active] = buf
        pos[active] = torch.where(nxt < length, nxt + 1, length)
    return tokens
