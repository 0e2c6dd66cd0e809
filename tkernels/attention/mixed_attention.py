"""Mixed-batch paged attention: prefill chunks, decodes and speculation trees in one launch.

Inputs follow vLLM: queries ``q [T, Hq, D]`` packed request after request (``cu_seqlens_q``),
a paged K/V cache ``[num_blocks, block_size, Hkv, D]`` addressed through
``block_table [B, max_blocks]``, and ``seq_lens [B]`` = context length INCLUDING the request's
new tokens, whose K/V are already in the cache (key ``prefix + i`` belongs to new token ``i``,
``prefix = seq_len - query_len``).

Visibility. Every query token sees the whole cached prefix. Among the request's new tokens an
ordinary request is causal (token i sees new tokens 0..i); a request flagged in ``is_tree`` is a
speculation tree (``tree_parents`` holds its nodes' local parents, BFS order, parent[0] = -1,
at most ``MAX_TREE_NODES`` = 256 nodes) and node i sees exactly its ancestors and itself. Positions: token i of a causal
request sits at ``prefix + i``, tree node i at ``prefix + depth(i)``. An optional sliding
``window`` keeps keys with ``query_pos - key_pos < window``; an optional ``softcap`` maps a
scaled logit s to ``softcap * tanh(s / softcap)``.

Design.

* Plan (:func:`plan_mixed_attention`, built on the host from ``cu_seqlens_q``/``seq_lens``, once
  per step and shareable by every layer): each request is a *prefill* request (more than
  ``decode_max_q`` new tokens; compute-bound) or a *decode* request (decodes and trees;
  bandwidth-bound). Work items are (request, KV head, query tile, KV range). A tile packs
  ``BLOCK_M // group`` query tokens times the ``group = Hq / Hkv`` query heads sharing one KV
  head, so every K/V tile loaded feeds all heads of its group (GQA packing). Prefill tiles use
  (``prefill_block_m``, ``prefill_block_n``), skip keys beyond the tile's causal frontier and
  before its window. Decode tiles use (``decode_block_m``, ``decode_block_n``), the M size
  shrunk to the batch's longest decode/tree query so a pure decode batch runs 16-row tiles;
  when the batch has too few items to fill the GPU (``2 * SM count``) their context is split
  into chunks of at least ``min_split_keys`` keys (split-KV). Items are ordered by FlashInfer's
  cost estimate ``2 * tile_rows + kv_len``, largest first, so long prefill tiles start in the
  first wave and short decode tiles fill the tail (longest-processing-time list scheduling over
  the hardware's in-order block dispatch).
* One launch of :func:`mixed_attention_kernel` runs every item, one program per item in plan
  order (not a persistent grid); the class picks one of two tile shapes compiled into the same
  kernel (POD-style). Registers are allocated for the larger shape, so a batch of one class
  compiles its shape into both branches. Scores use ``tl.dot`` with fp32 accumulation and
  ``exp2`` with ``scale * log2(e)`` folded in; key tiles wholly inside the cached prefix skip
  the mask. K/V rows are gathered through the block table per key, so any block size works
  with any BLOCK_N.
* Split items write fp32 partial outputs and log-sum-exps to a workspace; a second small launch
  (:func:`merge_split_kv_kernel`) merges them per token.

Tile shapes, warps, stages and split parameters come from
``tkernels.config.launch_config("mixed_attention", ...)``. The defaults
(:func:`default_config`) are unmeasured starting points (written before any GPU run), chosen
only so that the tiles compile without register spills; ``tkernels autotune`` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import triton
import triton.language as tl

from tkernels.checks import fail as _fail
from tkernels.checks import integer, real
from tkernels.config import launch_config
from tkernels.registry import gpu_compile_check
from tkernels.spec.tree import MAX_TREE_NODES, ancestor_bits, ancestor_words, depths, validate_parents

LOG2E = 1.4426950408889634

PREFILL, DECODE = 0, 1
# Columns of a plan's item table (int32 [num_items, ITEM_FIELDS]).
ITEM_FIELDS = 8  # req, kv_head, class, q_start, kv_start, kv_end, ws_row, unused (alignment)
# Columns of a plan's merge table (int32 [num_split_tokens, MERGE_FIELDS]).
MERGE_FIELDS = 4  # token, first workspace row, row stride between splits, number of splits

DEFAULT_CONFIG: dict[str, Any] = {
    "prefill_block_m": 128,  # query rows (tokens x group heads) per prefill tile
    # K/V tiles are gathered through the block table with one 64-bit address per element, so
    # BLOCK_N costs registers fast: at head_dim 128, 64-key tiles spill (ptxas, sm_90), 32 do not.
    "prefill_block_n": 32,
    "decode_block_m": 64,  # upper bound; shrunk to the batch's longest decode/tree query
    "decode_block_n": 32,
    "decode_max_q": 64,  # requests with at most this many new tokens use decode tiles
    "min_split_keys": 512,  # split-KV chunks hold at least this many keys
    "max_splits": 32,
    "num_warps": 8,  # shared by both tile classes; a 128x128 fp32 accumulator needs 8 warps
    "num_stages": 2,
}


def search_space(dry_run: bool, quick: bool) -> dict[str, list[dict[str, int]]]:
    """The configs ``tkernels autotune`` tries, per tuning stage (decode-only, prefill-only and
    mixed batches, tuned in that order, each over the best of the stages before): a few tiny
    tiles for a CPU dry run, fewer for ``--quick``."""
    if dry_run:
        return {"decode": [{"decode_block_n": n} for n in (16, 32)],
                "prefill": [{"prefill_block_m": 32, "prefill_block_n": n} for n in (16, 32)],
                "mix": [{"num_warps": 4, "num_stages": 2}]}
    block_n = (32, 64, 128)
    return {
        "decode": [{"decode_block_n": n, "min_split_keys": s} for n in block_n
                   for s in ((512,) if quick else (256, 512, 1024))],
        "prefill": [{"prefill_block_m": m, "prefill_block_n": n} for m in (64, 128) for n in block_n],
        "mix": [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in ((2,) if quick else (2, 3))],
    }


def default_config(head_dim: int, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_CONFIG` adjusted to the head size and the input dtype (register budget of
    one tile; ``dtype`` None: 16-bit inputs)."""
    if dtype == torch.float32 and head_dim <= 128:
        # fp32 K/V tiles take twice the registers: the 16-bit tiles spill on sm_80 (Triton 3.6:
        # 544-680 B at head_dim 64 and 128, 112 B on sm_90 at 64 with trees); these do not.
        tiles = (64, 32) if head_dim <= 64 else (32, 32)
        return {**DEFAULT_CONFIG, "prefill_block_m": tiles[0], "prefill_block_n": tiles[1],
                "decode_block_m": tiles[0], "decode_block_n": tiles[1]}
    if head_dim <= 64:
        return {**DEFAULT_CONFIG, "prefill_block_n": 64, "decode_block_n": 64}
    if head_dim > 128:
        # 64 x 32 tiles spill at head_dim 256 (sm_90, Triton 3.6: 292-360 B) and, with fp32
        # inputs, need 328 KB of shared memory; 32 x 16 tiles do neither (fp32: 98 KB).
        return {**DEFAULT_CONFIG, "prefill_block_m": 32, "prefill_block_n": 16, "decode_block_m": 32,
                "decode_block_n": 16}
    return dict(DEFAULT_CONFIG)


_DUMMY_SMS = 132  # SM count assumed when planning without a GPU (H100 SXM)


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


def shared_memory_estimate(config: dict[str, Any], head_dim: int) -> int:
    """Bytes of shared memory :func:`mixed_attention_kernel` allocates for a 16-bit launch of
    ``config`` (tile sizes after planning), an estimate that ``tkernels autotune`` uses to skip
    candidates that cannot launch on the GPU, before compiling them.

    Per tile class (M query rows, N keys, D = head_dim padded to a power of two): the larger of
    the fp32 accumulator's layout conversion (M x D x 4) and the dot operands staged in shared
    memory (Q: M x D, K and V: 2 x N x D, 2 bytes each), with a 25 % margin; the kernel needs the
    larger class's (the branches never run together). ``num_stages`` does not multiply it: the
    K/V rows are gathered through the block table, so the loads are not pipelined. Fitted on
    Triton 3.6 and 3.9 compiles for sm_80 and sm_90; the compile check (``python -m
    tkernels.registry --candidates``) fails when a compile needs more than this.
    """
    d = triton.next_power_of_2(head_dim)

    def tile(m: int, n: int) -> int:
        return max(m * d * 4, (m + 2 * n) * d * 2)

    need = max(tile(config["prefill_block_m"], config["prefill_block_n"]),
               tile(config["decode_block_m"], config["decode_block_n"]))
    return need * 5 // 4


_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
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
        constexprs=dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), GROUP=_CHECK_GROUP,
                        PAGE_SIZE=16, PREFILL_BLOCK_M=cfg["prefill_block_m"], PREFILL_BLOCK_N=cfg["prefill_block_n"],
                        DECODE_BLOCK_M=cfg["decode_block_m"], DECODE_BLOCK_N=cfg["decode_block_n"],
                        HAS_TREE=features, HAS_WINDOW=features, HAS_SOFTCAP=features),
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
    HAS_TREE=True, HAS_WINDOW=True, HAS_SOFTCAP=True,
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
):
    item = items_ptr + tl.program_id(0) * 8  # ITEM_FIELDS
    req = tl.load(item)
    kv_head = tl.load(item + 1)
    tile_class = tl.load(item + 2)
    q_start = tl.load(item + 3)
    kv_start = tl.load(item + 4)
    kv_end = tl.load(item + 5)
    ws_row = tl.load(item + 6)
    token0 = tl.load(cu_seqlens_q_ptr + req)
    q_len = tl.load(cu_seqlens_q_ptr + req + 1) - token0
    prefix = tl.load(seq_lens_ptr + req) - q_len
    if tile_class == 0:  # PREFILL
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
    return min(triton.next_power_of_2(num_q_heads), max(1, 1024 // head_dim_pad))


def _merge_launches(shared_limit: int | None):
    """The split-KV merge as :func:`mixed_attention` launches it: each output dtype x head_dim
    64/128/256 with 32 query heads (Llama-3-8B, Qwen2.5), and 2 heads (less than a block)."""
    from tkernels.registry import Launch

    for name in _DTYPES.values():
        for heads, head_dim in ((32, 64), (32, 128), (32, 256), (2, 128)):
            head_dim_pad = triton.next_power_of_2(head_dim)
            block = _merge_heads(heads, head_dim_pad)
            yield Launch(f"{name} d{head_dim} {block} of {heads} heads",
                         dict(HEADS_BLOCK=block, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad),
                         types={"out_ptr": f"*{name}"})


@gpu_compile_check(
    {"out_ptr": "*fp16", "ws_o_ptr": "*fp32", "ws_lse_ptr": "*fp32", "merge_ptr": "*i32",
     "stride_ot": "i32", "stride_oh": "i32", "num_q_heads": "i32"},
    _merge_launches, HEADS_BLOCK=8, HEAD_DIM=128, HEAD_DIM_PAD=128,
)
@triton.jit
def merge_split_kv_kernel(
    out_ptr, ws_o_ptr, ws_lse_ptr, merge_ptr, stride_ot, stride_oh, num_q_heads,
    HEADS_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
):
    # Program (merge entry, head block): HEADS_BLOCK query heads of one split token.
    entry = merge_ptr + tl.program_id(0) * 4  # MERGE_FIELDS
    token = tl.load(entry)
    row0 = tl.load(entry + 1)
    row_stride = tl.load(entry + 2)
    num_splits = tl.load(entry + 3)
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


@dataclass(frozen=True)
class MixedAttentionPlan:
    """Per-step schedule shared by every layer (same batch, block table and tree shapes)."""

    items: torch.Tensor  # int32 [num_items, ITEM_FIELDS], in launch order
    merge: torch.Tensor  # int32 [num_split_tokens, MERGE_FIELDS]
    ws_rows: int  # workspace rows (token x split) for split-KV partials
    has_tree: bool  # some request is a tree
    is_tree: torch.Tensor  # int8 [B]
    ancestors: torch.Tensor  # int64 [T, words]: ancestor-or-self bits of tree nodes (0 elsewhere), see ancestor_bits
    positions: torch.Tensor  # int32 [T]: position of each query token
    num_tokens: int
    batch: int
    num_q_heads: int
    num_kv_heads: int
    window: int | None
    config: dict[str, Any]  # final tile shapes and launch parameters
    trees: tuple[torch.Tensor, torch.Tensor] | None = None  # (tree_parents, is_tree) as planned, else None


def _check_int_vector(t: Any, arg: str, length: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.dim() != 1:
        _fail(arg, f"must be a 1-D int32 tensor, got {t.dtype} with shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        _fail(arg, f"must have {length} entries, got {t.numel()}")
    if not t.is_contiguous():
        _fail(arg, "must be contiguous")


def plan_mixed_attention(
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    tree_parents: torch.Tensor | None = None,
    is_tree: torch.Tensor | None = None,
    window: int | None = None,
    config: dict[str, Any] | None = None,
    num_sms: int | None = None,
    num_tokens: int | None = None,
    dtype: torch.dtype | None = None,
) -> MixedAttentionPlan:
    """Validate the batch description and schedule it (one host read of the small index tensors).

    ``config`` overrides entries of the tuned/default launch config; ``dtype`` (q/K/V's element
    type; None: 16-bit) picks the default tiles (:func:`default_config`); ``num_sms`` overrides the
    SM count used to decide split-KV (default: the current GPU's, else 132); ``num_tokens``
    (q's length) is checked against ``cu_seqlens_q``.
    """
    _check_int_vector(cu_seqlens_q, "cu_seqlens_q")
    if dtype is not None and dtype not in _DTYPES:
        _fail("dtype", f"must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    if cu_seqlens_q.numel() < 1:
        _fail("cu_seqlens_q", "must have B + 1 >= 1 entries")
    B = cu_seqlens_q.numel() - 1
    _check_int_vector(seq_lens, "seq_lens", B)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        _fail("block_table", "must be a 2-D int32 tensor [B, max_blocks]")
    if block_table.shape[0] != B:
        _fail("block_table", f"must have {B} rows (one per request), got {block_table.shape[0]}")
    if block_table.stride(1) != 1:
        _fail("block_table", "rows must be contiguous")
    for arg, t in (("seq_lens", seq_lens), ("block_table", block_table)):
        if t.device != cu_seqlens_q.device:
            _fail(arg, f"must be on {cu_seqlens_q.device} like cu_seqlens_q, got {t.device}")
    if num_q_heads <= 0 or num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        _fail("num_q_heads", f"must be a positive multiple of num_kv_heads={num_kv_heads}, got {num_q_heads}")
    window = _check_window(window)
    device = cu_seqlens_q.device

    cu = cu_seqlens_q.cpu().long()
    ctx = seq_lens.cpu().long()
    if B and cu[0] != 0:
        _fail("cu_seqlens_q", f"must start at 0, got {int(cu[0])}")
    q_len = cu[1:] - cu[:-1]
    if (q_len < 0).any():
        _fail("cu_seqlens_q", "must be non-decreasing")
    T = int(cu[-1])
    if num_tokens is not None and T != num_tokens:
        _fail("cu_seqlens_q", f"ends at {T} but q holds {num_tokens} tokens")
    if (ctx < q_len).any():
        r = int((ctx < q_len).nonzero()[0])
        _fail("seq_lens", f"request {r} has seq_len {int(ctx[r])} < its {int(q_len[r])} new tokens")
    max_blocks_needed = (ctx + block_size - 1) // block_size
    if B and int(max_blocks_needed.max()) > block_table.shape[1]:
        _fail("block_table", f"has {block_table.shape[1]} columns, seq_lens need up to {int(max_blocks_needed.max())}")
    if B and block_table.shape[1]:
        # Checked where the table lives: only one flag crosses to the host.
        needed = max_blocks_needed.to(device)
        used = torch.arange(block_table.shape[1], device=device)[None, :] < needed[:, None]
        if (used & ((block_table < 0) | (block_table >= num_blocks))).any():
            _fail("block_table", f"holds block ids outside [0, {num_blocks}) within seq_lens")

    # Trees: validate parents, derive ancestor bits and positions.
    token_req = torch.repeat_interleave(torch.arange(B), q_len)
    local = torch.arange(T) - cu[:-1][token_req]
    prefix = ctx - q_len
    positions = prefix[token_req] + local
    ancestors = torch.zeros((T, 1), dtype=torch.int64)
    tree_req = torch.zeros(B, dtype=torch.bool)
    if (tree_parents is None) != (is_tree is None):
        _fail("tree_parents" if tree_parents is None else "is_tree", "tree_parents and is_tree go together")
    if tree_parents is not None:
        _check_int_vector(tree_parents, "tree_parents", T)
        if not isinstance(is_tree, torch.Tensor) or is_tree.dtype != torch.bool or is_tree.shape != (B,):
            _fail("is_tree", f"must be a bool tensor of shape ({B},)")
        for arg, t in (("tree_parents", tree_parents), ("is_tree", is_tree)):
            if t.device != device:
                _fail(arg, f"must be on {device} like cu_seqlens_q, got {t.device}")
        tree_req = is_tree.cpu()
        if (q_len[tree_req] > MAX_TREE_NODES).any():
            _fail("tree_parents", f"trees hold at most {MAX_TREE_NODES} nodes")
        # The spec contract's own checks and derivations, on the tree requests' tokens only.
        tree_token = tree_req[token_req]
        parents = tree_parents.cpu()[tree_token]
        cu_trees = torch.nn.functional.pad(torch.cumsum(q_len[tree_req & (q_len > 0)], 0), (1, 0))
        if parents.numel():
            try:
                validate_parents(parents, cu_trees)
            except ValueError as err:
                _fail("tree_parents", f"tree requests must hold BFS trees: {err}")
            words = ancestor_words(int(q_len[tree_req].max()))
            ancestors = torch.zeros((T, words), dtype=torch.int64)
            ancestors[tree_token] = ancestor_bits(parents, cu_trees, words)
            positions[tree_token] = prefix[token_req][tree_token] + depths(parents, cu_trees).long()

    cfg = _launch_config(num_q_heads // num_kv_heads, head_dim, block_size, q_len, dtype, config)
    items, merge, ws_rows = _schedule(cfg, q_len, ctx, tree_req, num_kv_heads, num_q_heads // num_kv_heads,
                                      window, num_sms or _num_sms(device))
    _one_class_tiles(cfg, set(items[:, 2].tolist()))
    return MixedAttentionPlan(
        items=items.to(device), merge=merge.to(device), ws_rows=ws_rows, has_tree=bool(tree_req.any()),
        is_tree=tree_req.to(torch.int8).to(device), ancestors=ancestors.to(device),
        positions=positions.to(torch.int32).to(device), num_tokens=T, batch=B,
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, window=window, config=cfg,
        trees=None if tree_parents is None else (tree_parents, is_tree),
    )


def _check_window(window: Any) -> int | None:
    return None if window is None else integer("window", window, minimum=1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DUMMY_SMS


def _launch_config(group: int, head_dim: int, block_size: int, q_len: torch.Tensor, dtype: torch.dtype | None,
                   override: dict | None) -> dict[str, Any]:
    # A tuned bucket (measured in bf16) replaces the defaults for every dtype.
    cfg = launch_config("mixed_attention", {"head_dim": head_dim, "group": group, "block_size": block_size},
                        default_config(head_dim, dtype), override)
    min_rows = triton.next_power_of_2(group)
    cfg["prefill_block_m"] = max(cfg["prefill_block_m"], min_rows)
    # A decode tile only needs as many rows as the longest decode/tree query fills (>= 16 for tl.dot).
    decode_q = q_len[(q_len > 0) & (q_len <= cfg["decode_max_q"])]
    longest = int(decode_q.max()) if decode_q.numel() else 1
    cfg["decode_block_m"] = max(min(cfg["decode_block_m"], triton.next_power_of_2(group * longest)), 16, min_rows)
    return cfg


def _one_class_tiles(cfg: dict[str, Any], classes: set[int]) -> None:
    """Registers are allocated for the larger of the two compiled tile shapes: a batch with one
    class only compiles that shape into both branches, so it runs at that shape's occupancy."""
    if classes == {DECODE}:
        cfg["prefill_block_m"], cfg["prefill_block_n"] = cfg["decode_block_m"], cfg["decode_block_n"]
    elif classes == {PREFILL}:
        cfg["decode_block_m"], cfg["decode_block_n"] = cfg["prefill_block_m"], cfg["prefill_block_n"]


def _schedule(cfg, q_len, ctx, tree_req, num_kv_heads, group, window, num_sms):
    """Work items (see ITEM_FIELDS) ordered by cost, the merge table and the workspace size."""
    B = q_len.numel()
    prefill = q_len > cfg["decode_max_q"]
    block_m = torch.where(prefill, cfg["prefill_block_m"], cfg["decode_block_m"])
    block_n = torch.where(prefill, cfg["prefill_block_n"], cfg["decode_block_n"])
    block_q = block_m // group
    q_tiles = (q_len + block_q - 1) // block_q
    prefix = ctx - q_len
    # Split-KV only for decode requests, and only as far as needed to fill the GPU.
    base_items = int((q_tiles * num_kv_heads).sum())
    wanted = max(1, -(-2 * num_sms // max(base_items, 1)))
    lo_req = torch.zeros(B, dtype=torch.long) if window is None else (prefix - window + 1).clamp(min=0) // block_n * block_n
    span = ctx - lo_req
    splits = torch.minimum(torch.full_like(span, min(wanted, cfg["max_splits"])),
                           (span + cfg["min_split_keys"] - 1) // cfg["min_split_keys"]).clamp(min=1)
    splits = torch.where(prefill | (q_len == 0), torch.ones_like(splits), splits)
    split_len = ((span + splits - 1) // splits + block_n - 1) // block_n * block_n
    splits = torch.where(split_len > 0, (span + split_len - 1) // split_len.clamp(min=1), splits).clamp(min=1)
    split_len = torch.where(splits > 1, split_len, span.clamp(min=1))

    per_req = q_tiles * splits * num_kv_heads
    req = torch.repeat_interleave(torch.arange(B), per_req)
    idx = torch.arange(req.numel()) - (torch.cumsum(per_req, 0) - per_req)[req]
    kv_head = idx % num_kv_heads
    rest = idx // num_kv_heads
    split = rest % splits[req]
    q_start = rest // splits[req] * block_q[req]
    first_pos = torch.where(tree_req[req], prefix[req], prefix[req] + q_start)
    tile_lo = torch.zeros_like(first_pos) if window is None else (first_pos - window + 1).clamp(min=0) // block_n[req] * block_n[req]
    # Causal or tree, a tile's last key is its last token's own: a node's ancestors precede it.
    tile_hi = torch.minimum(ctx[req], prefix[req] + q_start + block_q[req])
    kv_start = torch.maximum(tile_lo, lo_req[req] + split * split_len[req])
    kv_end = torch.minimum(tile_hi, lo_req[req] + (split + 1) * split_len[req])
    kv_end = torch.maximum(kv_end, kv_start)

    is_split = splits > 1
    ws_first = torch.cumsum(torch.where(is_split, splits * q_len, 0), 0) - torch.where(is_split, splits * q_len, 0)
    ws_row = torch.where(is_split[req], ws_first[req] + split * q_len[req] + q_start, -1)
    cls = torch.where(prefill[req], PREFILL, DECODE)
    items = torch.stack([req, kv_head, cls, q_start, kv_start, kv_end, ws_row, torch.zeros_like(req)], 1)
    cost = 2 * block_m[req] + (kv_end - kv_start)
    items = items[torch.argsort(-cost, stable=True)].to(torch.int32)

    split_reqs = is_split.nonzero().flatten()
    m_req = torch.repeat_interleave(split_reqs, q_len[split_reqs])
    m_local = torch.arange(m_req.numel()) - (torch.cumsum(q_len[split_reqs], 0) - q_len[split_reqs]).repeat_interleave(q_len[split_reqs])
    cu = torch.cumsum(q_len, 0) - q_len
    merge = torch.stack([cu[m_req] + m_local, ws_first[m_req] + m_local, q_len[m_req], splits[m_req]], 1).to(torch.int32)
    ws_rows = int((splits * q_len)[is_split].sum())
    return items.contiguous(), merge.contiguous(), ws_rows


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
    head_dim_pad = triton.next_power_of_2(D)
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
        HAS_SOFTCAP=softcap is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if plan.merge.shape[0]:
        heads = _merge_heads(Hq, head_dim_pad)
        merge_split_kv_kernel[(plan.merge.shape[0], triton.cdiv(Hq, heads))](
            out, ws_o, ws_lse, plan.merge, out.stride(0), out.stride(1), Hq,
            HEADS_BLOCK=heads, HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad,
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
    """Plain-PyTorch fp32 reference: one request at a time, K/V gathered through the block table."""
    _T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    scale = D ** -0.5 if scale is None else scale
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
