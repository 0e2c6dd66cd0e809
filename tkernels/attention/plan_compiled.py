"""The compiled loops of host planning (numba, ``cache=True``, one host thread): a batch's
per-token layout and trees (:func:`batch_layout`, for :func:`~tkernels.attention.plan.describe_batch`)
and its work items and merge table (:func:`schedule`, for
:func:`~tkernels.attention.plan.plan_mixed_attention`).

One step is a few dozen requests of ragged lengths: as vectorised torch ops on such
small arrays, planning cost ~1 ms of host time per step, nearly all of it per-op overhead; as
loops compiled once, ~0.1 ms for the whole plan (64 trees of 32 nodes).
:mod:`tkernels.attention.plan_reference` holds the plain-PyTorch derivations these loops mirror,
and ``tests/test_attention_plan.py`` asserts that both give identical tables on random ragged
batches.

The tables' layout (column indices, the tile classes) is :mod:`tkernels.attention.plan`'s,
passed in as arguments: it is defined there once. Compiled on a machine's first call (about 5 s
on the project's 2-core VM), then loaded from numba's cache (``__pycache__`` or
``NUMBA_CACHE_DIR``): about 0.4 s per process, numba's import included. Imported lazily by
:mod:`tkernels.attention.plan`, so importing tkernels does not load numba.
"""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit

__all__ = ["batch_layout", "schedule"]


@njit(cache=True)
def batch_layout(cu, ctx, tree_req, parents, tree_depths, has_depths, words):
    """Every token's request and position, and the trees' ancestor bits.

    ``cu`` int64 [B + 1] (checked: starts at 0, non-decreasing), ``ctx`` int64 [B] (>= the new
    tokens), ``tree_req`` bool [B], ``parents`` int64 [T] (local parents; read on tree requests'
    tokens only, empty when there are no trees), ``tree_depths`` int64 [T] (every token's depth,
    read where ``has_depths``), ``words``: 64-bit words per ancestor row.

    Returns ``(token_req int64[T], positions int64[T], tree_token bool[T], ancestors int64[T,
    words], simple, bfs)``: ``simple`` is False when some tree node's parent is neither -1 nor an
    earlier node of its tree (then its ancestors and depths here are not the contract's: the
    caller derives them with :func:`tkernels.spec.tree.ancestor_bits` and ``depths``); ``bfs``:
    every tree passes :func:`tkernels.spec.tree.validate_parents`'s test (root -1, then ``0 <=
    parents[i] < i``, non-decreasing from node 1).
    """
    B = ctx.shape[0]
    T = cu[B]
    token_req = np.empty(T, np.int64)
    positions = np.empty(T, np.int64)
    tree_token = np.zeros(T, np.bool_)
    ancestors = np.zeros((T, words), np.int64)
    depth = np.zeros(T, np.int64)
    one = np.int64(1)
    simple = True
    bfs = True
    for b in range(B):
        start = cu[b]
        n = cu[b + 1] - start
        prefix = ctx[b] - n
        if not tree_req[b]:
            for i in range(n):
                token_req[start + i] = b
                positions[start + i] = prefix + i
            continue
        for i in range(n):
            t = start + i
            token_req[t] = b
            tree_token[t] = True
            p = parents[t]
            if i == 0:
                bfs = bfs and p == -1
            else:
                bfs = bfs and p >= 0 and p < i and (i < 2 or p >= parents[t - 1])
            if p >= 0 and p < i:  # the parent's row is final: node i sees it, its ancestors and itself
                q = start + p
                depth[t] = depth[q] + 1
                for w in range(words):
                    ancestors[t, w] = ancestors[q, w]
            elif p != -1:
                simple = False
            ancestors[t, i >> 6] |= one << (i & 63)
            positions[t] = prefix + (tree_depths[t] if has_depths else depth[t])
    return token_req, positions, tree_token, ancestors, simple, bfs


@njit(cache=True)
def schedule(q_len, ctx, tree_req, prefill_block_m, prefill_block_n, decode_block_m, decode_block_n, decode_max_q,
             min_split_keys, max_splits, num_kv_heads, group, window, num_sms, item_columns, item_fields,
             merge_columns, merge_fields, prefill_class, decode_class):
    """Work items ordered by cost, the merge table and the workspace rows (as
    :func:`tkernels.attention.plan_reference.schedule_reference`; the module doc of
    :mod:`tkernels.attention.plan` says why each choice).

    ``q_len``, ``ctx`` int64 [B], ``tree_req`` bool [B]; the launch config's entries; ``window``
    -1 for none; ``item_columns``: the item table's columns of (request, KV head, tile class,
    first query row, KV start, KV end, workspace row), ``item_fields`` its width;
    ``merge_columns``: the merge table's columns of (token, first workspace row, row stride,
    splits), ``merge_fields`` its width; the tile classes' values.

    Returns ``(items int32 [num_items, item_fields], merge int32 [num_split_tokens,
    merge_fields], ws_rows)``.
    """
    B = q_len.shape[0]
    H = num_kv_heads
    block_m = np.empty(B, np.int64)
    block_n = np.empty(B, np.int64)
    block_q = np.empty(B, np.int64)
    q_tiles = np.empty(B, np.int64)
    base_items = 0
    for b in range(B):
        if q_len[b] > decode_max_q:
            block_m[b], block_n[b] = prefill_block_m, prefill_block_n
        else:
            block_m[b], block_n[b] = decode_block_m, decode_block_n
        block_q[b] = block_m[b] // group
        q_tiles[b] = (q_len[b] + block_q[b] - 1) // block_q[b]
        base_items += q_tiles[b] * H
    # Split-KV only for decode requests, and only as far as needed to fill the GPU.
    wanted = max(1, (2 * num_sms + max(base_items, 1) - 1) // max(base_items, 1))
    cap = min(wanted, max_splits)
    lo_req = np.zeros(B, np.int64)
    splits = np.empty(B, np.int64)
    split_len = np.empty(B, np.int64)
    ws_first = np.empty(B, np.int64)
    num_items = 0
    ws_rows = 0
    merge_rows = 0
    for b in range(B):
        bn = block_n[b]
        prefix = ctx[b] - q_len[b]
        if window >= 0:
            lo_req[b] = max(prefix - window + 1, 0) // bn * bn
        span = ctx[b] - lo_req[b]
        s = max(min(cap, (span + min_split_keys - 1) // min_split_keys), 1)
        if q_len[b] > decode_max_q or q_len[b] == 0:
            s = 1
        chunk = ((span + s - 1) // s + bn - 1) // bn * bn
        if chunk > 0:
            s = max((span + chunk - 1) // chunk, 1)
        splits[b] = s
        split_len[b] = chunk if s > 1 else max(span, 1)
        ws_first[b] = ws_rows
        if s > 1:
            ws_rows += s * q_len[b]
            merge_rows += q_len[b]
        num_items += q_tiles[b] * s * H

    # Items in request, query tile, split, KV head order, then ordered by cost (stable).
    rows = np.empty((num_items, 7), np.int64)
    cost = np.empty(num_items, np.int64)
    k = 0
    for b in range(B):
        prefix = ctx[b] - q_len[b]
        bq, bn = block_q[b], block_n[b]
        for qt in range(q_tiles[b]):
            q_start = qt * bq
            first_pos = prefix if tree_req[b] else prefix + q_start
            tile_lo = 0 if window < 0 else max(first_pos - window + 1, 0) // bn * bn
            # Causal or tree, a tile's last key is its last token's own: a node's ancestors precede it.
            tile_hi = min(ctx[b], prefix + q_start + bq)
            for split in range(splits[b]):
                kv_start = max(tile_lo, lo_req[b] + split * split_len[b])
                kv_end = max(min(tile_hi, lo_req[b] + (split + 1) * split_len[b]), kv_start)
                ws_row = ws_first[b] + split * q_len[b] + q_start if splits[b] > 1 else -1
                for h in range(H):
                    rows[k, 0], rows[k, 1], rows[k, 2] = b, h, prefill_class if q_len[b] > decode_max_q else decode_class
                    rows[k, 3], rows[k, 4], rows[k, 5], rows[k, 6] = q_start, kv_start, kv_end, ws_row
                    cost[k] = 2 * block_m[b] + (kv_end - kv_start)
                    k += 1
    order = _by_cost(cost)
    items = np.zeros((num_items, item_fields), np.int32)
    for k in range(num_items):
        for c in range(7):
            items[k, item_columns[c]] = rows[order[k], c]

    merge = np.zeros((merge_rows, merge_fields), np.int32)
    m = 0
    token = 0
    for b in range(B):
        if splits[b] > 1:
            for i in range(q_len[b]):
                merge[m, merge_columns[0]] = token + i
                merge[m, merge_columns[1]] = ws_first[b] + i
                merge[m, merge_columns[2]] = q_len[b]
                merge[m, merge_columns[3]] = splits[b]
                m += 1
        token += q_len[b]
    return items, merge, ws_rows


@njit(cache=True)
def _by_cost(cost):
    """Indices of ``cost`` from the largest to the smallest, ties in index order (a stable sort
    of ``-cost``): one sort of unique keys (cost rank, index), cheaper than a merge sort."""
    n = cost.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    top, bottom = cost.max(), cost.min()
    if float(top) - float(bottom) + 1.0 > float((1 << 62) // n):  # keys would overflow: numba's merge sort
        return np.argsort(-cost, kind="mergesort")
    keys = (top - cost) * n + np.arange(n)
    keys.sort()
    return keys % n
