"""The tree proposer's measured step-latency model (plugins/vllm/step_model.py) and what it
changes: trees sized by this machine's measured steps, down to no draft at all."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
from test_proposer import Batch
from test_tree_speculation import LLAMA3_8B, fake_step, make_tree_proposer

from tkernels.sched.latency_model import DEFAULT_RATES, LatencyModel, LatencyRates, ModelShape, batch_cost

pytestmark = pytest.mark.vllm

SHAPE = ModelShape(num_layers=30, hidden_size=576, num_q_heads=9, num_kv_heads=3, head_dim=64,
                   intermediate_size=1536, vocab_size=49152, dtype_bytes=4)
# A CPU-like machine: every token costs a sizeable share of the weights' streaming time, so a
# step of 8 x 33 tokens costs many times a step of 8 tokens.
CPU_RATES = LatencyRates(overhead_us=2000.0, weight_gbps=20.0, matmul_tflops=0.05, kv_gbps=10.0, attn_tflops=0.02)


def test_sibling_ranks_of_accepted_paths():
    from tkernels.plugins.vllm.tree_proposer import sibling_ranks

    parents = [-1, 0, 0, 0, 1, 1, 3, 4]  # BFS: root's children 1 2 3, 1's 4 5, 3's 6, 4's 7
    assert sibling_ranks(parents, [0]) == ([-1], 1)  # nothing accepted below a root with children
    assert sibling_ranks(parents, [0, 3, 6]) == ([2, 0], 2)  # 6 is a leaf: nothing more observed
    assert sibling_ranks(parents, [0, 1, 5]) == ([0, 1], 2)
    assert sibling_ranks(parents, [0, 1, 4]) == ([0, 0, -1], 3)  # 4 has a child the target did not take
    assert sibling_ranks([-1], [0]) == ([], 0)


@pytest.mark.parametrize("max_depth", [2, 8, 40])
def test_batched_sibling_ranks_are_the_per_path_reference(max_depth):
    """The step's trees at once (batch_sibling_ranks, and its compiled pass accepted_paths from
    verification's accepted nodes, as the proposer learns) against sibling_ranks tree by tree, on
    random BFS trees (1 to 60 nodes) and random accepted paths."""
    import torch

    from tkernels.plugins.vllm.tree_proposer import batch_sibling_ranks, sibling_ranks
    from tkernels.spec.drafters import DraftBatch, DraftTree
    from tkernels.spec.drafting.kernels import accepted_paths, update_rank_estimates
    from tkernels.spec.tree_policy import DynamicTreePolicy

    rng = np.random.default_rng(0)
    for _ in range(30):
        trees, paths = [], []
        for _ in range(int(rng.integers(1, 12))):
            n = int(rng.integers(1, 61))
            parents = [-1] + sorted(int(rng.integers(0, j)) for j in range(1, n))  # non-decreasing: BFS
            path = [0]
            while rng.random() < 0.8:
                children = [j for j in range(n) if parents[j] == path[-1]]
                if not children:
                    break
                path.append(int(rng.choice(children)))
            trees.append(DraftTree(torch.arange(n), torch.tensor(parents, dtype=torch.int32)))
            paths.append(path)
        batch = DraftBatch.from_trees(trees)
        on_path = np.zeros(batch.num_nodes, bool)
        for b, path in enumerate(paths):
            on_path[batch.cu[b] + np.array(path)] = True
        ranks, observed = batch_sibling_ranks(batch, on_path, max_depth)
        # verification's form: accepted nodes [rows, width] (-1 padded) of rows in another order
        rows = rng.permutation(len(trees))
        nodes = np.full((len(trees), 1 + max(map(len, paths))), -1, np.int32)
        for b, path in enumerate(paths):
            nodes[rows[b], :len(path)] = path
        num = np.zeros(len(trees), np.int32)
        num[rows] = [len(p) for p in paths]
        got = np.empty(batch.num_nodes, bool), np.empty_like(ranks), np.empty_like(observed)
        accepted_paths(batch.parents.numpy(), batch.cu, batch.depths, nodes, num, rows, max_depth, *got)
        assert (got[0] == on_path).all() and (got[1] == ranks).all() and (got[2] == observed).all()
        # what the proposer then learns, compiled, against DynamicTreePolicy.update (bit for bit)
        reference, compiled = DynamicTreePolicy(max_depth=max(max_depth, 4)), DynamicTreePolicy(max_depth=max(max_depth, 4))
        for _ in range(2):
            reference.update(torch.from_numpy(ranks), torch.from_numpy(observed))
            update_rank_estimates(compiled.hits.numpy(), compiled.trials.numpy(), compiled.decay, ranks, observed)
        assert torch.equal(compiled.hits, reference.hits) and torch.equal(compiled.trials, reference.trials)
        for b, (tree, path) in enumerate(zip(trees, paths)):
            want, seen = sibling_ranks(tree.parents.tolist(), path)
            want = (want + [-1] * max_depth)[:max_depth]
            assert ranks[b].tolist() == want and observed[b] == min(seen, max_depth)


def measured_step(model: LatencyModel, prefix, chunks):
    """A TreeStep-like record of a step that ran ``chunks`` tokens per row after ``prefix`` and took
    what ``model`` predicts (stamped that long ago)."""
    prefix, chunks = np.asarray(prefix, dtype=np.int64), np.asarray(chunks, dtype=np.int64)
    took = model.step_us(*batch_cost(prefix, chunks)) / 1e6
    return SimpleNamespace(prefix=prefix, num_nodes=chunks, root_position=prefix.copy(), started=time.perf_counter() - took)


def test_measured_steps_refit_the_model_to_this_machine():
    from tkernels.config import ConfigChoice
    from tkernels.plugins.vllm.step_model import MeasuredSteps

    truth = LatencyModel(SHAPE, CPU_RATES)
    steps = MeasuredSteps(SHAPE, choice=ConfigChoice(None, "no config in this test"))
    assert steps.model.rates == DEFAULT_RATES and "analytic H100-class default" in steps.describe()
    rng = np.random.default_rng(0)
    for _ in range(40):
        rows = int(rng.integers(1, 9))
        step = measured_step(truth, rng.integers(10, 600, rows), rng.integers(1, 34, rows))
        steps.record(step)
        assert step.started is None  # measured once
    assert steps.record(SimpleNamespace(started=None)) is None  # a step nobody stamped
    model = steps.calibration.wait()
    assert model is not None and steps.calibration.refits >= 1
    for tokens in (8, 64, 264):
        predicted, actual = model.step_time(tokens), truth.step_time(tokens)
        assert abs(predicted / actual - 1) < 0.3, (tokens, predicted, actual)
    off = MeasuredSteps(SHAPE, calibrate=False, choice=ConfigChoice(None, "no config in this test"))
    assert off.record(measured_step(truth, [10], [1])) is None and "not calibrated" in off.describe()


def test_steps_with_a_prompt_chunk_are_not_measured():
    """The size policy prices decodes and verified drafts; a prompt token costs less (no LM head,
    sampler or top-k capture), so a step with a prompt chunk in it is left out of the fit."""
    from tkernels.config import ConfigChoice
    from tkernels.plugins.vllm.step_model import MeasuredSteps

    truth = LatencyModel(SHAPE, CPU_RATES)
    steps = MeasuredSteps(SHAPE, choice=ConfigChoice(None, "no config in this test"))
    chunk = measured_step(truth, [0, 40], [1, 1])
    chunk.root_position = np.array([63, 40])  # row 0 ran a 64-token prompt chunk (its root is its last token)
    assert steps.record(chunk) is None and chunk.started is None and steps.calibration.steps == 0
    steps.record(measured_step(truth, [0, 40], [1, 3]))  # a decode and a verified 2-draft chain
    assert steps.calibration.steps == 1


def propose_at(proposer, batch_size):
    batch = Batch([[3, 4, 5, 3, 4]] * batch_size)  # "3 4" repeats: the hybrid's retrieval drafts
    fake_step(proposer, [f"r{i}" for i in range(batch_size)], [[]] * batch_size)
    batch.commit([[3]] * batch_size)
    return proposer.propose([[3]] * batch_size, batch.num_tokens.copy(), batch.token_ids)


@pytest.mark.parametrize("drafter", ["hybrid", "tr_static", "dynamic"])
def test_a_measured_model_where_drafts_do_not_pay_drafts_nothing(drafter):
    """The analytic default (an H100) makes a batch of 8 draft; this machine's measured model
    (a CPU: tokens are dear) makes the same batch draft nothing, and each refit reaches the
    proposer's policies."""
    proposer, _ = make_tree_proposer(num_spec=8, shape=LLAMA3_8B, additional_config={"tkernels_tree": {"drafter": drafter}})
    if drafter == "dynamic":
        from test_tree_speculation import learn

        learn(proposer, {3: [4, 5], 4: [5, 3]})
    assert any(propose_at(proposer, 8))  # the default: drafts pay on an H100
    cpu = LatencyModel(proposer.step_model.model.shape, CPU_RATES)
    proposer.step_model.record = lambda step: cpu  # this step's measurement refit the model
    propose_at(proposer, 8)
    assert proposer.policy.step_time is cpu
    if drafter != "dynamic":
        assert proposer.tree_drafter.tr_policy.step_time is cpu
    proposer.step_model.record = lambda step: None
    drafts = propose_at(proposer, 8)
    assert drafts == [[]] * 8 and not proposer.tree_batch.proposed
    if drafter != "dynamic":
        assert proposer.stats["undrafted_steps"] >= 1


def test_the_size_policy_learns_the_drafters_acceptance():
    """Harness drafters: every verified tree teaches the size policy the accepted nodes' ranks."""
    import torch

    from tkernels.spec.drafters import DraftBatch, DraftTree

    proposer, _ = make_tree_proposer(num_spec=8)
    before = proposer.policy.accept_probs().clone()
    trees = DraftBatch.from_trees([DraftTree(torch.tensor([3, 4, 9, 5]), torch.tensor([-1, 0, 0, 1], dtype=torch.int32))])
    for _ in range(20):
        # rank 0 at depths 1 and 2, every time
        on_path = proposer._learn_acceptance(trees, np.array([[0, 1, 3]], np.int32), np.array([3], np.int32), np.array([0]))
        assert on_path.tolist() == [True, True, False, True]
    after = proposer.policy.accept_probs()
    assert after[0, 0] > before[0, 0] and after[1, 0] > before[1, 0] and after[0, 1] < before[0, 1]


@pytest.mark.parametrize("drafter", ["hybrid", "dynamic"])
def test_an_unmeasured_proposer_probes_until_its_first_fit(drafter):
    """No config for this machine and no fit yet: nothing prices a draft (the analytic default is
    an H100's), so the proposer drafts one node a request on every other step and none on the
    others, whatever the default would size; the first fit of those steps ends the probing."""
    proposer, _ = make_tree_proposer(measured=False, num_spec=8, shape=LLAMA3_8B,
                                     additional_config={"tkernels_tree": {"drafter": drafter}})
    if drafter == "dynamic":
        from test_tree_speculation import learn

        learn(proposer, {3: [4, 5], 4: [5, 3]})
    assert not proposer.step_model.measured and "probing" in proposer.step_model.describe()
    sizes = [{len(d) for d in propose_at(proposer, 8)} for _ in range(6)]
    assert sizes == [{1}, {0}] * 3 and proposer.stats["probe_steps"] == 6
    truth = LatencyModel(proposer.step_model.model.shape, CPU_RATES)
    rng = np.random.default_rng(1)
    for _ in range(20):  # this machine's steps, measured; the first fit ends the probing
        rows = int(rng.integers(1, 9))
        proposer.step_model.record(measured_step(truth, rng.integers(10, 600, rows), rng.integers(1, 10, rows)))
    proposer.step_model.calibration.wait()
    assert proposer.step_model.measured and "probing" not in proposer.step_model.describe()
    propose_at(proposer, 8)
    assert proposer.stats["probe_steps"] == 6
