"""Token Recycling tree speculation in vLLM: proposer, runner patches by hand, then the engine."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_proposer import VOCAB, Batch, FakeTarget, logits_preferring

pytestmark = pytest.mark.vllm

NUM_SPEC = 3
TREE_PROPOSER = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"


# (hidden, layers, heads, kv heads, head size, MLP) as the step-latency model reads a model
SMOLLM2_135M = (576, 30, 9, 3, 64, 1536)
LLAMA3_8B = (4096, 32, 32, 8, 128, 14336)


def vllm_config(num_spec=NUM_SPEC, async_scheduling=False, max_model_len=256, additional_config=None, shape=SMOLLM2_135M):
    hidden, layers, heads, kv_heads, head_size, mlp = shape
    model_config = SimpleNamespace(
        max_model_len=max_model_len, get_vocab_size=lambda: VOCAB, uses_mrope=False, get_hidden_size=lambda: hidden,
        get_num_layers=lambda parallel: layers, get_num_attention_heads=lambda parallel: heads,
        get_num_kv_heads=lambda parallel: kv_heads, get_head_size=lambda: head_size, dtype=torch.bfloat16,
        hf_text_config=SimpleNamespace(intermediate_size=mlp),
    )
    return SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=num_spec, method="custom_class", model=TREE_PROPOSER),
        model_config=model_config,
        scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        additional_config=additional_config,
    )


DYNAMIC = {"tkernels_tree": {"drafter": "dynamic"}}  # the per-(depth, rank) drafter (the default is hybrid)


def make_tree_proposer(measured=True, **config):
    """A tree proposer on a fake target. ``measured``: its step model's rates come from a config
    for this machine (holding the analytic default's H100-class rates, the sizes these tests
    reason about), so it sizes trees from its first step; False: no config, as on a machine
    nobody profiled (it probes until its first fit: step_model.py)."""
    from dataclasses import asdict
    from pathlib import Path
    from unittest import mock

    from tkernels.config import ConfigChoice
    from tkernels.plugins.vllm.proposer import TokenRecyclingTreeProposer
    from tkernels.sched.latency_model import DEFAULT_RATES

    choice = ConfigChoice(Path("test.json"), "override (a test's config)", {"latency_model": asdict(DEFAULT_RATES)}) \
        if measured else ConfigChoice(None, "no config in this test")
    with mock.patch("tkernels.plugins.vllm.step_model.current", return_value=choice):
        proposer = TokenRecyclingTreeProposer(vllm_config(**config))
    target = FakeTarget()
    super(TokenRecyclingTreeProposer, proposer).load_model(target)  # the capture only: no engine layers here
    return proposer, target


def fake_step(proposer, req_ids, drafts):
    """The TreeStep begin_step would record for rows verified with ``drafts`` (every row
    scheduled as ``1 + len(draft)`` tokens)."""
    from tkernels.plugins.vllm.tree import TreeStep

    num_nodes, cu_nodes, parents, depths, is_tree, trees = proposer.tree_batch.verification_trees(
        req_ids, drafts, np.array([len(d) + 1 for d in drafts]))
    proposer.tree_batch.step = TreeStep(req_ids=req_ids, drafts=drafts, prefix=np.zeros(len(drafts), dtype=np.int64),
                                        num_nodes=num_nodes, parents=torch.from_numpy(parents),
                                        cu_nodes=torch.from_numpy(cu_nodes).int(), node_depths=torch.from_numpy(depths),
                                        is_tree=is_tree, trees=trees)


def propose_tree(batch, req_id, tokens, parents):
    """TreeBatch.propose of one request's tree (root token 0: verification never reads it)."""
    from tkernels.spec.drafters import DraftBatch

    trees = DraftBatch(torch.tensor([0, *tokens]), parents, np.array([0, parents.numel()]), [req_id])
    batch.propose([req_id], [tokens], trees, [0])


def verified(proposer, sampled):
    """What TreeBatch.verify records of the fake step: each row's accepted nodes (root first),
    read off its sampled tokens (the accepted drafts, then the bonus token)."""
    step = proposer.tree_batch.step
    cu = step.cu_nodes.tolist()
    paths = []
    for i, tokens in enumerate(sampled):
        parents = step.parents[cu[i]:cu[i + 1]].tolist()
        draft = step.drafts[i]
        path = [0]
        for token in tokens[:-1]:
            path.append(next(j for j in range(1, len(parents)) if parents[j] == path[-1] and draft[j - 1] == token))
        paths.append(path)
    width = max(map(len, paths))
    nodes = torch.tensor([p + [-1] * (width - len(p)) for p in paths], dtype=torch.int32)
    step.accepted = (nodes, torch.tensor([len(p) for p in paths], dtype=torch.int32))


def learn(proposer, rows):
    for token, next_tokens in rows.items():
        proposer.drafter.adjacency[token] = torch.tensor(next_tokens + [60] * (8 - len(next_tokens)), dtype=torch.int32)
        proposer.tree_drafter.dynamic.recycled[token] = True


def test_tree_draft_is_the_best_nodes_in_bfs_order_recorded_per_request():
    proposer, _target = make_tree_proposer(additional_config=DYNAMIC)
    # Recycled rows 4 -> (8, 9, 10), 8 -> (12, ...); 12 is unwritten. Prior acceptance 0.5 * 0.5**rank:
    # path probabilities 8: .5, 9: .25, 12: .25, 10: .125, ... so the best 3 nodes are 8, 9 and 12.
    learn(proposer, {4: [8, 9, 10], 8: [12, 13], 9: [20]})
    batch = Batch([[3], [7, 7]])
    fake_step(proposer, ["a", "b"], [[], []])
    batch.commit([[4], []])  # row 1 is mid-prefill: nothing sampled, nothing drafted
    drafts = proposer.propose([[4], []], batch.num_tokens.copy(), batch.token_ids)
    assert drafts == [[8, 9, 12], []]
    assert proposer.tree_batch.proposed["a"].tokens == [8, 9, 12]
    assert proposer.tree_batch.proposed["a"].parents.tolist() == [-1, 0, 0, 1]
    assert "b" not in proposer.tree_batch.proposed
    # The linear proposer drafts the best path of the same tree.
    from test_proposer import make_proposer

    linear, _ = make_proposer()
    learn(linear, {4: [8, 9, 10], 8: [12, 13], 9: [20]})
    assert linear.propose([[4]], np.array([2]), np.array([[3, 4]]))[0] == [8, 12]


@pytest.mark.parametrize("size", ["per_batch", "fixed"])
def test_tree_size_follows_the_step_time_at_this_batch_size(size):
    proposer, _ = make_tree_proposer(num_spec=6, additional_config={"tkernels_tree": {"size": size, "drafter": "dynamic"}})
    learn(proposer, {4: [8, 9, 10, 11], 8: [12, 13, 14], 9: [20, 21], 12: [30, 31], 10: [40]})
    # A fixed cost per step plus one per token: free nodes for one request, dear ones for 64.
    proposer.policy.step_time = SimpleNamespace(step_time=lambda tokens, requests=0, context=0: 100.0 + tokens)
    sizes = {}
    for batch_size in (1, 64):
        batch = Batch([[3]] * batch_size)
        fake_step(proposer, [f"r{i}" for i in range(batch_size)], [[]] * batch_size)
        batch.commit([[4]] * batch_size)
        drafts = proposer.propose([[4]] * batch_size, batch.num_tokens.copy(), batch.token_ids)
        sizes[batch_size] = {len(d) for d in drafts}
    # prior acceptance 0.5 * 0.5**rank: at batch 64 one draft per request pays, no more
    assert sizes == ({1: {6}, 64: {1}} if size == "per_batch" else {1: {6}, 64: {6}})


@pytest.mark.parametrize("drafter", ["dynamic", "hybrid"])
def test_tree_sizes_price_the_attention_of_the_drafting_requests_context(drafter):
    """Every node attends to its request's context: the size policy (and, for the harness
    drafters, the pricing of the drafted nodes) is handed the drafting rows' mean context, and a
    longer context, whose attention costs more per node, makes smaller trees."""
    proposer, _ = make_tree_proposer(num_spec=6, additional_config={"tkernels_tree": {"drafter": drafter}})
    if drafter == "dynamic":  # the hybrid drafts from the histories' repeats
        learn(proposer, {4: [8, 9, 10, 11], 8: [12, 13, 14], 9: [20, 21], 12: [30, 31], 10: [40]})
    contexts = []

    def step_time(tokens, requests=0, context=0):  # 1 µs per scored (query, key) pair
        contexts.append((requests, context))
        return 100.0 + tokens + tokens * context

    proposer.policy.step_time = proposer.tree_drafter.tr_policy.step_time = SimpleNamespace(step_time=step_time)
    sizes = {}
    for length in (2, 40):
        # "3 4 5" repeats (retrieval has continuations); the tokens after 4 are learnt (TR's rows)
        batch = Batch([([3, 4, 5] * 20)[-(length - 1):], ([3, 4, 5] * 20)[-(length + 1):], [3]])
        fake_step(proposer, ["a", "b", "c"], [[]] * 3)
        batch.commit([[4], [4], []])  # "c" is mid-prefill: it drafts nothing and is not priced
        drafts = proposer.propose([[4], [4], []], batch.num_tokens.copy(), batch.token_ids)
        assert contexts and set(contexts) == {(2, length + 1)}  # the two drafting rows' mean: (length + length + 2) / 2
        contexts.clear()
        sizes[length] = max(map(len, drafts))
    assert sizes[40] < sizes[2]


def test_lone_request_drafts_past_64_nodes_on_an_8b_model_and_a_batch_small_trees():
    """Up to 255 draft tokens: on a Llama-3-8B-shaped model (the analytic H100-class step model:
    x1.07 at 128 tokens) a lone request drafts 128+ nodes, 32 requests a few each."""
    from tkernels.spec import MAX_TREE_NODES, validate_parents

    proposer, _ = make_tree_proposer(num_spec=MAX_TREE_NODES - 1, shape=LLAMA3_8B, additional_config=DYNAMIC)
    assert len(proposer.tree_drafter.dynamic.candidates) >= 2 * MAX_TREE_NODES  # candidates to choose the 256 best from
    learn(proposer, {t: [(t + r + 1) % VOCAB for r in range(8)] for t in range(VOCAB)})  # every row recycled
    sizes = {}
    for batch_size in (1, 32):
        batch = Batch([[3]] * batch_size)
        req_ids = [f"r{i}" for i in range(batch_size)]
        fake_step(proposer, req_ids, [[]] * batch_size)
        batch.commit([[4]] * batch_size)
        drafts = proposer.propose([[4]] * batch_size, batch.num_tokens.copy(), batch.token_ids)
        sizes[batch_size] = {len(d) for d in drafts}
        parents = proposer.tree_batch.proposed["r0"].parents
        assert parents.numel() == len(drafts[0]) + 1 <= MAX_TREE_NODES
        validate_parents(parents)
    assert min(sizes[1]) >= 127 and max(sizes[32]) <= 16


@pytest.mark.parametrize("drafter", [None, "tr_static"])
def test_harness_drafters_draft_no_more_per_request_than_the_batch_pays_for(drafter):
    """The default drafter (hybrid) and the static template with per-batch sizing: each request's tree
    is drafted at most at the dynamic policy's size for this batch (128 nodes for one request,
    8 for 32 on a Llama-3-8B-shaped model), then priced by its own estimates where it has them
    (the template has none: it keeps them all); ``size: fixed`` drafts the whole budget."""
    from tkernels.plugins.vllm.settings import DEFAULT_TREE_DRAFTER
    from tkernels.spec import MAX_TREE_NODES

    assert DEFAULT_TREE_DRAFTER == "hybrid"
    for size, expected in (("per_batch", {1: 128, 32: 8}), ("fixed", {1: MAX_TREE_NODES, 32: MAX_TREE_NODES})):
        options = {"size": size} | ({"drafter": drafter} if drafter else {})
        proposer, _ = make_tree_proposer(num_spec=MAX_TREE_NODES - 1, shape=LLAMA3_8B,
                                         additional_config={"tkernels_tree": options})
        assert proposer.tree_drafter.method == (drafter or DEFAULT_TREE_DRAFTER)
        budgets = []

        def draft(keys, histories, num_nodes, original=proposer.tree_drafter.draft_batch, budgets=budgets):
            budgets.append(num_nodes)
            return original(keys, histories, num_nodes)

        proposer.tree_drafter.draft_batch = draft
        for batch_size in (1, 32):
            batch = Batch([[3, 4, 5, 3, 4]] * batch_size)  # "3 4" repeats: retrieval has something to draft
            fake_step(proposer, [f"r{i}" for i in range(batch_size)], [[]] * batch_size)
            batch.commit([[3]] * batch_size)
            drafts = proposer.propose([[3]] * batch_size, batch.num_tokens.copy(), batch.token_ids)
            if drafter == "tr_static" and size == "per_batch":  # the template: exactly the budget
                assert {len(d) for d in drafts} == {expected[batch_size] - 1}
            else:  # (fixed: 255 draft tokens, or fewer where max_model_len leaves less room)
                assert all(0 < len(d) < expected[batch_size] for d in drafts)
        assert budgets == [expected[1], expected[32]]


def test_a_drafter_without_token_recycling_captures_no_top_k(rng):
    """pld keeps no adjacency: the target's logits pass through untouched (no top-k, no
    log-sum-exp over the vocabulary every step) and its steps still draft and learn."""
    proposer, target = make_tree_proposer(num_spec=4, additional_config={"tkernels_tree": {"size": "fixed",
                                                                                          "drafter": "pld"}})
    assert proposer.tree_drafter.recycling is None and not proposer._capture
    batch = Batch([[5, 6, 7, 8, 5, 6]])
    fake_step(proposer, ["a"], [[]])
    target.compute_logits(logits_preferring([7], rng))
    assert proposer._captured == []
    batch.commit([[7]])
    drafts = proposer.propose([[7]], batch.num_tokens.copy(), batch.token_ids)
    assert drafts == [[8, 5, 6, 7]]  # what followed "5 6 7" in the prompt
    fake_step(proposer, ["a"], drafts)
    target.compute_logits(logits_preferring([8, 5, 9, 0, 0], rng))
    batch.commit([[8, 5, 9]])
    verified(proposer, [[8, 5, 9]])
    proposer.propose([[8, 5, 9]], batch.num_tokens.copy(), batch.token_ids)
    assert proposer.stats["skipped_steps"] == 0 and proposer.stats["recycled_steps"] == 2


def test_tree_recycles_every_verified_node_including_rejected_branches(rng):
    proposer, target = make_tree_proposer(additional_config=DYNAMIC)
    batch = Batch([[3]])
    # Row 0 was verified with the tree 4 -> (8, 9), 8 -> 12: logits rows for nodes 4, 8, 9, 12.
    fake_step(proposer, ["a"], [[8, 9, 12]])
    target.compute_logits(logits_preferring([8, 30, 31, 32], rng))
    batch.commit([[4, 8, 30]])  # (the root 4 was committed before; here it stands for the step's prefix)
    proposer.propose([[8, 30]], batch.num_tokens.copy(), batch.token_ids)
    adjacency = proposer.drafter.adjacency
    assert adjacency[4, 0] == 8 and adjacency[8, 0] == 30  # the accepted path
    assert adjacency[9, 0] == 31 and adjacency[12, 0] == 32  # a rejected branch and a rejected leaf
    assert proposer.stats["skipped_steps"] == 0 and proposer.stats["recycled_rows"] == 4


def test_harness_drafters_draft_observe_and_follow_requests(rng):
    """drafter = a tkernels.spec.drafters method: the offline harness's trees, recorded per
    request; the next step recycles every verified node and reads the accepted path off the
    sampled tokens; finished requests are forgotten."""
    proposer, target = make_tree_proposer(num_spec=6, additional_config={"tkernels_tree": {"size": "fixed",
                                                                                          "drafter": "hybrid"}})
    assert proposer.tree_drafter.method == "hybrid" and proposer.tree_drafter.recycling is proposer.drafter
    batch = Batch([[5, 6, 7, 8, 9, 10, 5, 6], [3]])  # request a's answer quotes its prompt
    fake_step(proposer, ["a", "b"], [[], []])
    target.compute_logits(logits_preferring([7, 4], rng))
    batch.commit([[7], [4]])
    drafts = proposer.propose([[7], [4]], batch.num_tokens.copy(), batch.token_ids)
    assert drafts[0][:3] == [8, 9, 10]  # retrieval: what followed 5 6 7 in the prompt
    assert drafts[1] == [] or len(drafts[1]) <= 6  # b: unwritten rows, probability 0
    tree = proposer.tree_batch.proposed["a"].trees.trees()[proposer.tree_batch.proposed["a"].row]
    assert proposer.tree_batch.proposed["a"].tokens == drafts[0] == tree.tokens[1:].tolist()
    # Verify a's tree: the target accepts 8, 9 and says 42 after 9 (b drafted nothing or was cut).
    scheduled = [drafts[0], []]
    fake_step(proposer, ["a", "b"], scheduled)
    nine = tree.tokens.tolist().index(9)
    after = [8 if j == 0 else 9 if j == tree.tokens.tolist().index(8) else 42 if j == nine else 60
             for j in range(len(tree))]
    target.compute_logits(logits_preferring(after + [11], rng))
    batch.commit([[8, 9, 42], [11]])
    before = proposer.tree_drafter.retrieval_calibration.accepted.sum().item()
    verified(proposer, [[8, 9, 42], [11]])
    proposer.propose([[8, 9, 42], [11]], batch.num_tokens.copy(), batch.token_ids)
    assert proposer.drafter.adjacency[9, 0] == 42 and proposer.drafter.adjacency[3, 0] == 4  # and b's root row
    assert proposer.tree_drafter.retrieval_calibration.accepted.sum().item() > before  # 8 and 9 were retrieval's
    assert proposer.stats["skipped_steps"] == 0 and proposer.stats["recycled_rows"] == 2 + len(tree) + 1
    # b finished: its context and tree are dropped
    fake_step(proposer, ["a"], [proposer.tree_batch.proposed["a"].tokens if "a" in proposer.tree_batch.proposed else []])
    proposer.tree_batch.step.drafts = [[]]
    target.compute_logits(logits_preferring([1], rng))
    proposer.propose([[1]], batch.num_tokens[:1].copy() + 1, batch.token_ids[:1])
    assert set(proposer.tree_drafter.keys()) == {"a"}


def test_prompt_topk_recycles_the_prompt_positions(rng):
    proposer, _target = make_tree_proposer(additional_config={"tkernels_tree": {"prompt_topk": True}})
    fake_step(proposer, ["p"], [[]])
    proposer.tree_batch.step.prompt_rows = torch.tensor([1, 2, 3])  # the step's tokens 1..3 are prompt tokens
    proposer.tree_batch.step.prompt_tokens = torch.tensor([20, 21, 22])
    hidden = logits_preferring([0, 30, 31, 32], rng)  # FakeTarget.compute_logits returns its input
    proposer.recycle_prompt(hidden, forward_s=1.0)
    assert proposer.drafter.adjacency[[20, 21, 22], 0].tolist() == [30, 31, 32]
    assert bool((proposer.drafter.probs[[20, 21, 22], 0] > 0).all())  # the rows written, with probabilities
    assert proposer.stats["prompt_topk_rows"] == 3 and proposer.stats["prompt_forward_s"] == 1.0
    proposer.recycle_prompt(hidden, forward_s=1.0)  # consumed: a second forward of the step recycles nothing
    assert proposer.stats["prompt_topk_rows"] == 3


@pytest.mark.parametrize("options", [{"drafter": "eagle"}, {"prompt_topk": "yes"}, {"size": "huge"}, {"other": 1}])
def test_tree_options_are_checked(options):
    with pytest.raises(ValueError, match="tkernels_tree"):
        make_tree_proposer(additional_config={"tkernels_tree": options})


def test_unsupported_configs_are_refused_when_the_proposer_is_built():
    with pytest.raises(ValueError, match="async scheduling"):
        make_tree_proposer(async_scheduling=True)
    with pytest.raises(ValueError, match="num_speculative_tokens > 255"):
        make_tree_proposer(num_spec=256)
    make_tree_proposer(num_spec=255)


def test_patch_fails_loudly_if_vllm_moved_the_method(monkeypatch):
    import vllm

    from tkernels.plugins.vllm import compat, patches

    class Runner:
        def _sample(self, logits, metadata):  # renamed parameter
            pass

    with pytest.raises(RuntimeError, match=r"patches Runner._sample.*has \('self', 'logits', 'metadata'\)"):
        compat.checked_method(Runner, "_sample", ("self", "logits", "spec_decode_metadata"))
    with pytest.raises(RuntimeError, match="no such method"):
        compat.checked_method(Runner, "_prepare_inputs", ("self", "scheduler_output", "num_scheduled_tokens"))
    monkeypatch.setattr(vllm, "__version__", "0.40.0")
    with pytest.raises(RuntimeError, match=r"vLLM 0.40.0 is not supported"):
        patches.install(vllm_config())


def test_register_only_warns_if_the_admission_patch_cannot_be_made_but_the_tree_proposer_fails(monkeypatch, caplog):
    from vllm.sampling_params import SamplingParams

    import tkernels.plugins.vllm as plugin
    from tkernels.plugins.vllm import patches

    monkeypatch.delenv("TKERNELS_VLLM_CPU_TEST_BACKEND", raising=False)
    monkeypatch.setattr(SamplingParams, "_validate_spec_decode", lambda self, speculative_config, model_config: None)
    monkeypatch.setattr(plugin, "REGISTERED", False)
    with caplog.at_level("WARNING", logger="tkernels"):
        plugin.register()  # a server that does not use tree speculation keeps working
    assert plugin.REGISTERED and "patches SamplingParams._validate_spec_decode" in caplog.text
    with pytest.raises(RuntimeError, match="patches SamplingParams._validate_spec_decode"):
        patches.install(vllm_config())


def test_requests_tree_verification_cannot_reproduce_are_refused_at_submission():
    from vllm.sampling_params import SamplingParams

    from tkernels.plugins.vllm.patches import install_request_validation

    install_request_validation()
    tree_spec = vllm_config().speculative_config
    SamplingParams(temperature=0.0)._validate_spec_decode(tree_spec)
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, seed=3)._validate_spec_decode(tree_spec)
    from vllm.exceptions import VLLMValidationError

    for params, what in ((dict(repetition_penalty=1.2), "penalties"), (dict(logprobs=2), "logprobs"),
                         (dict(min_tokens=3), "min_tokens"), (dict(bad_words=["x"]), "bad_words")):
        # vLLM's validation error (its server answers HTTP 400 with the message), and a ValueError
        with pytest.raises(VLLMValidationError, match=f"top-k/top-p sampling only.*{what}") as caught:
            SamplingParams(**params)._validate_spec_decode(tree_spec)
        assert isinstance(caught.value, ValueError)
    linear = SimpleNamespace(method="custom_class", model="tkernels.plugins.vllm.proposer.TokenRecyclingProposer")
    SamplingParams(repetition_penalty=1.2)._validate_spec_decode(linear)  # other proposers: unchanged


def test_beam_search_is_refused_as_beam_search():
    """Issue 22 item 3: use_beam_search was refused with "this request asks for logprobs"."""
    from vllm.sampling_params import SamplingParams

    from tkernels.plugins.vllm.patches import UnsupportedRequestError, install_request_validation

    install_request_validation()
    tree_spec = vllm_config().speculative_config
    # what vLLM's beam search submits per beam and step (entrypoints/generate/beam_search)
    beam_step = SamplingParams(logprobs=8, max_tokens=1, temperature=0.0, detokenize=False)
    with pytest.raises(UnsupportedRequestError, match=r"asks for beam search \(use_beam_search\) \("):
        beam_step._validate_spec_decode(tree_spec)
    with pytest.raises(UnsupportedRequestError, match="asks for logprobs"):
        SamplingParams(logprobs=2, max_tokens=1)._validate_spec_decode(tree_spec)


def test_a_refused_streamed_request_logs_one_warning_line_not_a_traceback():
    """Issue 22 item 3: vLLM's stream generators log any exception with a full ERROR traceback;
    a refused request (the client's mistake, HTTP 400 in the stream) is one WARNING line."""
    import logging

    from tkernels.plugins.vllm.patches import UnsupportedRequestError, install_request_validation

    install_request_validation()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    for name in ("vllm.entrypoints.openai.chat_completion.serving", "vllm.entrypoints.openai.completion.serving"):
        served = logging.getLogger(name)
        served.addHandler(handler)
        try:
            for error in (UnsupportedRequestError("tkernels tree speculation ...: asks for logprobs"), RuntimeError("bug")):
                try:
                    raise error
                except Exception:
                    served.exception("Error in chat completion stream generator.")  # what vLLM's generator does
        finally:
            served.removeHandler(handler)
    refused, other = records[0::2], records[1::2]
    assert all(r.levelname == "WARNING" and r.exc_info is None and "asks for logprobs" in r.getMessage() for r in refused)
    assert all(r.levelname == "ERROR" and r.exc_info is not None for r in other)  # real errors keep their traceback


def test_a_failed_request_is_finished_with_an_error_and_the_others_go_on(monkeypatch):
    """Patch 6 on vLLM's own scheduler: a row whose tokens are [FAILED_TOKEN] (the worker could not
    verify it) ends that request with FINISHED_ERROR; the other request keeps its token."""
    from test_scheduler import create_scheduler, make_request
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine import FinishReason
    from vllm.v1.outputs import ModelRunnerOutput

    from tkernels.models import tiny_llama_dir
    from tkernels.plugins.vllm import patches, tree

    patches.install_failed_request_handling()
    scheduler = create_scheduler(tiny_llama_dir(), Scheduler)
    monkeypatch.setattr(patches, "is_tree_config", lambda config: True)  # the scheduler's config has no proposer
    for name in ("bad", "good"):
        scheduler.add_request(make_request(name, 5, 4))
    output = scheduler.schedule()
    runner_output = ModelRunnerOutput(req_ids=["bad", "good"], req_id_to_index={"bad": 0, "good": 1},
                                      sampled_token_ids=[[tree.FAILED_TOKEN], [7]])
    outputs = [o for batch in scheduler.update_from_output(output, runner_output).values() for o in batch.outputs]
    assert [(o.request_id, o.finish_reason) for o in outputs if o.request_id == "bad"] == [("bad", FinishReason.ERROR)]
    assert "bad" not in scheduler.requests and [o.new_token_ids for o in outputs if o.request_id == "good"] == [[7]]
    assert [r.request_id for r in scheduler.running] == ["good"]


# --- runner patches on a stand-in runner --------------------------------------------------------


def fake_runner(req_ids, num_computed, num_tokens_total, block_table=None, sampling_metadata=None):
    input_batch = SimpleNamespace(
        num_reqs=len(req_ids), req_ids=req_ids, num_computed_tokens_cpu=np.array(num_computed),
        sampling_metadata=sampling_metadata or SimpleNamespace(all_greedy=True),
        block_table=[SimpleNamespace(get_device_tensor=lambda n: block_table[:n])],
    )
    builder = SimpleNamespace(step_trees=None)  # as tkernels' attention metadata builder
    return SimpleNamespace(input_batch=input_batch, positions=torch.arange(100, 100 + num_tokens_total),
                           input_ids=SimpleNamespace(gpu=None), attn_groups=[[SimpleNamespace(metadata_builders=[builder])]])


def test_begin_step_sets_tree_positions_and_attention_trees():
    from tkernels.plugins.vllm import tree

    batch = tree.TreeBatch()
    propose_tree(batch, "t", [8, 9, 12, 13], torch.tensor([-1, 0, 0, 1, 1], dtype=torch.int32))
    propose_tree(batch, "gone", [5], torch.tensor([-1, 0], dtype=torch.int32))
    # Row 0 prefills 3 tokens, row 1 verifies its tree cut by the scheduler to 3 nodes.
    runner = fake_runner(["p", "t"], [0, 10], 3 + 4)
    linear = runner.positions.clone()
    scheduler_output = SimpleNamespace(finished_req_ids={"gone"}, scheduled_spec_decode_tokens={"t": [8, 9, 12]})
    batch.begin_step(runner, scheduler_output, np.array([3, 4]))
    assert runner.positions[:4].tolist() == linear[:4].tolist()  # prefill tokens and the tree's root
    assert runner.positions[4:].tolist() == [11, 11, 12]  # num_computed + depth
    tree_parents, is_tree = batch.trees
    assert is_tree.tolist() == [False, True] and tree_parents[3:].tolist() == [-1, 0, 0, 1]
    assert runner.attn_groups[0][0].metadata_builders[0].step_trees is batch.trees  # handed to the builder
    step = batch.step
    assert step.drafts == [[], [8, 9, 12]] and step.num_nodes.tolist() == [1, 4]
    assert step.parents.tolist() == [-1, -1, 0, 0, 1] and step.cu_nodes.tolist() == [0, 1, 5]
    assert batch.proposed == {}  # consumed, and the finished request's dropped
    assert step.node_depths.tolist() == [0, 0, 1, 1, 2] and step.is_tree.tolist() == [False, True]


def test_a_draft_that_is_not_the_proposed_tree_is_verified_as_a_chain_for_that_request_alone(rng):
    """What vLLM does near max_model_len (zeros in place of every draft), or any draft the
    proposer did not make: that row is a chain (causal attention, linear positions, lossless
    verification of whatever was drafted), counted and logged once; the other rows keep their trees."""
    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

    from tkernels.plugins.vllm import tree

    batch = tree.TreeBatch()
    tree_parents = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
    propose_tree(batch, "t", [8, 9, 12], tree_parents)
    propose_tree(batch, "z", [8, 9, 12], tree_parents)  # scheduled zeros instead
    # "n" was never proposed anything but is scheduled a draft; "c" is a draft with extra tokens
    propose_tree(batch, "c", [5, 6], torch.tensor([-1, 0, 0], dtype=torch.int32))
    runner = fake_runner(["t", "z", "n", "c"], [10, 20, 30, 40], 4 + 4 + 3 + 4, torch.arange(16).view(4, 4).int())
    linear = runner.positions.clone()
    drafts = {"t": [8, 9, 12], "z": [0, 0, 0], "n": [7, 7], "c": [5, 6]}
    batch.begin_step(runner, SimpleNamespace(finished_req_ids=set(), scheduled_spec_decode_tokens=drafts),
                     np.array([4, 4, 3, 4]))  # "c": 4 tokens for a 2-token draft
    step = batch.step
    assert step.is_tree.tolist() == [True, False, False, False] and batch.foreign_drafts == 3
    assert step.parents.tolist() == [-1, 0, 0, 1] + [-1, 0, 1, 2] + [-1, 0, 1] + [-1, 0, 1]
    assert step.root_position.tolist() == [10, 20, 30, 41]
    assert runner.positions[4:].tolist() == linear[4:].tolist()  # chains keep vLLM's positions
    assert runner.positions[:4].tolist() == [100, 11, 11, 12]  # the tree's nodes at prefix + depth
    parents, is_tree = batch.trees
    assert is_tree.tolist() == [True, False, False, False] and (parents[4:] == -1).all()
    # Verification: the tree row accepts 9 (node 2) then the bonus; zeros are rejected at once;
    # "n" accepts its chain 7, 7; "c" (logits of its last 3 tokens) accepts 5, not 6.
    runner.input_ids.gpu = torch.tensor([4, 8, 9, 12] + [3, 0, 0, 0] + [6, 7, 7] + [1, 4, 5, 6])
    logits = logits_preferring([9, 1, 50, 2] + [33, 1, 1, 1] + [7, 7, 44] + [5, 60, 3], rng)
    metadata = SimpleNamespace(num_draft_tokens=[3, 3, 2, 2], max_spec_len=3,
                               logits_indices=torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14]))
    cache = torch.randn(1, 16, 4, 1, 8, generator=rng)
    batch._kv_planes = [cache]
    before = cache.clone()
    out = batch.verify(runner, logits, metadata)
    p = PLACEHOLDER_TOKEN_ID
    assert out.sampled_token_ids.tolist() == [[9, 50, p, p], [33, p, p, p], [7, 7, 44, p], [5, 60, p, p]]
    # Only the tree row's K/V moved (node 2 at position 10 + 2 to 10 + 1); chains stay in place.
    moved = before.clone()
    moved[:, 2, 3] = before[:, 3, 0]
    assert torch.equal(cache, moved)


@pytest.mark.parametrize("backend", ["torch", "reference", "interpreter"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled-top-k-1"])
def test_verify_returns_vllm_layout_and_compacts_the_accepted_path(monkeypatch, rng, backend, sampled):
    """Greedy verification, and sampling verification with row 1 at temperature 0.9 and top-k 1
    (greedy again, so the same result) beside a greedy row; references (the torch and reference
    attention modes) and interpreted kernels."""
    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

    from tkernels.plugins.vllm import tree

    monkeypatch.delenv("TKERNELS_VLLM_CPU_TEST_BACKEND", raising=False)
    monkeypatch.setenv("TKERNELS_VLLM_CPU_ATTENTION", backend)
    block_size, heads, dim = 4, 2, 16
    cache = torch.randn(heads, 6, block_size, 1, dim, generator=rng)  # kv_planes' layout
    block_table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    sampling = SimpleNamespace(all_greedy=False, temperature=torch.tensor([0.0, 0.9]), top_k=torch.tensor([VOCAB, 1]),
                               top_p=None, generators={1: torch.Generator().manual_seed(0)}) if sampled else None
    runner = fake_runner(["d", "t"], [5, 6], 1 + 5, block_table, sampling)
    batch = tree.TreeBatch()
    batch._kv_planes = [cache]
    propose_tree(batch, "t", [8, 9, 12, 13], torch.tensor([-1, 0, 0, 1, 2], dtype=torch.int32))
    batch.begin_step(runner, SimpleNamespace(finished_req_ids=set(), scheduled_spec_decode_tokens={"t": [8, 9, 12, 13]}),
                     np.array([1, 5]))
    # Row 0 (no draft) says 40. Row 1: root 4 -> 9 (node 2), 9 -> 13 (node 4), then 50: path 0, 2, 4.
    runner.input_ids.gpu = torch.tensor([7, 4, 8, 9, 12, 13])
    logits = logits_preferring([40, 9, 1, 13, 2, 50], rng)
    metadata = SimpleNamespace(num_draft_tokens=[0, 4], max_spec_len=4, logits_indices=torch.arange(6))
    before = cache.clone()
    out = batch.verify(runner, logits, metadata)
    p = PLACEHOLDER_TOKEN_ID
    assert out.sampled_token_ids.tolist() == [[40, p, p, p, p], [9, 13, 50, p, p]]
    assert out.sampled_token_ids.dtype == torch.int32 and out.logprobs_tensors is None
    assert batch.trees is None  # the step's trees end with its verification

    def slot(req, pos):
        return int(block_table[req, pos // block_size]), pos % block_size

    # Request 1's node 2 (position 6 + 2) moves to position 7, node 4 (6 + 4) to 8; the rest stays.
    expected = before.clone()
    expected[:, slot(1, 7)[0], slot(1, 7)[1]] = before[:, slot(1, 8)[0], slot(1, 8)[1]]
    expected[:, slot(1, 8)[0], slot(1, 8)[1]] = before[:, slot(1, 10)[0], slot(1, 10)[1]]
    assert torch.equal(cache, expected)


def test_vllms_placeholder_draft_is_a_chain_counted_apart_and_not_logged(monkeypatch):
    """vLLM pads a request scheduled one token (a prompt found whole in the prefix cache) to the
    speculative budget with -1 drafts: that row is a chain, counted in ``padded_drafts``, not as a
    foreign draft, and nothing is logged; a proposed row beside it keeps its tree."""
    from tkernels.plugins.vllm import tree

    batch = tree.TreeBatch()
    tree_parents = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
    propose_tree(batch, "t", [8, 9, 12], tree_parents)
    runner = fake_runner(["t", "p"], [10, 20], 4 + 4, torch.arange(8).view(2, 4).int())
    drafts = {"t": [8, 9, 12], "p": [tree.PLACEHOLDER_DRAFT] * 3}
    logged = []
    monkeypatch.setattr(tree.logger, "warning", lambda *args: logged.append(args))
    batch.begin_step(runner, SimpleNamespace(finished_req_ids=set(), scheduled_spec_decode_tokens=drafts),
                     np.array([4, 4]))
    assert batch.step.is_tree.tolist() == [True, False]
    assert (batch.padded_drafts, batch.foreign_drafts) == (1, 0) and not logged
    propose_tree(batch, "t", [8, 9, 12], tree_parents)  # a step's proposals are used once
    drafts["p"] = [7, 7, 7]  # the same row with a draft nobody proposed: foreign, logged
    batch.begin_step(runner, SimpleNamespace(finished_req_ids=set(), scheduled_spec_decode_tokens=drafts),
                     np.array([4, 4]))
    assert (batch.padded_drafts, batch.foreign_drafts) == (1, 1) and len(logged) == 1
    assert batch.step.parents.tolist() == [-1, 0, 0, 1] + [-1, 0, 1, 2]


def test_a_request_with_unusable_logits_fails_alone(monkeypatch, rng):
    """Verification refusing one request's logits (NaN) fails that request (FAILED_TOKEN, no KV
    moved) and verifies the others as if it were not there."""
    from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID

    from tkernels.plugins.vllm import tree

    monkeypatch.setenv("TKERNELS_VLLM_CPU_TEST_BACKEND", "reference")
    real = tree.verify_greedy_reference

    def refusing(logits, tokens, parents, cu_nodes, checked=None):  # as tkernels.spec.NonFiniteLogitsError
        bad = (~torch.isfinite(logits).all(-1)).nonzero().flatten()
        if bad.numel():
            error = ValueError(f"logits: nodes {bad.tolist()} hold NaN")
            error.requests = sorted({int(torch.searchsorted(cu_nodes, int(b), right=True)) - 1 for b in bad})
            raise error
        return real(logits, tokens, parents, cu_nodes, checked=checked)

    monkeypatch.setattr(tree, "verify_greedy_reference", refusing)
    cache = torch.randn(2, 6, 4, 1, 16, generator=rng)
    runner = fake_runner(["a", "t"], [5, 6], 3 + 3, torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32))
    batch = tree.TreeBatch()
    batch._kv_planes = [cache]
    for req_id in ("a", "t"):
        propose_tree(batch, req_id, [8, 9], torch.tensor([-1, 0, 1], dtype=torch.int32))
    batch.begin_step(runner, SimpleNamespace(finished_req_ids=set(), scheduled_spec_decode_tokens={"a": [8, 9], "t": [8, 9]}),
                     np.array([3, 3]))
    runner.input_ids.gpu = torch.tensor([4, 8, 9, 4, 8, 9])
    logits = logits_preferring([8, 9, 50, 8, 9, 50], rng)
    logits[1, 3] = float("nan")  # request "a" (nodes 0-2)
    before = cache.clone()
    metadata = SimpleNamespace(num_draft_tokens=[2, 2], max_spec_len=2, logits_indices=torch.arange(6))
    out = batch.verify(runner, logits, metadata)
    p = PLACEHOLDER_TOKEN_ID
    assert out.sampled_token_ids.tolist() == [[tree.FAILED_TOKEN, p, p], [8, 9, 50]]
    assert torch.isnan(logits[1, 3])  # vLLM's tensor left as it was
    assert torch.equal(cache[:, :3], before[:, :3])  # request "a"'s blocks untouched


# --- inside vLLM ---------------------------------------------------------------------------------


def _bench(method: str, model: str, max_tokens: int, rounds: int, cpu_backend: str | None = None, num_spec: int = 4):
    env = dict(os.environ)
    if cpu_backend is not None:  # "1" (the interpreter, the older name's value), "reference", "torch" or "" (none)
        env.pop("TKERNELS_VLLM_CPU_TEST_BACKEND", None)
        env["TKERNELS_VLLM_CPU_ATTENTION"] = {"1": "interpreter"}.get(cpu_backend, cpu_backend)
    return subprocess.run(
        [sys.executable, "-m", "tkernels.cli.speculation_bench", "--method", method, "--raw",
         "--model", model, "--questions", "2", "--max-tokens", str(max_tokens), "--num-spec-tokens", str(num_spec),
         "--rounds", str(rounds)],
        capture_output=True, text=True, timeout=1200, env=env,
    )


def _result(out) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    # the runner's JSON line (vLLM's multiprocess shutdown may log to stdout after it)
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


def _check_lossless_with_accepted_drafts(plain: dict, tree: dict, max_tokens: int) -> None:
    assert [len(t) for t in plain["token_ids"]] == [max_tokens] * 2
    assert tree["token_ids"] == plain["token_ids"] * 2  # greedy outputs identical, every request
    counters = tree["counters"]
    assert counters["spec_decode_num_accepted_tokens"] > 0  # vLLM's own spec-decode metrics see the trees
    assert sum(map(len, tree["token_ids"])) / sum(tree["steps"]) > 1.0


def test_tree_speculation_on_the_tiny_model_with_the_interpreted_kernels():
    """Attention, verification and compaction kernels under Triton's interpreter (the
    conftest sets TRITON_INTERPRET=1 on CPU machines; the subprocess inherits it)."""
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()
    with ThreadPoolExecutor(2) as pool:
        plain, tree = pool.map(lambda a: _result(_bench(*a)), [("none", "tiny", 12, 1, None), ("tr-tree", "tiny", 12, 2, "1")])
    _check_lossless_with_accepted_drafts(plain, tree, 12)


def test_tree_speculation_with_255_draft_tokens_matches_plain_decoding():
    """Trees of up to 256 nodes (num_speculative_tokens = 255, the whole budget every step)
    through the interpreted attention, verification and compaction kernels; a second round of
    the same questions lets the drafter's trees reach deep. Every output equals plain greedy."""
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()
    with ThreadPoolExecutor(2) as pool:
        plain, tree = pool.map(lambda a: _result(_bench(*a)),
                               [("none", "tiny", 24, 1, None), ("tr-tree", "tiny", 24, 2, "1", 255)])
    _check_lossless_with_accepted_drafts(plain, tree, 24)
    counters = tree["counters"]
    assert counters["spec_decode_num_draft_tokens"] / counters["spec_decode_num_drafts"] > 64  # trees past 64 nodes


def test_harness_drafters_in_the_engine_are_lossless_and_recycle_the_prompt():
    """drafter hybrid (tkernels.spec.drafters) with prompt_topk, reference backend: the outputs
    are plain decoding's, every step is recycled and the prompts' positions too."""
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()
    with ThreadPoolExecutor(2) as pool:
        plain, tree = pool.map(lambda a: _result(_bench(*a)), [("none", "tiny", 12, 1, "reference"),
                                                              ("tree:hybrid+prompt", "tiny", 12, 2, "reference")])
    _check_lossless_with_accepted_drafts(plain, tree, 12)
    stats = tree["proposer_stats"]
    assert stats["skipped_steps"] == 0 and stats["prompt_topk_rows"] > 0 and stats["prompt_topk_s"] > 0


def _runner_engines(script: str, *args: str) -> tuple[dict, dict]:
    """(plain, tree): the runner script's JSON without and with ``--tree``, two engines at once."""
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()  # built once, before the two processes read it
    runner = Path(__file__).with_name(script)

    def run(tree: bool) -> dict:
        out = subprocess.run([sys.executable, str(runner), *args] + (["--tree"] if tree else []), capture_output=True,
                             text=True, timeout=900)
        return _result(out)

    with ThreadPoolExecutor(2) as pool:
        plain, tree = pool.map(run, [False, True])
    return plain, tree


@pytest.mark.parametrize("attention", ["torch", "compiled"])
def test_tree_speculation_under_a_mixed_load_matches_plain_decoding(attention):
    """Staggered arrivals, chunked prefills next to trees, prefix-cache hits, greedy and sampled
    requests in one batch (float32; the tree on the torch attention path, or on the compiled one
    with every layer checked against the reference in the engine); see _tree_load_runner.py."""
    plain, tree = _runner_engines("_tree_load_runner.py", *(["--compiled"] if attention == "compiled" else []))
    free = [run["token_ids"].pop("free") for run in (plain, tree)]
    assert len(plain["token_ids"]) == 14 and tree["token_ids"] == plain["token_ids"]
    assert [len(f) for f in free] == [30, 30]
    assert tree["counters"]["spec_decode_num_accepted_tokens"] > 0 and tree["steps"] < plain["steps"]
    if attention == "compiled":
        checks = tree["layer_checks"]
        assert checks["tree_layers"] > 0 and checks["max_error"] < 1e-4


def test_native_cpu_attention_under_a_mixed_load():
    """The same load in bf16 with TKERNELS_VLLM_CPU_ATTENTION=native in both engines: every
    layer's output of vLLM-CPU's kernel, tree rows beside prefill chunks and decodes, matches the
    reference in the engine; the trees are verified and accepted. (bf16 greedy tokens are not
    compared with plain decoding's: a tree step's shapes differ from a decode step's, and so
    does bf16 rounding; the float32 runs above check losslessness.)"""
    from tkernels.plugins.vllm.cpu_attention import native_unavailable_reason

    reason = native_unavailable_reason(torch.bfloat16, None)
    if reason:  # vLLM-CPU's AVX2 build has no extend-attention op
        pytest.skip(reason)
    plain, tree = _runner_engines("_tree_load_runner.py", "--native")
    for run in (plain, tree):
        checks = run["layer_checks"]
        assert checks["layers"] > 0 and checks["max_error"] < 2e-2
        assert sorted(len(t) for t in run["token_ids"].values()) == sorted([30] + [20 + 7 * (i % 5) for i in range(14)])
    assert tree["layer_checks"]["tree_layers"] > 0 and plain["layer_checks"]["tree_layers"] == 0
    assert tree["counters"]["spec_decode_num_accepted_tokens"] > 0 and tree["steps"] < plain["steps"]


def test_drafts_the_proposer_did_not_make_affect_only_their_rows_in_the_engine():
    """Zeros (vLLM's drafts near max_model_len) and reversed trees injected for two requests every
    third step: those rows are verified as chains, every output is still plain decoding's."""
    plain, tree = _runner_engines("_foreign_draft_runner.py")
    assert len(plain["token_ids"]) == 6 and tree["token_ids"] == plain["token_ids"]
    assert tree["proposer_stats"]["foreign_drafts"] > 0


def test_tree_speculation_without_tkernels_attention_fails_at_start_up():
    """Refused in the front end, before any model loads, saying what to set (issue 22 items 2
    and 4: it failed at model load, ~84 s into a real server's start)."""
    out = _bench("tr-tree", "tiny", 4, 1, cpu_backend="")
    assert out.returncode != 0
    assert "tree speculation on vLLM-CPU needs tkernels' attention" in out.stderr
    assert "set TKERNELS_VLLM_CPU_ATTENTION=native" in out.stderr
    assert "Model loading took" not in out.stderr and "EngineCore" not in out.stderr


@pytest.mark.slow
def test_tree_speculation_on_smollm2_is_lossless():
    from tkernels.models import smollm2_dir

    smollm2_dir()
    with ThreadPoolExecutor(2) as pool:
        plain, tree = pool.map(lambda a: _result(_bench(*a)), [("none", "smollm2", 32, 1), ("tr-tree", "smollm2", 32, 2)])
    _check_lossless_with_accepted_drafts(plain, tree, 32)


def _seeded_run(num_spec: int) -> dict:
    runner = Path(__file__).with_name("_seeded_runner.py")
    return _result(subprocess.run([sys.executable, str(runner), str(num_spec)], capture_output=True, text=True,
                                  timeout=900))


def test_seeded_requests_repeat_across_runs_batches_and_draft_sizes():
    """A seeded sampled request (with a chunked prompt, which vLLM-CPU's own seeded path cannot
    serve) gives the same tokens alone and in a mixed batch with a warm drafter, in two
    processes with 2 and 6 draft tokens per step (see _seeded_runner.py)."""
    from tkernels.models import tiny_llama_dir

    tiny_llama_dir()
    with ThreadPoolExecutor(2) as pool:
        small, large = pool.map(_seeded_run, [2, 6])
    assert len(small["alone"]) == 24
    assert small["alone"] == small["mixed"] == large["alone"] == large["mixed"]
    assert small["other_seed"] == large["other_seed"] != small["alone"]  # another seed, other tokens
    assert small["late"] == large["late"] and small["greedy"] == large["greedy"]


@pytest.mark.slow
def test_tensor_parallel_2_with_tkernels_equals_tp_1_plain():
    """The decode-maximal scheduler, tkernels' attention backend (its PyTorch reference on
    vLLM-CPU) and tree speculation with tensor parallelism 2, against plain TP 1 decoding
    (float32); see _tp_runner.py."""
    from tkernels.models import tiny_llama_dir

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("tensor parallelism 2 on vLLM-CPU needs two cores (one per rank)")
    tiny_llama_dir()
    runner = str(Path(__file__).with_name("_tp_runner.py"))
    # vLLM-CPU binds each rank to a NUMA node by default; a one-node machine needs explicit cores
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=f"{cpus[0]}|{cpus[1]}")
    tp2 = _result(subprocess.run([sys.executable, runner, "2", "tkernels"], capture_output=True, text=True,
                                 timeout=1200, env=env))
    tp1 = _result(subprocess.run([sys.executable, runner, "1", "plain"], capture_output=True, text=True, timeout=900))
    assert [len(t) for t in tp1["token_ids"]] == [16] * 3
    assert tp2["token_ids"] == tp1["token_ids"]
    assert tp2["counters"]["spec_decode_num_accepted_tokens"] > 0  # the trees were verified, some accepted
