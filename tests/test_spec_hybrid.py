"""tkernels.spec.drafters: merged hybrid trees are valid BFS trees of the best candidates; calibration learns."""

import random

import pytest
import torch

from tkernels.spec import validate_parents
from tkernels.spec.drafters import (
    HYBRID_TEMPLATE_SHARE,
    METHODS,
    DraftTree,
    RetrievalCalibration,
    TreeDrafter,
    static_template,
)
from tkernels.spec.retrieval import SuffixAutomaton, bfs_order
from tkernels.spec.tree_policy import KEPT_PRIOR

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


def _brute_joint_trie(drafter: TreeDrafter, history: list[int]) -> dict[tuple[int, ...], float]:
    """Every node of the joint candidate trie (module doc of tkernels.spec.drafters), its token
    path -> its score, by exhaustive expansion with retrieval counted on the history directly,
    not the automaton."""
    from collections import Counter

    from tkernels.spec.drafters import MAX_CHILDREN, ROOT_CONTEXTS

    def occurrences(seq):
        return sum(history[i:i + len(seq)] == seq for i in range(len(history) - len(seq) + 1))

    def followers(ctx):
        return Counter(history[i + len(ctx)] for i in range(len(history) - len(ctx)) if history[i:i + len(ctx)] == ctx)

    n = len(history)
    match = max((m for m in range(1, n) if occurrences(history[n - m:]) >= 2), default=0)
    # the root's contexts: the longest match, then each shorter suffix whose occurrences grow
    roots, length = [], match
    while length > 0 and len(roots) < ROOT_CONTEXTS:
        roots.append(history[n - length:])
        length -= 1
        while length > 0 and occurrences(history[n - length:]) == occurrences(history[n - length - 1:]):
            length -= 1
    trie, stack = {(): 1.0}, [((), history[-1], 1.0, 0, roots)]
    while stack:
        path, token, score, depth, contexts = stack.pop()
        d = depth + 1
        cands = {}
        if d <= drafter.max_depth:
            q = drafter.recycling.probs[token].float()
            for t, stored, p in zip(drafter.recycling.adjacency[token].tolist(), q.tolist(),
                                    drafter.tr_policy.accept_prob(q, d).tolist()):
                if stored > 0:
                    cands.setdefault(t, [p, 0.0, None])
        if d <= 2 * drafter.max_depth:
            for ctx in contexts:
                f = followers(ctx)
                total = sum(f.values())
                assert len(f) <= MAX_CHILDREN  # the test keeps retrieval's choice unambiguous
                for t, c in f.items():
                    cand = cands.setdefault(t, [0.0, 0.0, None])
                    if cand[2] is None:
                        cand[1] = drafter.retrieval_calibration.accept_prob(c / total, len(ctx), total, d)
                        cand[2] = ctx + [t]
        for t, (p_tr, p_ret, ctx) in cands.items():
            p = max(p_tr, p_ret)
            if p > 0:
                trie[path + (t,)] = score * p
                stack.append((path + (t,), t, score * p, d, [ctx] if ctx is not None else []))
    return trie


def _template_paths(drafter: TreeDrafter, root: int, num_nodes: int) -> list[tuple[int, ...]]:
    """The static template's first ``num_nodes`` nodes as token paths, without the nodes (and
    their subtrees) whose row entry was never written or that lie past ``max_depth``."""
    shape = static_template(num_nodes)
    paths: list = [()]
    for parent, rank in zip(shape.parents.tolist()[1:], shape.ranks.tolist()[1:]):
        path = paths[parent]
        last = path[-1] if path else root
        ok = path is not None and len(path) < drafter.max_depth and drafter.recycling.probs[last, rank] > 0
        paths.append(path + (int(drafter.recycling.adjacency[last, rank]),) if ok else None)
    return [p for p in paths if p is not None]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_nodes", [1, 2, 9, 40, 81])
def test_hybrid_tree_is_the_template_breadth_then_the_best_nodes_of_the_joint_trie(seed, num_nodes):
    rng = random.Random(seed)
    drafter = TreeDrafter(V, "hybrid", max_depth=3)
    g = torch.Generator().manual_seed(seed)  # TR rows with four recycled candidates each
    ids = torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(V)])
    probs = torch.zeros(V, 8)
    probs[:, :4] = torch.rand(V, 4, generator=g).sort(dim=1, descending=True).values * 0.6
    drafter.recycle(torch.arange(V), ids, probs)
    prompt = [rng.randrange(4) for _ in range(30)]  # 4 tokens: at most 4 continuations of any context
    history = prompt + prompt[5:12]
    tree = drafter.draft(["r"], [history], num_nodes)[0]
    validate_parents(tree.parents)
    assert len(tree) <= num_nodes and int(tree.tokens[0]) == history[-1]
    paths = _paths(tree)
    assert len(set(paths)) == len(paths)  # one node per token path
    parents, scores = tree.parents.long(), tree.scores
    assert bool((scores[1:] <= scores[parents[1:]] + 1e-12).all())  # path products
    trie = _brute_joint_trie(drafter, history)
    breadth = _template_paths(drafter, history[-1], max(1, int(num_nodes * HYBRID_TEMPLATE_SHARE)))
    assert set(breadth) <= set(paths)  # the template's written nodes, all of them
    rest = sorted((score for path, score in trie.items() if path not in breadth), reverse=True)
    best = sorted([trie[p] for p in breadth] + rest[:num_nodes - len(breadth)], reverse=True)
    assert sorted(scores.tolist(), reverse=True) == pytest.approx(best)
    assert all(trie[p] == pytest.approx(float(s)) for p, s in zip(paths, scores))


def test_hybrid_follows_a_copy_and_keeps_recycled_alternatives():
    drafter = TreeDrafter(V, "hybrid")
    prompt = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    ids = torch.arange(8).repeat(V, 1) + 30  # TR: after any token, 30..37 at probability 0.2, 0.1, 0
    probs = torch.zeros(V, 8)
    probs[:, 0], probs[:, 1] = 0.2, 0.1
    drafter.recycle(torch.arange(V), ids, probs)
    tree = drafter.draft(["r"], [prompt + [5, 12, 13]], 12)[0]
    paths = _paths(tree)
    assert (14, 15, 16, 17) in paths  # the copy goes on
    assert (30,) in paths  # the recycled alternative at the root
    i = paths.index((14,))
    assert tree.retrieval[i] == (1, 2, 1.0) and torch.isnan(tree.tr_probs[i])  # retrieval's, matched 12 13
    j = paths.index((30,))
    assert tree.retrieval[j] is None and float(tree.tr_probs[j]) == pytest.approx(0.2, abs=1e-3)  # fp16 state


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
    # what the verified (kept) drafts were worth, beside: their scores 0.8 + 0.5 + 0.72 + 0.25, one accepted
    policy = drafter.tr_policy
    assert policy.kept_scores == pytest.approx(KEPT_PRIOR * policy.decay + 2.27)
    assert policy.kept_accepted == pytest.approx(KEPT_PRIOR * policy.decay + 1)


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
    drafter = TreeDrafter(V, "retrieval", compiled=False)  # the compiled slots: tests/test_spec_drafting.py
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


@pytest.mark.parametrize("arg,call", [
    # issue 22: a probe of every public drafter entry point
    ("num_nodes", lambda: TreeDrafter(V, "hybrid").draft(["a"], [[1, 2, 3]], 2.5)),
    ("histories", lambda: TreeDrafter(V, "hybrid").draft(["a"], [[1, 2, V + 5]], 8)),  # an IndexError before
    ("histories", lambda: TreeDrafter(V, "tr_static").draft(["a"], [[1, 2, -1]], 8)),  # wrapped to the last row
    ("batch_size", lambda: TreeDrafter(V, "hybrid").choose([], batch_size=-1)),
    ("decay", lambda: RetrievalCalibration(decay=float("nan"))),
    ("prior_weight", lambda: RetrievalCalibration(prior_weight=0)),
    ("accepted", lambda: RetrievalCalibration().record([(1, 2, 0.5)], [True, False])),
    ("max_nodes", lambda: SuffixAutomaton([1, 2, 1, 2]).continuations(0)),
    ("max_children", lambda: SuffixAutomaton([1, 2, 1, 2]).continuations(8, max_children=0)),
    ("max_depth", lambda: SuffixAutomaton([1, 2, 1, 2]).continuations(8, max_depth=1.5)),
    ("parents", lambda: bfs_order([-1, 5])),
])
def test_bad_inputs_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()


def _observe_random(drafter, trees, g):
    ids = torch.stack([torch.randperm(V, generator=g)[:8] for _ in range(sum(map(len, trees)))])
    probs = torch.rand(ids.shape, generator=g).sort(dim=1, descending=True).values * 0.6
    drafter.observe(trees, ids, probs, [[0] + ([1] if len(t) > 1 else []) for t in trees])


def test_own_rows_change_nothing_for_one_request_at_a_time():
    """The harness's case: a request's own row of a token is the shared row's latest value."""
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    # the reference's own rows (the compiled ones draft the same trees: tests/test_spec_drafting.py)
    with_own, shared_only = TreeDrafter(V, "hybrid", compiled=False), TreeDrafter(V, "hybrid", compiled=False)
    for d in (with_own, shared_only):
        _warm(d, 1)
    history = [rng.randrange(V) for _ in range(20)]
    for _ in range(12):
        trees = [d.draft(["q"], [history], 24)[0] for d in (with_own, shared_only)]
        assert trees[0].tokens.tolist() == trees[1].tokens.tolist() and trees[0].parents.tolist() == trees[1].parents.tolist()
        state = g.get_state()
        _observe_random(with_own, trees[:1], g)
        g.set_state(state)
        _observe_random(shared_only, trees[1:], g)
        shared_only._own.clear()  # reads the shared adjacency only
        history.append(int(trees[0].tokens[1]) if len(trees[0]) > 1 else rng.randrange(V))
    assert with_own._own["q"]


def test_own_rows_keep_each_request_its_latest_row_among_many():
    drafter = TreeDrafter(V, "hybrid")
    root = DraftTree(torch.tensor([7]), torch.tensor([-1], dtype=torch.int32))
    rows = {"a": [11, 12, 13, 14, 15, 16, 17, 18], "b": [21, 22, 23, 24, 25, 26, 27, 28]}
    for key in ("a", "b"):  # both verify token 7, b last
        drafter.observe([DraftTree(root.tokens, root.parents, key=key)], torch.tensor([rows[key]]),
                        torch.full((1, 8), 0.1), [[0]])
    firsts = {key: drafter.draft([key], [[1, 2, 7]], 3)[0].tokens[1].item() for key in ("a", "b", "c")}
    assert firsts == {"a": 11, "b": 21, "c": 21}  # c never verified 7: the shared (latest) row
    drafter.release("a")
    assert drafter.draft(["a"], [[1, 2, 7]], 3)[0].tokens[1].item() == 21


def test_a_token_at_several_nodes_keeps_the_last_nodes_row():
    drafter = TreeDrafter(V, "hybrid", compiled=False)  # the compiled rows: tests/test_spec_drafting.py
    tree = DraftTree(torch.tensor([7, 3, 4, 3]), torch.tensor([-1, 0, 0, 1], dtype=torch.int32), key="a")
    ids = torch.arange(32).view(4, 8)
    drafter.observe([tree], ids, torch.full((4, 8), 0.1), [[0]])
    assert drafter.recycling.adjacency[3].tolist() == list(range(24, 32))
    assert drafter._own["a"][3][0] == list(range(24, 32))


def test_static_template_reads_own_rows_first():
    drafter = TreeDrafter(V, "tr_static")
    _warm(drafter)
    root = DraftTree(torch.tensor([7]), torch.tensor([-1], dtype=torch.int32))
    own = {"a": [11] + list(range(30, 37)), "b": [21] + list(range(40, 47))}
    for key, row in own.items():  # both verify token 7, b last
        drafter.observe([DraftTree(root.tokens, root.parents, key=key)], torch.tensor([row]), torch.full((1, 8), 0.1), [[0]])
    shape = static_template(20)
    trees = drafter.draft(["a", "b", "c"], [[7], [7], [7]], 20)
    parents, ranks = shape.parents.tolist(), shape.ranks.tolist()
    for tree, key in zip(trees, ("a", "b", "c")):
        expected = [7]
        for i in range(1, 20):  # own row for token 7 (c has none: the shared row, b's), shared rows elsewhere
            p = expected[parents[i]]
            expected.append(own.get(key, own["b"])[ranks[i]] if p == 7 else int(drafter.recycling.adjacency[p, ranks[i]]))
        assert tree.tokens.tolist() == expected and tree.parents.tolist() == parents


def test_hybrid_never_drafts_placeholders_of_rows_never_written():
    drafter = TreeDrafter(V, "hybrid")
    drafter.recycle(torch.tensor([3]), torch.arange(8).view(1, 8) + 10, torch.full((1, 8), 0.2))  # row 3 only
    assert drafter.draft(["a"], [[1, 2, 4]], 40)[0].tokens.tolist() == [4]  # cold root, nothing to copy
    tree = drafter.draft(["b"], [[1, 2, 3]], 40)[0]
    assert sorted(tree.tokens.tolist()) == [3] + list(range(10, 18))  # row 3's entries; theirs are unwritten


def test_retrieval_calibration_record_counts_each_candidate_in_its_cell(rng):
    """The vectorised record against cell() one candidate at a time (edges and shares included)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    cal, want = RetrievalCalibration(decay=0.9), RetrievalCalibration(decay=0.9)
    for _ in range(5):
        n = int(torch.randint(0, 300, (1,), generator=gen))
        depth = torch.randint(0, 20, (n,), generator=gen).tolist()
        match = torch.randint(0, 40, (n,), generator=gen).tolist()
        share = torch.tensor([0.25, 0.5, 0.75, 1.0])[torch.randint(0, 4, (n,), generator=gen)].tolist()
        ok = (torch.rand(n, generator=gen) < 0.5).tolist()
        features = list(zip(depth, match, share))
        cal.record(features, ok)
        want.tested *= want.decay
        want.accepted *= want.decay
        for f, accepted in zip(features, ok):
            want.tested[want.cell(*f)] += 1.0
            want.accepted[want.cell(*f)] += float(accepted)
        torch.testing.assert_close(cal.tested, want.tested, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cal.accepted, want.accepted, rtol=1e-12, atol=1e-12)
