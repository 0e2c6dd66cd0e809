"""KV compaction after verification: kernel vs reference vs a slot-by-slot model."""

import pytest
import torch

from tkernels.attention.batch import TREE_KINDS, tree_parents
from tkernels.spec.kv_compaction import compact_kv, compact_kv_reference, launch_config
from tkernels.spec.tree import MAX_TREE_NODES, depths, leaf_paths


def random_case(rng, batch=5, block_size=4, heads=2, head_dim=8, width=6, num_blocks=64, lead=(), dtype=torch.float16):
    max_blocks = 8
    cache = torch.randn(*lead, num_blocks, block_size, heads, head_dim, generator=rng).to(dtype)
    block_table = torch.randperm(num_blocks, generator=rng)[: batch * max_blocks].view(batch, max_blocks).int()
    tree_size = 12
    prefix = torch.randint(0, max_blocks * block_size - tree_size, (batch,), generator=rng).int()
    nodes = torch.full((batch, width), -1, dtype=torch.int32)
    num = torch.randint(1, width + 1, (batch,), generator=rng).int()
    for b in range(batch):  # strictly increasing path from node 0 inside the tree
        path = [0] + sorted(torch.randperm(tree_size - 1, generator=rng)[: int(num[b]) - 1].add(1).tolist())
        nodes[b, : len(path)] = torch.tensor(path, dtype=torch.int32)
    return cache, block_table, prefix, nodes, num


def expected_after(cache, block_table, prefix, nodes, num):
    """Slot-by-slot model: read every source first, then write."""
    out = cache.clone()
    block_size = cache.shape[-3]

    def slot(b, pos):
        return int(block_table[b, pos // block_size]), pos % block_size

    for b in range(block_table.shape[0]):
        moves = [(slot(b, int(prefix[b]) + int(nodes[b, d])), slot(b, int(prefix[b]) + d)) for d in range(1, int(num[b]))]
        values = [cache[..., s[0], s[1], :, :].clone() for s, _ in moves]
        for (_, dst), value in zip(moves, values):
            out[..., dst[0], dst[1], :, :] = value
    return out


@pytest.mark.parametrize("lead", [(), (2,), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_compact_matches_model(rng, lead, dtype):
    cache, *meta = random_case(rng, lead=lead, dtype=dtype)
    expected = expected_after(cache, *meta)
    ours, ref = cache.clone(), cache.clone()
    compact_kv(ours, *meta)
    compact_kv_reference(ref, *meta)
    assert torch.equal(ours, expected)  # every other slot untouched, bit for bit
    assert torch.equal(ref, expected)


@pytest.mark.parametrize("config", [{"block_hd": 16, "num_warps": 1}, {"block_hd": 8}])
def test_launch_configs_match_model(rng, config):
    cache, *meta = random_case(rng, heads=3, head_dim=16, lead=(2,))  # 48 columns: several tiles
    expected = expected_after(cache, *meta)
    compact_kv(cache, *meta, config=config)
    assert torch.equal(cache, expected)
    with pytest.raises(ValueError, match="^config"):
        compact_kv(cache, *meta, config={"block_hd": 24})


def test_list_of_caches_overlap_and_block_boundaries(rng):
    # path 0, 2, 3: entry 1 reads position 2 which entry 2 writes; prefix 3 with blocks of 4
    # puts the tree across a block boundary.
    block_table = torch.tensor([[5, 1, 7, 2], [0, 3, 6, 4]], dtype=torch.int32)
    prefix = torch.tensor([3, 0], dtype=torch.int32)
    nodes = torch.tensor([[0, 2, 3, -1, -1], [0, 1, 4, 6, 9]], dtype=torch.int32)
    num = torch.tensor([3, 5], dtype=torch.int32)
    caches = [torch.randn(8, 4, 3, 16, generator=rng) for _ in range(2)]
    original = caches[0].clone()
    expected = [expected_after(c, block_table, prefix, nodes, num) for c in caches]
    compact_kv(caches, block_table, prefix, nodes, num)
    for c, e in zip(caches, expected):
        assert torch.equal(c, e)
    # request 0: position 4 (block 1, slot 0) <- node 2 at position 5 (block 1, slot 1),
    # position 5 <- node 3 at position 6 (block 1, slot 2); node 0 at position 3 (block 5, slot 3) stays
    assert torch.equal(caches[0][1, 0], original[1, 1]) and torch.equal(caches[0][1, 1], original[1, 2])
    assert torch.equal(caches[0][5, 3], original[5, 3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", TREE_KINDS)
@pytest.mark.parametrize("nodes", [65, 128, MAX_TREE_NODES])
def test_paths_of_trees_past_64_nodes(rng, nodes, kind, dtype):
    """Accepted paths of a big tree (a chain's 256-long one included) beside short ones: the
    width (max depth + 1) sets the kernel's path tile, up to 256 rows."""
    parents = tree_parents(kind, nodes, rng)
    paths = leaf_paths(parents)
    picks = [paths[-1], paths[int(torch.randint(len(paths), (1,), generator=rng))], [0], [0, 1]]
    width = int(depths(parents).max()) + 1
    block_size, heads, head_dim = 16, 2, 8
    prefix = torch.randint(0, 40, (len(picks),), generator=rng).int()
    blocks = (int(prefix.max()) + nodes + block_size - 1) // block_size
    num_blocks = len(picks) * blocks + 3
    block_table = torch.randperm(num_blocks, generator=rng)[: len(picks) * blocks].view(len(picks), blocks).int()
    accepted = torch.full((len(picks), width), -1, dtype=torch.int32)
    num = torch.zeros(len(picks), dtype=torch.int32)
    for b, path in enumerate(picks):
        keep = len(path) if b == 0 else int(torch.randint(1, len(path) + 1, (1,), generator=rng))
        accepted[b, :keep] = torch.tensor(path[:keep], dtype=torch.int32)
        num[b] = keep
    cache = torch.randn(2, num_blocks, block_size, heads, head_dim, generator=rng).to(dtype)
    meta = (block_table, prefix, accepted, num)
    expected = expected_after(cache, *meta)
    ref = cache.clone()
    compact_kv_reference(ref, *meta)
    compact_kv(cache, *meta)
    assert torch.equal(cache, expected) and torch.equal(ref, expected)


def test_nothing_to_move(rng):
    cache, block_table, prefix, _, _ = random_case(rng, batch=3)
    nodes = torch.tensor([[0, 1, 2], [0, -1, -1], [0, 1, -1]], dtype=torch.int32)
    num = torch.tensor([3, 1, 2], dtype=torch.int32)
    before = cache.clone()
    compact_kv(cache, block_table, prefix, nodes, num)
    assert torch.equal(cache, before)
    empty = torch.empty(0, 8, dtype=torch.int32)
    compact_kv(cache, empty, torch.empty(0, dtype=torch.int32), torch.empty(0, 3, dtype=torch.int32), torch.empty(0, dtype=torch.int32))
    assert torch.equal(cache, before)


def test_bad_inputs(rng):
    cache, block_table, prefix, nodes, num = random_case(rng, batch=3, width=4)
    good = (cache, block_table, prefix, nodes, num)

    def bad(index, value):
        args = list(good)
        args[index] = value
        return args

    cases = [
        ("num_accepted", bad(4, torch.tensor([1, 5, 1], dtype=torch.int32))),
        ("num_accepted", bad(4, num.long())),
        ("accepted_nodes", bad(3, torch.tensor([[0, 2, 1, -1]] * 3, dtype=torch.int32))[:4] + [torch.full((3,), 3, dtype=torch.int32)]),
        ("accepted_nodes", bad(3, nodes[:2])),
        ("block_table", bad(1, block_table.long())),
        ("block ids", bad(1, torch.full_like(block_table, 999))),
        ("prefix_lens", bad(2, torch.full((3,), 10_000, dtype=torch.int32))),
        ("kv_caches", bad(0, cache.transpose(-1, -2))),
        ("kv_caches", bad(0, [cache, cache[:-1]])),
        ("kv_caches", bad(0, [])),
    ]
    for name, args in cases:
        with pytest.raises(ValueError, match=name):
            compact_kv(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_compaction(dtype):
    gen = torch.Generator().manual_seed(0)
    cache, *meta = random_case(gen, batch=32, block_size=16, heads=8, head_dim=128, width=9, num_blocks=512,
                               lead=(2,), dtype=dtype)
    expected = expected_after(cache, *meta)
    cache, meta = cache.cuda(), [m.cuda() for m in meta]
    compact_kv(cache, *meta)
    assert torch.equal(cache.cpu(), expected)


def test_negative_prefix_lens_is_named(rng):
    """Issue 14 item 8: a negative prefix_lens was blamed on the block table."""
    cache, block_table, prefix, nodes, num = random_case(rng, batch=3, width=4)
    prefix[1] = -1
    for fn in (compact_kv, compact_kv_reference):
        with pytest.raises(ValueError, match=r"^prefix_lens: .*>= 0"):
            fn(cache, block_table, prefix, nodes, num)


def test_launch_config_bad_row_size():
    for bad in (0, 2.5, "64"):
        with pytest.raises(ValueError, match=r"^kv_dim\b"):
            launch_config(bad)


@pytest.mark.parametrize("seed", range(4))
def test_cpu_compaction_matches_the_reference(seed):
    """compact_kv_cpu (vLLM-CPU's path: no-op moves dropped, nothing done without a move)
    against the reference on random accepted paths, chains of first children (no move) and
    empty acceptances, every cache of a list moved."""
    from tkernels.spec.kv_compaction import compact_kv_cpu

    gen = torch.Generator().manual_seed(seed)
    batch, block_size, blocks_per_req = 5, 4, 6
    table = torch.randperm(batch * blocks_per_req, generator=gen).view(batch, blocks_per_req).int()
    prefix = torch.randint(0, 8, (batch,), generator=gen).int()
    for case in ("random", "no move", "nothing accepted"):
        nodes = torch.full((batch, 5), -1, dtype=torch.int32)
        num = torch.zeros(batch, dtype=torch.int32)
        for b in range(batch):
            n = int(torch.randint(1, 6, (1,), generator=gen)) if case != "nothing accepted" else 1
            path = [0] + sorted(torch.randperm(10, generator=gen)[:n - 1].add(1).tolist()) if case == "random" \
                else list(range(n))
            nodes[b, :n], num[b] = torch.tensor(path, dtype=torch.int32), n
        caches = [torch.randn(2, batch * blocks_per_req, block_size, 3, 8, generator=gen) for _ in range(3)]
        ref = [c.clone() for c in caches]
        compact_kv_cpu(caches, table, prefix, nodes, num)
        compact_kv_reference(ref, table, prefix, nodes, num)
        for got, want in zip(caches, ref):
            assert torch.equal(got, want)
