"""DDPM-style Gaussian diffusion heads: the interface, the reverse chain, and an analytic toy.

A head draws one continuous token ``x_0`` (``D`` dims) given a condition ``z`` by ``S`` reverse
steps. Reverse step ``s`` (``s = 0 .. S-1``, diffusion time ``t = S - s``) maps ``x_t`` to
``x_{t-1} ~ N(mean(x_t, s, z), sigma_s^2 I)``, starting from ``x_S ~ N(0, I)``.

Trajectories are stored as ``x_start [N, D]`` (``x_S``) and ``xs [N, S, D]`` where ``xs[:, s]``
is the point reached by step ``s`` (so ``xs[:, -1]`` is the token ``x_0``); ``mus [N, S, D]``
holds the means of those transitions. The layout matches
:func:`tkernels.continuous.acceptance.trajectory_log_ratio`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch


def _steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer, got {num_steps!r}")
    return num_steps


class DiffusionSchedule:
    """Noise schedule of ``S`` steps; reverse-step stds are ``sqrt(beta_t)`` (always > 0).

    DDPM's other choice, the posterior std, is 0 at ``t = 1``: a zero-variance last step has no
    density, so the trajectory ratio would be undefined there.
    """

    def __init__(self, betas: torch.Tensor):
        if betas.dim() != 1 or betas.numel() == 0 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with every value in (0, 1)")
        self.betas = betas.double()  # betas[t - 1] for t = 1 .. S
        self.alpha_bars = torch.cumprod(1 - self.betas, 0)
        self.num_steps = betas.numel()
        # Per reverse step s (t = S - s).
        t_index = torch.arange(self.num_steps - 1, -1, -1)
        self.sigmas = self.betas.sqrt()[t_index].float()
        beta, alpha_bar = self.betas[t_index], self.alpha_bars[t_index]
        alpha_bar_prev = torch.cat([self.alpha_bars.new_ones(1), self.alpha_bars[:-1]])[t_index]
        # mean = coef_x0 * x0_hat + coef_xt * x_t (DDPM posterior mean), and x0_hat from eps.
        self.coef_x0 = (alpha_bar_prev.sqrt() * beta / (1 - alpha_bar)).float()
        self.coef_xt = ((1 - beta).sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar)).float()
        self.alpha_bars_reverse = alpha_bar.float()

    @classmethod
    def cosine(cls, num_steps: int, max_beta: float = 0.999) -> DiffusionSchedule:
        """Nichol & Dhariwal's cosine schedule."""
        num_steps = _steps(num_steps)
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
        return cls(torch.tensor(betas, dtype=torch.float64))

    @classmethod
    def linear(cls, num_steps: int, beta_start: float, beta_end: float) -> DiffusionSchedule:
        num_steps = _steps(num_steps)
        return cls(torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64))

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process ``x_t`` for diffusion times ``t`` in ``1 .. S`` (training)."""
        alpha_bar = self.alpha_bars.to(x0.device, torch.float32)[t - 1][:, None]
        return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise

    def mean_from_eps(self, x_t: torch.Tensor, step: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Reverse-step mean from a noise prediction ``eps`` of ``x_t`` at reverse steps ``step``."""
        alpha_bar = self.alpha_bars_reverse.to(x_t.device)[step][:, None]
        x0_hat = (x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
        return self.mean_from_x0(x_t, step, x0_hat)

    def mean_from_x0(self, x_t: torch.Tensor, step: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
        c0 = self.coef_x0.to(x_t.device)[step][:, None]
        ct = self.coef_xt.to(x_t.device)[step][:, None]
        return c0 * x0_hat + ct * x_t


class DiffusionHead(Protocol):
    """What the speculative sampler needs from a head: a schedule and a batched mean."""

    schedule: DiffusionSchedule
    token_dim: int

    def mean(self, x_t: torch.Tensor, step: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``x_t [M, D]``, reverse-step indices ``step`` int64 ``[M]``, conditions ``z [M, ...]``
        -> ``[M, D]`` means of ``x_{t-1}``. Rows are independent (steps may differ per row)."""
        ...


def _check_chain(head: DiffusionHead, z, x_start) -> tuple[int, int]:
    """``x_start [N, D]`` and ``z [N, ...]`` for ``head``; returns ``(N, S)``."""
    if not isinstance(x_start, torch.Tensor) or x_start.dim() != 2 or x_start.shape[1] != head.token_dim:
        raise ValueError(f"x_start: must be [N, D={head.token_dim}], got {getattr(x_start, 'shape', type(x_start))}")
    if not isinstance(z, torch.Tensor) or z.dim() < 1 or z.shape[0] != x_start.shape[0]:
        raise ValueError(f"z: must have one row per row of x_start ({x_start.shape[0]}), got {getattr(z, 'shape', type(z))}")
    return x_start.shape[0], head.schedule.num_steps


def sample_chain(
    head: DiffusionHead, z: torch.Tensor, x_start: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the reverse chain (``S`` sequential head calls). ``noise [N, S, D]`` is the
    per-step standard-normal noise; returns ``xs, mus`` (each ``[N, S, D]``)."""
    n, num_steps = _check_chain(head, z, x_start)
    if not isinstance(noise, torch.Tensor) or tuple(noise.shape) != (n, num_steps, head.token_dim):
        raise ValueError(f"noise: must be [N={n}, S={num_steps}, D={head.token_dim}], got {getattr(noise, 'shape', type(noise))}")
    sigmas = head.schedule.sigmas.to(x_start.device)
    xs = x_start.new_empty(n, num_steps, x_start.shape[1])
    mus = torch.empty_like(xs)
    x = x_start
    for s in range(num_steps):
        mu = head.mean(x, torch.full((n,), s, dtype=torch.long, device=x.device), z)
        x = mu + sigmas[s] * noise[:, s]
        mus[:, s], xs[:, s] = mu, x
    return xs, mus


def chain_means(head: DiffusionHead, z: torch.Tensor, x_start: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Means of every transition of given trajectories, in ONE batched head call (all steps at
    once): this is what makes verification by the target cost one call instead of ``S``."""
    n, num_steps = _check_chain(head, z, x_start)
    dims = head.token_dim
    if not isinstance(xs, torch.Tensor) or tuple(xs.shape) != (n, num_steps, dims):
        raise ValueError(f"xs: must be [N={n}, S={num_steps}, D={dims}], got {getattr(xs, 'shape', type(xs))}")
    x_t = torch.cat([x_start[:, None], xs[:, :-1]], dim=1).reshape(n * num_steps, dims)
    step = torch.arange(num_steps, device=xs.device).repeat(n)
    z_rep = z.repeat_interleave(num_steps, dim=0)
    return head.mean(x_t, step, z_rep).reshape(n, num_steps, dims)


class GaussianMixtureHead:
    """Toy head whose data distribution is a Gaussian mixture with isotropic components.

    ``mean`` is the DDPM posterior mean built from the exact ``E[x_0 | x_t]`` of the mixture, so
    the chain's output is close to the mixture; the chain's own output law (what speculation
    must reproduce) is computed exactly in 1-D by :func:`chain_density_1d`. ``z`` is ``[M, 0]``
    (no condition) or ``[M, D]``: an offset added to every component mean (a conditional toy).
    """

    def __init__(self, schedule: DiffusionSchedule, weights, means, stds):
        self.schedule = schedule
        self.log_weights = torch.as_tensor(weights, dtype=torch.float32).log()
        self.means = torch.as_tensor(means, dtype=torch.float32)  # [K, D]
        self.stds = torch.as_tensor(stds, dtype=torch.float32)  # [K]
        self.token_dim = self.means.shape[1]

    def mean(self, x_t: torch.Tensor, step: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.schedule.alpha_bars_reverse[step][:, None]  # [M, 1]
        root = alpha_bar.sqrt()
        var0 = self.stds.square()[None, :]  # [1, K]
        var_t = alpha_bar * var0 + (1 - alpha_bar)  # [M, K]
        means = self.means[None] + z[:, None, :] if z.shape[-1] else self.means[None]  # [M or 1, K, D]
        diff = x_t[:, None, :] - root[:, :, None] * means  # [M, K, D]
        log_lik = self.log_weights - 0.5 * (diff.square().sum(-1) / var_t + self.token_dim * var_t.log())
        resp = (log_lik - log_lik.amax(1, keepdim=True)).exp()
        resp = resp / resp.sum(1, keepdim=True)  # posterior component probabilities [M, K]
        x0_given_k = means + (root * var0 / var_t)[:, :, None] * diff
        return self.schedule.mean_from_x0(x_t, step, (resp[:, :, None] * x0_given_k).sum(1))


def chain_density_1d(head: DiffusionHead, grid: torch.Tensor) -> torch.Tensor:
    """Density of a 1-D head's output ``x_0`` on a uniform ``grid`` (float64 quadrature of the
    reverse chain's transition kernels). The grid must cover the mass with a spacing well
    below the smallest sigma."""
    g = grid.double()
    dx = float(g[1] - g[0])
    z = torch.zeros(g.numel(), 0)
    density = torch.exp(-0.5 * g.square()) / math.sqrt(2 * math.pi)
    for s, sigma in enumerate(head.schedule.sigmas.double().tolist()):
        mu = head.mean(g.float()[:, None], torch.full((g.numel(),), s, dtype=torch.long), z)[:, 0].double()
        kernel = torch.exp(-0.5 * ((g[None, :] - mu[:, None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        density = (density * dx) @ kernel  # p_{t-1}(y) = sum_x p_t(x) N(y; mu(x), sigma^2) dx
    return density
