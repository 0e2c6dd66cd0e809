"""Tree contract utilities, templates and server formats against slow Python references."""

import pytest
import torch

from tkernels.attention.batch import TREE_KINDS, tree_parents
from tkernels.spec.tree import (
    MAX_TREE_NODES,
    TR_80_WIDTHS,
    TreeShape,
    ancestor_bits,
    ancestor_mask,
    ancestor_words,
    best_path,
    chain,
    depths,
    from_child_counts,
    from_rank_paths,
    from_widths,
    leaf_paths,
    positions,
    retrieve_indices,
    select_subtree,
    to_sglang,
    to_vllm_linear,
    token_recycling_template,
    token_recycling_tree,
    validate_parents,
)


def random_tree(n: int, rng: torch.Generator) -> torch.Tensor:
    """A random BFS tree: parents non-decreasing and < i."""
    parents = [-1]
    for i in range(1, n):
        low = max(parents[-1], 0)
        parents.append(int(torch.randint(low, i, (1,), generator=rng)))
    return torch.tensor(parents, dtype=torch.int32)


def ref_ancestors(parents: list[int], i: int) -> list[int]:
    chain_ = [i]
    while parents[chain_[-1]] >= 0:
        chain_.append(parents[chain_[-1]])
    return chain_[::-1]  # root first, i last


def check_against_reference(parents: torch.Tensor) -> None:
    n = parents.numel()
    validate_parents(parents)
    p = parents.tolist()
    paths = [ref_ancestors(p, i) for i in range(n)]
    assert depths(parents).dtype == torch.int32
    assert depths(parents).tolist() == [len(a) - 1 for a in paths]
    assert positions(parents, 17).tolist() == [16 + len(a) for a in paths]
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, a in enumerate(paths):
        mask[i, a] = True
    assert torch.equal(ancestor_mask(parents), mask)
    bits = ancestor_bits(parents)
    assert bits.dtype == torch.int64 and bits.shape == (n, ancestor_words(n)) == (n, -(-n // 64))
    j = torch.arange(n)
    unpacked = (bits[:, j // 64] >> (j % 64)) & 1  # bit j % 64 of word j // 64
    assert torch.equal(unpacked.bool(), mask)
    # the kernels' 32-bit view of the same memory: bit j % 32 of word j // 32
    halves = bits.view(torch.int32)
    assert torch.equal(((halves[:, j // 32] >> (j % 32)) & 1).bool(), mask)
    leaves = [i for i in range(n) if i not in p[1:]]
    assert leaf_paths(parents) == [paths[i] for i in leaves]
    ri = retrieve_indices(parents)
    assert ri.shape == (len(leaves), max(len(a) for a in paths))
    for row, leaf in zip(ri.tolist(), leaves):
        assert row == paths[leaf] + [-1] * (ri.shape[1] - len(paths[leaf]))


@pytest.mark.parametrize("n", [1, 2, 7, 33, 64, 100])
def test_derived_quantities_match_reference(n, rng):
    check_against_reference(random_tree(n, rng))


@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("n", [65, 128, MAX_TREE_NODES])
def test_derived_quantities_past_64_nodes(n, kind, rng):
    check_against_reference(tree_parents(kind, n, rng))


def test_full_words_use_the_sign_bit():
    assert ancestor_bits(chain(64).parents)[-1].tolist() == [-1]  # all 64 bits set
    assert ancestor_bits(chain(256).parents)[-1].tolist() == [-1] * 4
    assert ancestor_bits(chain(65).parents)[-1].tolist() == [-1, 1]
    assert ancestor_bits(chain(3).parents, words=3).shape == (3, 3)  # wider rows on request, zero-padded
    with pytest.raises(ValueError, match="^words"):
        ancestor_bits(chain(65).parents, words=1)


def test_ragged_batch_equals_per_tree(rng):
    trees = [random_tree(n, rng) for n in (5, 1, 64, 12, 200)] + [tree_parents("chain", 256, rng)]
    parents = torch.cat(trees)
    cu_nodes = torch.tensor([0, 5, 6, 70, 82, 282, 538], dtype=torch.int32)
    validate_parents(parents, cu_nodes)
    assert torch.equal(depths(parents, cu_nodes), torch.cat([depths(t) for t in trees]))
    assert torch.equal(ancestor_bits(parents, cu_nodes), torch.cat([ancestor_bits(t, words=4) for t in trees]))
    start = torch.tensor([3, 4, 5, 6, 7, 8])
    expected = torch.cat([positions(t, int(s)) for t, s in zip(trees, start)])
    assert torch.equal(positions(parents, start, cu_nodes), expected)


@pytest.mark.parametrize(
    "bad",
    [
        [],  # empty
        [0, 0],  # root not -1
        [-1, 1],  # parent >= i
        [-1, 0, -1],  # second root
        [-1, 0, 0, 2, 1],  # not BFS: parents decrease
        [-1, 0, 1, 0],  # not BFS: depth 1 node after a depth 2 node
    ],
)
def test_bad_parents_raise(bad):
    with pytest.raises(ValueError, match="parents"):
        validate_parents(torch.tensor(bad, dtype=torch.int32))


def test_derived_quantities_reject_non_trees():
    for bad in ([-1, 1], [-1, 2, 1], [-1, 5]):  # a cycle, a 2-cycle, out of range
        with pytest.raises(ValueError, match="parents"):
            depths(torch.tensor(bad, dtype=torch.int32))


def test_bad_parents_types_and_cu_nodes_raise():
    with pytest.raises(ValueError, match="parents"):
        validate_parents(torch.tensor([[-1, 0]], dtype=torch.int32))
    with pytest.raises(ValueError, match="parents"):
        validate_parents(torch.tensor([-1.0, 0.0]))
    parents = torch.tensor([-1, 0, -1, 0], dtype=torch.int32)
    validate_parents(parents, torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_nodes"):
        validate_parents(parents, torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"parents.*request 1"):
        validate_parents(parents, torch.tensor([0, 1, 4], dtype=torch.int32))


def test_token_recycling_template():
    shape = token_recycling_template()
    assert len(shape) == 80
    assert torch.bincount(depths(shape.parents).long()).tolist() == [1, 8, 21, 20, 15, 6, 7, 1, 1]
    assert int(shape.ranks.max()) == 7 and TR_80_WIDTHS[0] == 8
    assert shape.levels[:3] == [(1, 9), (9, 30), (30, 50)] and shape.levels[-1] == (79, 80)
    # the rank-sum rule: a node's child count is max(0, W[depth] - sum of its path's ranks)
    d, p, r = depths(shape.parents).tolist(), shape.parents.tolist(), shape.ranks.tolist()
    for i in range(80):
        rank_sum = sum(r[j] for j in ref_ancestors(p, i)[1:])
        width = TR_80_WIDTHS[d[i]] if d[i] < len(TR_80_WIDTHS) else 0
        assert p.count(i) == max(0, width - rank_sum)
    for n in (1, 16, 32, 64):
        small = shape.truncate(n)
        validate_parents(small.parents)
        assert torch.equal(small.ranks, shape.ranks[:n])
    with pytest.raises(ValueError):
        shape.truncate(81)


def test_token_recycling_tree_widens_the_template_by_one_rule():
    assert torch.equal(token_recycling_tree(80).parents, token_recycling_template().parents)
    for extra, size in ((1, 173), (2, 392)):
        wider = token_recycling_tree(size)
        assert len(wider) == size and len(token_recycling_tree(size + 1)) > size
        assert torch.equal(wider.parents, from_widths([min(8, w + extra) for w in TR_80_WIDTHS]).parents)
    # a fan-out cap below the template's widest level caps every level
    assert torch.equal(token_recycling_tree(1, k=4).parents, from_widths([min(4, w) for w in TR_80_WIDTHS]).parents)
    deep = token_recycling_tree(200, depth=40)  # widened template, then the top-1 chain to depth 40
    assert int(depths(deep.parents).max()) == 40 and len(deep) >= 200
    assert torch.bincount(depths(deep.parents).long())[9:].tolist() == [1] * 32
    for bad, kwargs in (("min_nodes", {"min_nodes": 0}), ("depth", {"depth": 0}), ("k", {"k": 0}),
                        ("min_nodes", {"min_nodes": 10**6, "k": 2})):
        with pytest.raises(ValueError, match=f"^{bad}:"):
            token_recycling_tree(**kwargs)


def test_shape_builders_agree():
    by_counts = from_child_counts([2, 2, 1])
    by_paths = from_rank_paths([(1,), (0,), (0, 0), (0, 1), (1, 0)])
    assert torch.equal(by_counts.parents, by_paths.parents)
    assert torch.equal(by_counts.ranks, by_paths.ranks)
    assert by_counts.parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert torch.equal(from_widths([2, 2]).parents, from_child_counts([2, 2, 1]).parents)
    assert chain(4).parents.tolist() == [-1, 0, 1, 2]
    with pytest.raises(ValueError, match="prefix"):
        from_rank_paths([(0, 1)])
    with pytest.raises(ValueError, match="child_counts"):
        from_child_counts([1, 0, 3])


def test_sglang_format(rng):
    trees = [random_tree(n, rng) for n in (9, 1, 4)]
    parents, cu_nodes = torch.cat(trees), torch.tensor([0, 9, 10, 14], dtype=torch.int32)
    tokens = torch.randint(0, 1000, (14,), generator=rng)
    out_tokens, mask = to_sglang(tokens, parents, cu_nodes)
    assert torch.equal(out_tokens, tokens) and mask.dtype == torch.int64 and mask.numel() == 81 + 1 + 16
    tree = trees[0].tolist()
    for i in range(9):
        for j in range(9):
            assert bool(mask[i * 9 + j]) == (j in ref_ancestors(tree, i))
    assert torch.equal(to_sglang(tokens[:9], trees[0])[1], mask[:81])


def test_best_path_and_vllm_linear(rng):
    parents = random_tree(30, rng)
    scores = torch.rand(30, generator=rng, dtype=torch.float64)
    p = parents.tolist()
    leaves = [i for i in range(30) if i not in p[1:]]
    best = max(leaves, key=lambda leaf: sum(scores[j].item() for j in ref_ancestors(p, leaf)))
    assert best_path(parents, scores).tolist() == ref_ancestors(p, best)
    tokens = torch.arange(30) * 10
    assert to_vllm_linear(tokens, parents, scores).tolist() == [10 * j for j in ref_ancestors(p, best)[1:]]
    # without scores: the first-child (top-1) chain
    shape = token_recycling_template()
    top1 = best_path(shape.parents)
    assert shape.ranks[top1[1:]].tolist() == [0] * 8
    assert to_vllm_linear(torch.zeros(1, dtype=torch.int64), torch.tensor([-1], dtype=torch.int32)).numel() == 0
    with pytest.raises(ValueError, match="draft_tokens"):
        to_vllm_linear(tokens[:5], parents)


@pytest.mark.parametrize("fn", [retrieve_indices, leaf_paths, best_path])
@pytest.mark.parametrize("bad", [[-1, 0, 9], [-1, 0, -3], [0, 0, 1], [-1, 0, 1, 0]])
def test_path_functions_validate_parents(fn, bad):
    """Issue 14 item 8: parents [-1, 0, 9] raised IndexError deep inside retrieve_indices,
    leaf_paths and best_path; they validate like depths (one check, naming parents)."""
    with pytest.raises(ValueError, match="^parents"):
        fn(torch.tensor(bad, dtype=torch.int32))


def test_from_child_counts_rejects_bad_counts():
    """Issue 14 item 8: a negative count was silently accepted (it dropped nodes)."""
    import numpy as np

    for bad in ([2, -1, 1], [1.5], [True]):
        with pytest.raises(ValueError, match=r"^child_counts\[\d+\]: must be a non-negative integer"):
            from_child_counts(bad)
    assert torch.equal(from_child_counts(np.array([2, 0, 1])).parents, from_child_counts([2, 0, 1]).parents)


_P = torch.tensor([-1, 0, 0, 1], dtype=torch.int32)
_PP, _CU = torch.cat([_P, _P]), torch.tensor([0, 4, 8], dtype=torch.int32)


@pytest.mark.parametrize("arg,call", [
    # issue 22: a start tensor of the wrong length was a raw RuntimeError from repeat_interleave
    ("start", lambda: positions(_PP, torch.tensor([1, 2, 3]), _CU)),
    ("start", lambda: positions(_P, torch.tensor([1, 2]))),
    ("start", lambda: positions(_PP, torch.ones(2, 2, dtype=torch.long), _CU)),
    ("start", lambda: positions(_PP, torch.tensor([1.0, 2.0]), _CU)),
    ("start", lambda: positions(_P, 1.5)),
    ("start", lambda: positions(_P, -1)),
    ("cu_nodes", lambda: positions(_PP, 0, torch.tensor([0, 5, 3], dtype=torch.int32))),
    ("cu_nodes", lambda: depths(_PP, torch.tensor([0, 3], dtype=torch.int32))),
    ("cu_nodes", lambda: depths(_PP, [0, 4, 8])),
    ("parents", lambda: depths(_P[None])),
    ("parents", lambda: depths(torch.tensor([-1.0, 0.0]))),
    ("parents", lambda: ancestor_mask(_P[None])),
    ("cu_nodes", lambda: ancestor_bits(_PP, torch.tensor([0, 3], dtype=torch.int32))),
    ("words", lambda: ancestor_bits(_P, words=1.5)),
    ("words", lambda: ancestor_bits(_P, words=0)),
    ("max_nodes", lambda: ancestor_words(-5)),
    ("max_nodes", lambda: ancestor_words("8")),
    ("keep", lambda: select_subtree(_P, torch.ones(3, dtype=torch.bool))),
    ("cu_nodes", lambda: select_subtree(_PP, torch.ones(8, dtype=torch.bool), torch.tensor([0, 3], dtype=torch.int32))),
    ("node_scores", lambda: best_path(_P, torch.ones(3))),
    ("n", lambda: chain(0)),
    ("n", lambda: chain(2.5)),
    ("n", lambda: chain(4).truncate(0)),
    ("n", lambda: chain(4).truncate(2.0)),
    ("child_counts", lambda: from_child_counts([-1])),
    ("rank_paths", lambda: from_rank_paths([(-1,)])),
    ("rank_paths", lambda: from_rank_paths([("a",)])),
    ("widths", lambda: from_widths([-1])),
    ("widths", lambda: from_widths([1.5])),
    ("ranks", lambda: TreeShape(_P, torch.tensor([-1, 0]))),
    ("draft_tokens", lambda: to_sglang(torch.ones(3), _P)),
    ("cu_nodes", lambda: to_sglang(torch.ones(8), _PP, torch.tensor([0, 3], dtype=torch.int32))),
    ("draft_tokens", lambda: to_vllm_linear(torch.ones(3), _P)),
    ("k", lambda: token_recycling_tree(5, k=2.0)),
    ("min_nodes", lambda: token_recycling_tree(0)),
])
def test_bad_inputs_name_the_argument(arg, call):
    """Every public function of the tree module: a bad argument is a ValueError naming it first."""
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()
