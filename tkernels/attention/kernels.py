"""Triton kernels of mixed-batch attention and the launches they compile (the compile check).

One launch of :func:`mixed_attention_kernel` runs every work item of the plan
(:mod:`tkernels.attention.plan`), one program per item in plan order (not a persistent grid);
the item's tile class picks one of two tile shapes compiled into the same kernel (POD-style).
Registers are allocated for the larger shape, so a batch of one class compiles its shape into
both branches. Scores use ``tl.dot`` with fp32 accumulation and ``exp2`` with
``scale * log2(e)`` folded in; key tiles wholly inside the cached prefix skip the mask. K/V rows
are gathered through the block table per key, so any block size works with any BLOCK_N. Split
items write fp32 partial outputs and log-sum-exps to a workspace; a second small launch
(:func:`merge_split_kv_kernel`) merges them per token. The plan's layout constants reach the
kernels as ``tl.constexpr`` arguments (:data:`LAYOUT`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import triton
import triton.language as tl

from tkernels.attention.plan import (
    _DTYPES,
    DECODE,
    DEFAULT_CONFIG,
    ITEM_CLASS,
    ITEM_FIELDS,
    ITEM_KV_END,
    ITEM_KV_HEAD,
    ITEM_KV_START,
    ITEM_Q_START,
    ITEM_REQ,
    ITEM_WS_ROW,
    MERGE_FIELDS,
    MERGE_ROW_STRIDE,
    MERGE_SPLITS,
    MERGE_TOKEN,
    MERGE_WS_ROW,
    PREFILL,
    _launch_config,
    _one_class_tiles,
    default_config,
    shared_memory_estimate,
)
from tkernels.config import next_power_of_2
from tkernels.registry import gpu_compile_check

LOG2E = 1.4426950408889634
# The plan's host layout (tkernels.attention.plan), passed to the kernels as constexprs: the item
# table's width and columns and the prefill tile class to the attention kernel, the merge
# table's to the merge kernel.
LAYOUT = {"ITEM_FIELDS": ITEM_FIELDS, "PREFILL": PREFILL, "ITEM_REQ": ITEM_REQ, "ITEM_KV_HEAD": ITEM_KV_HEAD,
          "ITEM_CLASS": ITEM_CLASS, "ITEM_Q_START": ITEM_Q_START, "ITEM_KV_START": ITEM_KV_START,
          "ITEM_KV_END": ITEM_KV_END, "ITEM_WS_ROW": ITEM_WS_ROW}
MERGE_LAYOUT = {"MERGE_FIELDS": MERGE_FIELDS, "MERGE_TOKEN": MERGE_TOKEN, "MERGE_WS_ROW": MERGE_WS_ROW,
                "MERGE_ROW_STRIDE": MERGE_ROW_STRIDE, "MERGE_SPLITS": MERGE_SPLITS}

@triton.jit
def _tanh(x):
    # 1 - 2 / (e^2x + 1) through exp2: portable across backends (no libdevice), exact at +-inf.
    return 1.0 - 2.0 / (tl.exp2(2.8853900817779268 * x) + 1.0)  # 2 * log2(e)


@triton.jit
def _attend_tile(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, ws_o_ptr, ws_lse_ptr,
    block_table_ptr, is_tree_ptr, ancestors_ptr, positions_ptr,
    req, kv_head, q_start, kv_start, kv_end, ws_row, token0, q_len, prefix,
    qk_scale, softcap_log2e, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_anc, num_q_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_TREE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    # Row r of the tile is query token q_start + r // GROUP under query head kv_head*GROUP + r % GROUP.
    rows = tl.arange(0, BLOCK_M)
    tok = q_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < (BLOCK_M // GROUP) * GROUP) & (tok < q_len)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q_rows = (token0 + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=row_valid[:, None] & dim_valid[None, :], other=0.0)

    causal_last = prefix + tok  # last key a causal row sees
    if HAS_TREE:
        tree = tl.load(is_tree_ptr + req) != 0
        anc_rows = ancestors_ptr + (token0 + tok).to(tl.int64) * stride_anc  # each row's 32-bit ancestor words
        tree_words = tl.where(tree, stride_anc, 0)  # words to read per row: none outside trees
    if HAS_WINDOW:
        q_pos = tl.load(positions_ptr + token0 + tok, mask=row_valid, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    kv_head_off = kv_head * stride_kh
    # Tiles wholly inside the cached prefix and the item's range are visible to every row:
    # without a window they skip the mask (most tiles of a long prefill or decode).
    mask_from = tl.minimum(prefix, kv_end)
    if HAS_WINDOW:
        mask_from = kv_start
    for start in range(kv_start, kv_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < kv_end
        page = tl.load(block_table_ptr + req * stride_bt + keys // PAGE_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = keys % PAGE_SIZE
        k_off = page * stride_kb + slot * stride_ks + kv_head_off
        v_off = page * stride_vb + slot * stride_vs + kv_head * stride_vh
        k = tl.load(k_cache_ptr + k_off[None, :] + dims[:, None], mask=key_valid[None, :] & dim_valid[:, None], other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + dims[None, :], mask=key_valid[:, None] & dim_valid[None, :], other=0.0)

        s = tl.dot(q, k)
        if HAS_SOFTCAP:
            s = softcap_log2e * _tanh(s * qk_scale)  # qk_scale = scale / softcap
        else:
            s = s * qk_scale  # qk_scale = scale * log2(e)

        if start + BLOCK_N > mask_from:
            new_key = keys - prefix  # index among the request's new tokens (< 0: cached prefix)
            visible = keys[None, :] <= causal_last[:, None]
            if HAS_TREE:
                # Bit j of a row is bit j % 32 of its int32 word j // 32. A tile of BLOCK_N keys
                # spans at most BLOCK_N / 32 + 1 words: one [BLOCK_M] load each, selected per key,
                # then one shift (a gathered word per key would cost a 64-bit address per element).
                bit = tl.maximum(new_key, 0)
                first_word = tl.maximum(start - prefix, 0) // 32
                words = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
                for i in tl.static_range((BLOCK_N + 31) // 32 + 1):
                    word_idx = rows * 0 + first_word + i  # a [BLOCK_M] tensor, as the interpreter's masks need
                    word = tl.load(anc_rows + word_idx, mask=row_valid & (word_idx < tree_words), other=0)
                    words = tl.where(((bit // 32) == first_word + i)[None, :], word[:, None], words)
                is_ancestor = (words >> (bit % 32)[None, :]) & 1
                visible = tl.where(tree, (new_key[None, :] < 0) | (is_ancestor != 0), visible)
            if HAS_WINDOW:
                # Tree nodes sit at prefix + depth, so new keys take their position from the table.
                key_pos = tl.load(positions_ptr + token0 + new_key, mask=key_valid & (new_key >= 0), other=0)
                key_pos = tl.where(new_key >= 0, key_pos, keys)
                visible = visible & ((q_pos[:, None] - key_pos[None, :]) < window)
            visible = visible & key_valid[None, :] & row_valid[:, None]
            s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_mask = row_valid[:, None] & dim_valid[None, :]
    if ws_row < 0:
        out_rows = (token0 + tok).to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_ptr + out_rows[:, None] + dims[None, :], o.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        ws_rows = (ws_row + rows // GROUP).to(tl.int64) * num_q_heads + head
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(ws_o_ptr + ws_rows[:, None] * HEAD_DIM + dims[None, :], o, mask=store_mask)
        tl.store(ws_lse_ptr + ws_rows, lse, mask=row_valid)


_CHECK_GROUP = 4  # GQA group of the compiled launches (Llama-3-8B's); it only changes index math
_CHECK_FEATURES = {"plain": False, "tree+window+softcap": True}


def compile_launch(config: dict[str, Any], head_dim: int, dtype: torch.dtype, q_lens: tuple[int, ...],
                   features: bool = False, candidate: bool = False, label: str = ""):
    """The :class:`tkernels.registry.Launch` that :func:`mixed_attention` compiles for a batch
    of requests with ``q_lens`` new tokens, planned with ``config`` over the defaults: the
    planner's own tile choice (:func:`_launch_config`, :func:`_one_class_tiles`)."""
    from tkernels.registry import Launch

    q_len = torch.tensor(q_lens)
    cfg = _launch_config(_CHECK_GROUP, head_dim, 16, q_len, dtype, {**default_config(head_dim, dtype), **config})
    _one_class_tiles(cfg, {PREFILL if q > cfg["decode_max_q"] else DECODE for q in q_lens})
    tensor = f"*{_DTYPES[dtype]}"
    return Launch(
        label=label or (f"{_DTYPES[dtype]} d{head_dim} {cfg['prefill_block_m']}x{cfg['prefill_block_n']}/"
                        f"{cfg['decode_block_m']}x{cfg['decode_block_n']} w{cfg['num_warps']}s{cfg['num_stages']}"),
        constexprs=dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=next_power_of_2(head_dim), GROUP=_CHECK_GROUP,
                        PAGE_SIZE=16, PREFILL_BLOCK_M=cfg["prefill_block_m"], PREFILL_BLOCK_N=cfg["prefill_block_n"],
                        DECODE_BLOCK_M=cfg["decode_block_m"], DECODE_BLOCK_N=cfg["decode_block_n"],
                        HAS_TREE=features, HAS_WINDOW=features, HAS_SOFTCAP=features, **LAYOUT),
        types={name: tensor for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")},
        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]},
        candidate=candidate,
        shared_bound=shared_memory_estimate(cfg, head_dim) if candidate else None,
    )


# The worst mixed batch for registers: a prefill chunk beside decode/tree queries of 16 tokens
# (the decode tile at its full 64 rows with group 4).
_CHECK_Q_LENS = (DEFAULT_CONFIG["decode_max_q"] + 1, 16)


def _attention_launches(shared_limit: int | None):
    """Every default launch (fp16/bf16/fp32 x the three default tile regimes of head_dim 64, 128,
    256 x plain and tree/window/softcap batches); autotune's candidates are listed on its side
    (:func:`tkernels.autotune.candidates.attention_candidate_launches`)."""
    for dtype in _DTYPES:
        for head_dim in (64, 128, 256):
            for name, features in _CHECK_FEATURES.items():
                launch = compile_launch({}, head_dim, dtype, _CHECK_Q_LENS, features)
                yield replace(launch, label=f"{launch.label} {name}")


_ATTN_SIGNATURE = {
    "q_ptr": "*fp16", "k_cache_ptr": "*fp16", "v_cache_ptr": "*fp16", "out_ptr": "*fp16",
    "ws_o_ptr": "*fp32", "ws_lse_ptr": "*fp32", "items_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
    "seq_lens_ptr": "*i32", "block_table_ptr": "*i32", "is_tree_ptr": "*i8", "ancestors_ptr": "*i32",
    "positions_ptr": "*i32", "qk_scale": "fp32", "softcap_log2e": "fp32", "window": "i32",
    "stride_qt": "i32", "stride_qh": "i32", "stride_kb": "i64", "stride_ks": "i32", "stride_kh": "i32",
    "stride_vb": "i64", "stride_vs": "i32", "stride_vh": "i32", "stride_ot": "i32", "stride_oh": "i32",
    "stride_bt": "i32", "stride_anc": "i32", "num_q_heads": "i32",
}


@gpu_compile_check(
    _ATTN_SIGNATURE, _attention_launches, HEAD_DIM=128, HEAD_DIM_PAD=128, GROUP=4, PAGE_SIZE=16,
    PREFILL_BLOCK_M=128, PREFILL_BLOCK_N=32, DECODE_BLOCK_M=64, DECODE_BLOCK_N=32,
    HAS_TREE=True, HAS_WINDOW=True, HAS_SOFTCAP=True, **LAYOUT,
)
@triton.jit
def mixed_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, ws_o_ptr, ws_lse_ptr, items_ptr,
    cu_seqlens_q_ptr, seq_lens_ptr, block_table_ptr, is_tree_ptr, ancestors_ptr, positions_ptr,
    qk_scale, softcap_log2e, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_anc, num_q_heads,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, GROUP: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PREFILL_BLOCK_M: tl.constexpr, PREFILL_BLOCK_N: tl.constexpr,
    DECODE_BLOCK_M: tl.constexpr, DECODE_BLOCK_N: tl.constexpr,
    HAS_TREE: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ITEM_FIELDS: tl.constexpr, PREFILL: tl.constexpr, ITEM_REQ: tl.constexpr, ITEM_KV_HEAD: tl.constexpr,
    ITEM_CLASS: tl.constexpr, ITEM_Q_START: tl.constexpr, ITEM_KV_START: tl.constexpr, ITEM_KV_END: tl.constexpr,
    ITEM_WS_ROW: tl.constexpr,
):
    item = items_ptr + tl.program_id(0) * ITEM_FIELDS  # columns: see tkernels.attention.plan.ITEM_FIELDS
    req = tl.load(item + ITEM_REQ)
    kv_head = tl.load(item + ITEM_KV_HEAD)
    tile_class = tl.load(item + ITEM_CLASS)
    q_start = tl.load(item + ITEM_Q_START)
    kv_start = tl.load(item + ITEM_KV_START)
    kv_end = tl.load(item + ITEM_KV_END)
    ws_row = tl.load(item + ITEM_WS_ROW)
    token0 = tl.load(cu_seqlens_q_ptr + req)
    q_len = tl.load(cu_seqlens_q_ptr + req + 1) - token0
    prefix = tl.load(seq_lens_ptr + req) - q_len
    if tile_class == PREFILL:
        _attend_tile(
            q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, ws_o_ptr, ws_lse_ptr,
            block_table_ptr, is_tree_ptr, ancestors_ptr, positions_ptr,
            req, kv_head, q_start, kv_start, kv_end, ws_row, token0, q_len, prefix,
            qk_scale, softcap_log2e, window,
            stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_ot, stride_oh, stride_bt, stride_anc, num_q_heads,
            HEAD_DIM, HEAD_DIM_PAD, GROUP, PAGE_SIZE, PREFILL_BLOCK_M, PREFILL_BLOCK_N,
            HAS_TREE, HAS_WINDOW, HAS_SOFTCAP,
        )
    else:
        _attend_tile(
            q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, ws_o_ptr, ws_lse_ptr,
            block_table_ptr, is_tree_ptr, ancestors_ptr, positions_ptr,
            req, kv_head, q_start, kv_start, kv_end, ws_row, token0, q_len, prefix,
            qk_scale, softcap_log2e, window,
            stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_ot, stride_oh, stride_bt, stride_anc, num_q_heads,
            HEAD_DIM, HEAD_DIM_PAD, GROUP, PAGE_SIZE, DECODE_BLOCK_M, DECODE_BLOCK_N,
            HAS_TREE, HAS_WINDOW, HAS_SOFTCAP,
        )


def _merge_heads(num_q_heads: int, head_dim_pad: int) -> int:
    # Query heads per merge program: the [heads, head_dim] fp32 accumulator and one split's
    # outputs stay in registers at 1024 elements each (4 warps; all heads of a token in one
    # program spilled from 64 heads x 128 up, 2048 elements by 4 B on sm_80).
    return min(next_power_of_2(num_q_heads), max(1, 1024 // head_dim_pad))


def _merge_launches(shared_limit: int | None):
    """The split-KV merge as :func:`mixed_attention` launches it: each output dtype x head_dim
    64/128/256 with 32 query heads (Llama-3-8B, Qwen2.5), and 2 heads (less than a block)."""
    from tkernels.registry import Launch

    for name in _DTYPES.values():
        for heads, head_dim in ((32, 64), (32, 128), (32, 256), (2, 128)):
            head_dim_pad = next_power_of_2(head_dim)
            block = _merge_heads(heads, head_dim_pad)
            yield Launch(f"{name} d{head_dim} {block} of {heads} heads",
                         dict(HEADS_BLOCK=block, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, **MERGE_LAYOUT),
                         types={"out_ptr": f"*{name}"})


@gpu_compile_check(
    {"out_ptr": "*fp16", "ws_o_ptr": "*fp32", "ws_lse_ptr": "*fp32", "merge_ptr": "*i32",
     "stride_ot": "i32", "stride_oh": "i32", "num_q_heads": "i32"},
    _merge_launches, HEADS_BLOCK=8, HEAD_DIM=128, HEAD_DIM_PAD=128, **MERGE_LAYOUT,
)
@triton.jit
def merge_split_kv_kernel(
    out_ptr, ws_o_ptr, ws_lse_ptr, merge_ptr, stride_ot, stride_oh, num_q_heads,
    HEADS_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, MERGE_FIELDS: tl.constexpr,
    MERGE_TOKEN: tl.constexpr, MERGE_WS_ROW: tl.constexpr, MERGE_ROW_STRIDE: tl.constexpr, MERGE_SPLITS: tl.constexpr,
):
    # Program (merge entry, head block): HEADS_BLOCK query heads of one split token.
    entry = merge_ptr + tl.program_id(0) * MERGE_FIELDS  # columns: see tkernels.attention.plan.MERGE_FIELDS
    token = tl.load(entry + MERGE_TOKEN)
    row0 = tl.load(entry + MERGE_WS_ROW)
    row_stride = tl.load(entry + MERGE_ROW_STRIDE)
    num_splits = tl.load(entry + MERGE_SPLITS)
    heads = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_valid = heads < num_q_heads
    mask = head_valid[:, None] & (dims < HEAD_DIM)[None, :]
    m = tl.full([HEADS_BLOCK], float("-inf"), tl.float32)
    total = tl.zeros([HEADS_BLOCK], tl.float32)
    acc = tl.zeros([HEADS_BLOCK, HEAD_DIM_PAD], tl.float32)
    for split in range(num_splits):
        ws_rows = (row0 + split * row_stride).to(tl.int64) * num_q_heads + heads
        lse = tl.load(ws_lse_ptr + ws_rows, mask=head_valid, other=float("-inf"))
        o = tl.load(ws_o_ptr + ws_rows[:, None] * HEAD_DIM + dims[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        weight = tl.exp2(lse - m_safe)
        total = total * alpha + weight
        acc = acc * alpha[:, None] + weight[:, None] * o
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    out_rows = token.to(tl.int64) * stride_ot + heads * stride_oh
    tl.store(out_ptr + out_rows[:, None] + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
