"""tkernels' CPU stand-in for ``sgl_kernel`` against SGLang's own Triton twins, on random inputs.

Every op of :mod:`tkernels.plugins.sglang.cpu_ops` runs beside the Triton kernel SGLang launches for
the same job off CPU (here under ``TRITON_INTERPRET=1``, set by tests/conftest.py), on the same
random inputs, and the outputs (and every tensor it may write) must be equal. The names SGLang
imports but the stand-in does not implement raise ``NotImplementedError``; other names are absent.
"""

import sys

import pytest
import torch

from tkernels.plugins.sglang import cpu, cpu_ops

pytestmark = pytest.mark.sglang

triton = pytest.importorskip("triton")


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def ranges(rng, bs: int, pool_len: int):
    """Per request ``[start, end)`` inside a pool row (some empty), as int64 tensors."""
    start = torch.randint(0, pool_len // 2, (bs,), generator=rng)
    length = torch.randint(0, pool_len // 2, (bs,), generator=rng)
    length[torch.randint(0, bs, (1,), generator=rng)] = 0  # an empty range among them
    return start, start + length


@pytest.mark.parametrize("bs", [1, 3, 9])
def test_assign_req_to_token_pool(rng, bs):
    from sglang.srt.mem_cache.allocation import assign_req_to_token_pool

    pool_len, rows = 100, 12
    req_pool_indices = torch.randperm(rows, generator=rng)[:bs]
    start, end = ranges(rng, bs, pool_len)
    out_cache_loc = torch.randint(0, 10_000, (int((end - start).sum()),), generator=rng)
    req_to_token = torch.randint(0, 10_000, (rows, pool_len), generator=rng, dtype=torch.int32)
    expected = req_to_token.clone()
    assign_req_to_token_pool[(bs,)](req_pool_indices, expected, start, end, out_cache_loc, pool_len,
                                    next_power_of_2(bs))
    cpu_ops.assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start, end, out_cache_loc, pool_len)
    assert torch.equal(req_to_token, expected)


@pytest.mark.parametrize("bs", [1, 3, 9])
def test_assign_extend_cache_locs(rng, bs):
    from sglang.kernels.ops.speculative.cache_locs import assign_extend_cache_locs

    pool_len, rows = 100, 12
    req_pool_indices = torch.randperm(rows, generator=rng)[:bs]
    start, end = ranges(rng, bs, pool_len)
    req_to_token = torch.randint(0, 10_000, (rows, pool_len), generator=rng, dtype=torch.int32)
    n = int((end - start).sum())
    expected = torch.full((n + 3,), -7, dtype=torch.int64)  # the tail must stay untouched
    out = expected.clone()
    assign_extend_cache_locs[(bs,)](req_pool_indices, req_to_token, start, end, expected, pool_len,
                                    next_power_of_2(bs))
    cpu_ops.assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start, end, out, pool_len)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("op", ["assign_req_to_token_pool_cpu", "assign_extend_cache_locs_cpu"])
def test_ranges_past_the_row_are_refused(op):
    """The Triton twins would read or write the next request's row; the stand-in stops instead."""
    req_to_token = torch.zeros(3, 10, dtype=torch.int32)
    start, end = torch.tensor([2, 9]), torch.tensor([4, 11])
    with pytest.raises(RuntimeError, match=r"request 1's KV slots \[9, 11\) pass its req_to_token row of 10"):
        getattr(cpu_ops, op)(torch.tensor([0, 1]), req_to_token, start, end, torch.zeros(4, dtype=torch.int64), 10)


@pytest.mark.parametrize("bs,width", [(1, 4), (4, 3), (7, 6)])
def test_fill_accept_out_cache_loc(rng, bs, width):
    from sglang.kernels.ops.speculative.eagle import fill_accept_out_cache_loc

    num_nodes = width * 2
    # Each request's accepted nodes (flat indices into its tree), -1 padded, like eagle_sample's output.
    accept_index = torch.full((bs, width), -1, dtype=torch.int32)
    for b in range(bs):
        n = int(torch.randint(1, width + 1, (1,), generator=rng))
        accept_index[b, :n] = torch.randperm(num_nodes, generator=rng)[:n].sort().values.int() + b * num_nodes
    out_cache_loc = torch.randint(0, 10_000, (bs * num_nodes,), generator=rng)
    size = accept_index.numel()
    expected = torch.full((size,), -7, dtype=torch.int64)
    out = expected.clone()
    fill_accept_out_cache_loc[(size,)](accept_index, out_cache_loc, expected, next_power_of_2(size))
    cpu_ops.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, out)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("num_locs", [1, 5, 40])
def test_copy_all_layer_kv_cache(rng, num_locs):
    from sglang.kernels.ops.kvcache.cache_move import copy_all_layer_kv_cache_tiled

    slots = 64
    # K and V buffers of 3 layers, of different row sizes (bytes per slot), as the KV pool holds them.
    buffers = [torch.randn(slots, heads, 8, generator=rng) for heads in (1, 2, 1, 2, 3, 1)]
    src = torch.randint(0, slots, (num_locs,), generator=rng)
    tgt = torch.randperm(slots, generator=rng)[:num_locs]  # distinct targets, sources may overlap them

    def run(copy, bufs):
        data_ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
        strides = torch.tensor([b[0].nbytes for b in bufs], dtype=torch.int64)
        copy(data_ptrs, strides)

    expected = [b.clone() for b in buffers]
    upper = next_power_of_2(num_locs)
    tile = 128

    def triton_copy(data_ptrs, strides):
        grid = (data_ptrs.numel(), -(-int(strides.max()) // tile))
        copy_all_layer_kv_cache_tiled[grid](data_ptrs, strides, tgt, src, num_locs, upper, BYTES_PER_TILE=tile)

    run(triton_copy, expected)
    run(lambda d, s: cpu_ops.copy_all_layer_kv_cache_cpu(d, s, tgt, src), buffers)
    for got, want in zip(buffers, expected):
        assert torch.equal(got, want)


def random_trees(rng, bs: int, n: int) -> torch.Tensor:
    """NGRAM's ancestor masks bool[bs*n*n] of random BFS-ordered trees (row i: i and its ancestors)."""
    masks = []
    for _ in range(bs):
        parents = [-1] + [int(torch.randint(0, i, (1,), generator=rng)) for i in range(1, n)]
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                mask[i, j] = True
                j = parents[j]
        masks.append(mask.flatten())
    return torch.cat(masks)


@pytest.mark.parametrize("bs,n", [(1, 1), (2, 8), (5, 13)])
def test_reconstruct_indices_from_tree_mask(rng, bs, n):
    from sglang.kernels.ops.speculative.reconstruct_tree import reconstruct_indices_from_tree_mask_triton

    tree_mask = random_trees(rng, bs, n)
    verified = torch.randint(1, 500, (bs,), generator=rng)
    want = [torch.full((bs * n,), -9, dtype=torch.int64) for _ in range(4)]
    got = [t.clone() for t in want]
    reconstruct_indices_from_tree_mask_triton(tree_mask, verified, *want, bs, n)
    cpu_ops.reconstruct_indices_from_tree_mask(tree_mask, verified, *got, bs, n)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("bs,n,steps", [(1, 4, 4), (3, 8, 5), (4, 12, 12)])
def test_verify_tree_greedy(rng, bs, n, steps):
    from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton

    tree_mask = random_trees(rng, bs, n)
    positions, index, next_token, next_sibling = (torch.empty(bs * n, dtype=torch.int64) for _ in range(4))
    cpu_ops.reconstruct_indices_from_tree_mask(tree_mask, torch.zeros(bs), positions, index, next_token,
                                               next_sibling, bs, n)  # checked against SGLang's just above
    vocab = 4  # few tokens, so drafts often match the target and paths go deep
    candidates = torch.randint(0, vocab, (bs, n), generator=rng)
    target_predict = torch.randint(0, vocab, (bs, n), generator=rng)
    tree = [t.view(bs, n) for t in (index, next_token, next_sibling)]

    def outputs():
        return (torch.full((bs * n,), -5, dtype=torch.int32), torch.full((bs, steps), -1, dtype=torch.int32),
                torch.full((bs,), -5, dtype=torch.int32))

    want, got = outputs(), outputs()
    verify_tree_greedy_triton(*want, candidates, *tree, target_predict)
    cpu_ops.verify_tree_greedy_cpu(*got, candidates, *tree, target_predict)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("name", cpu_ops.DECLARED)
def test_declared_ops_raise(name):
    with pytest.raises(NotImplementedError, match=name):
        getattr(cpu_ops, name)()


def test_other_names_are_absent():
    with pytest.raises(AttributeError):
        cpu_ops.silu_and_mul  # noqa: B018
    with pytest.raises(ImportError):
        exec("from tkernels.plugins.sglang.cpu_ops import silu_and_mul", {})


def test_stand_in_is_what_sglang_imports():
    """Here (no sgl_kernel) the test suite's conftest installed it: ``import sgl_kernel`` is the stand-in."""
    import sgl_kernel
    import sgl_kernel.speculative

    if not getattr(sgl_kernel, "TKERNELS_STAND_IN", False):
        pytest.skip("a real sgl_kernel is installed")
    assert str(cpu.STAND_IN_DIR) in sys.path
    assert sgl_kernel.__file__.startswith(str(cpu.STAND_IN_DIR))
    assert sgl_kernel.assign_req_to_token_pool_cpu is cpu_ops.assign_req_to_token_pool_cpu
    assert sgl_kernel.speculative.reconstruct_indices_from_tree_mask is cpu_ops.reconstruct_indices_from_tree_mask
    assert cpu.install_stand_in(cpu_only=False)  # idempotent
