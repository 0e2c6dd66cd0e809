"""Continuous acceptance kernels vs their torch references (interpreter), validation, compile."""

import math
import os
import subprocess
import sys

import pytest
import torch

from tkernels.continuous.acceptance import (
    first_rejection,
    first_rejection_reference,
    launch_config,
    trajectory_log_ratio,
    trajectory_log_ratio_reference,
)


def _trajectories(rows, steps, dims, dtype, rng):
    x, mu_p, mu_q = (torch.randn(rows, steps, dims, generator=rng).to(dtype) for _ in range(3))
    sigma = torch.rand(steps, generator=rng) + 0.05
    return x, mu_p, mu_q, sigma


@pytest.mark.parametrize("rows,steps,dims", [(1, 1, 1), (7, 3, 4), (130, 100, 16), (33, 17, 5), (5, 9, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_log_ratio_matches_reference(rows, steps, dims, dtype, rng):
    x, mu_p, mu_q, sigma = _trajectories(rows, steps, dims, dtype, rng)
    got = trajectory_log_ratio(x, mu_p, mu_q, sigma)
    want = trajectory_log_ratio_reference(x, mu_p, mu_q, sigma)
    assert got.dtype == torch.float32 and got.shape == (rows,) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * steps * dims)


@pytest.mark.parametrize("config", [{"block_k": 16, "block_elements": 64, "num_warps": 2}, {"block_k": 128}])
def test_log_ratio_launch_configs_match_reference(config, rng):
    x, mu_p, mu_q, sigma = _trajectories(37, 9, 5, torch.float32, rng)
    torch.testing.assert_close(trajectory_log_ratio(x, mu_p, mu_q, sigma, config=config),
                               trajectory_log_ratio_reference(x, mu_p, mu_q, sigma), rtol=1e-4, atol=1e-3)
    for bad in ({"block_n": 4}, {"block_k": 100}, {"num_warps": 0}):
        with pytest.raises(ValueError, match="^config"):
            trajectory_log_ratio(x, mu_p, mu_q, sigma, config=bad)


def test_log_ratio_strided_inputs(rng):
    # Views with non-unit strides on every axis (a [rows, dims, steps] buffer transposed).
    base = torch.randn(3, 19, 4, 11, generator=rng)
    x, mu_p, mu_q = (base[i].transpose(1, 2)[::2] for i in range(3))  # [5, 11, 4]
    sigma = torch.rand(11, generator=rng) + 0.1
    torch.testing.assert_close(trajectory_log_ratio(x, mu_p, mu_q, sigma), trajectory_log_ratio_reference(x, mu_p, mu_q, sigma), rtol=1e-5, atol=1e-4)


def test_log_ratio_is_difference_of_gaussian_log_densities(rng):
    x, mu_p, mu_q, sigma = _trajectories(6, 8, 3, torch.float64, rng)
    normal = lambda mu: torch.distributions.Normal(mu, sigma[None, :, None].double()).log_prob(x).sum((1, 2))
    torch.testing.assert_close(trajectory_log_ratio_reference(x, mu_p, mu_q, sigma).double(), normal(mu_p) - normal(mu_q), rtol=1e-5, atol=1e-4)
    same = trajectory_log_ratio(x.float(), mu_p.float(), mu_p.float(), sigma)
    assert torch.equal(same, torch.zeros(6))


def test_log_ratio_empty():
    assert trajectory_log_ratio(*(torch.randn(0, 4, 2) for _ in range(3)), torch.ones(4)).shape == (0,)
    assert torch.equal(trajectory_log_ratio(*(torch.randn(3, 0, 2) for _ in range(3)), torch.ones(0)), torch.zeros(3))


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda a: {**a, "mu_p": torch.randn(4, 6, 3)}, "mu_p"),  # steps differ
        (lambda a: {**a, "mu_q": torch.randn(4, 5, 2)}, "mu_q"),  # dims differ
        (lambda a: {**a, "x": torch.randn(4, 5)}, "x"),
        (lambda a: {**a, "sigma": torch.ones(6)}, "sigma"),
        (lambda a: {**a, "sigma": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])}, "sigma"),
        (lambda a: {**a, "sigma": -torch.ones(5)}, "sigma"),
        (lambda a: {**a, "mu_p": torch.randint(0, 3, (4, 5, 3))}, "mu_p"),
    ],
)
def test_log_ratio_bad_inputs(change, needle):
    args = {"x": torch.randn(4, 5, 3), "mu_p": torch.randn(4, 5, 3), "mu_q": torch.randn(4, 5, 3), "sigma": torch.ones(5)}
    for fn in (trajectory_log_ratio, trajectory_log_ratio_reference):
        with pytest.raises(ValueError, match=needle):
            fn(**change(args))


@pytest.mark.parametrize("rows,window", [(1, 1), (9, 4), (200, 1), (37, 70), (3, 64)])
def test_first_rejection_matches_reference(rows, window, rng):
    log_ratio = torch.randn(rows, window, generator=rng) * 2 + 0.5
    uniforms = torch.rand(rows, window, generator=rng)
    got = first_rejection(log_ratio, uniforms)
    assert got.dtype == torch.int32 and got.shape == (rows,)
    assert torch.equal(got, first_rejection_reference(log_ratio, uniforms))
    assert ((got >= 0) & (got <= window)).all()


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf is intended
def test_first_rejection_edge_values():
    inf, nan = math.inf, math.nan
    log_ratio = torch.tensor([[0.0, inf, -1.0], [nan, 0.0, 0.0], [-inf, 0.0, 0.0], [5.0, 5.0, 5.0], [-0.1, 0.0, 0.0]])
    uniforms = torch.tensor([[0.0, 0.999, 0.3], [0.1, 0.1, 0.1], [0.0, 0.1, 0.1], [0.999, 0.999, 0.999], [0.95, 0.5, 0.5]])
    # row 0: u=0 accepts, +inf accepts, exp(-1)=0.37 > 0.3 accepts -> 3; NaN rejects; -inf rejects
    # even u = 0; all ratios >= 1 accept; exp(-0.1) = 0.905 < 0.95 rejects.
    want = torch.tensor([3, 0, 0, 3, 0], dtype=torch.int32)
    assert torch.equal(first_rejection(log_ratio, uniforms), want)
    assert torch.equal(first_rejection_reference(log_ratio, uniforms), want)
    assert first_rejection(torch.zeros(0, 4), torch.rand(0, 4)).shape == (0,)
    assert torch.equal(first_rejection(torch.zeros(2, 0), torch.rand(2, 0)), torch.zeros(2, dtype=torch.int32))


def test_first_rejection_bad_inputs():
    with pytest.raises(ValueError, match="uniforms"):
        first_rejection(torch.zeros(3, 4), torch.rand(3, 5))
    with pytest.raises(ValueError, match="log_ratio"):
        first_rejection(torch.zeros(3), torch.rand(3))
    with pytest.raises(ValueError, match="uniforms"):
        first_rejection(torch.zeros(3, 4), torch.randint(0, 2, (3, 4)))


def test_kernels_compile_for_gpu_targets():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "from tkernels import registry as r\n"
        "entries = r.load_all(('tkernels.continuous.acceptance',))\n"
        "mine = [e for e in entries.values() if e.module == 'tkernels.continuous.acceptance']\n"
        "assert len(mine) == 2, mine\n"
        "[r.compile_entry(e, t) for e in mine for t in r.TARGETS]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_first_rejection_rejects_uniforms_outside_the_unit_interval():
    """Issue 14 items 7/8: NaN, negative or >= 1 uniforms were used as they came."""
    for bad in (math.nan, 1.0, 2.0, -0.5):
        uniforms = torch.rand(3, 4)
        uniforms[1, 2] = bad
        for fn in (first_rejection, first_rejection_reference):
            with pytest.raises(ValueError, match=r"^uniforms: .*\[0, 1\)"):
                fn(torch.zeros(3, 4), uniforms)


def test_launch_configs_refuse_bad_row_sizes():
    from tkernels.spec.verify import launch_config as verify_launch_config

    for fn, arg in ((launch_config, "elements"), (verify_launch_config, "vocab")):
        for bad in (0, 2.5):
            with pytest.raises(ValueError, match=rf"^{arg}\b"):
                fn(bad)
