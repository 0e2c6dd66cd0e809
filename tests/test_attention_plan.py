"""Host planning's compiled loops (tkernels/attention/plan_compiled.py) vs the plain-PyTorch
reference (tkernels/attention/plan_reference.py): identical layouts (token requests,
positions, tree tokens, ancestor bits), work items, merge tables and workspace sizes, on random
ragged batches (prefill chunks, decodes, short causal chunks, trees of 1..256 nodes, empty rows,
windows, split-KV) and on the edges; the same errors where the trees break the contract."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tkernels.attention import HostBatch, plan_mixed_attention
from tkernels.attention.batch import TREE_KINDS, tree_parents
from tkernels.attention.plan import ITEM_CLASS, _launch_config, _one_class_tiles, describe_batch
from tkernels.attention.plan_reference import layout_reference, schedule_reference
from tkernels.spec.tree import MAX_TREE_NODES, depths

BLOCK_SIZE = 16


def random_batch(rng: torch.Generator, B: int, kinds=("prefill", "decode", "chunk", "tree", "empty")):
    """(q_lens, seq_lens, trees): B requests of random kinds; trees[b] the parents of a tree row
    (None: causal)."""
    q_lens, seq_lens, trees = [], [], []

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (), generator=rng))

    for _ in range(B):
        kind = kinds[randint(0, len(kinds) - 1)]
        tree = None
        if kind == "prefill":
            q = randint(65, 700)
        elif kind == "decode":
            q = 1
        elif kind == "chunk":
            q = randint(2, 64)
        elif kind == "tree":
            q = randint(1, MAX_TREE_NODES)
            tree = tree_parents(TREE_KINDS[randint(0, len(TREE_KINDS) - 1)], q, rng)
        else:  # an empty row, causal or tree
            q = 0
            tree = torch.zeros(0, dtype=torch.int32) if randint(0, 1) else None
        q_lens.append(q)
        seq_lens.append(q + randint(0, 3000) * randint(0, 1))
        trees.append(tree)
    return q_lens, seq_lens, trees


def batch_args(q_lens, seq_lens, trees, *, with_trees=True, num_blocks=None):
    B = len(q_lens)
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    max_blocks = max([-(-s // BLOCK_SIZE) for s in seq_lens], default=0)
    table = torch.arange(B * max_blocks, dtype=torch.int32).view(B, max_blocks)
    kwargs = dict(num_blocks=num_blocks or max(B * max_blocks, 1), block_size=BLOCK_SIZE)
    if with_trees:
        parents = torch.full((int(cu[-1]),), -1, dtype=torch.int32)
        for b, tree in enumerate(trees):
            if tree is not None:
                parents[int(cu[b]):int(cu[b + 1])] = tree
        kwargs.update(tree_parents=parents, is_tree=torch.tensor([t is not None for t in trees], dtype=torch.bool))
    return (cu, seq, table), kwargs


def host_copies(args, kwargs, with_depths: bool) -> HostBatch:
    cu, seq, _ = args
    parents, is_tree = kwargs.get("tree_parents"), kwargs.get("is_tree")
    if parents is None:
        return HostBatch(cu.clone(), seq.clone())
    tree_depths = None
    if with_depths:
        tree_depths = torch.zeros(parents.numel(), dtype=torch.int64)
        for b in is_tree.nonzero().flatten().tolist():
            s, e = int(cu[b]), int(cu[b + 1])
            if e > s:
                tree_depths[s:e] = depths(parents[s:e])
    return HostBatch(cu.clone(), seq.clone(), parents.clone(), is_tree.clone(), tree_depths)


def check_layout(args, kwargs, *, host=None, checked=False, window=None):
    """describe_batch's layout equals the reference derivation's, field by field and dtype."""
    heads = dict(num_q_heads=8, num_kv_heads=2, head_dim=64)
    layout = describe_batch(*args, **heads, **kwargs, window=window, host=host, checked=checked)
    cu, seq, _ = args
    tree_req = kwargs.get("is_tree")
    want = layout_reference(cu.long(), seq.long(), tree_req, kwargs.get("tree_parents"),
                            None if host is None else host.tree_depths, checked)
    for name, w in zip(("token_req", "positions", "tree_token", "ancestors"), want):
        got = getattr(layout, name)
        assert got.dtype == w.dtype and torch.equal(got, w), name
    assert torch.equal(layout.q_len, (cu[1:] - cu[:-1]).long()) and torch.equal(layout.ctx, seq.long())
    assert torch.equal(layout.tree_req, torch.zeros(len(seq), dtype=torch.bool) if tree_req is None else tree_req)
    return layout


def check_plan(args, kwargs, *, num_q_heads, num_kv_heads, head_dim=64, window=None, config=None, num_sms=None,
               host=None, checked=False):
    """plan_mixed_attention's tables equal the reference schedule's over the same launch config."""
    plan = plan_mixed_attention(*args, **kwargs, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                head_dim=head_dim, window=window, config=config, num_sms=num_sms, host=host,
                                checked=checked)
    layout = check_layout(args, kwargs, host=host, checked=checked, window=window)
    group = num_q_heads // num_kv_heads
    cfg = _launch_config(group, head_dim, BLOCK_SIZE, layout.q_len, None, config)
    items, merge, ws_rows = schedule_reference(cfg, layout.q_len, layout.ctx, layout.tree_req, num_kv_heads, group,
                                               window, num_sms or 132)
    assert plan.items.dtype == torch.int32 and torch.equal(plan.items, items), "items"
    assert plan.merge.dtype == torch.int32 and torch.equal(plan.merge, merge), "merge"
    assert plan.ws_rows == ws_rows
    assert torch.equal(plan.positions, layout.positions.int()) and plan.positions.dtype == torch.int32
    assert torch.equal(plan.ancestors, layout.ancestors)
    assert torch.equal(plan.is_tree, layout.tree_req.to(torch.int8)) and plan.has_tree == bool(layout.tree_req.any())
    _one_class_tiles(cfg, set(items[:, ITEM_CLASS].tolist()))  # the classes the items hold
    assert plan.config == cfg
    return plan


@pytest.mark.parametrize("trial", range(12))
def test_compiled_plan_matches_the_reference_on_random_batches(rng, trial):
    B = [0, 1, 2, 5, 17, 40][trial % 6]
    q_lens, seq_lens, trees = random_batch(rng, B)
    group = [1, 2, 4, 8][int(torch.randint(0, 4, (), generator=rng))]
    num_kv_heads = [1, 2, 8][int(torch.randint(0, 3, (), generator=rng))]
    window = [None, 1, 7, 200, 2048][int(torch.randint(0, 5, (), generator=rng))]
    num_sms = [None, 1, 16, 132][int(torch.randint(0, 4, (), generator=rng))]
    config = [None, {"min_split_keys": 16, "decode_block_n": 16}, {"decode_max_q": 8, "max_splits": 3},
              {"prefill_block_m": 64, "prefill_block_n": 64, "min_split_keys": 100}][trial % 4]
    with_trees = any(t is not None for t in trees) or trial % 2
    args, kwargs = batch_args(q_lens, seq_lens, trees, with_trees=with_trees)
    heads = dict(num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads)
    check_plan(args, kwargs, **heads, window=window, config=config, num_sms=num_sms)
    for with_depths in (False, True):
        host = host_copies(args, kwargs, with_depths)
        check_plan(args, kwargs, **heads, window=window, config=config, num_sms=num_sms, host=host, checked=True)


def test_the_serving_shapes_and_the_edges(rng):
    """64 trees of 32 nodes, a prefill chunk among decodes, trees at the word boundaries (bit 63
    is the sign bit), a 256-node chain, a batch of empty rows, no requests at all, split-KV."""
    from tkernels.spec.drafting import static_template

    shapes = [
        ([32] * 64, [650 + i for i in range(64)], [static_template(32).parents.int()] * 64),
        ([512] + [1] * 63, [1024] + [600 + i for i in range(63)], [None] * 64),
        ([63, 64, 65, 128, 129, 256], [70, 64, 900, 128, 4000, 300],
         [tree_parents("chain", n, rng) for n in (63, 64, 65, 128, 129, 256)]),
        ([256, 1, 256], [256, 1, 257], [tree_parents("star", 256, rng), None, tree_parents("random", 256, rng)]),
        ([0, 0, 0], [0, 5, 9], [torch.zeros(0, dtype=torch.int32), None, torch.zeros(0, dtype=torch.int32)]),
        ([], [], []),
        ([1], [1], [tree_parents("chain", 1, rng)]),
        ([1, 3], [20000, 5000], [None, tree_parents("random", 3, rng)]),
    ]
    for q_lens, seq_lens, trees in shapes:
        for with_trees in (True, False):
            args, kwargs = batch_args(q_lens, seq_lens, trees, with_trees=with_trees)
            for num_sms, window in ((None, None), (1, None), (132, 100)):
                check_plan(args, kwargs, num_q_heads=32, num_kv_heads=8, num_sms=num_sms, window=window)
                check_plan(args, kwargs, num_q_heads=32, num_kv_heads=8, num_sms=num_sms, window=window,
                           host=host_copies(args, kwargs, True), checked=True)
    args, kwargs = batch_args([256], [256], [tree_parents("chain", 256, rng)])
    assert describe_batch(*args, **kwargs, num_q_heads=1, num_kv_heads=1, head_dim=8).ancestors[-1].tolist() == [-1] * 4


def _outcome(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        return f"ValueError: {err}"


@pytest.mark.parametrize("checked", [False, True])
def test_trees_off_the_contract(rng, checked):
    """Trees that break the contract: validate_parents' own message where the batch is checked
    here; where the caller said it checked them (``checked``), the contract's derivations of
    whatever the parents hold, or their errors (parents out of range, a cycle), as the reference."""
    cases = [
        [-1, 0, 1, 0, 3, 3, 4, 4, 4],  # a tree, not in BFS order
        [-1, 2, 0, 1],  # a tree whose parent follows its child
        [-1, 0, -1, 2],  # two roots
        [0, 0, 1],  # no root
        [-1, 5, 1],  # a parent beyond the tree (another request's node)
        [-1, 40, 1],  # a parent beyond the batch
        [-1, -3, 1],  # below -1
        [-1, 2, 1],  # a cycle
    ]
    for bad in cases:
        n = len(bad)
        trees = [tree_parents("random", 5, rng), torch.tensor(bad, dtype=torch.int32), None]
        args, kwargs = batch_args([5, n, 2], [50, 60, 8], trees)
        heads = dict(num_q_heads=8, num_kv_heads=2, head_dim=64)
        for host in (None, host_copies(args, kwargs, False)):
            if host is None and checked:
                continue
            got = _outcome(describe_batch, *args, **heads, **kwargs, host=host, checked=checked)
            want = _outcome(layout_reference, args[0].long(), args[1].long(), kwargs["is_tree"],
                            kwargs["tree_parents"], None, checked)
            if isinstance(want, str):
                assert got == want, bad
            else:
                assert not isinstance(got, str), (bad, got)
                check_layout(args, kwargs, host=host, checked=checked)
                if checked:
                    plan = check_plan(args, kwargs, num_q_heads=8, num_kv_heads=2, host=host, checked=True)
                    assert plan.has_tree


def test_cost_order_is_a_stable_descending_sort(rng):
    from tkernels.attention.plan_compiled import _by_cost

    for cost in (np.zeros(0, np.int64), np.array([5], np.int64), np.array([3, 3, 3, 1, 9, 3], np.int64),
                 torch.randint(0, 40, (3000,), generator=rng).numpy(),
                 np.array([2**62, -(2**62), 0, 2**62, 7], np.int64)):  # keys would overflow: the merge sort
        assert np.array_equal(_by_cost(cost), np.argsort(-cost, kind="stable")), cost


def test_importing_the_planner_does_not_load_numba():
    code = "import sys, tkernels.attention; assert 'numba' not in sys.modules, 'numba loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)
