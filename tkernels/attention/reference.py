"""Plain-PyTorch fp32 reference of mixed-batch attention."""

from __future__ import annotations

import torch

from tkernels.attention.launch import _check_inputs
from tkernels.attention.plan import _check_int_vector, _check_window
from tkernels.checks import fail as _fail
from tkernels.checks import real


def mixed_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    tree_parents: torch.Tensor | None = None,
    is_tree: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch fp32 reference: one request at a time, K/V gathered through the block table.

    Takes the arguments :func:`mixed_attention` takes, checked the same way where that costs no
    host read (tensors' types and shapes, the scalars); the index tensors' values are
    :func:`~tkernels.attention.plan.describe_batch`'s to check (the vLLM backend runs it on every
    step's batch when it runs this reference)."""
    _check_inputs(q, k_cache, v_cache, None)
    _T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    _check_int_vector(cu_seqlens_q, "cu_seqlens_q")
    if cu_seqlens_q.numel() < 1:
        _fail("cu_seqlens_q", "must have B + 1 >= 1 entries")
    _check_int_vector(seq_lens, "seq_lens", cu_seqlens_q.numel() - 1)
    if (tree_parents is None) != (is_tree is None):
        _fail("tree_parents" if tree_parents is None else "is_tree", "tree_parents and is_tree go together")
    scale = D ** -0.5 if scale is None else real("scale", scale, positive=True)
    softcap = None if softcap is None else real("softcap", softcap, positive=True)
    window = _check_window(window)
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    for r, ctx in enumerate(seq_lens.tolist()):
        t0, t1 = cu[r], cu[r + 1]
        n = t1 - t0
        if n == 0:
            continue
        prefix = ctx - n
        key = torch.arange(ctx, device=q.device)
        pages = block_table[r, key // block_size].long()
        k = k_cache[pages, key % block_size].float().repeat_interleave(Hq // Hkv, dim=1)  # [ctx, Hq, D]
        v = v_cache[pages, key % block_size].float().repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[t0:t1].float(), k) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        new = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
        q_pos = prefix + torch.arange(n, device=q.device)
        k_pos = key.clone()
        if is_tree is not None and bool(is_tree[r]):
            parents = tree_parents[t0:t1].tolist()
            new = torch.zeros(n, n, dtype=torch.bool, device=q.device)
            depth = [0] * n
            for i in range(n):
                j = i
                while j >= 0:
                    new[i, j] = True
                    j = parents[j]
                depth[i] = int(new[i].sum()) - 1
            q_pos = prefix + torch.tensor(depth, device=q.device)
            k_pos[prefix:] = q_pos
        visible = torch.cat([torch.ones(n, prefix, dtype=torch.bool, device=q.device), new], 1)
        if window is not None:
            visible &= (q_pos[:, None] - k_pos[None, :]) < window
        s = s.masked_fill(~visible, float("-inf"))
        out[t0:t1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v).to(q.dtype)
    return out
