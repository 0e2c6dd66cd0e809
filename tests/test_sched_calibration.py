"""Latency-model fitting and the online calibration (tkernels.sched.calibration): synthetic steps
from a known CPU-like model, a fake clock; no timing of this machine."""

import math
import random

import numpy as np
import pytest

from tkernels.sched import DEFAULT_RATES, DecodeMaximalPolicy, LatencyModel, LatencyRates, ModelShape, Prefill
from tkernels.sched.calibration import OnlineCalibration
from tkernels.sched.latency_model import fit_rates, prefill_chunk_cost
from tkernels.spec.tree_policy import DynamicTreePolicy

# SmolLM2-135M in float32, the model this project serves on its CPU VM
SMOLLM2 = ModelShape(num_layers=30, hidden_size=576, num_q_heads=9, num_kv_heads=3, head_dim=64,
                     intermediate_size=1536, vocab_size=49152, dtype_bytes=4)
# CPU-like rates (tens of ms per decode step, ~2 ms more per token): the ground truth of the fits
CPU = LatencyRates(overhead_us=5000.0, weight_gbps=10.0, matmul_tflops=0.1, kv_gbps=5.0, attn_tflops=0.05)
TRUTH = LatencyModel(SMOLLM2, CPU)


def served_steps(n: int, seed: int = 0, prefills: bool = True) -> list[tuple[int, int, int]]:
    """Costs of steps a server runs: a few decodes at various contexts, sometimes a prompt chunk."""
    rng = random.Random(seed)
    steps = []
    for _ in range(n):
        tokens = kv = pairs = 0
        for _ in range(rng.randint(1, 8)):
            context = rng.randint(16, 1500)
            tokens, kv, pairs = tokens + 1, kv + context, pairs + context
        if prefills and rng.random() < 0.3:
            chunk = rng.randint(16, 512)
            chunk_kv, chunk_pairs = prefill_chunk_cost(rng.randint(0, 1024), chunk)
            tokens, kv, pairs = tokens + chunk, kv + chunk_kv, pairs + chunk_pairs
        steps.append((tokens, kv, pairs))
    return steps


def test_steps_us_is_step_us():
    costs = served_steps(50)
    for model in (TRUTH, LatencyModel(SMOLLM2, DEFAULT_RATES)):
        np.testing.assert_allclose(model.steps_us(costs), [model.step_us(*c) for c in costs], rtol=1e-12)


def test_fit_recovers_the_predictions_from_the_default_start():
    costs = served_steps(200)
    rng = np.random.default_rng(0)
    measured = TRUTH.steps_us(costs) * rng.lognormal(0, 0.02, len(costs))  # 2% noise
    fitted = LatencyModel(SMOLLM2, fit_rates(SMOLLM2, costs, measured))  # from the H100 default: x100s off
    assert np.median(np.abs(LatencyModel(SMOLLM2, DEFAULT_RATES).steps_us(costs) / measured - 1)) > 0.9
    held_out = served_steps(100, seed=1)
    np.testing.assert_allclose(fitted.steps_us(held_out), TRUTH.steps_us(held_out), rtol=0.05)


def test_fit_keeps_what_the_steps_do_not_constrain():
    costs = [(n, 0, 0) for n in (1, 2, 4, 8, 16, 64, 128)]  # no attention at all: kv and attention rates are free
    fitted = fit_rates(SMOLLM2, costs, TRUTH.steps_us(costs), start=DEFAULT_RATES)
    # the free rates follow the fitted ones at the start's ratios (the fit's weak priors)
    d = DEFAULT_RATES
    assert fitted.attn_tflops / fitted.matmul_tflops == pytest.approx(d.attn_tflops / d.matmul_tflops, rel=1e-3)
    assert fitted.kv_gbps / fitted.weight_gbps == pytest.approx(d.kv_gbps / d.weight_gbps, rel=1e-3)
    assert fitted.matmul_tflops < d.matmul_tflops / 100  # the CPU-like truth, not the H100 start
    np.testing.assert_allclose(LatencyModel(SMOLLM2, fitted).steps_us(costs), TRUTH.steps_us(costs), rtol=0.02)


@pytest.mark.parametrize("costs, measured, match", [
    ([(1, 1, 1)], [1.0, 2.0], "costs"),
    ([], [], "costs"),
    ([(1, 1, 1)], [0.0], "measured_us"),
    ([(1, 1, 1)], [math.nan], "measured_us"),
])
def test_fit_rejects_bad_input(costs, measured, match):
    with pytest.raises(ValueError, match=match):
        fit_rates(SMOLLM2, costs, measured)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_online_calibration_converges_within_the_first_minute():
    clock = FakeClock()
    calibration = OnlineCalibration(LatencyModel(SMOLLM2, DEFAULT_RATES), "the default", clock=clock)
    costs = served_steps(600)
    refit_at = []
    for i, cost in enumerate(costs):
        clock.now = i * 0.1  # a step every 100 ms: 60 s of steps
        if calibration.record(cost, TRUTH.step_us(*cost)) is not None:
            refit_at.append(clock.now)
    assert calibration.steps == 600 and refit_at[0] == pytest.approx((calibration.min_steps - 1) * 0.1)
    # every 2 s while settling (the first minute), then every 30 s
    gaps = np.diff(refit_at)
    assert gaps.min() >= 2.0 - 1e-9 and gaps.max() <= 2.0 + 0.1 + 1e-9
    held_out = served_steps(100, seed=1)
    np.testing.assert_allclose(calibration.model.steps_us(held_out), TRUTH.steps_us(held_out), rtol=0.05)
    summary = calibration.summary()
    assert summary["source"] == "the default" and summary["fit_median_rel_error"] < 0.01
    assert summary["start_median_rel_error"] > 0.9 and summary["window_steps"] == calibration.window
    samples = calibration.samples()
    assert len(samples["costs"]) == len(samples["measured_us"]) == len(samples["predicted_us"]) == calibration.window
    assert "median error" in calibration.line() and "the default" in calibration.line()
    # after the first minute: refits every 30 s
    clock.now = 61.0
    calibration.record(costs[0], TRUTH.step_us(*costs[0]))
    assert calibration.settled
    refits = calibration.refits
    for t in (62.0, 80.0, 90.0):
        clock.now = t
        calibration.record(costs[1], TRUTH.step_us(*costs[1]))
    assert calibration.refits == refits + 1  # 91 s would be the next


def test_online_calibration_waits_for_min_steps_and_checks_input():
    calibration = OnlineCalibration(LatencyModel(SMOLLM2, DEFAULT_RATES), "x", min_steps=4, clock=FakeClock())
    assert [calibration.record((1, 10, 10), 50_000.0) for _ in range(3)] == [None] * 3
    assert calibration.record((1, 10, 10), 50_000.0) is not None
    assert calibration.record((0, 0, 0), 50_000.0) is None  # an empty step teaches nothing
    with pytest.raises(ValueError, match="measured_us"):
        calibration.record((1, 1, 1), -1.0)
    with pytest.raises(ValueError, match="cost"):
        calibration.record((1, -1, 1), 1.0)
    with pytest.raises(ValueError, match="window"):
        OnlineCalibration(calibration.model, "x", window=0)


def test_background_fits_match_inline_ones():
    """background=True: the fit runs in a helper thread and its model comes back at a later
    record() (or wait()); the same steps give the same model as inline fitting."""
    costs = served_steps(40)
    models = []
    for background in (False, True):
        calibration = OnlineCalibration(LatencyModel(SMOLLM2, DEFAULT_RATES), "x", background=background,
                                        clock=FakeClock())
        for cost in costs[:16]:
            refit = calibration.record(cost, TRUTH.step_us(*cost))
        assert (refit is not None) is (not background)
        if background:
            assert calibration.wait() is calibration.model and calibration.refits == 1
        models.append(calibration.model)
    assert models[0] == models[1]


def test_a_failed_fit_keeps_the_model(monkeypatch):
    import tkernels.sched.calibration as calibration_module

    def broken(*args, **kwargs):
        raise RuntimeError("no convergence")

    monkeypatch.setattr(calibration_module, "fit_rates", broken)
    calibration = OnlineCalibration(LatencyModel(SMOLLM2, DEFAULT_RATES), "x", min_steps=1, clock=FakeClock())
    assert calibration.record((1, 10, 10), 50_000.0) is None
    assert calibration.model.rates == DEFAULT_RATES and calibration.failures == 1
    assert "no convergence" in calibration.last_error and calibration.summary()["failed_fits"] == 1


def test_calibrated_budget_holds_a_cpu_slo():
    """The H100 default grants a whole prompt under a 200 ms SLO on a CPU where it takes seconds;
    the calibrated model grants what fits."""
    load = dict(decode_context_lens=[600] * 4, prefills=[Prefill(0, 2048)])
    default = DecodeMaximalPolicy(SMOLLM2, slo_ms=200, max_tokens=2048, rates=DEFAULT_RATES).plan(**load)
    assert default.tokens == 2048 and TRUTH.step_us(default.tokens, 2400, 2400 + 2048 * 2049 // 2) > 200e3
    policy = DecodeMaximalPolicy(SMOLLM2, slo_ms=200, max_tokens=2048, rates=CPU)
    plan = policy.plan(**load)
    assert 4 < plan.tokens < 2048 and plan.predicted_us <= 180e3


def test_tree_size_follows_the_machine():
    """On the CPU model a bigger forward costs more than it gains at large batches: one node (no
    draft); on the H100 default the same acceptance buys big trees."""
    cpu, h100 = DynamicTreePolicy(step_time=TRUTH), DynamicTreePolicy(step_time=LatencyModel(SMOLLM2, DEFAULT_RATES))
    cpu_sizes = [len(cpu.choose(b, 64)) for b in (1, 4, 32)]
    assert cpu_sizes[0] > 1 and cpu_sizes == sorted(cpu_sizes, reverse=True) and cpu_sizes[-1] == 1
    assert all(len(h100.choose(b, 64)) > c for b, c in zip((1, 4, 32), cpu_sizes))


def test_measured_rates_reach_every_reader_through_the_config_folder(tmp_path, monkeypatch, bench_script):
    """bench/serve.py's cpu.json (measured rates only) is a valid config, and the readers of
    the per-GPU config (the scheduler's policy, the tree proposer's LatencyRates.from_config)
    get the measured rates from it."""
    from dataclasses import asdict

    from tkernels import config

    serve = bench_script("serve")
    path = serve.write_cpu_config(tmp_path, asdict(CPU), "a test")
    assert config.load(path)["latency_model"]["source"] == "a test"
    monkeypatch.setenv(config.ENV_CONFIG_DIR, str(tmp_path))
    choice = config.choose()
    assert choice.path == path and LatencyRates.from_config(choice) == CPU
    assert DecodeMaximalPolicy(SMOLLM2, slo_ms=200, choice=choice).model == TRUTH


def test_tail_ratio_is_the_upper_quantile_of_measured_over_predicted():
    """A machine whose steps are usually on the model but one in ten runs 1.5x slower: the fit
    follows the usual step and the tail ratio says how much slower the tail is."""
    calibration = OnlineCalibration(LatencyModel(SMOLLM2, DEFAULT_RATES), "the default", min_steps=8, refit_s=0)
    assert calibration.tail_ratio == 1.0
    for i, cost in enumerate(served_steps(200)):
        calibration.record(cost, TRUTH.step_us(*cost) * (1.5 if i % 10 == 0 else 1.0))
    assert 1.4 < calibration.tail_ratio < 1.6
    assert calibration.summary()["tail_ratio"] == calibration.tail_ratio
    assert f"x{calibration.tail_ratio:.2f}" in calibration.line()
