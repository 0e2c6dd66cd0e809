"""Decode-maximal chunk budget through SGLang's real PrefillAdder (no engine, no GPU).

Built like SGLang's own PrefillAdder unit tests: global ServerArgs first, a mocked radix cache
and KV allocator (SGLang's real PrefillBudget on top), real ``Req`` and ``ScheduleBatch``.
"""

from array import array
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest

pytestmark = pytest.mark.sglang

SHAPE = dict(num_layers=4, hidden_size=256, num_q_heads=4, num_kv_heads=2, head_dim=64, intermediate_size=512,
             vocab_size=1000)


@pytest.fixture(scope="module")
def sg():
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(ServerArgs(model_path="dummy"))
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.managers.schedule_policy import AddReqResult
    from sglang.srt.mem_cache.base_prefix_cache import DecLockRefResult, IncLockRefResult
    from sglang.srt.mem_cache.prefill_budget import PrefillBudget
    from sglang.srt.sampling.sampling_params import SamplingParams

    from tkernels.plugins.sglang import budget

    return SimpleNamespace(Req=Req, ScheduleBatch=ScheduleBatch, AddReqResult=AddReqResult, PrefillBudget=PrefillBudget,
                           SamplingParams=SamplingParams, IncLockRefResult=IncLockRefResult,
                           DecLockRefResult=DecLockRefResult, budget=budget)


def tree_cache(sg):
    tc = MagicMock()
    tc.supports_mamba.return_value = False
    tc.supports_prefix_sharing.return_value = False
    tc.evictable_size.return_value = tc.full_evictable_size.return_value = 0
    tc.disable = False
    tc.inc_lock_ref.return_value = sg.IncLockRefResult()
    tc.dec_lock_ref.return_value = sg.DecLockRefResult()
    return tc


def allocator(sg, free=10**6):
    alloc = MagicMock()
    alloc.page_size = 1
    alloc.available_size.return_value = alloc.full_available_size.return_value = free
    alloc.request_slot_reserve.return_value = 0
    alloc.create_prefill_budget.side_effect = lambda tc, num_mixed_decode_tokens=0: sg.PrefillBudget(
        alloc, tc, num_mixed_decode_tokens=num_mixed_decode_tokens)
    return alloc


def request(sg, rid, prompt, generated=0):
    req = sg.Req(rid, "", array("q", range(1, prompt + 1)), sg.SamplingParams(max_new_tokens=16))
    req.output_ids = array("q", range(generated))
    return req


def policy(slo_ms=None):
    from tkernels.sched import DEFAULT_RATES, DecodeMaximalPolicy, ModelShape

    return DecodeMaximalPolicy(ModelShape(**SHAPE), slo_ms=slo_ms, max_tokens=512, rates=DEFAULT_RATES,
                               default_budget=128)


def admit(sg, decode_lens, prompt, pol, chunked_prefill_size=512):
    """One prefill attempt as the scheduler makes it under --enable-mixed-chunk."""
    decodes = [request(sg, f"d{i}", n - 1, generated=1) for i, n in enumerate(decode_lens)]
    waiting = request(sg, "w", prompt)
    waiting.init_next_round_input(None)
    from tkernels.sched import Prefill

    adder = sg.budget.DecodeMaximalPrefillAdder(
        1, tree_cache(sg), allocator(sg), sg.ScheduleBatch(reqs=decodes, batch_is_full=False), 1.0, 16384,
        chunked_prefill_size, len(decodes), policy=pol, prefills=[Prefill(0, prompt)])
    result = adder.add_one_req(waiting, has_chunked_req=False, truncation_align_size=None)
    chunk = waiting.extend_end - waiting.prefix_len if waiting in adder.can_run_list else 0
    return adder, result, chunk


@pytest.mark.parametrize("slo_ms", [None, 8.0, 30.0], ids=["fixed", "slo8", "slo30"])
def test_chunk_is_the_policy_prefill_grant(sg, monkeypatch, slo_ms):
    monkeypatch.delenv("TKERNELS_TBT_SLO_MS", raising=False)
    decode_lens = [100, 2048, 37, 511, 4000]
    pol = policy(slo_ms)
    adder, _, chunk = admit(sg, decode_lens, 3000, pol)
    plan = adder.plan
    assert plan == pol.plan(decode_lens, 0, [(0, 3000)])
    assert plan.decode_tokens == len(decode_lens)  # every decode kept in the step
    assert 0 < chunk == plan.prefill_tokens
    assert len(decode_lens) + chunk <= plan.tokens <= 512
    if slo_ms is None:
        assert plan.tokens == 128  # the fixed budget, not SGLang's 512 - decodes


def test_without_the_policy_sglang_fills_the_chunk(sg):
    from sglang.srt.managers.schedule_policy import PrefillAdder

    decodes = [request(sg, f"d{i}", 99, generated=1) for i in range(5)]
    waiting = request(sg, "w", 3000)
    waiting.init_next_round_input(None)
    adder = PrefillAdder(1, tree_cache(sg), allocator(sg), sg.ScheduleBatch(reqs=decodes, batch_is_full=False), 1.0,
                         16384, 512, len(decodes))
    adder.add_one_req(waiting, has_chunked_req=False, truncation_align_size=None)
    assert waiting.extend_end == 512 - 5


def test_decodes_over_the_budget_admit_no_prefill(sg, monkeypatch):
    monkeypatch.delenv("TKERNELS_TBT_SLO_MS", raising=False)
    adder, result, chunk = admit(sg, [300] * 200, 1000, policy())
    assert (adder.plan.tokens, adder.plan.decode_tokens, adder.plan.prefill_tokens) == (200, 200, 0)
    assert chunk == 0 and result != sg.AddReqResult.CONTINUE


def scheduler_stub(**overrides):
    model_config = SimpleNamespace(hf_text_config=SimpleNamespace(intermediate_size=512), hidden_size=256,
                                   num_hidden_layers=4, num_attention_heads=4, get_total_num_kv_heads=lambda: 2,
                                   head_dim=64, vocab_size=1000, dtype=SimpleNamespace(itemsize=2))
    fields = dict(chunked_prefill_size=512, is_mixed_chunk=True, model_config=model_config, tp_size=1,
                  max_running_requests=8, running_batch=SimpleNamespace(reqs=[]), waiting_queue=[], chunked_req=None)
    return SimpleNamespace(**{**fields, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"chunked_prefill_size": None}, "needs chunked prefill"),
    ({"is_mixed_chunk": False}, "needs --enable-mixed-chunk"),
])
def test_impossible_server_args_are_a_clear_error(sg, overrides, message):
    from tkernels.plugins.sglang import check_budget_at_start

    with pytest.raises(RuntimeError, match=message):  # at start-up (after init_chunked_prefill)
        check_budget_at_start(None, scheduler_stub(**overrides))
    with pytest.raises(RuntimeError, match=message):
        sg.budget.prefill_adder_for(scheduler_stub(**overrides))


def test_prefill_adder_for_binds_the_waiting_prompts(sg, monkeypatch):
    from tkernels.sched import WaitClock

    monkeypatch.delenv("TKERNELS_TBT_SLO_MS", raising=False)
    chunked = SimpleNamespace(rid="c", prefix_len=256, seqlen=1000)
    waiting = [SimpleNamespace(rid=f"w{n}", prefix_len=0, seqlen=n) for n in (30, 40, 50)]
    scheduler = scheduler_stub(chunked_req=chunked, waiting_queue=waiting, max_running_requests=2)
    factory = sg.budget.prefill_adder_for(scheduler)
    assert factory.func is sg.budget.DecodeMaximalPrefillAdder
    assert factory.keywords["prefills"] == [(256, 744, 0.0), (0, 30, 0.0), (0, 40, 0.0)]
    assert factory.keywords["policy"] is sg.budget.prefill_adder_for(scheduler).keywords["policy"]  # built once
    now = [0.0]
    scheduler.tkernels_wait_clock = WaitClock(clock=lambda: now[0])
    sg.budget.prefill_adder_for(scheduler)
    now[0] = 0.75
    assert [p.waited_ms for p in sg.budget.prefill_adder_for(scheduler).keywords["prefills"]] == [750.0] * 3


def test_aged_prompt_gets_a_tile_beside_decodes_that_fill_the_slo(sg):
    """Issue 14 item 10 through SGLang's PrefillAdder: 16 decodes fill a 0.5 ms SLO (a 16-token
    tile), so the waiting prompt's chunk budget was 0; once it has waited longer than the bound
    its chunk budget is one tile."""
    from tkernels.sched import DEFAULT_RATES, LLAMA3_8B, DecodeMaximalPolicy, Prefill

    pol = DecodeMaximalPolicy(LLAMA3_8B, slo_ms=0.5, max_tokens=512, rates=DEFAULT_RATES, max_wait_ms=100)
    decodes = [request(sg, f"d{i}", 1000, generated=1) for i in range(16)]
    for waited, budget in ((0.0, 0), (150.0, 16)):
        waiting = request(sg, "w", 300)
        waiting.init_next_round_input(None)
        adder = sg.budget.DecodeMaximalPrefillAdder(
            1, tree_cache(sg), allocator(sg), sg.ScheduleBatch(reqs=decodes, batch_is_full=False), 1.0, 16384,
            512, len(decodes), policy=pol, prefills=[Prefill(0, 300, waited)])
        assert adder.plan.prefill_tokens == budget and adder.rem_chunk_tokens == budget
