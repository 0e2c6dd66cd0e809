"""Continuous speculative acceptance benchmark C1: MAR-H-like verification of one window.

Batch 64, a window of 256 tokens (MAR-H's sequence) of 16 dims, 100 diffusion steps, fp32 (MAR
runs its diffusion head in fp32): per-token trajectory log-ratios over (steps x dims) from the
draft trajectory and both heads' means, then the number of accepted tokens per row. Each timed
call is the whole path: ``first_rejection(trajectory_log_ratio(x, mu_p, mu_q, sigma), u)``.

Implementations on the same inputs: ``tkernels`` (:mod:`tkernels.continuous.acceptance` with this
GPU's tuned launch config, or the documented fallback), ``tkernels-default-config`` (the built-in
launch defaults: the pair reports what tuning bought) and ``torch`` (the plain-PyTorch references). Outputs are checked before timing (log-ratios close,
accepted counts equal except where a log-ratio sits within rounding of log u).

Run on a GPU: ``pytest bench/bench_continuous.py --benchmark-enable``; medians of
``triton.testing.do_bench`` are merged into ``bench/results/<device file name>.json`` as
``{"workload": "C1", "impl": ..., "us": ..., "tbps": ...}`` records (tbps: bytes read / time).
Without a GPU the module skips unless ``TKERNELS_BENCH_TINY=1`` (tiny
shapes under the interpreter, nothing written).
"""

from __future__ import annotations

import functools

import pytest
import torch
from common import DEVICE, HAS_CUDA, median_us, requires_gpu

from tkernels.continuous import acceptance as A

pytestmark = requires_gpu

BATCH, TOKENS, DIMS, STEPS = (64, 256, 16, 100) if HAS_CUDA else (2, 8, 4, 5)


@functools.cache
def inputs():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (BATCH * TOKENS, STEPS, DIMS)
    sigma = torch.linspace(0.5, 0.02, STEPS, device=DEVICE)
    mu_q = torch.randn(shape, generator=g, device=DEVICE)
    x = mu_q + sigma[:, None] * torch.randn(shape, generator=g, device=DEVICE)  # a draft trajectory
    mu_p = mu_q + 0.002 * torch.randn(shape, generator=g, device=DEVICE)  # a close target
    uniforms = torch.rand(BATCH, TOKENS, generator=g, device=DEVICE)
    return x, mu_p, mu_q, sigma, uniforms


def _run(log_ratio_fn, first_rejection_fn):
    x, mu_p, mu_q, sigma, uniforms = inputs()
    return lambda: first_rejection_fn(log_ratio_fn(x, mu_p, mu_q, sigma).view(BATCH, TOKENS), uniforms)


IMPLS = {
    "tkernels": _run(A.trajectory_log_ratio, A.first_rejection),
    "tkernels-default-config": _run(functools.partial(A.trajectory_log_ratio, config=A.DEFAULT_CONFIG), A.first_rejection),
    "torch": _run(A.trajectory_log_ratio_reference, A.first_rejection_reference),
}


def _check(impl):
    x, mu_p, mu_q, sigma, _uniforms = inputs()
    config = A.DEFAULT_CONFIG if impl == "tkernels-default-config" else None
    got = A.trajectory_log_ratio(x, mu_p, mu_q, sigma, config=config)
    torch.testing.assert_close(got, A.trajectory_log_ratio_reference(x, mu_p, mu_q, sigma), rtol=1e-3, atol=1e-3)
    n_got, n_want = IMPLS[impl](), IMPLS["torch"]()
    assert int((n_got != n_want).sum()) <= 1, "accepted counts differ beyond a rounding tie"


@pytest.mark.parametrize("impl", list(IMPLS))
def test_c1(benchmark, impl, records):
    _check(impl)
    us = benchmark.pedantic(median_us, args=(IMPLS[impl],), rounds=1, iterations=1)
    x, mu_p, mu_q, _, uniforms = inputs()
    read = x.nbytes + mu_p.nbytes + mu_q.nbytes + uniforms.nbytes
    record = {"workload": "C1", "impl": impl, "us": us, "tbps": read / (us * 1e-6) / 1e12}
    benchmark.extra_info.update(record)
    records.append(record)
