"""The compiled CPU attention loop (numba, ``cache=True``): mixed batches of prefill chunks,
decodes and trees over the paged cache (no gather of a request's context, no padding to a
group's longest context), online softmax in fp32.

:func:`attend` is the kernel; :mod:`tkernels.attention.compiled_path` plans a step's work items
and launches it per layer; :func:`tkernels.attention.mixed_attention_reference` is the reference
it is tested against. A task is a work item (a request's queries) and a group of KV heads; it
walks the request's keys a tile (whole cache blocks) at a time, and each tile's K and V rows of
the group's heads are first packed into head-major fp32 tiles (bf16 caches as their raw 16-bit
patterns, widened exactly: ``bits << 16``), reading each key's slot once, in cache order. vLLM's
physical cache keeps a slot's heads side by side (``[blocks, block_size, kv_heads, 2 * D]``),
so one head's rows read in place are a strided walk over the whole tile, once per head; packed,
the tile is one sequential read per group and every score and value pass runs over contiguous
rows (on the project's 2-core AMD VM, 26 trees of 9 nodes: -13% per layer; 26 decodes: -31%;
docs/step_profile.md, fifth round). A batch of too few tasks to occupy the threads splits each
task's keys into contiguous runs of tiles (split-KV), each part leaving its running maximum,
denominator and unnormalised output in a workspace that a second parallel pass merges per row.
"""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit  # isort: split

from numba import prange  # after tkernels.jit (its llvmlite fix)

from tkernels.compiled_math import FASTMATH, exp_shifted

KEY_TILE = 128  # keys per online-softmax step (whole cache blocks): long vectorised inner loops

__all__ = ["KEY_TILE", "attend", "key_tile"]


def key_tile(block_size: int) -> int:
    """Keys per step of :func:`attend`'s online softmax for a cache of ``block_size`` slots per
    block: whole blocks, about :data:`KEY_TILE`."""
    return max(block_size, (KEY_TILE // block_size) * block_size)


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attend(q, k32, v32, k16, v16, bf16, layout, out, table, items, cu, ctx, tree, ancestors, positions, window, scale,
           softcap, heads_per_task, tile, splits, ws_m, ws_den, ws_acc, order, starts):
    """One layer's attention for every work item, in parallel over tasks: items x groups of
    ``heads_per_task`` KV heads (a divisor of the KV heads) x ``splits`` parts of the item's keys.

    ``q`` float32 [T, Hq, D]; the caches [num_blocks, block_size, Hkv, D] as flat arrays over
    their storage (``k32``/``v32`` float32, or ``k16``/``v16`` int16 holding bf16 bit patterns
    when ``bf16``; the other pair is unused), ``layout`` int64 (block_size, Hkv, D, then K's and
    V's element strides of block, slot and head; D's is 1); ``out`` float32 [T, Hq, D] (rows of
    the items' queries written); ``table`` int32 [B, max_blocks]; ``items`` int64 [N, 3]:
    (request, first query, end query) of the request's new tokens; ``cu`` int64 [B + 1] query
    rows; ``ctx`` int64 [B] context incl. the new tokens; ``tree`` bool [B]; ``ancestors`` int64
    [T, words] ancestor-or-self bits of tree nodes; ``positions`` int64 [T]; ``window`` (0:
    none); ``softcap`` (0: none). Keys a query sees: the request's cached prefix, and among its
    new tokens the causal ones (``j <= i``), or on trees its ancestors; within ``window`` of its
    position where one is set. Every query sees at least its own key. ``tile``: keys per step of
    the online softmax (whole cache blocks). ``splits`` > 1 (split-KV, for batches of too few
    tasks to occupy the threads): part ``p`` of an item walks the ``p``-th of ``splits`` runs of
    its key tiles and leaves its running maximum, denominator and unnormalised output in
    ``ws_m``/``ws_den`` [splits, T, Hq] and ``ws_acc`` [splits, T, Hq, D] float32, merged per
    query row afterwards (an empty or fully masked part leaves ``-inf``, 0, 0); with
    ``splits`` = 1 the workspaces are unused (empty) and every output is written directly.
    ``order``/``starts`` int64: the tasks (numbered item-major, then head group, then key part)
    dealt to workers, worker ``w`` running ``order[starts[w]:starts[w + 1]]`` in turn, one worker
    per thread (numba deals a ``prange`` in equal contiguous runs, whatever the tasks' sizes:
    the plan balances the lists, :func:`tkernels.attention.compiled_path._deal`).

    Offsets into the caches and the packed tiles are unsigned: a signed computed index costs a
    negative-index check per element, which stops the copies, dot products and updates from
    vectorising (5x slower)."""
    block_size, num_kv, D = layout[0], layout[1], layout[2]
    G = q.shape[1] // num_kv
    hpt = heads_per_task
    groups = num_kv // hpt
    for worker in prange(starts.shape[0] - 1):  # one worker per thread (the plan's threads)
        for at in range(starts[worker], starts[worker + 1]):
            task = order[at]
            part, rest = task % splits, task // splits
            item, h0 = rest // groups, (rest % groups) * hpt
            r, q0, q1 = items[item, 0], items[item, 1], items[item, 2]
            first = cu[r]
            prefix = ctx[r] - (cu[r + 1] - first)
            nq = q1 - q0
            R = nq * G  # query rows per KV head: (query, head of the group)
            rows = hpt * R
            # The task's query rows (pre-scaled): head hh's at hh * R, one per (query, head of the group).
            qb = np.empty((rows, D), np.float32)
            for hh in range(hpt):
                for i in range(nq):
                    for g in range(G):
                        for d in range(D):
                            qb[hh * R + i * G + g, d] = q[first + q0 + i, (h0 + hh) * G + g, d] * scale
            m = np.full(rows, -np.inf, np.float32)
            den = np.zeros(rows, np.float32)
            acc = np.zeros((rows, D), np.float32)
            s = np.empty((R, tile), np.float32)  # one head's scores at a time
            seen = np.empty((nq, tile), np.bool_)
            two_n = np.empty(tile, np.int32)  # exponent bits of the exps' 2^n factors
            # The tile's K and V rows of the task's heads, packed head-major: head hh's key j at (hh * tile + j) * D.
            k_tile = np.empty(hpt * tile * D, np.float32)
            v_tile = np.empty(hpt * tile * D, np.float32)
            k_bits, v_bits = k_tile.view(np.uint32), v_tile.view(np.uint32)  # bf16: widened bit patterns
            key_end = prefix + q1  # causal or tree: no query of the item sees a later key
            key_lo = 0
            if window > 0:
                low = positions[first + q0]
                for i in range(q0, q1):
                    low = min(low, positions[first + i])
                key_lo = max(0, low - window + 1)
            k_first = (key_lo // block_size) * block_size
            num_tiles = (key_end - k_first + tile - 1) // tile
            for k0 in range(k_first + (part * num_tiles // splits) * tile,
                            min(k_first + ((part + 1) * num_tiles // splits) * tile, key_end), tile):
                nk = min(tile, key_end - k0)
                for j in range(nk):  # pack: each key's slot once, its heads in order (vLLM keeps them side by side)
                    key = k0 + j
                    page, slot = table[r, key // block_size], key % block_size
                    for hh in range(hpt):
                        k_row = np.uint64(page * layout[3] + slot * layout[4] + (h0 + hh) * layout[5])
                        v_row = np.uint64(page * layout[6] + slot * layout[7] + (h0 + hh) * layout[8])
                        at = np.uint64((hh * tile + j) * D)
                        if bf16:  # one loop per row: a plain widening copy each (vectorised)
                            for d in range(D):
                                k_bits[at + np.uint64(d)] = np.uint32(np.uint16(k16[k_row + np.uint64(d)])) << np.uint32(16)
                            for d in range(D):
                                v_bits[at + np.uint64(d)] = np.uint32(np.uint16(v16[v_row + np.uint64(d)])) << np.uint32(16)
                        else:
                            for d in range(D):
                                k_tile[at + np.uint64(d)] = k32[k_row + np.uint64(d)]
                            for d in range(D):
                                v_tile[at + np.uint64(d)] = v32[v_row + np.uint64(d)]
                # Visibility (the same for every head): only tiles with new tokens or past the window's edge.
                masked = k0 + nk > prefix or window > 0 or k0 < key_lo
                if masked:
                    for i in range(nq):
                        node = first + q0 + i
                        for j in range(nk):
                            key = k0 + j
                            ok = key >= key_lo
                            if ok and key >= prefix:
                                new = key - prefix
                                if tree[r]:
                                    ok = ((ancestors[node, new >> 6] >> (new & 63)) & 1) == 1
                                else:
                                    ok = new <= q0 + i
                                if ok and window > 0:
                                    ok = positions[node] - positions[first + new] < window
                            elif ok and window > 0:
                                ok = positions[node] - key < window
                            seen[i, j] = ok
                for hh in range(hpt):
                    base = hh * R  # the head's query rows
                    tile_at = np.uint64(hh * tile * D)  # and its keys' rows in the packed tiles
                    # scores: two query rows x four keys per pass over D (eight vectorised
                    # reductions: each key row loaded once for two rows; three or four rows
                    # at once, or the keys in sub-blocks kept in L1, were no faster)
                    row = 0
                    while row + 2 <= R:
                        qa, qc = base + row, base + row + 1
                        j = 0
                        while j + 4 <= nk:
                            a0 = tile_at + np.uint64(j * D)
                            a1, a2, a3 = a0 + np.uint64(D), a0 + np.uint64(2 * D), a0 + np.uint64(3 * D)
                            d0 = d1 = d2 = d3 = e0 = e1 = e2 = e3 = np.float32(0.0)
                            for d in range(D):
                                x, y, e = qb[qa, d], qb[qc, d], np.uint64(d)
                                c0, c1, c2, c3 = k_tile[a0 + e], k_tile[a1 + e], k_tile[a2 + e], k_tile[a3 + e]
                                d0 += x * c0
                                d1 += x * c1
                                d2 += x * c2
                                d3 += x * c3
                                e0 += y * c0
                                e1 += y * c1
                                e2 += y * c2
                                e3 += y * c3
                            s[row, j], s[row, j + 1], s[row, j + 2], s[row, j + 3] = d0, d1, d2, d3
                            s[row + 1, j], s[row + 1, j + 1], s[row + 1, j + 2], s[row + 1, j + 3] = e0, e1, e2, e3
                            j += 4
                        for jj in range(j, nk):
                            a0 = tile_at + np.uint64(jj * D)
                            d0 = e0 = np.float32(0.0)
                            for d in range(D):
                                kk = k_tile[a0 + np.uint64(d)]
                                d0 += qb[qa, d] * kk
                                e0 += qb[qc, d] * kk
                            s[row, jj], s[row + 1, jj] = d0, e0
                        row += 2
                    if row < R:  # an odd row last: one row x four keys
                        j = 0
                        while j + 4 <= nk:
                            a0 = tile_at + np.uint64(j * D)
                            a1, a2, a3 = a0 + np.uint64(D), a0 + np.uint64(2 * D), a0 + np.uint64(3 * D)
                            d0 = d1 = d2 = d3 = np.float32(0.0)
                            for d in range(D):
                                x, e = qb[base + row, d], np.uint64(d)
                                d0 += x * k_tile[a0 + e]
                                d1 += x * k_tile[a1 + e]
                                d2 += x * k_tile[a2 + e]
                                d3 += x * k_tile[a3 + e]
                            s[row, j], s[row, j + 1], s[row, j + 2], s[row, j + 3] = d0, d1, d2, d3
                            j += 4
                        for jj in range(j, nk):
                            a0 = tile_at + np.uint64(jj * D)
                            dot = np.float32(0.0)
                            for d in range(D):
                                dot += qb[base + row, d] * k_tile[a0 + np.uint64(d)]
                            s[row, jj] = dot
                    if softcap > 0:
                        for row in range(R):
                            for j in range(nk):
                                s[row, j] = softcap * np.tanh(s[row, j] / softcap)
                    if masked:
                        for i in range(nq):
                            for g in range(G):
                                for j in range(nk):
                                    if not seen[i, j]:
                                        s[i * G + g, j] = -np.inf
                    for row in range(R):
                        # the row's maximum in eight independent chains: in one chain every key
                        # waits for the previous compare (a sixth of the layer on the Xeon VM)
                        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = m[base + row]
                        j = 0
                        while j + 8 <= nk:
                            t0, t1 = max(t0, s[row, j]), max(t1, s[row, j + 1])
                            t2, t3 = max(t2, s[row, j + 2]), max(t3, s[row, j + 3])
                            t4, t5 = max(t4, s[row, j + 4]), max(t5, s[row, j + 5])
                            t6, t7 = max(t6, s[row, j + 6]), max(t7, s[row, j + 7])
                            j += 8
                        for jj in range(j, nk):
                            t0 = max(t0, s[row, jj])
                        top = max(max(max(t0, t1), max(t2, t3)), max(max(t4, t5), max(t6, t7)))
                        if top == -np.inf:
                            continue
                        fix = np.exp(m[base + row] - top)
                        den[base + row] *= fix
                        for d in range(D):
                            acc[base + row, d] *= fix
                        exp_shifted(s[row], nk, top, two_n)
                        for j in range(nk):
                            den[base + row] += s[row, j]
                        j = 0
                        while j + 4 <= nk:  # four keys per pass over the row's accumulator
                            p0, p1, p2, p3 = s[row, j], s[row, j + 1], s[row, j + 2], s[row, j + 3]
                            a0 = tile_at + np.uint64(j * D)
                            a1, a2, a3 = a0 + np.uint64(D), a0 + np.uint64(2 * D), a0 + np.uint64(3 * D)
                            for d in range(D):
                                e = np.uint64(d)
                                acc[base + row, d] += p0 * v_tile[a0 + e] + p1 * v_tile[a1 + e] + p2 * v_tile[a2 + e] + p3 * v_tile[a3 + e]
                            j += 4
                        for jj in range(j, nk):
                            p, a0 = s[row, jj], tile_at + np.uint64(jj * D)
                            for d in range(D):
                                acc[base + row, d] += p * v_tile[a0 + np.uint64(d)]
                        m[base + row] = top
            for hh in range(hpt):
                for i in range(nq):
                    for g in range(G):
                        row, t, h = hh * R + i * G + g, first + q0 + i, (h0 + hh) * G + g
                        if splits == 1:
                            inv = 1.0 / den[row]
                            for d in range(D):
                                out[t, h, d] = acc[row, d] * inv
                        else:
                            ws_m[part, t, h], ws_den[part, t, h] = m[row], den[row]
                            for d in range(D):
                                ws_acc[part, t, h, d] = acc[row, d]
    if splits > 1:  # merge the parts of every query row (each row sees its own key: some part is finite)
        for item in prange(items.shape[0]):
            r, q0, q1 = items[item, 0], items[item, 1], items[item, 2]
            merged = np.empty(D, np.float32)
            for t in range(cu[r] + q0, cu[r] + q1):
                for h in range(q.shape[1]):
                    top = -np.inf
                    for p in range(splits):
                        top = max(top, ws_m[p, t, h])
                    total = np.float32(0.0)
                    merged[:] = 0.0
                    for p in range(splits):
                        if ws_m[p, t, h] == -np.inf:
                            continue
                        w = np.exp(ws_m[p, t, h] - top)
                        total += ws_den[p, t, h] * w
                        for d in range(D):
                            merged[d] += ws_acc[p, t, h, d] * w
                    inv = 1.0 / total
                    for d in range(D):
                        out[t, h, d] = merged[d] * inv
