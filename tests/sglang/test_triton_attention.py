"""SGLang's own Triton attention kernels run here (interpreter on CPU) and match a reference.

They are the baselines tkernels' kernels are compared against, so the SGLang environment must be
able to drive them: a tiny ragged GQA batch, prefix from a scattered KV pool, each output
poisoned with NaN first.
"""

import pytest
import torch

pytestmark = pytest.mark.sglang

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 32
POOL = 256  # KV pool slots; requests' tokens sit at random slots


def attend(q, k, v, visible, scale):
    """Reference for one request: q [n, H, D], k/v [m, Hkv, D], visible bool [n, m]."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(group, dim=1).transpose(0, 1) for t in (k, v))
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs @ v).transpose(0, 1)


def random_pool(rng, seq_lens):
    """A KV pool and, per request, the random pool slots of its tokens (kv_indptr/kv_indices)."""
    k_pool, v_pool = (torch.randn(POOL, KV_HEADS, HEAD_DIM, generator=rng, dtype=torch.float16) for _ in range(2))
    kv_indptr = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    kv_indptr[1:] = torch.tensor(seq_lens).cumsum(0)
    kv_indices = torch.randperm(POOL, generator=rng)[: int(kv_indptr[-1])].to(torch.int32)
    return k_pool, v_pool, kv_indptr, kv_indices


@pytest.mark.parametrize("tree_mask", [False, True], ids=["causal", "custom_mask"])
def test_extend_attention_fwd(rng, tree_mask):
    from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

    prefix_lens, extend_lens = [3, 0, 70], [5, 1, 2]  # 70 crosses a 64-key block
    k_pool, v_pool, kv_indptr, kv_indices = random_pool(rng, prefix_lens)
    qo_indptr = torch.zeros(len(extend_lens) + 1, dtype=torch.int32)
    qo_indptr[1:] = torch.tensor(extend_lens).cumsum(0)
    tokens = int(qo_indptr[-1])
    q, k, v = (torch.randn(tokens, h, HEAD_DIM, generator=rng, dtype=torch.float16) for h in (HEADS, KV_HEADS, KV_HEADS))
    out = torch.full_like(q, float("nan"))

    # TARGET_VERIFY layout: request b owns an n x (prefix + n) row-major block at mask_indptr[b].
    visible = []
    for prefix, n in zip(prefix_lens, extend_lens):
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        extend_part = causal & (torch.rand(n, n, generator=rng) < 0.5) | torch.eye(n, dtype=torch.bool) if tree_mask else causal
        visible.append(torch.cat([torch.ones(n, prefix, dtype=torch.bool), extend_part], dim=1))
    custom_mask = torch.cat([m.flatten() for m in visible]) if tree_mask else None
    mask_indptr = torch.tensor([0] + [m.numel() for m in visible], dtype=torch.int64).cumsum(0) if tree_mask else None

    scale = HEAD_DIM**-0.5
    extend_attention_fwd(q, k, v, out, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, custom_mask,
                         not tree_mask, mask_indptr, max(extend_lens), 1.0, 1.0, sm_scale=scale)

    for b, visible_b in enumerate(visible):
        rows, slots = slice(qo_indptr[b], qo_indptr[b + 1]), kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
        keys, values = torch.cat([k_pool[slots], k[rows]]), torch.cat([v_pool[slots], v[rows]])
        torch.testing.assert_close(out[rows].float(), attend(q[rows], keys, values, visible_b, scale), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("kv_heads", [KV_HEADS, HEADS], ids=["gqa", "mha"])
def test_decode_attention_fwd(rng, kv_heads):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    seq_lens, max_kv_splits = [1, 70, 33], 4
    k_pool, v_pool, kv_indptr, kv_indices = random_pool(rng, seq_lens)
    k_pool, v_pool = (t.repeat_interleave(kv_heads // KV_HEADS, dim=1) for t in (k_pool, v_pool))
    q = torch.randn(len(seq_lens), HEADS, HEAD_DIM, generator=rng, dtype=torch.float16)
    out = torch.full_like(q, float("nan"))
    attn_logits = torch.empty(len(seq_lens), HEADS, max_kv_splits, HEAD_DIM, dtype=torch.float32)
    attn_lse = torch.empty(len(seq_lens), HEADS, max_kv_splits, dtype=torch.float32)
    num_kv_splits = torch.full((len(seq_lens),), max_kv_splits, dtype=torch.int32)

    scale = HEAD_DIM**-0.5
    decode_attention_fwd(q, k_pool, v_pool, out, kv_indptr, kv_indices, attn_logits, attn_lse, num_kv_splits,
                         max_kv_splits, scale, 1.0, 1.0)

    for b, n in enumerate(seq_lens):
        slots = kv_indices[kv_indptr[b]:kv_indptr[b + 1]].long()
        expected = attend(q[b : b + 1], k_pool[slots], v_pool[slots], torch.ones(1, n, dtype=torch.bool), scale)
        torch.testing.assert_close(out[b : b + 1].float(), expected, atol=2e-3, rtol=2e-3)
