"""The CPU paths, vectorised PyTorch (tkernels.attention.torch_path) and compiled
(tkernels.attention.compiled_path), against the plain reference, on fresh random batches:
decodes, prefill chunks with a prefix (longer than one query tile), trees, all mixed, GQA/MQA,
sliding window, softcap, every cache dtype (the compiled path: fp32 and bf16), padding rows,
wide block tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tkernels.attention import mixed_attention_reference, plan_mixed_attention
from tkernels.attention.batch import PagedBatch, random_paged_batch, tree_parents
from tkernels.attention.compiled_path import (
    COMPILED_DTYPES,
    CompiledAttentionPlan,
    compiled_caches,
    mixed_attention_compiled,
    mixed_attention_prepared,
    plan_compiled_attention,
)
from tkernels.attention.torch_path import LONG_Q_TILE, SHORT_MAX_Q, mixed_attention_torch, plan_torch_attention

PATHS = {"torch": (plan_torch_attention, mixed_attention_torch),
         "compiled": (plan_compiled_attention, mixed_attention_compiled)}

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def plan_for(b: PagedBatch, window=None, path="torch"):
    num_blocks, block_size, num_kv_heads, head_dim = b.k_cache.shape
    return PATHS[path][0](b.cu_seqlens_q, b.seq_lens, b.block_table, num_q_heads=b.q.shape[1],
                                num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                                block_size=block_size, window=window, num_tokens=b.q.shape[0], **b.tree_kwargs())


def check(b: PagedBatch, window=None, softcap=None, scale=0.2, path="torch") -> None:
    ref = mixed_attention_reference(*b.inputs(), scale, window=window, softcap=softcap, **b.tree_kwargs())
    out = PATHS[path][1](b.q, b.k_cache, b.v_cache, plan_for(b, window, path), scale, softcap=softcap)
    assert out.dtype == b.q.dtype and out.shape == b.q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[b.q.dtype], rtol=TOL[b.q.dtype])


def mixed(gen: torch.Generator, batch: int) -> tuple[list[int], list[int], list[bool]]:
    """Random requests: decodes, short causal chunks, trees, long prefill chunks, empty rows."""
    q_lens, ctxs, trees = [], [], []
    for _ in range(batch):
        kind = int(torch.randint(0, 5, (1,), generator=gen))
        n = [1, int(torch.randint(2, SHORT_MAX_Q + 1, (1,), generator=gen)), int(torch.randint(1, 40, (1,), generator=gen)),
             int(torch.randint(SHORT_MAX_Q + 1, LONG_Q_TILE + 80, (1,), generator=gen)), 0][kind]
        q_lens.append(n)
        ctxs.append(n + int(torch.randint(0, 200, (1,), generator=gen)))
        trees.append(kind == 2)
    return q_lens, ctxs, trees


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("path", PATHS)
def test_mixed_batches_match_the_reference(seed, heads, path):
    gen = torch.Generator().manual_seed(seed)
    q_lens, ctxs, trees = mixed(gen, 1 + seed)
    b = random_paged_batch(q_lens, ctxs, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=32, block_size=16,
                           dtype=torch.float32, generator=gen, trees=trees)
    check(b, path=path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 1, 5, 70])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("path", PATHS)
def test_dtypes_window_and_softcap(dtype, window, softcap, path):
    gen = torch.Generator().manual_seed(7)
    q_lens, ctxs, trees = [1, 9, 300, 12, 1, 0], [90, 60, 420, 12, 1, 5], [False, True, False, False, False, False]
    b = random_paged_batch(q_lens, ctxs, num_q_heads=6, num_kv_heads=2, head_dim=64, block_size=8, dtype=dtype,
                           generator=gen, trees=trees)
    if path == "compiled" and dtype not in COMPILED_DTYPES:
        pytest.skip("the compiled path takes fp32 and bf16 caches (fp16 runs the torch path)")
    check(b, window=window, softcap=softcap, path=path)


@pytest.mark.parametrize("kind", ["chain", "star", "random"])
@pytest.mark.parametrize("nodes", [1, 2, 9, 65, 256])
@pytest.mark.parametrize("path", PATHS)
def test_trees_of_every_shape_next_to_decodes(kind, nodes, path):
    gen = torch.Generator().manual_seed(nodes)
    b = random_paged_batch([1, nodes, 1, 3], [50, nodes + 33, 7, 3], num_q_heads=4, num_kv_heads=2, head_dim=16,
                           block_size=16, dtype=torch.float32, generator=gen, trees=[False, True, False, True])
    cu = b.cu_seqlens_q.tolist()
    b.tree_parents[cu[1]:cu[2]] = tree_parents(kind, nodes, gen)
    check(b, path=path)
    check(b, window=3, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_padding_rows_and_wide_block_tables(path):
    """vLLM pads a batch with zero-length rows (seq_len 0) and passes block tables wider than
    the longest context; neither may be read nor change the result."""
    gen = torch.Generator().manual_seed(3)
    b = random_paged_batch([2, 0, 5, 1], [20, 9, 5, 40], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=4,
                           dtype=torch.float32, generator=gen, trees=[False, False, True, False])
    b.block_table = torch.cat([b.block_table, torch.full((4, 5), -1, dtype=torch.int32)], 1)  # unused columns
    b.cu_seqlens_q = torch.cat([b.cu_seqlens_q, b.cu_seqlens_q[-1:].repeat(2)])  # two padding rows
    b.seq_lens = torch.cat([b.seq_lens, torch.zeros(2, dtype=torch.int32)])
    b.block_table = torch.cat([b.block_table, torch.full((2, b.block_table.shape[1]), -1, dtype=torch.int32)])
    b.is_tree = torch.cat([b.is_tree, torch.zeros(2, dtype=torch.bool)])
    check(b, path=path)


def test_empty_batch():
    for B in (0, 2):
        b = random_paged_batch([0] * B, [0] * B, num_q_heads=2, num_kv_heads=1, head_dim=16, block_size=4,
                               dtype=torch.float32)
        plan = plan_for(b)
        assert plan.groups == () and mixed_attention_torch(b.q, b.k_cache, b.v_cache, plan).shape == (0, 2, 16)
        plan = plan_for(b, path="compiled")
        assert plan.items.shape == (0, 3)
        assert mixed_attention_compiled(b.q, b.k_cache, b.v_cache, plan).shape == (0, 2, 16)


@pytest.mark.parametrize("path", PATHS)
def test_plan_is_shared_by_layers_and_writes_out(path):
    """One plan, two layers (other q and caches of the same shapes), ``out`` written in place."""
    gen = torch.Generator().manual_seed(5)
    layers = [random_paged_batch([1, 30, 4], [64, 80, 10], num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16,
                                 dtype=torch.float32, generator=gen, trees=[False, False, True]) for _ in range(2)]
    layers[1].block_table, layers[1].tree_parents = layers[0].block_table, layers[0].tree_parents
    plan = plan_for(layers[0], path=path)
    for b in layers:
        out = torch.zeros_like(b.q)
        assert PATHS[path][1](b.q, b.k_cache, b.v_cache, plan, out=out) is out
        torch.testing.assert_close(out, mixed_attention_reference(*b.inputs(), **b.tree_kwargs()), atol=2e-5, rtol=2e-5)


def test_errors_name_the_argument():
    gen = torch.Generator().manual_seed(0)
    b = random_paged_batch([1, 3], [10, 3], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                           dtype=torch.float32, generator=gen)
    plan = plan_for(b)
    with pytest.raises(ValueError, match="^plan: was built for another batch"):
        mixed_attention_torch(b.q[:2], b.k_cache, b.v_cache, plan)
    with pytest.raises(ValueError, match="^plan: must be a TorchAttentionPlan"):
        mixed_attention_torch(b.q, b.k_cache, b.v_cache, None)
    with pytest.raises(ValueError, match="^softcap: "):
        mixed_attention_torch(b.q, b.k_cache, b.v_cache, plan, softcap=0.0)
    compiled = plan_for(b, path="compiled")
    with pytest.raises(ValueError, match="^plan: was built for another batch"):
        mixed_attention_compiled(b.q[:2], b.k_cache, b.v_cache, compiled)
    with pytest.raises(ValueError, match="^plan: must be a CompiledAttentionPlan"):
        mixed_attention_compiled(b.q, b.k_cache, b.v_cache, plan)
    # the loop reads the cache without bounds checks: a cache smaller than the one the table was checked against is refused
    with pytest.raises(ValueError, match="^plan: was built for another batch, head layout, block size or cache size"):
        mixed_attention_compiled(b.q, b.k_cache[:-1], b.v_cache[:-1], compiled)
    with pytest.raises(ValueError, match="^k_cache: must be float32 or bfloat16"):
        mixed_attention_compiled(b.q.half(), b.k_cache.half(), b.v_cache.half(), compiled)
    for bad_heads in (0, 3, True, 1.0):
        with pytest.raises(ValueError, match="^heads_per_task: must be a divisor of the 2 KV heads"):
            mixed_attention_compiled(b.q, b.k_cache, b.v_cache, compiled, heads_per_task=bad_heads)
    for bad_splits in (0, True, 2.0):
        with pytest.raises(ValueError, match="^key_splits: must be a positive integer"):
            mixed_attention_compiled(b.q, b.k_cache, b.v_cache, compiled, key_splits=bad_splits)
    assert isinstance(compiled, CompiledAttentionPlan)
    # The batch checks are the Triton planner's, word for word.
    bad = b.block_table.clone()
    bad[0, 0] = b.k_cache.shape[0]
    for planner in (plan_torch_attention, plan_compiled_attention, plan_mixed_attention):
        with pytest.raises(ValueError, match=r"^block_table: holds block ids outside"):
            planner(b.cu_seqlens_q, b.seq_lens, bad, num_q_heads=4, num_kv_heads=2, head_dim=16,
                    num_blocks=b.k_cache.shape[0], block_size=4)


def test_short_requests_of_very_different_contexts_split_into_groups():
    """Decodes and trees from 1 to 1500 keys: padded in a few groups of similar context, not one."""
    gen = torch.Generator().manual_seed(11)
    ctxs = torch.randint(1, 1500, (30,), generator=gen).tolist()
    q_lens = [min(c, 1 + 8 * (i % 2)) for i, c in enumerate(ctxs)]
    b = random_paged_batch(q_lens, ctxs, num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=16,
                           dtype=torch.float32, generator=gen, trees=[i % 2 == 1 for i in range(30)])
    assert 1 < len(plan_for(b).groups) <= 4
    check(b)


@pytest.mark.parametrize("physical", ["HND", "NHD"])
@pytest.mark.parametrize("path", PATHS)
def test_k_and_v_halves_of_one_cache_as_the_vllm_plugin_views_it(physical, path):
    """vLLM's cache [blocks, kv_heads, block_size, 2 * D] in either physical order, viewed as K
    and V halves: gathered together (one 2D-wide row gather), same result."""
    gen = torch.Generator().manual_seed(2)
    b = random_paged_batch([1, 9, 40], [70, 30, 90], num_q_heads=6, num_kv_heads=2, head_dim=32, block_size=16,
                           dtype=torch.float32, generator=gen, trees=[False, True, False])
    kv = torch.cat([b.k_cache, b.v_cache], -1)  # [blocks, block_size, kv_heads, 2D]: NHD
    if physical == "HND":
        kv = kv.transpose(1, 2).contiguous().transpose(1, 2)
    b.k_cache, b.v_cache = kv.split(32, dim=-1)
    check(b, path=path)


@pytest.mark.parametrize("heads_per_task", [1, 2, 4])
@pytest.mark.parametrize("physical", ["HND", "NHD"])
@pytest.mark.parametrize("dtype", COMPILED_DTYPES)
def test_compiled_tasks_of_any_head_group(heads_per_task, physical, dtype):
    """The compiled loop's tasks take 1, some or all KV heads of an item (packing each tile's rows
    of those heads); every grouping gives the reference's output, on both physical cache orders,
    windowed and not, and the default grouping (by batch and threads) too."""
    gen = torch.Generator().manual_seed(heads_per_task)
    q_lens, ctxs, trees = mixed(gen, 7)
    b = random_paged_batch([*q_lens, 9, 1], [*ctxs, 300, 260], num_q_heads=8, num_kv_heads=4, head_dim=32,
                           block_size=16, dtype=dtype, generator=gen, trees=[*trees, True, False])
    kv = torch.cat([b.k_cache, b.v_cache], -1)  # [blocks, block_size, kv_heads, 2D]: NHD
    if physical == "HND":
        kv = kv.transpose(1, 2).contiguous().transpose(1, 2)
    b.k_cache, b.v_cache = kv.split(32, dim=-1)
    for window in (None, 20):
        ref = mixed_attention_reference(*b.inputs(), 0.2, window=window, **b.tree_kwargs())
        plan = plan_for(b, window, path="compiled")
        for heads in (heads_per_task, None):
            out = mixed_attention_compiled(b.q, b.k_cache, b.v_cache, plan, 0.2, heads_per_task=heads)
            torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("key_splits", [2, 3, 40])
@pytest.mark.parametrize("dtype", COMPILED_DTYPES)
def test_compiled_key_splits(key_splits, dtype):
    """Split-KV: each task's keys in 2, 3 or more parts than it has tiles (idle parts), merged
    per query row; the reference's output with any head grouping, windowed and not (a window
    leaves parts whose keys no query sees), on trees, decodes and causal rows of 1 to 700 keys."""
    gen = torch.Generator().manual_seed(key_splits)
    q_lens, ctxs, trees = mixed(gen, 5)
    b = random_paged_batch([*q_lens, 9, 1, 3], [*ctxs, 700, 1, 260], num_q_heads=8, num_kv_heads=4, head_dim=32,
                           block_size=16, dtype=dtype, generator=gen, trees=[*trees, True, False, False])
    for window in (None, 20):
        ref = mixed_attention_reference(*b.inputs(), 0.2, window=window, **b.tree_kwargs())
        plan = plan_for(b, window, path="compiled")
        for heads in (1, 4):
            out = mixed_attention_compiled(b.q, b.k_cache, b.v_cache, plan, 0.2, heads_per_task=heads,
                                           key_splits=key_splits)
            torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def test_key_splits_fill_the_threads():
    from tkernels.attention.compiled_path import _key_splits

    assert _key_splits(26, 2, 10) == 1  # a server's step: tasks enough
    assert _key_splits(3, 2, 7) == 2  # a lone request's three heads on two threads: six tasks
    assert _key_splits(3, 16, 7) == 7 and _key_splits(3, 16, 20) == 11  # at most one part per tile
    assert _key_splits(1, 2, 1) == 1 and _key_splits(0, 2, 5) == 1


def test_heads_per_task_leaves_two_tasks_per_thread():
    from tkernels.attention.compiled_path import _heads_per_task

    assert _heads_per_task(26, 3, 2) == 3  # a server's step: every head of an item in one task
    assert _heads_per_task(1, 3, 2) == 1  # a lone decode: its heads spread over the threads
    assert _heads_per_task(2, 8, 2) == 4 and _heads_per_task(1, 8, 4) == 1 and _heads_per_task(3, 8, 2) == 4
    assert _heads_per_task(0, 2, 2) == 1 and _heads_per_task(5, 1, 2) == 1


@pytest.mark.parametrize("num_tasks", [0, 1, 2, 3, 7, 26, 78, 101])
@pytest.mark.parametrize("workers", [1, 2, 3, 16])
def test_deal_balances_the_workers(num_tasks, workers):
    """The loop's tasks dealt to the threads: every task once, each worker's list one run of
    ``order``, counts within one, and on tasks of falling sizes (the plan's order) each
    worker's work within the largest task of the mean (a largest-first split would give one
    thread every large task)."""
    from tkernels.attention.compiled_path import _deal

    order, starts = _deal(num_tasks, workers)
    assert order.dtype == np.int64 and starts.dtype == np.int64 and starts.shape == (workers + 1,)
    assert sorted(order.tolist()) == list(range(num_tasks)) and starts[0] == 0 and starts[-1] == num_tasks
    counts = np.diff(starts)
    assert counts.min() >= 0 and counts.max() - counts.min() <= 1
    sizes = np.sort(np.random.default_rng(num_tasks).integers(1, 1000, num_tasks))[::-1]
    work = np.array([sizes[order[starts[w]:starts[w + 1]]].sum() for w in range(workers)])
    if num_tasks:
        assert np.abs(work - sizes.sum() / workers).max() <= sizes.max()


def test_prepared_caches_serve_every_step():
    """A server's layer prepares its caches once (:func:`compiled_caches`): later writes to the
    caches are read, plans of other steps run on them, and ``out`` of another layout than the
    loop's (strided rows, bf16) is written through its buffer."""
    gen = torch.Generator().manual_seed(11)
    for dtype in COMPILED_DTYPES:
        b = random_paged_batch([1, 9, 40, 1], [70, 30, 90, 1], num_q_heads=6, num_kv_heads=2, head_dim=32,
                               block_size=16, dtype=dtype, generator=gen, trees=[False, True, False, False])
        kv = torch.cat([b.k_cache, b.v_cache], -1).transpose(1, 2).contiguous().transpose(1, 2)
        b.k_cache, b.v_cache = kv.split(32, dim=-1)
        caches = compiled_caches(b.k_cache, b.v_cache)
        for step in range(3):
            if step:  # new K/V land in the cache, another batch is planned
                kv.copy_(torch.randn(kv.shape, generator=gen).to(dtype))
                b.q = torch.randn(b.q.shape, generator=gen).to(dtype)
            plan = plan_for(b, path="compiled")
            ref = mixed_attention_reference(*b.inputs(), 0.2, **b.tree_kwargs())
            wide = torch.full((b.q.shape[0], b.q.shape[1], 64), 7.0, dtype=dtype)
            out = wide[..., :32]  # rows contiguous, the tensor not: written through a buffer
            for o in (None, out):
                got = mixed_attention_prepared(b.q, caches, plan, 0.2, out=o)
                torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
            assert (wide[..., 32:] == 7.0).all()


def test_prepared_errors_name_the_argument():
    gen = torch.Generator().manual_seed(0)
    b = random_paged_batch([1, 3], [10, 3], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4,
                           dtype=torch.float32, generator=gen)
    caches, plan = compiled_caches(b.k_cache, b.v_cache), plan_for(b, path="compiled")
    with pytest.raises(ValueError, match="^caches: must be CompiledCaches"):
        mixed_attention_prepared(b.q, (b.k_cache, b.v_cache), plan)
    with pytest.raises(ValueError, match="^q: must be a CPU tensor"):
        mixed_attention_prepared(b.q.bfloat16(), caches, plan)
    with pytest.raises(ValueError, match="^q: must be a CPU tensor"):
        mixed_attention_prepared(b.q[..., :8], caches, plan)
    with pytest.raises(ValueError, match="^out: must be a tensor like q"):
        mixed_attention_prepared(b.q, caches, plan, out=torch.empty(2, 4, 16))
    with pytest.raises(ValueError, match="^plan: was built for another batch"):
        mixed_attention_prepared(b.q[:2], caches, plan)
    with pytest.raises(ValueError, match="^scale: must be a positive number"):
        mixed_attention_prepared(b.q, caches, plan, -1.0)
    with pytest.raises(ValueError, match="^v_cache: shape"):
        compiled_caches(b.k_cache, b.v_cache[:-1])
    with pytest.raises(ValueError, match="^v_cache: dtype"):
        compiled_caches(b.k_cache, b.v_cache.bfloat16())
    with pytest.raises(ValueError, match="^k_cache: must be float32 or bfloat16"):
        compiled_caches(b.k_cache.half(), b.v_cache.half())
    with pytest.raises(ValueError, match="^k_cache: must be \\[num_blocks"):
        compiled_caches(b.k_cache[0], b.v_cache[0])
