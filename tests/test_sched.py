"""Decode-maximal token budget policy (tkernels.sched): pure-Python unit tests."""

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tkernels.config import ConfigChoice, ConfigError
from tkernels.sched import (
    DEFAULT_RATES,
    ENV_TBT_SLO_MS,
    FALLBACK_BUDGET,
    LLAMA3_8B,
    DecodeMaximalPolicy,
    LatencyModel,
    LatencyRates,
    ModelShape,
    Prefill,
)
from tkernels.sched.latency_model import batch_cost, draft_cost, prefill_chunk_cost

MODEL = LatencyModel(LLAMA3_8B, DEFAULT_RATES)
NO_CONFIG = ConfigChoice(None, "fallback: test", {})


def policy(**kwargs):
    kwargs.setdefault("choice", NO_CONFIG)
    return DecodeMaximalPolicy(LLAMA3_8B, **kwargs)


def random_load(seed):
    r = random.Random(seed)
    decodes = [r.randint(1, 8192) for _ in range(r.choice([0, 1, 7, 64, 300]))]
    spec = [r.choice([0, 0, 3, 15]) for _ in decodes]
    prefills = [Prefill(r.choice([0, r.randint(0, 16384)]), r.randint(1, 5000)) for _ in range(r.randint(0, 3))]
    return decodes, spec, prefills


def predicted_us(decodes, spec, prefills):
    """The step time of exactly this load, costed independently of the policy's prefix sums."""
    kv = pairs = tokens = 0
    for context_len, drafts in zip(decodes, spec):
        draft_kv, draft_pairs = draft_cost(context_len, drafts)
        kv, pairs, tokens = kv + context_len + draft_kv, pairs + context_len + draft_pairs, tokens + 1 + drafts
    for prefix_len, chunk in prefills:
        chunk_kv, chunk_pairs = prefill_chunk_cost(prefix_len, chunk)
        kv, pairs, tokens = kv + chunk_kv, pairs + chunk_pairs, tokens + chunk
    return MODEL.step_us(tokens, kv, pairs)


def test_default_rates_match_measured_linear_scaling():
    # docs/design.md, H100, Llama-3-8B linear layers: x1.02 @64, x1.07 @128, x1.22 @256, x1.93 @512.
    one = MODEL.step_us(1, 0, 0) - DEFAULT_RATES.overhead_us
    for tokens, measured in [(64, 1.02), (128, 1.07), (256, 1.22), (512, 1.93)]:
        ratio = (MODEL.step_us(tokens, 0, 0) - DEFAULT_RATES.overhead_us) / one
        assert ratio == pytest.approx(measured, rel=0.06)


def test_latency_model_prices_the_tree_policy():
    from tkernels.spec import DynamicTreePolicy

    trees = DynamicTreePolicy(k=4, max_depth=16, step_time=MODEL)
    # docs/design.md: a 64-node tree is free at batch 1 and unaffordable at batch 32.
    assert len(trees.choose(1, 64)) == 64 and len(trees.choose(32, 64)) < 16


@pytest.mark.parametrize("tile", [16, 32, 7])
@pytest.mark.parametrize("slo_ms", [None, 12.0, 30.0, 200.0])
def test_budget_is_tile_aligned_and_capped(tile, slo_ms):
    p = policy(slo_ms=slo_ms, tile=tile, max_tokens=4096)
    for seed in range(40):
        decodes, spec, prefills = random_load(seed)
        plan = p.plan(decodes, spec, prefills)
        if plan.tokens == plan.decode_tokens and plan.spec_tokens == plan.prefill_tokens == 0:
            continue  # decodes alone: exactly the decodes, aligned or not
        assert plan.tokens % tile == 0 and tile <= plan.tokens <= 4096 // tile * tile
        assert plan.decode_tokens + plan.spec_tokens + plan.prefill_tokens <= plan.tokens


def granted(cap, decodes, spec, prefills):
    """The step a cap grants: every decode, then drafts of the first decodes, then prompts in order."""
    left = max(cap - len(decodes), 0)
    granted_spec, chunks = [], []
    for s in spec:
        granted_spec.append(min(s, left))
        left -= granted_spec[-1]
    for prefix_len, remaining, *_ in prefills:
        chunks.append((prefix_len, min(remaining, left)))
        left -= chunks[-1][1]
    return decodes, granted_spec, [c for c in chunks if c[1]]


@pytest.mark.parametrize("seed", range(20))
def test_budget_meets_slo_and_is_maximal(seed):
    decodes, spec, prefills = random_load(seed)
    slo_ms = random.Random(seed).choice([15.0, 40.0, 100.0])
    plan = policy(slo_ms=slo_ms, margin=0.1, max_tokens=8192).plan(decodes, spec, prefills)
    target = slo_ms * 1e3 * 0.9
    step = granted(plan.tokens, decodes, spec, prefills)
    assert (sum(step[1]), sum(c for _, c in step[2])) == (plan.spec_tokens, plan.prefill_tokens)
    assert plan.predicted_us == pytest.approx(predicted_us(*step), rel=1e-9)
    if plan.tokens > len(decodes) and decodes:  # without decodes the prompts run whole (test below)
        assert plan.predicted_us <= target or plan.tokens == 16  # one tile always runs
    work = len(decodes) + sum(spec) + sum(p.remaining for p in prefills)
    next_cap = plan.tokens // 16 * 16 + 16
    if work > plan.tokens and next_cap <= 8192:  # not limited by the work: one more tile misses the SLO
        assert predicted_us(*granted(next_cap, decodes, spec, prefills)) > target


def test_budget_grows_with_slo():
    decodes, prefills = [2048] * 64, [Prefill(3584, 100_000)]
    budgets = [policy(slo_ms=slo).plan(decodes, 0, prefills).tokens for slo in (5, 10, 14, 20, 30, 50, 80, 200)]
    assert budgets == sorted(budgets) and budgets[0] == 64 and budgets[-1] > budgets[2] > 64


def test_decodes_never_dropped():
    p = policy(slo_ms=10.0)
    for num_decodes in (1, 63, 64, 65, 300, 5000):
        plan = p.plan([4096] * num_decodes, 4, [Prefill(0, 10_000)])
        assert plan.decode_tokens == num_decodes and plan.tokens >= num_decodes
    # 300 decodes at 4096 keys alone miss a 10 ms SLO: the step is exactly the decodes.
    plan = p.plan([4096] * 300, 4, [Prefill(0, 10_000)])
    assert (plan.tokens, plan.spec_tokens, plan.prefill_tokens) == (300, 0, 0)
    # Decodes above max_tokens are still all granted.
    assert policy(slo_ms=10.0, max_tokens=256).plan([16] * 1000).tokens == 1000


def test_chunk_shrinks_as_prefix_grows():
    p = policy(slo_ms=30.0)
    chunks = [p.plan([2048] * 32, 0, [Prefill(prefix, 1_000_000)]).prefill_tokens
              for prefix in (0, 1024, 4096, 16384, 65536)]
    assert all(a > b for a, b in itertools.pairwise(chunks)) and chunks[-1] > 0


def test_running_chunk_then_new_prefills():
    plan = policy(slo_ms=30.0).plan([1024] * 8, 0, [Prefill(8000, 40), Prefill(0, 100_000)])
    assert plan.prefill_tokens > 40  # the running chunk's 40 tokens, the rest to the new prompt
    # Costed with the new prompt at prefix 0, not at the running chunk's prefix.
    assert plan.predicted_us == pytest.approx(
        predicted_us([1024] * 8, [0] * 8, [(8000, 40), (0, plan.prefill_tokens - 40)]))


def test_drafts_and_chunk_share_the_budget():
    p = policy(slo_ms=25.0)
    decodes, prefills = [2048] * 16, [Prefill(0, 100_000)]
    plain = p.plan(decodes, 0, prefills)
    spec = p.plan(decodes, 8, prefills)
    capped = p.plan(decodes, 8, prefills, tree_budget=40)
    assert spec.spec_tokens == 16 * 8 and capped.spec_tokens == 40  # drafts first, up to the tree budget
    assert spec.prefill_tokens < capped.prefill_tokens < plain.prefill_tokens  # the rest to the chunk
    for plan in (plain, spec, capped):
        assert plan.decode_tokens + plan.spec_tokens + plan.prefill_tokens == plan.tokens
    # A tight SLO cuts drafts (from the last decodes) before any decode.
    tight = policy(slo_ms=10.0).plan(decodes, [64] * 16, prefills)
    assert 0 < tight.spec_tokens < 16 * 64 and tight.prefill_tokens == 0 and tight.decode_tokens == 16


def test_budget_stops_at_the_work():
    p = policy(slo_ms=100.0)
    assert p.plan([100] * 5, 0, [Prefill(0, 20)]).tokens == 32  # 25 tokens, rounded up to a tile
    assert p.plan([]).tokens == 16  # nothing to run: one tile, never a zero budget


@pytest.mark.parametrize("slo_ms", [5.0, 30.0])
def test_without_decodes_prompts_run_whole(slo_ms):
    """No running decode, no inter-token latency to protect: the step is the prompts' whole work
    (rounded up to a tile) within the buffer, whatever the SLO; with one decode the SLO applies."""
    p = policy(slo_ms=slo_ms, max_tokens=8192)
    prompts = [Prefill(0, 3000), Prefill(500, 1200)]
    plan = p.plan([], 0, prompts)
    assert (plan.tokens, plan.decode_tokens, plan.prefill_tokens) == (4208, 0, 4200)
    assert plan.predicted_us > slo_ms * 1e3  # over the SLO, which guards decodes only
    assert p.plan([], 0, [Prefill(0, 100_000)]).prefill_tokens == 8192  # the buffer still bounds it
    with_decode = p.plan([1024], 0, prompts)
    assert (with_decode.prefill_tokens < 4200 and with_decode.predicted_us <= slo_ms * 1e3 * 0.9) or \
        with_decode.tokens == 16


def test_no_slo_uses_config_budget_else_fallback(monkeypatch):
    monkeypatch.delenv(ENV_TBT_SLO_MS, raising=False)
    assert policy().plan([10] * 3, 0, [Prefill(0, 10_000)]).tokens == FALLBACK_BUDGET
    configured = ConfigChoice(Path("GPU.json"), "shipped: test", {"budgets": {"default_tokens": 1000}})
    plan = policy(choice=configured).plan([10] * 3, 0, [Prefill(0, 10_000)])
    assert plan.tokens == 992 and plan.prefill_tokens == 989  # aligned down to the tile
    assert policy(default_budget=64, max_tokens=48).plan([], 0, [Prefill(0, 100)]).tokens == 48
    bad = ConfigChoice(Path("GPU.json"), "shipped: test", {"budgets": {"default_tokens": "many"}})
    with pytest.raises(ConfigError, match="budgets.default_tokens"):
        policy(choice=bad)


def test_slo_from_env(monkeypatch):
    monkeypatch.setenv(ENV_TBT_SLO_MS, "25")
    assert policy().slo_ms == 25.0
    assert policy(slo_ms=40).slo_ms == 40  # the argument wins
    monkeypatch.setenv(ENV_TBT_SLO_MS, "fast")
    with pytest.raises(ValueError, match=ENV_TBT_SLO_MS):
        policy()


def test_rates_from_config():
    rates = {"overhead_us": 10.0, "weight_gbps": 1000.0, "matmul_tflops": 300.0, "kv_gbps": 900.0, "attn_tflops": 100}
    choice = ConfigChoice(Path("GPU.json"), "shipped: test", {"latency_model": rates})
    assert policy(slo_ms=20, choice=choice).model.rates == LatencyRates(**rates)
    assert policy(slo_ms=20).model.rates == DEFAULT_RATES  # empty section: analytic default
    slower = policy(slo_ms=40, choice=choice).plan([2048] * 8, 0, [Prefill(0, 100_000)])
    faster = policy(slo_ms=40).plan([2048] * 8, 0, [Prefill(0, 100_000)])
    assert slower.tokens < faster.tokens
    for section, field in [({k: v for k, v in rates.items() if k != "kv_gbps"}, "kv_gbps"),
                           ({**rates, "attn_tflops": -1}, "attn_tflops")]:
        with pytest.raises(ConfigError, match=f"latency_model.{field}"):
            policy(slo_ms=20, choice=ConfigChoice(Path("GPU.json"), "shipped: test", {"latency_model": section}))


@pytest.mark.parametrize("kwargs, match", [
    ({"tile": 0}, "tile"), ({"max_tokens": 8}, "max_tokens"), ({"margin": 1.0}, "margin"),
    ({"slo_ms": 0}, "slo_ms"), ({"slo_ms": float("nan")}, "slo_ms"), ({"default_budget": 0}, "default_budget"),
    ({"max_wait_ms": -1}, "max_wait_ms"), ({"max_wait_ms": float("nan")}, "max_wait_ms"),
    ({"max_wait_ms": "soon"}, "max_wait_ms"),
])
def test_bad_policy_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        policy(**kwargs)


@pytest.mark.parametrize("args, match", [
    (([-1],), "decode_context_lens"), (([10, 20], [1]), "spec_tokens"), (([10], -2), "spec_tokens"),
    (([10], 0, [(0, -5)]), "prefills"), (([10], 0, [(1.5, 5)]), "prefills"), (([10], 1, (), -1), "tree_budget"),
    # issue 14 item 8: a decode with no context, wrong-length prompt tuples (a TypeError before)
    (([0],), "decode_context_lens"), (([10], 0, [(1, 2, 3, 4)]), "prefills"), (([10], 0, [(5,)]), "prefills"),
    (([10], 0, [(0, 5, -1.0)]), "prefills"), (([10], 0, [(0, 5, float("nan"))]), "prefills"),
    (([10], 0, [5]), "prefills"), (([True],), "decode_context_lens"),
])
def test_bad_plan_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        policy(slo_ms=20).plan(*args)


def test_bad_shape_and_rates():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelShape(num_layers=2, hidden_size=64, num_q_heads=2, num_kv_heads=0, head_dim=32,
                   intermediate_size=128, vocab_size=256)
    with pytest.raises(ValueError, match="kv_gbps"):
        LatencyRates(overhead_us=0, weight_gbps=1, matmul_tflops=1, kv_gbps=0, attn_tflops=1)


def test_numpy_integers_are_counts():
    """Issue 14 item 8: NumPy integers (a server's arrays) were refused."""
    import numpy as np

    p = policy(slo_ms=20)
    want = p.plan([100, 200], [3, 0], [Prefill(0, 500)], tree_budget=2)
    got = p.plan(list(np.array([100, 200])), np.array([3, 0]), [(np.int64(0), np.int32(500))], tree_budget=np.int64(2))
    assert got == want
    assert p.plan([100, 200], np.int64(3)) == p.plan([100, 200], 3)
    assert policy(tile=np.int64(8), max_tokens=np.int64(64)).tile == 8


# --- issue 14 item 10: no prompt starves --------------------------------------------------------

STARVING_LOADS = [  # (decodes, draft tokens per decode, SLO ms): a waiting prompt got 0 tokens for 300 steps
    (16, 0, 0.5),
    (64, 0, 2.0),
    (40, 63, 30.0),
]


@pytest.mark.parametrize("decodes, drafts, slo_ms", STARVING_LOADS)
@pytest.mark.parametrize("max_wait_ms", [0.0, 50.0, 500.0])
def test_a_waiting_prompt_gets_a_tile_per_step_once_aged(decodes, drafts, slo_ms, max_wait_ms):
    """Time runs at the predicted step time. Until the prompt has waited longer than max_wait_ms
    the SLO rules (here it grants the prompt nothing); from then on every step grants it at least
    one tile, taken before the drafts: the step meets the SLO whenever the decodes plus one tile
    do, and exceeds it only by that tile otherwise."""
    p = policy(slo_ms=slo_ms, max_wait_ms=max_wait_ms)
    target = slo_ms * 1e3 * (1 - 0.1)
    assert p.plan([1024] * decodes, drafts, [Prefill(0, 100_000)]).prefill_tokens == 0  # the SLO alone starves it
    waited, remaining, aged_steps = 0.0, 100_000, 0
    for step in range(300):
        context = [1024 + step] * decodes
        prompt = Prefill(100_000 - remaining, remaining, waited)
        plan = p.plan(context, drafts, [prompt])
        assert plan.decode_tokens == decodes  # a decode is never dropped
        if waited > max_wait_ms:
            aged_steps += 1
            assert plan.prefill_tokens >= p.tile, (step, waited)
            assert plan.tokens == plan.decode_tokens + plan.spec_tokens + plan.prefill_tokens
            tile_fits = p.plan(context, 0, [prompt[:2]]).prefill_tokens >= p.tile  # no drafts, not aged
            assert plan.predicted_us <= target if tile_fits else plan.tokens == decodes + p.tile
        else:
            assert plan.prefill_tokens == 0
        remaining -= plan.prefill_tokens
        waited += plan.predicted_us / 1e3
    assert aged_steps >= 300 - 1 - max_wait_ms / 4.5  # every step here lasts >= 4.5 ms


def test_ageing_bound_from_env_and_default(monkeypatch):
    from tkernels.sched import DEFAULT_MAX_WAIT_MS, ENV_MAX_WAIT_MS

    monkeypatch.delenv(ENV_MAX_WAIT_MS, raising=False)
    assert policy().max_wait_ms == DEFAULT_MAX_WAIT_MS
    monkeypatch.setenv(ENV_MAX_WAIT_MS, "120")
    assert policy().max_wait_ms == 120.0 and policy(max_wait_ms=7).max_wait_ms == 7
    monkeypatch.setenv(ENV_MAX_WAIT_MS, "later")
    with pytest.raises(ValueError, match=ENV_MAX_WAIT_MS):
        policy()


def test_wait_clock_ages_prompts_from_first_sight():
    from tkernels.sched import WaitClock

    now = [100.0]
    clock = WaitClock(clock=lambda: now[0])
    assert clock.waited_ms(["a", "b"]) == [0.0, 0.0]
    now[0] += 0.25
    assert clock.waited_ms(["a", "b", "c"]) == [250.0, 250.0, 0.0]
    now[0] += 0.5
    assert clock.waited_ms(["c"]) == [500.0]  # a and b left the queue: forgotten
    assert clock.waited_ms(["a"]) == [0.0]


@pytest.mark.parametrize("arg,call", [
    # issue 22: the latency model's cost helpers took negative or fractional counts
    ("prefix_len", lambda: prefill_chunk_cost(-1, 5)),
    ("chunk", lambda: prefill_chunk_cost(0, 2.5)),
    ("context_len", lambda: draft_cost(-1, 5)),
    ("spec_tokens", lambda: draft_cost(10, -1)),
    ("tokens", lambda: LatencyModel(LLAMA3_8B, LatencyRates.from_config()).step_us(-1, 0, 0)),
    ("kv_tokens", lambda: LatencyModel(LLAMA3_8B, LatencyRates.from_config()).step_us(1, 0.5, 0)),
    ("attn_pairs", lambda: LatencyModel(LLAMA3_8B, LatencyRates.from_config()).step_us(1, 0, None)),
])
def test_latency_model_bad_inputs_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()


def test_batch_cost_sums_the_rows_chunks(rng):
    prefix = torch.randint(0, 900, (9,), generator=rng).tolist() + [5]
    chunks = torch.randint(1, 40, (9,), generator=rng).tolist() + [0]  # a row with nothing scheduled adds nothing
    expected = [sum(chunks), 0, 0]
    for p, c in zip(prefix, chunks):
        if c:
            kv, pairs = prefill_chunk_cost(p, c)
            expected[1] += kv
            expected[2] += pairs
    assert batch_cost(prefix, chunks) == tuple(expected)
    assert batch_cost(np.array(prefix), np.array(chunks)) == tuple(expected)
    assert batch_cost([], []) == (0, 0, 0)
    with pytest.raises(ValueError, match="prefix_lens"):
        batch_cost([1, 2], [3])
    with pytest.raises(ValueError, match="prefix_lens, chunks"):
        batch_cost([1], [-3])
