"""The compiled CPU attention loop (numba, ``cache=True``): mixed batches of prefill chunks,
decodes and trees over the paged cache, read in place (no gather, no padding to a group's
longest context), online softmax in fp32.

:func:`attend` is the kernel; :mod:`tkernels.attention.compiled_path` plans a step's work items
and launches it per layer; :func:`tkernels.attention.mixed_attention_reference` is the reference
it is tested against. fp32 caches are read in place; bf16 caches as their raw 16-bit patterns,
widened exactly to fp32 (``bits << 16``) into a tile of keys.
"""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit  # isort: split

from numba import prange  # after tkernels.jit (its llvmlite fix)

# Reassociation and contraction let the dot products and updates vectorise; no "no infs": the
# masked scores are -inf.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
KEY_TILE = 128  # keys per online-softmax step (whole cache blocks): long vectorised inner loops

__all__ = ["attend"]

# exp(x) = 2^n exp(r), r = x - n ln 2 in [-ln2/2, ln2/2]: cephes' expf polynomial (relative error
# ~1e-7), vectorisable where libm's expf is one call per element.
LOG2E, LN2_HI, LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
EXP_MIN = -87.0  # exp below it is taken as exactly 0 (masked keys' -inf among them)


@njit(cache=True, fastmath=FASTMATH, inline="always")
def _exp_shifted(row, n, top, two_n):
    """``row[:n] = exp(row[:n] - top)`` in place (``two_n``: int32 scratch of >= n)."""
    c0, c1, c2, c3, c4, c5 = EXP_POLY
    for j in range(n):
        x = row[j] - top
        keep = x >= EXP_MIN
        x = max(x, EXP_MIN)
        t = np.floor(x * LOG2E + 0.5)
        r = x - t * LN2_HI - t * LN2_LO
        p = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
        row[j] = (p * r * r + r + 1.0) if keep else 0.0
        two_n[j] = (np.int32(t) + 127) << 23
    scale = two_n[:n].view(np.float32)
    for j in range(n):
        row[j] *= scale[j]


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def attend(q, k32, v32, k16, v16, bf16, layout, out, table, items, cu, ctx, tree, ancestors, positions, window, scale,
           softcap):
    """One layer's attention for every work item, in parallel over items x KV heads.

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
    position where one is set. Every query sees at least its own key.

    fp32 caches are read in place; bf16 rows are first widened into a tile. Row offsets are
    unsigned: a signed computed index costs a negative-index check per element, which stops the
    dot products and updates from vectorising (5x slower)."""
    block_size, num_kv, D = layout[0], layout[1], layout[2]
    G = q.shape[1] // num_kv
    tile = max(block_size, (KEY_TILE // block_size) * block_size)  # keys per step of the online softmax
    for task in prange(items.shape[0] * num_kv):
        item, h = task // num_kv, task % num_kv
        r, q0, q1 = items[item, 0], items[item, 1], items[item, 2]
        first = cu[r]
        prefix = ctx[r] - (cu[r + 1] - first)
        nq = q1 - q0
        rows = nq * G
        # The item's query rows (pre-scaled), one per (query, head of the group), contiguous.
        qb = np.empty((rows, D), np.float32)
        for i in range(nq):
            for g in range(G):
                for d in range(D):
                    qb[i * G + g, d] = q[first + q0 + i, h * G + g, d] * scale
        m = np.full(rows, -np.inf, np.float32)
        den = np.zeros(rows, np.float32)
        acc = np.zeros((rows, D), np.float32)
        s = np.empty((rows, tile), np.float32)
        seen = np.empty((nq, tile), np.bool_)
        two_n = np.empty(tile, np.int32)  # exponent bits of the exps' 2^n factors
        k_at = np.empty(tile, np.uint64)  # where the tile's K and V rows start in k_src / v_src
        v_at = np.empty(tile, np.uint64)
        # bf16: the tile's K and V rows widened to fp32 (as bits); rows j at j * D.
        bits = np.empty(2 * D * tile if bf16 else 0, np.uint32)
        k_src, v_src = k32, v32
        if bf16:
            k_src = bits[:D * tile].view(np.float32)
            v_src = bits[D * tile:].view(np.float32)
        key_end = prefix + q1  # causal or tree: no query of the item sees a later key
        key_lo = 0
        if window > 0:
            low = positions[first + q0]
            for i in range(q0, q1):
                low = min(low, positions[first + i])
            key_lo = max(0, low - window + 1)
        for k0 in range((key_lo // block_size) * block_size, key_end, tile):
            nk = min(tile, key_end - k0)
            for j in range(nk):
                key = k0 + j
                page, slot = table[r, key // block_size], key % block_size
                k_row = np.uint64(page * layout[3] + slot * layout[4] + h * layout[5])
                v_row = np.uint64(page * layout[6] + slot * layout[7] + h * layout[8])
                if bf16:
                    at = np.uint64(j * D)
                    for d in range(D):
                        bits[at + np.uint64(d)] = np.uint32(np.uint16(k16[k_row + np.uint64(d)])) << np.uint32(16)
                    at += np.uint64(D * tile)
                    for d in range(D):
                        bits[at + np.uint64(d)] = np.uint32(np.uint16(v16[v_row + np.uint64(d)])) << np.uint32(16)
                    k_row = v_row = np.uint64(j * D)
                k_at[j], v_at[j] = k_row, v_row
            j = 0
            while j + 4 <= nk:  # scores: four keys per pass over a query row (four vectorised reductions)
                a0, a1, a2, a3 = k_at[j], k_at[j + 1], k_at[j + 2], k_at[j + 3]
                for row in range(rows):
                    d0 = d1 = d2 = d3 = np.float32(0.0)
                    for d in range(D):
                        x, e = qb[row, d], np.uint64(d)
                        d0 += x * k_src[a0 + e]
                        d1 += x * k_src[a1 + e]
                        d2 += x * k_src[a2 + e]
                        d3 += x * k_src[a3 + e]
                    s[row, j], s[row, j + 1], s[row, j + 2], s[row, j + 3] = d0, d1, d2, d3
                j += 4
            for jj in range(j, nk):
                a0 = k_at[jj]
                for row in range(rows):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qb[row, d] * k_src[a0 + np.uint64(d)]
                    s[row, jj] = dot
            if softcap > 0:
                for row in range(rows):
                    for j in range(nk):
                        s[row, j] = softcap * np.tanh(s[row, j] / softcap)
            # Visibility: only tiles with new tokens or past the window's edge.
            if k0 + nk > prefix or window > 0 or k0 < key_lo:
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
                for i in range(nq):
                    for g in range(G):
                        for j in range(nk):
                            if not seen[i, j]:
                                s[i * G + g, j] = -np.inf
            for row in range(rows):
                top = m[row]
                for j in range(nk):
                    top = max(top, s[row, j])
                if top == -np.inf:
                    continue
                fix = np.exp(m[row] - top)
                den[row] *= fix
                for d in range(D):
                    acc[row, d] *= fix
                _exp_shifted(s[row], nk, top, two_n)
                for j in range(nk):
                    den[row] += s[row, j]
                j = 0
                while j + 4 <= nk:  # four keys per pass over the row's accumulator
                    p0, p1, p2, p3 = s[row, j], s[row, j + 1], s[row, j + 2], s[row, j + 3]
                    a0, a1, a2, a3 = v_at[j], v_at[j + 1], v_at[j + 2], v_at[j + 3]
                    for d in range(D):
                        e = np.uint64(d)
                        acc[row, d] += p0 * v_src[a0 + e] + p1 * v_src[a1 + e] + p2 * v_src[a2 + e] + p3 * v_src[a3 + e]
                    j += 4
                for jj in range(j, nk):
                    p, a0 = s[row, jj], v_at[jj]
                    for d in range(D):
                        acc[row, d] += p * v_src[a0 + np.uint64(d)]
                m[row] = top
        for i in range(nq):
            for g in range(G):
                row = i * G + g
                inv = 1.0 / den[row]
                for d in range(D):
                    out[first + q0 + i, h * G + g, d] = acc[row, d] * inv
