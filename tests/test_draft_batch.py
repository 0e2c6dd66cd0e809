"""DraftBatch (a step's drafts as one ragged batch) against the per-tree DraftTree operations it
replaces on a server's step, and the compiled drafters' one-pass recycling against
TokenRecycling.recycle_topk, on fresh random trees."""

import numpy as np
import pytest
import torch

from tkernels.spec.drafters import DraftBatch, DraftTree, TreeDrafter
from tkernels.spec.drafting.compiled import Features
from tkernels.spec.token_recycling import TokenRecycling


def random_tree(rng, key, with_fields: bool) -> DraftTree:
    n = int(rng.integers(1, 40))
    parents = [-1] + sorted(int(rng.integers(0, j)) for j in range(1, n))  # non-decreasing: BFS
    fields = {}
    if with_fields:
        fields["scores"] = torch.from_numpy(rng.random(n))
        fields["tr_probs"] = torch.from_numpy(np.where(rng.random(n) < 0.5, rng.random(n), np.nan).astype(np.float32))
        feat = np.stack([np.where(rng.random(n) < 0.5, rng.integers(1, 9, n), -1), rng.integers(1, 20, n)], 1)
        fields["retrieval"] = Features(feat.astype(np.int64), rng.random(n))
    return DraftTree(torch.from_numpy(rng.integers(0, 100, n)), torch.tensor(parents, dtype=torch.int32), key=key,
                     **fields)


def same(a: DraftTree, b: DraftTree) -> bool:
    def eq(x, y):
        if x is None or y is None:
            return x is None and y is None
        if isinstance(x, torch.Tensor):
            return torch.equal(x, y) if not x.is_floating_point() else bool(((x == y) | (x.isnan() & y.isnan())).all())
        return list(x) == list(y)

    return a.key == b.key and all(eq(getattr(a, f), getattr(b, f)) for f in ("tokens", "parents", "scores", "tr_probs",
                                                                              "retrieval"))


@pytest.mark.parametrize("with_fields", [False, True])
def test_batch_operations_are_the_per_tree_ones(with_fields):
    rng = np.random.default_rng(1)
    for _ in range(40):
        trees = [random_tree(rng, f"r{b}", with_fields) for b in range(int(rng.integers(1, 9)))]
        batch = DraftBatch.from_trees(trees)
        assert all(same(a, b) for a, b in zip(batch.trees(), trees))
        assert batch.depths.tolist() == [d for t in trees for d in _depths(t.parents.tolist())]
        # a kept node's parent kept: keep each node with its parent's fate and a coin
        keep = np.zeros(batch.num_nodes, bool)
        parents = batch.global_parents()
        for i in range(batch.num_nodes):
            keep[i] = parents[i] < 0 or (keep[parents[i]] and rng.random() < 0.7)
        chosen = batch.select(keep)
        for b, tree in enumerate(trees):
            nodes = torch.from_numpy(np.flatnonzero(keep[batch.cu[b]:batch.cu[b + 1]]))
            assert same(chosen.trees()[b], tree.select(nodes))
        rows = rng.permutation(len(trees))[:int(rng.integers(1, len(trees) + 1))]
        counts = np.array([int(rng.integers(1, len(trees[r]) + 1)) for r in rows])
        cut = batch.rows(rows, counts)
        assert all(same(cut.trees()[j], trees[r].select(torch.arange(c))) for j, (r, c) in enumerate(zip(rows, counts)))
        assert cut.depths.tolist() == [d for r, c in zip(rows, counts) for d in _depths(trees[r].parents.tolist())[:c]]
        both = DraftBatch.cat([batch, cut])
        assert all(same(a, b) for a, b in zip(both.trees(), batch.trees() + cut.trees()))
    with pytest.raises(ValueError, match="keep"):
        DraftBatch.from_trees([DraftTree(torch.tensor([1, 2]), torch.tensor([-1, 0], dtype=torch.int32))]).select(
            np.array([False, True]))


def _depths(parents):
    depth = []
    for p in parents:
        depth.append(0 if p < 0 else depth[p] + 1)
    return depth


def test_compiled_recycling_keeps_what_recycle_topk_keeps():
    """One compiled pass in node order (TreeDrafter.observe_batch with a compiled drafter)
    against TokenRecycling.recycle_topk: tokens repeated within the step keep the last node's row."""
    rng = np.random.default_rng(2)
    vocab, k = 50, 8
    for _ in range(20):
        drafter = TreeDrafter(vocab, "tr_static", k, compiled=True)
        reference = TokenRecycling(vocab, k)
        n = int(rng.integers(1, 200))
        trees = [DraftTree(torch.from_numpy(rng.integers(0, vocab, n)), torch.arange(-1, n - 1, dtype=torch.int32),
                           key="r")]
        ids = torch.from_numpy(rng.integers(0, vocab, (n, k)))
        probs = torch.from_numpy(rng.random((n, k)).astype(np.float32))
        drafter.observe(trees, ids, probs, [[0]])
        reference.recycle_topk(ids, trees[0].tokens, probs)
        assert torch.equal(drafter.recycling.adjacency, reference.adjacency)
        assert torch.equal(drafter.recycling.probs, reference.probs)
    with pytest.raises(ValueError, match="topk_ids"):
        drafter.observe(trees, torch.full((n, k), vocab), probs, [[0]])
    with pytest.raises(ValueError, match="topk_ids: must be an integer tensor"):
        drafter.observe(trees, ids.float(), probs, [[0]])
    with pytest.raises(ValueError, match="topk_probs"):
        drafter.observe(trees, ids, torch.full((n, k), float("nan")), [[0]])


@pytest.mark.parametrize("method", ["pld", "tr_static", "retrieval", "hybrid"])
def test_compiled_drafts_carry_their_nodes_depths(method):
    """The depths a compiled draft carries (from its template, its chain or one compiled pass)
    are the tree contract's."""
    from tkernels.spec import depths

    rng = np.random.default_rng(3)
    drafter = TreeDrafter(30, method, compiled=True)
    if drafter.recycling is not None:
        drafter.recycle(torch.arange(30), torch.from_numpy(rng.integers(0, 30, (30, 8))), torch.rand(30, 8))
    histories = [list(rng.integers(0, 6, int(rng.integers(1, 60)))) for _ in range(7)]
    for nodes in (1, 9, 32, 80):
        batch = drafter.draft_batch([f"r{b}" for b in range(7)], histories, nodes)
        assert batch.depths.tolist() == depths(batch.parents, torch.from_numpy(batch.cu)).tolist()
