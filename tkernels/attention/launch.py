"""The mixed-batch attention launcher: :func:`mixed_attention` (inputs and visibility in
:mod:`tkernels.attention`)."""

from __future__ import annotations

import torch

from tkernels.attention.kernels import (
    LAYOUT,
    LOG2E,
    MERGE_LAYOUT,
    _merge_heads,
    merge_split_kv_kernel,
    mixed_attention_kernel,
)
from tkernels.attention.plan import MixedAttentionPlan, _check_window, plan_mixed_attention
from tkernels.checks import fail as _fail
from tkernels.checks import real
from tkernels.config import cdiv, next_power_of_2


def mixed_attention(
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
    out: torch.Tensor | None = None,
    plan: MixedAttentionPlan | None = None,
) -> torch.Tensor:
    """Attention of a mixed batch over a paged K/V cache; returns ``out [T, Hq, D]``.

    ``scale`` (a finite number > 0) defaults to ``D ** -0.5``. ``plan`` (from
    :func:`plan_mixed_attention` for the same batch, trees and window) skips re-planning, e.g.
    across layers; the trees are then taken from the plan (``tree_parents``/``is_tree`` may be
    omitted; given, they must be the planned ones). Without it the batch is planned (and its
    index tensors validated) here.
    """
    _check_inputs(q, k_cache, v_cache, out)
    T, Hq, D = q.shape
    num_blocks, block_size, Hkv, _ = k_cache.shape
    if scale is not None:
        scale = real("scale", scale, positive=True)
    if softcap is not None:
        softcap = real("softcap", softcap, positive=True)
    window = _check_window(window)
    if plan is None:
        plan = plan_mixed_attention(
            cu_seqlens_q, seq_lens, block_table, num_q_heads=Hq, num_kv_heads=Hkv, head_dim=D,
            num_blocks=num_blocks, block_size=block_size, tree_parents=tree_parents, is_tree=is_tree, window=window,
            num_tokens=T, dtype=q.dtype,
        )
    else:
        if (plan.num_tokens, plan.batch, plan.num_q_heads, plan.num_kv_heads) != (T, cu_seqlens_q.numel() - 1, Hq, Hkv):
            _fail("plan", "was built for another batch or head layout")
        if plan.window != window:
            _fail("plan", f"was built for window={plan.window}, called with window={window}")
        if (tree_parents is not None or is_tree is not None) and not _same_trees(plan.trees, (tree_parents, is_tree)):
            _fail("plan", "was built without trees, called with tree_parents/is_tree" if plan.trees is None else
                  "was built for other trees than the tree_parents/is_tree it is called with")
    for arg, t in (("cu_seqlens_q", cu_seqlens_q), ("seq_lens", seq_lens), ("block_table", block_table)):
        if t.device != q.device:
            _fail(arg, f"must be on {q.device} like q, got {t.device}")
    if out is None:
        out = torch.empty_like(q)
    if T == 0 or plan.items.shape[0] == 0:
        return out

    cfg = plan.config
    ws_o = torch.empty((plan.ws_rows, Hq, D), dtype=torch.float32, device=q.device)
    ws_lse = torch.empty((plan.ws_rows, Hq), dtype=torch.float32, device=q.device)
    scale = D ** -0.5 if scale is None else scale
    head_dim_pad = next_power_of_2(D)
    mixed_attention_kernel[(plan.items.shape[0],)](
        q, k_cache, v_cache, out, ws_o, ws_lse, plan.items,
        cu_seqlens_q, seq_lens, block_table, plan.is_tree, plan.ancestors.view(torch.int32), plan.positions,
        scale / softcap if softcap else scale * LOG2E, (softcap or 0.0) * LOG2E, int(window or 0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        block_table.stride(0), 2 * plan.ancestors.shape[1], Hq,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, GROUP=Hq // Hkv, PAGE_SIZE=block_size,
        PREFILL_BLOCK_M=cfg["prefill_block_m"], PREFILL_BLOCK_N=cfg["prefill_block_n"],
        DECODE_BLOCK_M=cfg["decode_block_m"], DECODE_BLOCK_N=cfg["decode_block_n"],
        HAS_TREE=plan.has_tree, HAS_WINDOW=window is not None,
        HAS_SOFTCAP=softcap is not None, **LAYOUT,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if plan.merge.shape[0]:
        heads = _merge_heads(Hq, head_dim_pad)
        merge_split_kv_kernel[(plan.merge.shape[0], cdiv(Hq, heads))](
            out, ws_o, ws_lse, plan.merge, out.stride(0), out.stride(1), Hq,
            HEADS_BLOCK=heads, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, **MERGE_LAYOUT,
        )
    return out


def _same_trees(planned, given) -> bool:
    """The planned (tree_parents, is_tree) and the given ones: the same tensors or equal values."""
    if planned is None:
        return False
    return all(a is b or (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype
                          and a.device == b.device and torch.equal(a, b)) for a, b in zip(planned, given))


def _check_inputs(q, k_cache, v_cache, out) -> None:
    for arg, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            _fail(arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        _fail("q", f"must be [T, num_q_heads, head_dim], got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        _fail("q", f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    _T, Hq, D = q.shape
    if not 16 <= D <= 256:
        _fail("q", f"head_dim must be in [16, 256], got {D}")
    if k_cache.dim() != 4:
        _fail("k_cache", f"must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        _fail("v_cache", f"shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    _, block_size, Hkv, Dk = k_cache.shape
    if Dk != D:
        _fail("k_cache", f"head_dim {Dk} differs from q's {D}")
    if Hkv == 0 or Hq % Hkv:
        _fail("k_cache", f"num_kv_heads={Hkv} must divide q's num_q_heads={Hq}")
    if block_size < 1:
        _fail("k_cache", "block_size must be >= 1")
    for arg, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            _fail(arg, f"dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            _fail(arg, f"must be on {q.device} like q, got {t.device}")
        if t.stride(3) != 1:
            _fail(arg, "last dimension (head_dim) must be contiguous")
    if q.stride(2) != 1:
        _fail("q", "last dimension (head_dim) must be contiguous")
    if out is not None:
        if not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
            _fail("out", f"must be a tensor like q ({tuple(q.shape)}, {q.dtype}, {q.device})")
        if out.stride(2) != 1:
            _fail("out", "last dimension (head_dim) must be contiguous")
