"""DecodeMaximalScheduler: the decode-maximal budget inside vLLM's AsyncScheduler."""

import importlib.util
import json

import pytest

pytestmark = pytest.mark.vllm

MAX_BATCHED = 512


@pytest.fixture(scope="module")
def model_dir():
    from tkernels.models import tiny_llama_dir

    return tiny_llama_dir()


def create_scheduler(model_dir, scheduler_cls, max_num_batched_tokens=MAX_BATCHED, max_num_seqs=16,
                     long_prefill_token_threshold=256, num_blocks=2000, additional_config=None):
    """As vLLM's tests/v1/core/utils.py::create_scheduler: a scheduler with no engine behind it."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=str(model_dir), skip_tokenizer_init=True, max_model_len=2048, seed=0)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=2048,
        long_prefill_token_threshold=long_prefill_token_threshold, enable_chunked_prefill=True,
        is_encoder_decoder=False, async_scheduling=True,
    )
    cache_config = CacheConfig(block_size=16, gpu_memory_utilization=0.9, cache_dtype="auto")
    cache_config.num_gpu_blocks = num_blocks
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config, cache_config=cache_config,
                             additional_config=additional_config or {})
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    return scheduler_cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config, block_size=16, log_stats=True,
                         structured_output_manager=StructuredOutputManager(vllm_config))


def make_request(request_id, num_prompt_tokens, max_tokens):
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    prompt = [(hash(request_id) + i) % 500 for i in range(num_prompt_tokens)]  # distinct: no prefix-cache hits
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Request(request_id, prompt, params, pooling_params=None, block_hasher=get_request_block_hasher(16, sha256))


def step(scheduler, output):
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(output.num_scheduled_tokens)
    sampled = [[7] if not scheduler.requests[i].is_prefill_chunk else [] for i in ids]
    scheduler.update_from_output(output, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={i: n for n, i in enumerate(ids)}, sampled_token_ids=sampled,
        logprobs=None, prompt_logprobs_dict={}, pooler_output=[]))


def test_mixed_load_respects_budget_and_never_skips_a_decode(model_dir):
    from tkernels.config import ConfigChoice
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler
    from tkernels.sched import LLAMA3_8B, DecodeMaximalPolicy

    # no online calibration: the policies below price the steps as an 8B model on an H100
    scheduler = create_scheduler(model_dir, DecodeMaximalScheduler, long_prefill_token_threshold=128,
                                 additional_config={"tkernels_sched": {"calibrate": False}})
    # Cost the steps as an 8B model on the analytic H100 rates, so that the budget binds. The SLO
    # tightens at step 14 to 5.65 ms, barely above the 5.0 ms of streaming the weights: from then
    # on the decodes alone often fill the budget, and "s4", decoding behind the still-prefilling
    # "long1" (admitted before it), would get no token if the chunk went first.
    slo_ms_from_step = {0: 8.0, 14: 5.65}
    arrivals = {0: [("s0", 40, 60), ("s1", 90, 60), ("s2", 25, 60), ("s3", 130, 60)],
                3: [("long0", 1500, 8)], 10: [("long1", 1800, 8), ("s4", 30, 30)], 25: [("long2", 900, 8)]}
    budgets, shared_steps, decodes_alone = set(), 0, 0
    for step_index in range(3000):
        if step_index in slo_ms_from_step:
            scheduler.policy = DecodeMaximalPolicy(LLAMA3_8B, slo_ms=slo_ms_from_step[step_index], tile=4,
                                                   max_tokens=scheduler.max_budget,
                                                   choice=ConfigChoice(None, "fallback: test", {}))
        for args in arrivals.get(step_index, []):
            scheduler.add_request(make_request(*args))
        if not scheduler.requests:
            break
        decodes = {r.request_id for r in scheduler.running if r.num_computed_tokens >= r.num_prompt_tokens}
        output = scheduler.schedule()
        plan = scheduler.last_plan
        scheduled = output.num_scheduled_tokens
        assert decodes <= set(scheduled), f"step {step_index}: decodes {decodes - set(scheduled)} skipped"
        assert all(scheduled[r] == 1 for r in decodes)
        assert scheduler.max_num_scheduled_tokens == min(plan.tokens, MAX_BATCHED)
        if plan.tokens == plan.decode_tokens and plan.prefill_tokens == 0:
            assert output.total_num_scheduled_tokens == len(decodes)  # decodes alone: exactly the decodes
            decodes_alone += 1
        else:
            assert output.total_num_scheduled_tokens <= plan.tokens
        budgets.add(plan.tokens)
        shared_steps += bool(decodes) and output.total_num_scheduled_tokens > len(decodes)
        step(scheduler, output)
    assert not scheduler.requests, "load did not finish"
    # Prompts were chunked beside decodes, the budget varied, and some steps were decodes only.
    assert shared_steps > 3 and len(budgets) > 3 and decodes_alone > 3


def test_default_budget_and_config_options(model_dir, monkeypatch):
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler
    from tkernels.sched import ENV_TBT_SLO_MS, FALLBACK_BUDGET

    monkeypatch.delenv(ENV_TBT_SLO_MS, raising=False)
    scheduler = create_scheduler(model_dir, DecodeMaximalScheduler, max_num_batched_tokens=2048)
    assert scheduler.policy.slo_ms is None and scheduler.policy.max_tokens == 2048
    assert scheduler.policy.model.shape.head_dim == json.loads((model_dir / "config.json").read_text())["head_dim"]
    scheduler.add_request(make_request("long", 3000, 4))
    assert scheduler.schedule().total_num_scheduled_tokens == FALLBACK_BUDGET
    monkeypatch.setenv(ENV_TBT_SLO_MS, "30")
    assert create_scheduler(model_dir, DecodeMaximalScheduler).policy.slo_ms == 30.0


def test_unsupported_vllm_version_fails_at_import(monkeypatch):
    import vllm

    import tkernels.plugins.vllm.scheduler as installed

    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    # A fresh module object from the same file: the installed module stays untouched.
    spec = importlib.util.spec_from_file_location("_scheduler_under_vllm_0_40", installed.__file__)
    with pytest.raises(RuntimeError, match=r"vLLM 0.40.0 is not supported .*>=0.32,<0.34"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_drafts_beyond_the_grant_are_dropped_from_the_last_decodes(model_dir):
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler

    scheduler = create_scheduler(model_dir, DecodeMaximalScheduler,
                                 additional_config={"tkernels_sched": {"default_budget": 8, "tile": 1}})
    for n in range(3):
        scheduler.add_request(make_request(f"r{n}", 20, 10))
    step(scheduler, scheduler.schedule())  # prompts, 8 tokens at a time
    while any(r.is_prefill_chunk or r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running):
        step(scheduler, scheduler.schedule())
    for request in scheduler.running:
        request.spec_token_ids = [11, 12, 13, 14]
    output = scheduler.schedule()
    # Budget 8: one token per decode, then 5 drafts in serving order.
    assert scheduler.last_plan.spec_tokens == 5 and output.total_num_scheduled_tokens == 8
    assert [output.num_scheduled_tokens[r.request_id] for r in scheduler.running] == [5, 2, 1]
    assert [len(output.scheduled_spec_decode_tokens.get(r.request_id, [])) for r in scheduler.running] == [4, 1, 0]


def test_online_calibration_learns_from_the_steps(model_dir, tmp_path):
    """The scheduler measures every step it hands out, refits its latency model (from the
    default: no config here) and writes what it learned; no timing is asserted."""
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler
    from tkernels.sched import DEFAULT_RATES
    from tkernels.sched.calibration import OnlineCalibration

    log = tmp_path / "calibration.json"
    scheduler = create_scheduler(model_dir, DecodeMaximalScheduler,
                                 additional_config={"tkernels_sched": {"slo_ms": 50, "calibration_log": str(log)}})
    calibration = scheduler.calibration
    assert calibration is not None and calibration.model.rates == DEFAULT_RATES
    assert "default" in calibration.source and calibration._executor is not None  # fits off the engine's thread
    # the same calibration fitting inline, so that this test knows when a fit lands
    scheduler.calibration = calibration = OnlineCalibration(scheduler.policy.model, calibration.source)
    for n, length in enumerate((300, 40, 700, 90)):
        scheduler.add_request(make_request(f"r{n}", length, 40))
    tokens = []
    for _ in range(200):
        if not scheduler.requests:
            break
        output = scheduler.schedule()
        tokens.append(output.total_num_scheduled_tokens)
        step(scheduler, output)
    assert not scheduler.requests
    stepped = [t for t in tokens if t]
    assert calibration.steps == len(stepped) >= calibration.min_steps and calibration.refits >= 1
    assert scheduler.policy.model is calibration.model and calibration.model.rates != DEFAULT_RATES
    # the SLO's step target (50 ms less the margin) leaves room for the measured tail
    assert calibration.tail_ratio >= 1
    assert scheduler.policy.target_us == pytest.approx(scheduler.slo_target_us / calibration.tail_ratio)
    data = json.loads(log.read_text())
    # written at the last refit: the steps up to it
    assert 0 < data["steps"] <= calibration.steps and len(data["costs"]) == len(data["measured_us"]) == data["steps"]
    assert [c[0] for c in data["costs"]] == stepped[:data["steps"]]  # each step's tokens, as scheduled
    assert all(t > 0 for t in data["measured_us"]) and "rates" in data
    off = create_scheduler(model_dir, DecodeMaximalScheduler, additional_config={"tkernels_sched": {"calibrate": False}})
    assert off.calibration is None


@pytest.mark.parametrize("option, value", [("calibrate", "yes"), ("calibration_log", 3)])
def test_calibration_options_are_checked(model_dir, option, value):
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler

    with pytest.raises(ValueError, match=option):
        create_scheduler(model_dir, DecodeMaximalScheduler, additional_config={"tkernels_sched": {option: value}})


def test_unknown_option_is_rejected(model_dir):
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler

    with pytest.raises(ValueError, match="unknown keys \\['slo'\\]"):
        create_scheduler(model_dir, DecodeMaximalScheduler, additional_config={"tkernels_sched": {"slo": 5}})


ENGINE_BATCHED = 256
PROMPT_LENGTHS = [5, 37, 150, 300, 64]


def generate(model_dir, prompt_lengths=PROMPT_LENGTHS, **llm_kwargs):
    """Greedy tokens of an in-process engine, and each step's scheduled token count."""
    from vllm import LLM, SamplingParams

    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                  max_num_batched_tokens=ENGINE_BATCHED, enable_chunked_prefill=True, **llm_kwargs)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    step_tokens, schedule = [], scheduler.schedule

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        step_tokens.append(output.total_num_scheduled_tokens)
        return output

    scheduler.schedule = recording_schedule
    prompts = [{"prompt_token_ids": [(7 * n + 3 * i) % 500 + 7 for i in range(length)]}
               for n, length in enumerate(prompt_lengths)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    scheduler_cls = type(scheduler)
    del llm, scheduler
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    return tokens, step_tokens, scheduler_cls


@pytest.mark.slow
def test_engine_greedy_outputs_match_default_scheduler(model_dir):
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler

    ours, our_steps, cls = generate(
        model_dir, scheduler_cls="tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler",
        additional_config={"tkernels_sched": {"default_budget": 32}})
    default, default_steps, _ = generate(model_dir)
    assert cls is DecodeMaximalScheduler
    assert max(our_steps) <= 32 < max(default_steps)  # prompts really were chunked differently
    assert all(len(t) == 16 for t in ours) and len({tuple(t) for t in ours}) > 1
    assert ours == default


@pytest.mark.slow
def test_64_concurrent_mixed_requests_match_default_engine(model_dir):
    # The load acceptance test: 64 requests of 3..400 prompt tokens submitted at once, so long
    # prompts are chunked while earlier ones decode, under a budget much smaller than the load.
    lengths = [3 + (97 * n) % 398 for n in range(64)]
    ours, our_steps, _ = generate(
        model_dir, lengths, max_num_seqs=64,
        scheduler_cls="tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler",
        additional_config={"tkernels_sched": {"default_budget": 128}})
    default, _, _ = generate(model_dir, lengths, max_num_seqs=64)
    assert len(ours) == 64 and all(len(t) == 16 for t in ours)
    assert max(our_steps) <= 128
    assert ours == default


def test_a_prompt_behind_many_decodes_does_not_starve(model_dir):
    """Issue 14 item 10: 16 decodes under a 0.5 ms SLO filled every step (one 16-token tile), so
    a prompt arriving behind them got 0 tokens for 300 steps. With the ageing bound (here 20 ms of
    a fake clock that runs at the policy's predicted step time) it gets a tile per step once aged.
    Steps are costed as an 8B model's (the tiny test model would meet the SLO)."""
    from tkernels.config import ConfigChoice
    from tkernels.plugins.vllm.scheduler import DecodeMaximalScheduler
    from tkernels.sched import LLAMA3_8B, DecodeMaximalPolicy, WaitClock

    scheduler = create_scheduler(model_dir, DecodeMaximalScheduler, max_num_seqs=32, additional_config={
        "tkernels_sched": {"slo_ms": 0.5, "max_wait_ms": 20, "calibrate": False}})  # the 8B pricing below, kept
    assert scheduler.policy.max_wait_ms == 20  # the option reaches the policy
    scheduler.policy = DecodeMaximalPolicy(LLAMA3_8B, slo_ms=0.5, max_wait_ms=20, max_tokens=scheduler.max_budget,
                                           choice=ConfigChoice(None, "fallback: test", {}))
    now = [0.0]
    scheduler.wait_clock = WaitClock(clock=lambda: now[0])
    for n in range(16):
        scheduler.add_request(make_request(f"d{n}", 8, 400))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.requests.values()):
        step(scheduler, scheduler.schedule())
    scheduler.add_request(make_request("late", 200, 4))
    prompt_tokens = []
    for _ in range(300):
        output = scheduler.schedule()
        plan = scheduler.last_plan
        prompt_tokens.append(output.num_scheduled_tokens.get("late", 0))
        assert all(output.num_scheduled_tokens.get(f"d{n}") == 1 for n in range(16))  # no decode skipped
        step(scheduler, output)
        now[0] += plan.predicted_us / 1e6
        if "late" not in scheduler.requests or scheduler.requests["late"].num_computed_tokens >= 200:
            break
    aged = next(i for i, n in enumerate(prompt_tokens) if n)
    assert prompt_tokens[0] == 0 and all(n >= 16 for n in prompt_tokens[aged:-1])  # a tile every step from then on
    assert sum(prompt_tokens) >= 200  # the prompt was computed
