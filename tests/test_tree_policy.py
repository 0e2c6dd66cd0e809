"""Dynamic tree policy: greedy on path products vs exhaustive search, step-time model, updates."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tkernels.spec.token_recycling import TokenRecycling
from tkernels.spec.tree import MAX_TREE_NODES, depths, select_subtree, validate_parents
from tkernels.spec.tree_policy import ConfidenceTreePolicy, DynamicTreePolicy, greedy_tree
from tkernels.spec.tree_policy import tested_nodes as find_tested_nodes  # not "test_*": pytest would collect it


def best_by_search(weight, max_depth: int, k: int, num_nodes: int) -> float:
    """Max sum of ``weight(rank path)`` over every tree of ``num_nodes`` nodes (exhaustive search)."""
    best, seen = 0.0, set()

    def grow(nodes: frozenset):
        nonlocal best
        if nodes in seen:
            return
        seen.add(nodes)
        if len(nodes) == num_nodes:
            best = max(best, sum(weight(x) for x in nodes))  # the root's weight 1 is the bonus
            return
        for node in nodes:
            if len(node) < max_depth:
                for r in range(k):
                    if node + (r,) not in nodes:
                        grow(nodes | {node + (r,)})

    grow(frozenset({()}))
    return best


@pytest.mark.parametrize("trial", range(4))
def test_greedy_is_optimal_on_small_cases(rng, trial):
    max_depth, k = 3, 3
    p = torch.rand(max_depth, k, generator=rng, dtype=torch.float64)
    if trial % 2:  # realistic: probabilities fall with rank
        p = p.sort(dim=1, descending=True).values * 0.9
    p = p / p.sum(1, keepdim=True).clamp(min=1)  # disjoint events: sum over ranks <= 1
    shape, expected = greedy_tree(p, 7)

    def rank_weight(path):
        return math.prod(p[d, r].item() for d, r in enumerate(path))

    validate_parents(shape.parents)
    assert len(shape) == 7 and expected.shape == (7,)
    for m in range(1, 8):
        assert expected[m - 1].item() == pytest.approx(best_by_search(rank_weight, max_depth, k, m), abs=1e-12)
    # the returned shape achieves its expectation
    d, ranks = depths(shape.parents).tolist(), shape.ranks.tolist()
    w = [1.0] * 7
    for i in range(1, 7):
        w[i] = w[shape.parents[i]] * p[d[i] - 1, ranks[i]].item()
    assert sum(w) == pytest.approx(expected[-1].item())


def test_greedy_runs_out_of_candidates():
    shape, expected = greedy_tree(torch.full((2, 2), 0.5), 100)
    assert len(shape) == 7 and expected[-1].item() == pytest.approx(1 + 1 + 1)
    with pytest.raises(ValueError, match="accept_probs"):
        greedy_tree(torch.full((2, 2), 1.5), 4)


def test_default_step_time_is_the_per_gpu_latency_model():
    from tkernels.sched.latency_model import LatencyModel

    step_time = DynamicTreePolicy().step_time
    assert isinstance(step_time, LatencyModel)
    # docs/design.md's H100 Llama-3-8B ratios: a 64-token verify is nearly free, 512 is not.
    assert step_time.step_time(64) / step_time.step_time(1) < 1.05
    assert step_time.step_time(512) / step_time.step_time(1) > 1.7


def test_budget_shrinks_with_batch_and_other_tokens():
    policy = DynamicTreePolicy()
    sizes = [len(policy.choose(batch, 80)) for batch in (1, 4, 16, 64)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 4 * sizes[-1]
    assert len(policy.choose(1, 80, other_tokens=2000)) < sizes[0]
    assert len(policy.choose(1, 12)) <= 12

    class Flat:  # verification is free: the budget is used up
        def step_time(self, batch_tokens):
            return 1.0

    assert len(DynamicTreePolicy(step_time=Flat()).choose(64, 50)) == 50


def test_trees_pay_for_their_attention_when_the_context_is_given():
    """Every node attends to its request's cached tokens. On this project's 2-core VM (the rates
    its vLLM-CPU engine fitted for SmolLM2-135M in float32) a node at a 1k-token context costs ~5 ms
    of attention against ~0.5 ms of matmuls: priced, a lone request's tree is several times
    smaller than unpriced (at batch 1 the engine measured 4.7-4.8 s per request at 3 draft tokens
    against 5.6-5.8 s at the unpriced size, docs/speculation.md). The model's step with a
    context is its step with that attention: K/V read once per request, every query token
    scoring the context."""
    from tkernels.sched.latency_model import LatencyModel, LatencyRates, ModelShape

    shape = ModelShape(num_layers=30, hidden_size=576, num_q_heads=9, num_kv_heads=3, head_dim=64,
                       intermediate_size=1536, vocab_size=49152, dtype_bytes=4)
    cpu = LatencyModel(shape, LatencyRates(overhead_us=1e4, weight_gbps=10.5, matmul_tflops=0.6, kv_gbps=9.4,
                                           attn_tflops=0.0132))
    assert cpu.step_time(9, requests=1, context=1000) == cpu.step_us(9, 1000, 9000)
    assert cpu.step_time(9) == cpu.step_us(9, 0, 0) == cpu.step_time(9, requests=4)
    # the policies price many candidate sizes in one vectorised call (steps_us): the same values
    from tkernels.spec.tree_policy import _step_times

    for requests, context in ((3, 700), (0, 0), (64, 0)):
        looped = [cpu.step_time(t, requests=requests, context=context) for t in range(1, 300)]
        assert _step_times(cpu, range(1, 300), requests, context).tolist() == pytest.approx(looped, rel=1e-12)
    with pytest.raises(ValueError, match="^context"):
        cpu.step_time(9, requests=1, context=-1)
    policy = DynamicTreePolicy(step_time=cpu)
    unpriced, priced = len(policy.choose(1, 64)), len(policy.choose(1, 64, context=1000))
    assert priced * 3 <= unpriced and priced >= 2
    assert len(policy.choose(1, 64, context=4000)) <= priced <= len(policy.choose(1, 64, context=100))
    with pytest.raises(ValueError, match="^context"):
        policy.choose(1, 64, context=-5)
    # Per-request trees: the same price for every node of the batch.
    scores = torch.tensor([[1.0, 0.5, 0.3, 0.2, 0.1, 0.05], [1.0, 0.4, 0.25, 0.12, 0.06, 0.03]], dtype=torch.float64)
    confidence = ConfidenceTreePolicy(step_time=cpu)
    kept = [int(confidence.choose(scores, context=c).sum()) for c in (0, 300, 3000)]
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1] >= 2  # the roots always

    class Unpriced:  # a StepTime without attention: called with the token count alone
        def step_time(self, batch_tokens):
            return 100.0 + batch_tokens

    assert len(DynamicTreePolicy(step_time=Unpriced()).choose(1, 8)) >= 1


def test_batch_1_trees_grow_past_64_nodes_where_the_step_model_says_they_are_nearly_free():
    """H100, Llama-3-8B (the analytic default): a step costs x1.02 at 64 tokens, x1.07 at 128,
    x1.11 at 192 (measured; the model says x1.16), x1.22 at 256 of a 1-token step. Under the
    prior (depth d + rank sum s has path probability 0.5**(d+s): 2**(c-1) nodes worth 2**-c
    each, every doubling of the tree adds 0.5 tokens) a lone request's best tree doubles past
    64 nodes, and shrinks as the batch grows."""
    policy = DynamicTreePolicy()
    step = policy.step_time
    assert [round(step.step_time(n) / step.step_time(1), 2) for n in (64, 128)] == [1.02, 1.07]
    sizes = {b: len(policy.choose(b, MAX_TREE_NODES)) for b in (1, 2, 8, 32)}
    assert sizes[1] >= 128 and sizes[1] > sizes[2] > sizes[8] > sizes[32]
    assert sizes[32] <= 16
    # Per-request trees (ConfidenceTreePolicy): the same nodes as scores, one budget for the batch.
    _shape, expected = greedy_tree(policy.accept_probs(), MAX_TREE_NODES)
    scores = torch.cat([torch.ones(1, dtype=torch.float64), expected.diff()])[None]  # each node's path probability
    kept = {b: int(ConfidenceTreePolicy().choose(scores.expand(b, -1)).sum()) // b for b in (1, 32)}
    assert kept[1] >= 128 and kept[32] <= 16


def test_update_learns_and_decays():
    policy = DynamicTreePolicy(k=4, max_depth=3, decay=0.5, prior_weight=1.0)
    for _ in range(30):  # the target always picks rank 2 at depth 1, then rank 0 at depth 2
        policy.update(torch.tensor([[2, 0, 3], [2, -1, 0]]), torch.tensor([2, 2]))
    p = policy.accept_probs()
    assert p[0, 2].item() == pytest.approx(1.0, abs=1e-6)
    assert p[1, 0].item() == pytest.approx(0.5, abs=1e-6) and p[1, 1].item() == pytest.approx(0.0, abs=1e-6)
    assert p[2].tolist() == pytest.approx([0.5, 0.25, 0.125, 0.0625])  # depth 3 never observed: prior
    shape = policy.choose(1, 3)
    assert shape.ranks.tolist() == [-1, 2, 0]  # learned: rank 2 first at depth 1
    with pytest.raises(ValueError, match="accepted_ranks"):
        policy.update(torch.tensor([0, 1]), torch.tensor([1]))


# --- per-request confidence trees ----------------------------------------------------------


def random_recycling(rng, vocab, k):
    """A drafter whose rows hold distinct random ids with falling probabilities; two rows unwritten."""
    tr = TokenRecycling(vocab, k)
    ids = torch.stack([torch.randperm(vocab, generator=rng)[:k] for _ in range(vocab)])
    probs = torch.rand(vocab, k, generator=rng).sort(dim=1, descending=True).values
    probs = probs / (probs.sum(1, keepdim=True) + torch.rand(vocab, 1, generator=rng))
    tr.recycle_topk(ids[2:], torch.arange(2, vocab), probs[2:])
    return tr


def path_weight(tr, last: int, accept_prob):
    """weight(rank path) = product of calibrated stored probabilities along it, from token ``last``."""

    def weight(path):
        w, token = 1.0, last
        for depth, r in enumerate(path, 1):
            q = tr.probs[token, r].float()
            w *= float(accept_prob(q, depth)) if accept_prob else float(q)
            token = int(tr.adjacency[token, r])
        return w

    return weight


@pytest.mark.parametrize("trial", range(3))
def test_draft_best_is_the_best_tree(rng, trial):
    vocab, k, max_depth = 9, 3, 3
    tr = random_recycling(rng, vocab, k)
    factors = 0.5 + torch.rand(max_depth + 1, generator=rng, dtype=torch.float64)  # some > 1: clamped
    accept_prob = [None, lambda q, d: (q.double() * factors[d]).clamp(max=1.0)][trial % 2]
    last = torch.tensor([0, 4, 7, 4])  # token 0's row is unwritten: only zero-score children
    for m in (1, 2, 5, 8):
        tokens, parents, scores, probs = tr.draft_best(last, m, accept_prob, max_depth=max_depth)
        assert tokens.shape == parents.shape == scores.shape == probs.shape == (4, m)
        for b in range(4):
            validate_parents(parents[b])
            assert tokens[b, 0] == last[b] and scores[b, 0] == 1
            for i in range(1, m):  # node i = a candidate of its parent's row, scored from its stored probability
                p = int(parents[b, i])
                r = tr.adjacency[tokens[b, p]].tolist().index(int(tokens[b, i]))
                q = tr.probs[tokens[b, p], r].float()
                assert probs[b, i] == q
                calibrated = float(accept_prob(q, int(depths(parents[b])[i]))) if accept_prob else float(q)
                assert scores[b, i].item() == pytest.approx(float(scores[b, p]) * calibrated)
            pairs = {(int(parents[b, i]), int(tokens[b, i])) for i in range(1, m)}
            assert len(pairs) == m - 1  # no candidate twice
            best = best_by_search(path_weight(tr, int(last[b]), accept_prob), max_depth, k, m) - 1  # minus the root
            assert scores[b, 1:].sum().item() == pytest.approx(best, abs=1e-9)
    # the expansion runs out: 1 + 3 + 9 nodes at max_depth 2
    assert tr.draft_best(last, 50, max_depth=2)[0].shape == (4, 13)


def test_choose_spends_one_budget_where_scores_are_high(rng):
    policy = ConfidenceTreePolicy()
    tr = random_recycling(rng, 50, 8)
    sure = torch.tensor([5, 6, 7, 8, 9, 10])
    ids = torch.cat([sure[:, None] + 1, torch.arange(20, 27).expand(6, 7)], 1)
    tr.recycle_topk(ids, sure, torch.tensor([0.97] + [0.004] * 7).expand(6, 8))  # a confident chain 5 -> 6 -> ... -> 11
    _tokens, parents, scores, _probs = tr.draft_best(torch.tensor([5, 11]), 40, policy.accept_prob)
    keep = policy.choose(scores)
    assert keep[:, 0].all()
    cu = torch.tensor([0, 40, 80], dtype=torch.int32)
    index, pruned, cu_kept = select_subtree(parents.flatten(), keep.flatten(), cu)  # a prefix of the score order: trees
    validate_parents(pruned, cu_kept)
    assert torch.equal(index, keep.flatten().nonzero().flatten())
    sizes = [int(policy.choose(scores[:1].expand(b, -1))[0].sum()) for b in (1, 8, 64)]
    print(keep.sum(1), sizes)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert policy.choose(scores, other_tokens=4000).sum() < keep.sum()

    class Flat:  # verification is free: every node with a chance is kept
        def step_time(self, batch_tokens):
            return 1.0

    assert ConfidenceTreePolicy(step_time=Flat()).choose(scores).equal(scores > 0)


def test_kept_nodes_worth_less_than_their_scores_make_smaller_batches():
    """choose() keeps the best-scoring nodes, whose scores came out high: record_kept learns what
    kept nodes were worth (accepted / summed scores, decayed, prior factor 1) and choose() prices
    the scores at that factor, so overconfident scores stop buying nodes that do not pay."""
    from tkernels.spec.tree_policy import KEPT_PRIOR

    class Linear:  # 100 µs a step plus 10 µs a token
        def step_time(self, batch_tokens, requests=0, context=0):
            return 100.0 + 10.0 * batch_tokens

    policy = ConfidenceTreePolicy(step_time=Linear(), decay=0.9)
    assert policy.kept_factor() == 1.0
    scores = torch.tensor([[1.0, 0.6, 0.5, 0.4, 0.3, 0.2]]).expand(8, -1)
    before = int(policy.choose(scores).sum())
    for _ in range(60):  # kept nodes scored 0.5 on average, one in four was accepted
        policy.record_kept(np.full(8, 0.5), np.arange(8) % 4 == 0)
    assert policy.kept_factor() == pytest.approx(0.5, rel=0.01)
    after = int(policy.choose(scores).sum())
    assert after < before
    # the factor is the scores' only change: ranking kept, a factor-1 policy with halved scores agrees
    halved = ConfidenceTreePolicy(step_time=Linear()).choose(scores * policy.kept_factor())
    assert policy.choose(scores).equal(halved)
    # the prior: a first step of nothing accepted moves the factor, not to zero
    fresh = ConfidenceTreePolicy(step_time=Linear(), decay=1.0)
    fresh.record_kept(np.full(4, 0.5), np.zeros(4, bool))
    assert fresh.kept_factor() == pytest.approx(KEPT_PRIOR / (KEPT_PRIOR + 2.0))


def test_calibration_learns_from_tested_candidates_only():
    policy = ConfidenceTreePolicy(max_depth=2, bins=2, decay=0.9, prior_weight=1.0)
    # root -> a (q 0.6), b (q 0.3); a -> c (q 0.8); b -> d (q 0.7). The target accepts a, then rejects c.
    parents = torch.tensor([-1, 0, 0, 1, 2], dtype=torch.int32)
    node_probs = torch.tensor([1.0, 0.6, 0.3, 0.8, 0.7])
    for _ in range(100):
        policy.update(node_probs, parents, torch.tensor([0, 5]), torch.tensor([[0, 1, 0]]), torch.tensor([2]))
    f = policy.factors()
    assert f[0, 0].item() == pytest.approx(1 / 0.6, rel=1e-3)  # depth 1, q in (1/2, 1]: always accepted
    assert f[0, 1].item() == pytest.approx(0.0, abs=1e-3)  # depth 1, q <= 1/2: b always rejected
    assert f[1, 0].item() == pytest.approx(0.0, abs=1e-3)  # c tested and rejected; d never tested (b rejected)
    assert f[1, 1].item() == pytest.approx(1.0)  # untouched: the prior
    assert policy.accept_prob(torch.tensor([0.6, 0.9]), 1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # clamped


def test_confidence_bad_inputs(rng):
    policy = ConfidenceTreePolicy()
    tr = random_recycling(rng, 20, 4)
    with pytest.raises(ValueError, match="num_nodes"):
        tr.draft_best(torch.tensor([1]), 0)
    with pytest.raises(ValueError, match="last_tokens"):
        tr.draft_best(torch.tensor([[1]]), 4)
    with pytest.raises(ValueError, match="topk_probs"):
        tr.recycle_topk(torch.zeros(2, 4, dtype=torch.int64), torch.tensor([1, 2]), torch.rand(2, 3))
    with pytest.raises(ValueError, match="scores"):
        policy.choose(torch.rand(5))
    parents, cu = torch.tensor([-1, 0, 0], dtype=torch.int32), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="node_probs"):
        policy.update(torch.rand(2), parents, cu, torch.tensor([[0, 1]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="accepted_nodes"):
        policy.update(torch.rand(3), parents, cu, torch.tensor([0, 1]), torch.tensor([2]))
    with pytest.raises(ValueError, match="decay"):
        ConfidenceTreePolicy(decay=0)


def test_select_subtree_matches_reference(rng):
    trees, keeps = [], []
    for n in (1, 7, 30, 12):  # ragged; scores fall along paths, keep each tree's best few
        parents = [-1] + sorted(int(torch.randint(0, i, (1,), generator=rng)) for i in range(1, n))
        score = [1.0]
        for i in range(1, n):
            score.append(score[parents[i]] * float(torch.rand(1, generator=rng)))
        m = int(torch.randint(1, n + 1, (1,), generator=rng))
        best = sorted(range(n), key=lambda i: -score[i])[:m]
        trees.append(parents)
        keeps.append([i in best for i in range(n)])
    cu = torch.tensor([0] + [len(t) for t in trees]).cumsum(0).int()
    parents = torch.tensor([p for t in trees for p in t], dtype=torch.int32)
    validate_parents(parents, cu)
    index, kept, kept_cu = select_subtree(parents, torch.tensor([k for ks in keeps for k in ks]), cu)
    validate_parents(kept, kept_cu)
    ref_index, ref_parents, ref_cu = [], [], [0]
    for start, tree, keep in zip(cu.tolist(), trees, keeps):
        new = {old: j for j, old in enumerate(i for i in range(len(tree)) if keep[i])}
        ref_index += [start + old for old in new]
        ref_parents += [-1 if tree[old] < 0 else new[tree[old]] for old in new]
        ref_cu.append(ref_cu[-1] + len(new))
    assert index.tolist() == ref_index and kept.tolist() == ref_parents and kept_cu.tolist() == ref_cu
    with pytest.raises(ValueError, match="keep must hold"):
        select_subtree(torch.tensor([-1, 0, 1], dtype=torch.int32), torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match="keep must be a bool"):
        select_subtree(torch.tensor([-1, 0], dtype=torch.int32), torch.tensor([1, 1]))


def test_confidence_host_estimate_equals_the_tensor_one():
    policy = ConfidenceTreePolicy(step_time=SimpleNamespace(step_time=lambda tokens: 1.0 + tokens))
    g = torch.Generator().manual_seed(0)
    policy.accepted *= torch.rand(policy.accepted.shape, generator=g, dtype=torch.float64) * 3  # factors up to 3
    probs = torch.rand(500, generator=g) ** 4
    host = policy.accept_prob_host()
    for depth in (1, 2, 8, 30):
        expected = policy.accept_prob(probs, depth)
        assert torch.equal(torch.tensor([host(q, depth) for q in probs.tolist()], dtype=torch.float64), expected)


_P = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
_CU = torch.tensor([0, 4])


@pytest.mark.parametrize("arg,call", [
    # issue 22: every public function of the tree policies, a bad argument named first
    ("num_nodes", lambda: greedy_tree(torch.full((3, 2), 0.5), 0)),
    ("num_nodes", lambda: greedy_tree(torch.full((3, 2), 0.5), 2.5)),
    ("accept_probs", lambda: greedy_tree(torch.tensor([[float("nan"), 0.5]]), 4)),
    ("accept_probs", lambda: greedy_tree(torch.full((3,), 0.5), 4)),
    ("decay", lambda: DynamicTreePolicy(decay=float("nan"))),
    ("max_depth", lambda: DynamicTreePolicy(max_depth=0)),
    ("k", lambda: DynamicTreePolicy(k=2.5)),
    ("prior_weight", lambda: DynamicTreePolicy(prior_weight=0)),
    ("accepted_ranks", lambda: DynamicTreePolicy(k=4).update(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))),
    ("accepted_ranks", lambda: DynamicTreePolicy(k=4).update(torch.tensor([[-2, 0]]), torch.tensor([1]))),
    ("num_observed", lambda: DynamicTreePolicy(k=4).update(torch.tensor([[0, 0]]), torch.tensor([1.0]))),
    ("batch_size", lambda: DynamicTreePolicy().choose(1.5, 8)),
    ("max_nodes", lambda: DynamicTreePolicy().choose(1, 0)),
    ("other_tokens", lambda: DynamicTreePolicy().choose(1, 8, other_tokens=-3)),
    ("decay", lambda: ConfidenceTreePolicy(decay=2)),
    ("bins", lambda: ConfidenceTreePolicy(bins=0)),
    ("prior_weight", lambda: ConfidenceTreePolicy(prior_weight=float("nan"))),
    ("depth", lambda: ConfidenceTreePolicy().accept_prob(torch.tensor([0.5]), 0)),
    ("probs", lambda: ConfidenceTreePolicy().accept_prob([0.5], 1)),
    ("depth", lambda: ConfidenceTreePolicy().record(torch.rand(3), torch.ones(2, dtype=torch.long), torch.ones(3, dtype=torch.bool))),
    ("probs", lambda: ConfidenceTreePolicy().record(torch.full((1,), 2.0), torch.ones(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))),
    ("accepted", lambda: ConfidenceTreePolicy().record(torch.rand(2), torch.ones(2, dtype=torch.long), torch.ones(2))),
    ("other_tokens", lambda: ConfidenceTreePolicy().choose(torch.rand(1, 5), other_tokens=-1)),
    ("scores", lambda: ConfidenceTreePolicy().choose(torch.full((1, 5), float("nan")))),
    ("scores", lambda: ConfidenceTreePolicy().record_kept([0.5, float("nan")], np.ones(2, bool))),
    ("scores", lambda: ConfidenceTreePolicy().record_kept([-0.5], np.ones(1, bool))),
    ("accepted", lambda: ConfidenceTreePolicy().record_kept([0.5, 0.5], np.ones(3, bool))),
    ("accepted", lambda: ConfidenceTreePolicy().record_kept([0.5], [1])),
    ("cu_nodes", lambda: find_tested_nodes(_P, torch.tensor([0, 3]), torch.zeros(1, 3, dtype=torch.int32), torch.tensor([1]))),
    ("num_accepted", lambda: find_tested_nodes(_P, _CU, torch.tensor([[0, 1, 3]]), torch.tensor([9]))),
    ("accepted_nodes", lambda: find_tested_nodes(_P, _CU, torch.tensor([[0, 9, 3]]), torch.tensor([3]))),
    ("accepted_nodes", lambda: find_tested_nodes(_P, _CU, torch.tensor([[0.0, 1.0]]), torch.tensor([2]))),
])
def test_bad_inputs_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()


def test_nan_stored_probability_gives_a_nan_estimate_not_an_index_error():
    got = ConfidenceTreePolicy().accept_prob(torch.tensor([float("nan"), 0.5]), 1)
    assert math.isnan(got[0]) and 0 < got[1] <= 1
