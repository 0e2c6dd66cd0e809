"""tkernels.spec.drafting: the compiled drafters draft exactly the Python reference's trees.

Both run side by side through a served batch's life: cold start (rows never written), requests
joining and leaving (release, a reused slot), long contexts (bulk automaton builds), a history
replaced under its key (rebuild), an end-of-sequence token, 1 to 256 nodes, and observe()
learning from every step in between (shared rows, own rows, both calibrations). Every tree is
compared whole: tokens, parents, scores and the stored TR probabilities (exactly: the same float64
operations in the same order), retrieval features: about 4800 trees (130k nodes) over the eight
cases.

The first run on a machine compiles the kernels (numba, ``cache=True``: 20 s for all four methods
on the project's 2-core VM at load 6, then about 4 s to load them).
"""

import random

import pytest
import torch

from tkernels.spec import validate_parents
from tkernels.spec.drafters import DraftBatch, TreeDrafter

EOS = 2


def _same(a, b) -> None:
    assert a.key == b.key
    assert a.tokens.dtype == b.tokens.dtype and a.tokens.tolist() == b.tokens.tolist()
    assert a.parents.tolist() == b.parents.tolist()
    validate_parents(a.parents)
    for name in ("scores", "tr_probs"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x.isnan(), y.isnan()), name
            assert torch.equal(x.nan_to_num(-1.0), y.nan_to_num(-1.0)), name
    assert (a.retrieval is None) == (b.retrieval is None)
    if a.retrieval is not None:
        assert list(a.retrieval) == list(b.retrieval)


def _observe(drafters, trees, vocab: int, rng: random.Random, g: torch.Generator) -> None:
    """One verify step for both drafters: random top-k (probabilities or none), a random
    accepted path per tree."""
    total = sum(map(len, trees))
    ids = torch.stack([torch.randperm(vocab, generator=g)[:8] for _ in range(total)])
    probs = None if rng.random() < 0.1 else torch.rand(total, 8, generator=g).sort(dim=1, descending=True).values
    paths = []
    for tree in trees:
        path, children = [0], {}
        for i, p in enumerate(tree.parents.tolist()[1:], 1):
            children.setdefault(p, []).append(i)
        while children.get(path[-1]) and rng.random() < 0.7:
            path.append(rng.choice(children[path[-1]]))
        paths.append(path)
    for d in drafters:
        d.observe(trees, ids, probs, paths)


@pytest.mark.parametrize("method", ["pld", "tr_static", "retrieval", "hybrid"])
@pytest.mark.parametrize("vocab", [40, 3000])
def test_compiled_drafters_draft_the_reference_trees(method, vocab):
    rng, g = random.Random(vocab), torch.Generator().manual_seed(vocab)
    compiled, reference = TreeDrafter(vocab, method, compiled=True), TreeDrafter(vocab, method, compiled=False)
    assert compiled.compiled is not None and reference.compiled is None
    drafters = (compiled, reference)
    live: dict[int, list[int]] = {}
    next_key, drafts = 0, 0
    for step in range(70):
        if step == 25 and compiled.recycling is not None:  # a warm adjacency from here (cold before)
            rows = torch.arange(vocab)
            ids = torch.stack([torch.randperm(vocab, generator=g)[:8] for _ in range(vocab)])
            probs = torch.rand(vocab, 8, generator=g).sort(dim=1, descending=True).values * 0.7
            for d in drafters:
                d.recycle(rows, ids, probs)
        while len(live) < rng.randint(1, 12):  # requests join: short, long (bulk builds), repetitive
            length = rng.choice([1, 2, 5, 40, 300, 1500])
            period = rng.randint(1, 30)
            base = [rng.randrange(vocab) for _ in range(period)]
            live[next_key] = [base[i % period] if rng.random() < 0.8 else rng.randrange(vocab) for i in range(length)]
            next_key += 1
        keys = list(live)
        histories = [live[key] for key in keys]
        if step % 3 == 0:  # the server's form: int32 arrays / tensors
            histories = [torch.tensor(h, dtype=torch.int32).numpy() if i % 2 else torch.tensor(h) for i, h in
                         enumerate(histories)]
        num_nodes = rng.choice([1, 2, 3, 9, 16, 32, 57, 80, 128, 256])
        trees = [d.draft(keys, histories, num_nodes) for d in drafters]
        for a, b in zip(*trees):
            _same(a, b)
        drafts += len(keys)
        _observe(drafters, trees[0], vocab, rng, g)
        for key, tree in zip(keys, trees[0]):  # commit: the first drafted token or a random one
            live[key].append(int(tree.tokens[1]) if len(tree) > 1 and rng.random() < 0.6 else rng.randrange(vocab))
            if rng.random() < 0.05:  # preempted and resumed with another history under the same key
                live[key] = live[key][: rng.randint(1, len(live[key]))]
            if rng.random() < 0.08 or len(live[key]) > 2500:  # finished (end of sequence): leaves
                live[key].append(EOS)
                for d in drafters:
                    d.draft([key], [live[key]], 4)
                    d.release(key)
                del live[key]
        assert sorted(compiled.keys()) == sorted(set(compiled.keys()))
    assert drafts > 300
    # the calibrations learnt the same sums (the compiled drafter's one pass, the reference's numpy)
    for name in ("mass", "accepted"):
        assert torch.equal(getattr(compiled.tr_policy, name), getattr(reference.tr_policy, name)), name
    for name in ("tested", "accepted"):
        assert torch.equal(getattr(compiled.retrieval_calibration, name), getattr(reference.retrieval_calibration, name))


def test_contexts_and_own_rows_follow_each_request_compiled():
    drafter = TreeDrafter(50, "hybrid", compiled=True)
    drafter.draft(["a"], [[1, 2, 3, 1, 2]], 4)
    assert drafter.compiled.context_tokens("a") == [1, 2, 3, 1, 2]
    drafter.draft(["a"], [[1, 2, 3, 1, 2, 3, 1]], 4)
    assert drafter.compiled.context_tokens("a") == [1, 2, 3, 1, 2, 3, 1]
    tree = drafter.draft(["a"], [[4, 5, 4]], 4)[0]
    assert drafter.compiled.context_tokens("a") == [4, 5, 4] and tree.tokens.tolist() == [4, 5, 4]
    tree = DraftTree_of([7, 3, 4, 3], [-1, 0, 0, 1], "a")
    drafter.observe([tree], torch.arange(32).view(4, 8), torch.full((4, 8), 0.1), [[0]])
    assert drafter.compiled.own_row("a", 3)[0] == list(range(24, 32))  # the last node's row
    drafter.release("a")
    assert drafter.keys() == [] and drafter.compiled.own_row("a", 3) is None


def DraftTree_of(tokens, parents, key):
    from tkernels.spec.drafters import DraftTree

    return DraftTree(torch.tensor(tokens), torch.tensor(parents, dtype=torch.int32), key=key)


def test_compiled_drafters_refuse_ids_outside_the_vocabulary():
    for method in ("tr_static", "hybrid"):
        with pytest.raises(ValueError, match="^histories:"):
            TreeDrafter(50, method, compiled=True).draft(["a"], [[1, 2, 50]], 8)
        with pytest.raises(ValueError, match="^histories:"):
            TreeDrafter(50, method, compiled=True).draft(["a"], [[-1, 2, 3]] if method == "hybrid" else [[-1]], 8)


def test_the_environment_switches_to_the_reference(monkeypatch):
    monkeypatch.setenv("TKERNELS_DRAFTERS", "reference")
    assert TreeDrafter(50, "hybrid").compiled is None
    monkeypatch.delenv("TKERNELS_DRAFTERS")
    assert TreeDrafter(50, "hybrid").compiled is not None
    assert TreeDrafter(50, "tr").compiled is None  # tr: its batched torch beam in both


@pytest.mark.parametrize("method", ["hybrid", "tr_static"])
def test_many_trees_of_one_slot_in_one_observe_grow_its_own_rows_first(method):
    """64 root-only trees with distinct roots under one key (or none) in one step: the slot's
    own-row table grows for all of them before the kernel writes (it used to grow per tree and
    the kernel's probe then looped forever on the full table), and matches the reference."""
    compiled, reference = (TreeDrafter(200, method, compiled=c) for c in (True, False))
    for key in (None, "a"):
        trees = [DraftTree_of([t], [-1], key) for t in range(64)]
        ids = torch.arange(64 * 8).view(64, 8) % 200
        for drafter in (compiled, reference):
            drafter.observe(trees, ids, torch.full((64, 8), 0.1), [[0]] * 64)
        for t in (0, 17, 63):
            assert compiled.compiled.own_row(key, t)[0] == ids[t].tolist() == reference._own[key][t][0]


def random_tree(gen: random.Random, n: int) -> list[int]:
    """BFS parents of a random n-node tree (each node's parent an earlier node, non-decreasing)."""
    parents = [-1]
    for i in range(1, n):
        parents.append(gen.randint(parents[-1] if i > 1 else 0, i - 1))
    return parents


def test_the_batched_calibration_records_what_a_per_tree_loop_would(rng):
    """TreeDrafter._calibrate (the whole batch at once) against a plain-Python reading of the
    rule: a node is tested when its parent is on the accepted path; TR nodes (finite stored
    probability) go to the TR calibration with their depth, retrieval nodes (features) to the
    retrieval one, both with whether the node is on the path, trees and nodes in order."""
    from tkernels.spec.drafters import DraftTree

    gen = random.Random(int(torch.randint(0, 2**31, (1,), generator=rng)))
    for _ in range(20):
        trees, paths = [], []
        for b in range(gen.randint(1, 12)):
            parents = random_tree(gen, gen.randint(1, 20))
            n = len(parents)
            path = [0]
            while gen.random() < 0.7:
                children = [j for j in range(n) if parents[j] == path[-1]]
                if not children:
                    break
                path.append(gen.choice(children))
            tr = None if gen.random() < 0.3 else torch.tensor([gen.random() if gen.random() < 0.6 else float("nan")
                                                               for _ in range(n)], dtype=torch.float32)
            ret = None if gen.random() < 0.3 else [(gen.randint(1, 5), gen.randint(1, 9), gen.random())
                                                   if gen.random() < 0.5 else None for _ in range(n)]
            trees.append(DraftTree(torch.arange(n), torch.tensor(parents, dtype=torch.int32), tr_probs=tr, retrieval=ret,
                                   key=b))
            paths.append(path)
        want_tr, want_ret = ([], [], []), ([], [])
        for tree, path in zip(trees, paths):
            parents = tree.parents.tolist()
            for i in range(1, len(tree)):
                if parents[i] not in path:
                    continue
                depth, j = 0, i
                while j > 0:
                    depth, j = depth + 1, parents[j]
                if tree.tr_probs is not None and tree.tr_probs[i] == tree.tr_probs[i]:
                    want_tr[0].append(float(tree.tr_probs[i]))
                    want_tr[1].append(depth)
                    want_tr[2].append(i in path)
                if tree.retrieval is not None and tree.retrieval[i] is not None:
                    want_ret[0].append(tree.retrieval[i])
                    want_ret[1].append(i in path)
        drafter = TreeDrafter(50, "hybrid", compiled=False)
        got_tr, got_ret = [], []
        drafter.tr_policy.record = lambda p, d, ok, got=got_tr: got.append((p.tolist(), d.tolist(), ok.tolist()))
        drafter.retrieval_calibration.record = lambda f, ok, got=got_ret: got.append((list(f), list(ok)))
        batch = DraftBatch.from_trees(trees)
        on_path = torch.zeros(batch.num_nodes, dtype=torch.bool)
        for b, path in enumerate(paths):
            on_path[[int(batch.cu[b]) + n for n in path]] = True
        drafter._calibrate(batch, on_path)
        any_tr = any(t.tr_probs is not None for t in trees)
        assert got_tr == ([(want_tr[0], want_tr[1], want_tr[2])] if any_tr else [])
        assert got_ret == [want_ret]


def test_the_kernels_fp16_reads_and_probability_bins_are_the_references():
    """:func:`half_to_float` (integer bits) is torch's fp16 -> float on every bit pattern, and the TR
    estimate's probability bin from exponent bits is ``floor(-log2(p))`` (accept_prob_host's) on
    every positive finite fp16 value and the 1e-30 floor."""
    import math

    import numpy as np
    from numba import njit

    from tkernels.spec.drafting import kernels as K

    @njit
    def reads(bits, out, bins):
        for i in range(bits.shape[0]):
            out[i] = K.half_to_float(bits[i])
            bins[i] = K._neg_log2_floor(max(out[i], 1e-30)) if out[i] > 0 and out[i] < np.inf else 0

    bits = np.arange(2**16, dtype=np.uint16)
    out, bins = np.empty(bits.size), np.empty(bits.size, np.int64)
    reads(bits, out, bins)
    expected = torch.from_numpy(bits.view(np.int16)).view(torch.float16).double().numpy()
    assert np.array_equal(out, expected, equal_nan=True)
    positive = (expected > 0) & np.isfinite(expected)
    assert bins[positive].tolist() == [math.floor(-math.log2(p)) for p in expected[positive].tolist()]
    assert K._neg_log2_floor.py_func(1e-30) == math.floor(-math.log2(1e-30))


def test_the_compiled_calibration_refuses_what_the_reference_refuses():
    """Stored probabilities above 1 (recycling takes any finite value >= 0) reach the TR
    calibration through a hybrid tree: both paths refuse them with ConfidenceTreePolicy.record's
    error, the compiled one before recording anything."""
    for compiled in (True, False):
        drafter = TreeDrafter(40, "hybrid", compiled=compiled)
        drafter.recycle(torch.arange(40), torch.arange(8).repeat(40, 1), torch.full((40, 8), 1.5))
        trees = drafter.draft([0], [[1, 2, 3, 1, 2]], 9)
        before = drafter.tr_policy.mass.clone(), drafter.retrieval_calibration.tested.clone()
        ids = torch.arange(8).repeat(len(trees[0]), 1)
        with pytest.raises(ValueError, match="^probs: "):
            drafter.observe(trees, ids, torch.full(ids.shape, 0.5), [[0, 1]])
        if compiled:
            assert torch.equal(drafter.tr_policy.mass, before[0])
            assert torch.equal(drafter.retrieval_calibration.tested, before[1])
