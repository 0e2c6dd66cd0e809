"""Dynamic tree policy: greedy on path products vs exhaustive search, step-time model, updates."""

import pytest
import torch

from tkernels.spec.tree import depths, validate_parents
from tkernels.spec.tree_policy import DynamicTreePolicy, greedy_tree


def best_by_search(p: list[list[float]], num_nodes: int) -> float:
    """Max expected accepted tokens over every tree of ``num_nodes`` nodes (exhaustive search)."""
    max_depth, k = len(p), len(p[0])

    def weight(path):
        w = 1.0
        for d, r in enumerate(path):
            w *= p[d][r]
        return w

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
    validate_parents(shape.parents)
    assert len(shape) == 7 and expected.shape == (7,)
    for m in range(1, 8):
        assert expected[m - 1].item() == pytest.approx(best_by_search(p.tolist(), m), abs=1e-12)
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
    # DESIGN.md's H100 Llama-3-8B ratios: a 64-token verify is nearly free, 512 is not.
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
