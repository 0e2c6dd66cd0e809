"""The CPU cache write of tkernels' vLLM backend (plugins/vllm/cache_write.py): the compiled
copy against the plain-PyTorch reference, bit for bit, on fresh random rows: every cache dtype,
both physical orders of the cache, K/V rows as views of a fused QKV output, padding slots (-1),
rows beyond the slot mapping, rows of another dtype than the cache's, and a slot beyond the
cache (refused, nothing written out of it)."""

from __future__ import annotations

import pytest
import torch

from tkernels.plugins.vllm.cache_write import cache_bits, write_kv, write_kv_reference


def cache(blocks, heads, block_size, width, dtype, physical):
    kv = torch.zeros(blocks, heads, block_size, width, dtype=dtype)
    if physical == "token-major":  # vLLM's LBNHC: a slot's heads side by side
        kv = torch.zeros(blocks, block_size, heads, width, dtype=dtype).transpose(1, 2)
    return kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("physical", ["head-major", "token-major"])
@pytest.mark.parametrize("seed", range(3))
def test_compiled_write_matches_the_reference(dtype, physical, seed):
    gen = torch.Generator().manual_seed(seed)
    heads, D, block_size, blocks = 3, 16, 8, 12
    for n in (0, 1, 5, 40):
        qkv = torch.randn(n + 3, (2 + 2 * heads) * D, generator=gen).to(dtype)  # rows beyond n: padding
        _, key, value = qkv.split([2 * D, heads * D, heads * D], dim=-1)
        key, value = key.view(-1, heads, D), value.view(-1, heads, D)
        slots = torch.randperm(blocks * block_size, generator=gen)[:n]
        slots[torch.rand(n, generator=gen) < 0.2] = -1
        for slot_mapping in (slots, slots.int()):
            fast, ref = (cache(blocks, heads, block_size, 2 * D, dtype, physical) for _ in range(2))
            fast.fill_(3.0), ref.fill_(3.0)
            write_kv(fast, cache_bits(fast), key, value, slot_mapping)
            write_kv_reference(ref, key, value, slot_mapping)
            assert torch.equal(fast.view(torch.int8 if dtype != torch.float32 else torch.int32),
                               ref.view(torch.int8 if dtype != torch.float32 else torch.int32))


def test_rows_of_another_dtype_and_slots_beyond_the_cache():
    gen = torch.Generator().manual_seed(7)
    kv = torch.zeros(4, 2, 4, 32, dtype=torch.bfloat16)
    key, value = torch.randn(3, 2, 16, generator=gen), torch.randn(3, 2, 16, generator=gen)  # fp32 rows
    ref = kv.clone()
    write_kv(kv, cache_bits(kv), key, value, torch.tensor([0, 5, 15]))
    write_kv_reference(ref, key, value, torch.tensor([0, 5, 15]))
    assert torch.equal(kv, ref)
    with pytest.raises(IndexError, match="^slot_mapping: slot 16 of row 1 lies beyond the layer's KV cache"):
        write_kv(kv, cache_bits(kv), key.bfloat16(), value.bfloat16(), torch.tensor([1, 16, 2]))
    assert torch.equal(kv[0, :, 1, :16], key[0].bfloat16())  # row 0 written before the bad slot was met
    assert torch.equal(kv[0, :, 2], ref[0, :, 2])  # row 2 not
    assert cache_bits(torch.zeros(2, 2, 4, 8, dtype=torch.float64)) is None  # 8-byte elements: the reference writes
