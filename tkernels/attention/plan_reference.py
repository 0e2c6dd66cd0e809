"""Plain-PyTorch reference of host planning: the derivations that
:mod:`tkernels.attention.plan_compiled`'s loops compute for
:func:`~tkernels.attention.plan.describe_batch` (every token's request and position, the trees'
ancestor bits: :func:`layout_reference`) and for
:func:`~tkernels.attention.plan.plan_mixed_attention` (work items, merge table, workspace rows:
:func:`schedule_reference`), written as vectorised torch over the batch. Readable, and ~1 ms
of host time per step at a serving batch (dozens of small ops): ``tests/test_attention_plan.py``
asserts that the compiled planner returns identical tables."""

from __future__ import annotations

import torch

from tkernels.attention.plan import (
    DECODE,
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
)
from tkernels.checks import fail as _fail
from tkernels.spec.tree import ancestor_bits, ancestor_words, depths, validate_parents

__all__ = ["layout_reference", "schedule_reference"]


def layout_reference(cu: torch.Tensor, ctx: torch.Tensor, tree_req: torch.Tensor | None = None,
                     tree_parents: torch.Tensor | None = None, tree_depths: torch.Tensor | None = None,
                     checked: bool = False):
    """``(token_req int64[T], positions int64[T], tree_token bool[T], ancestors int64[T, words])``
    of a checked batch (``cu`` int64 [B + 1], ``ctx`` int64 [B], on the host), its trees
    (``tree_req`` bool [B], ``tree_parents`` [T]; None: no trees) validated unless ``checked``;
    ``tree_depths``: every token's depth where the caller has them (else derived)."""
    B = ctx.numel()
    q_len = cu[1:] - cu[:-1]
    T = int(cu[-1])
    token_req = torch.repeat_interleave(torch.arange(B), q_len)
    local = torch.arange(T) - cu[:-1][token_req]
    prefix = ctx - q_len
    positions = prefix[token_req] + local
    ancestors = torch.zeros((T, 1), dtype=torch.int64)
    tree_token = torch.zeros(T, dtype=torch.bool)
    if tree_parents is not None:
        tree_token = tree_req[token_req]
        parents = tree_parents[tree_token]
        cu_trees = torch.nn.functional.pad(torch.cumsum(q_len[tree_req & (q_len > 0)], 0), (1, 0))
        if parents.numel():
            try:
                if not checked:
                    validate_parents(parents, cu_trees)
            except ValueError as err:
                _fail("tree_parents", f"tree requests must hold BFS trees: {err}")
            words = ancestor_words(int(q_len[tree_req].max()))
            ancestors = torch.zeros((T, words), dtype=torch.int64)
            ancestors[tree_token] = ancestor_bits(parents, cu_trees, words)
            node_depths = depths(parents, cu_trees) if tree_depths is None else tree_depths[tree_token]
            positions[tree_token] = prefix[token_req][tree_token] + node_depths.long()
    return token_req, positions, tree_token, ancestors


def schedule_reference(cfg, q_len, ctx, tree_req, num_kv_heads, group, window, num_sms):
    """Work items (see ITEM_FIELDS) ordered by cost, the merge table and the workspace size,
    from int64 ``q_len``/``ctx`` [B] and bool ``tree_req`` [B] (host tensors) and the launch
    config before :func:`~tkernels.attention.plan._one_class_tiles`."""
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
    columns = {ITEM_REQ: req, ITEM_KV_HEAD: kv_head, ITEM_CLASS: cls, ITEM_Q_START: q_start, ITEM_KV_START: kv_start,
               ITEM_KV_END: kv_end, ITEM_WS_ROW: ws_row}
    items = torch.stack([columns.get(c, torch.zeros_like(req)) for c in range(ITEM_FIELDS)], 1)
    cost = 2 * block_m[req] + (kv_end - kv_start)
    items = items[torch.argsort(-cost, stable=True)].to(torch.int32)

    split_reqs = is_split.nonzero().flatten()
    m_req = torch.repeat_interleave(split_reqs, q_len[split_reqs])
    m_local = torch.arange(m_req.numel()) - (torch.cumsum(q_len[split_reqs], 0) - q_len[split_reqs]).repeat_interleave(q_len[split_reqs])
    cu = torch.cumsum(q_len, 0) - q_len
    columns = {MERGE_TOKEN: cu[m_req] + m_local, MERGE_WS_ROW: ws_first[m_req] + m_local, MERGE_ROW_STRIDE: q_len[m_req],
               MERGE_SPLITS: splits[m_req]}
    merge = torch.stack([columns[c] for c in range(MERGE_FIELDS)], 1).to(torch.int32)
    ws_rows = int((splits * q_len)[is_split].sum())
    return items.contiguous(), merge.contiguous(), ws_rows
