"""tkernels.spec.drafters: merged hybrid trees are valid BFS trees of the best candidates; calibration learns."""

import random

import pytest
import torch

from tkernels.spec import validate_parents
from tkernels.spec.drafters import METHODS, DraftTree, RetrievalCalibration, TreeDrafter, _merge, static_template
from tkernels.spec.retrieval import SuffixAutomaton

V = 50


def _warm(drafter: TreeDrafter, seed: int = 0) -> None:
    """Write every adjacency row with random top-k and probabilities."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.arange(V)
    ids = torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(V)])
    probs = torch.rand(V, 8, generator=g).sort(dim=1, descending=True).values * 0.5
    drafter.recycle(rows, ids, probs)


def _paths(tree: DraftTree) -> list[tuple[int, ...]]:
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    paths = [()]
    for i in range(1, len(tokens)):
        paths.append(paths[parents[i]] + (tokens[i],))
    return paths


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("num_nodes", [1, 2, 16, 80])
def test_hybrid_tree_is_the_best_nodes_of_both_sources(seed, num_nodes):
    rng = random.Random(seed)
    drafter = TreeDrafter(V, "hybrid")
    _warm(drafter, seed)
    prompt = [rng.randrange(V) for _ in range(60)]
    history = prompt + prompt[10:25]  # the answer quotes the prompt
    tree = drafter.draft(["r"], [history], num_nodes)[0]
    validate_parents(tree.parents)
    assert len(tree) <= num_nodes and int(tree.tokens[0]) == history[-1]
    paths = _paths(tree)
    assert len(set(paths)) == len(paths)  # one node per token path
    parents, scores = tree.parents.long(), tree.scores
    assert bool((scores[1:] <= scores[parents[1:]] + 1e-12).all())  # a tree of path products
    # the candidates: TR's and retrieval's own best trees, each scored by its own estimates
    tr = drafter.draft.__self__._draft_tr(torch.tensor([history[-1]]), num_nodes)[0]
    sam = SuffixAutomaton(history)
    ret = sam.continuations(num_nodes, drafter.retrieval_calibration.accept_prob, max_depth=32)
    merged = _merge(tr, ret, 10_000)  # every candidate
    best = sorted(merged.scores.tolist(), reverse=True)[:num_nodes]
    assert sorted(scores.tolist(), reverse=True) == pytest.approx(best)
    if num_nodes >= 16:  # the quote continues: retrieval's chain is in the tree
        assert tuple(prompt[25:28]) in {p[:3] for p in paths}


def test_merge_takes_the_larger_estimate_and_keeps_sources():
    tr = DraftTree(torch.tensor([7, 1, 2, 3]), torch.tensor([-1, 0, 0, 1], dtype=torch.int32),
                   torch.tensor([1.0, 0.5, 0.2, 0.25], dtype=torch.float64), torch.tensor([1.0, 0.6, 0.3, 0.5]))
    retrieved = ([7, 2, 9], [-1, 0, 1], [1.0, 0.8, 0.72], [(4, 1.0, 0), (4, 1.0, 1), (5, 1.0, 1)])
    tree = _merge(tr, retrieved, 10)
    assert _paths(tree) == [(), (2,), (1,), (2, 9), (1, 3)]  # siblings best first
    assert tree.scores.tolist() == pytest.approx([1.0, 0.8, 0.5, 0.72, 0.25])
    assert tree.tr_probs[[1, 2, 4]].tolist() == pytest.approx([0.3, 0.6, 0.5]) and torch.isnan(tree.tr_probs[3])
    assert tree.retrieval == [None, (1, 4, 1.0), None, (2, 4, 1.0), None]
    small = _merge(tr, retrieved, 3)
    assert _paths(small) == [(), (2,), (2, 9)]  # the copy (0.72) beats the recycled alternative (0.5)


def test_observe_calibrates_each_source_on_its_tested_candidates():
    drafter = TreeDrafter(V, "hybrid")
    tree = DraftTree(torch.tensor([7, 2, 1, 9, 3]), torch.tensor([-1, 0, 0, 1, 2], dtype=torch.int32),
                     torch.tensor([1.0, 0.8, 0.5, 0.72, 0.25], dtype=torch.float64),
                     torch.tensor([float("nan"), 0.3, 0.6, float("nan"), 0.5]),
                     [None, (1, 4, 1.0), None, (2, 4, 1.0), None])
    before_tr = drafter.tr_policy.mass.sum().item() * drafter.tr_policy.decay
    drafter.observe([tree], torch.zeros(5, 8, dtype=torch.int64), torch.zeros(5, 8), [[0, 1]])  # 2 accepted, then 9 rejected
    cal = drafter.retrieval_calibration
    assert cal.tested[cal.cell(1, 4, 1.0)].item() == 1 and cal.accepted[cal.cell(1, 4, 1.0)].item() == 1
    assert cal.tested[cal.cell(2, 4, 1.0)].item() == 1 and cal.accepted[cal.cell(2, 4, 1.0)].item() == 0
    # TR tested its two depth-1 candidates (probs 0.3 and 0.6); node 4 (below the rejected 1) is untested
    assert drafter.tr_policy.mass.sum().item() == pytest.approx(before_tr + 0.9)


def test_retrieval_calibration_converges_to_the_observed_rate():
    cal = RetrievalCalibration(decay=1.0)
    rng = random.Random(0)
    for _ in range(2000):
        cal.record([(1, 6, 1.0), (3, 1, 0.4)], [rng.random() < 0.9, rng.random() < 0.1])
    assert cal.accept_prob(1.0, 6, 1, 1) == pytest.approx(0.9, abs=0.03)
    assert cal.accept_prob(0.4, 3, 2, 3) == pytest.approx(0.1, abs=0.03)  # context 3 at depth 3: match 1


@pytest.mark.parametrize("method", METHODS)
def test_every_method_drafts_valid_trees_for_a_batch(method):
    drafter = TreeDrafter(V, method)
    if drafter.recycling is not None:
        _warm(drafter)
    rng = random.Random(1)
    histories = [[rng.randrange(V) for _ in range(n)] for n in (1, 5, 40)]
    histories[2] += histories[2][:10]
    trees = drafter.draft(["a", "b", "c"], histories, 12)
    for tree, h in zip(trees, histories):
        validate_parents(tree.parents)
        assert 1 <= len(tree) <= 12 and int(tree.tokens[0]) == h[-1]
    if method == "tr_static":
        assert all(t.parents.tolist() == static_template(12).parents.tolist() for t in trees)
    chosen = drafter.choose(trees)
    for tree in chosen:
        validate_parents(tree.parents)
    ids = torch.randint(0, V, (sum(map(len, chosen)), 8))
    drafter.observe(chosen, ids, torch.rand(ids.shape), [[0]] * 3)


def test_contexts_follow_each_request():
    drafter = TreeDrafter(V, "retrieval")
    drafter.draft(["a"], [[1, 2, 3, 1, 2]], 4)
    assert drafter._contexts["a"].tokens == [1, 2, 3, 1, 2]
    drafter.draft(["a"], [[1, 2, 3, 1, 2, 3, 1]], 4)  # extended in place
    assert drafter._contexts["a"].tokens == [1, 2, 3, 1, 2, 3, 1]
    tree = drafter.draft(["a"], [[4, 5, 4]], 4)[0]  # another history under the key: rebuilt
    assert drafter._contexts["a"].tokens == [4, 5, 4] and tree.tokens.tolist() == [4, 5, 4]
    drafter.release("a")
    assert drafter.keys() == []


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="^method:"):
        TreeDrafter(V, "eagle")
    drafter = TreeDrafter(V, "hybrid")
    with pytest.raises(ValueError, match="^num_nodes:"):
        drafter.draft(["a"], [[1]], 0)
    with pytest.raises(ValueError, match="^keys:"):
        drafter.draft(["a", "b"], [[1]], 4)
    with pytest.raises(ValueError, match="^num_nodes:"):
        static_template(10_000)
