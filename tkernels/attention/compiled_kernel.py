"""The compiled CPU attention loop (numba, ``cache=True``): mixed batches of prefill chunks,
decodes and trees over the paged cache, read in place (no gather, no padding to a group's
longest context), online softmax in fp32.

:func:`attend` is the kernel; :mod:`tkernels.attention.compiled_path` plans a step's work items
and launches it per layer; :func:`tkernels.attention.mixed_attention_reference` is the reference
it is tested against. bf16 caches are read as their raw 16-bit patterns and widened to fp32 in
registers (``bits << 16``: exact); fp32 caches directly.
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
def attend(q, k_cache, v_cache, bf16, out, table, items, cu, ctx, tree, ancestors, positions, window, scale, softcap):
    """One layer's attention for every work item, in parallel over items x KV heads.

    ``q`` float32 [T, Hq, D]; ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D], float32,
    or int16 holding bf16 bit patterns when ``bf16``; ``out`` float32 [T, Hq, D] (rows of the
    items' queries written); ``table`` int32 [B, max_blocks]; ``items`` int64 [N, 3]: (request,
    first query, end query) of the request's new tokens; ``cu`` int64 [B + 1] query rows;
    ``ctx`` int64 [B] context incl. the new tokens; ``tree`` bool [B]; ``ancestors`` int64
    [T, words] ancestor-or-self bits of tree nodes; ``positions`` int64 [T]; ``window`` (0:
    none); ``softcap`` (0: none). Keys a query sees: the request's cached prefix, and among its
    new tokens the causal ones (``j <= i``), or on trees its ancestors; within ``window`` of its
    position where one is set. Every query sees at least its own key."""
    block_size = k_cache.shape[1]
    num_kv = k_cache.shape[2]
    D = k_cache.shape[3]
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
        # A tile of K and V rows in fp32 (as bits, to widen bf16); only a tile's first nk rows,
        # and scores' first nk columns, are written and read.
        bits = np.empty(2 * D * tile, np.uint32)
        kb = bits[:D * tile].view(np.float32).reshape((tile, D))
        vb = bits[D * tile:].view(np.float32).reshape((tile, D))
        kb_bits = bits[:D * tile].reshape((tile, D))
        vb_bits = bits[D * tile:].reshape((tile, D))
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
                page = table[r, key // block_size]
                slot = key % block_size
                if bf16:
                    for d in range(D):
                        kb_bits[j, d] = np.uint32(np.uint16(k_cache[page, slot, h, d])) << np.uint32(16)
                        vb_bits[j, d] = np.uint32(np.uint16(v_cache[page, slot, h, d])) << np.uint32(16)
                else:
                    for d in range(D):
                        kb[j, d] = k_cache[page, slot, h, d]
                        vb[j, d] = v_cache[page, slot, h, d]
            for j in range(nk):  # scores: dot products of contiguous rows (vectorised reductions)
                for row in range(rows):
                    dot = np.float32(0.0)
                    for d in range(D):
                        dot += qb[row, d] * kb[j, d]
                    s[row, j] = dot
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
                    for d in range(D):
                        acc[row, d] += p0 * vb[j, d] + p1 * vb[j + 1, d] + p2 * vb[j + 2, d] + p3 * vb[j + 3, d]
                    j += 4
                for jj in range(j, nk):
                    p = s[row, jj]
                    for d in range(D):
                        acc[row, d] += p * vb[jj, d]
                m[row] = top
        for i in range(nq):
            for g in range(G):
                row = i * G + g
                inv = 1.0 / den[row]
                for d in range(D):
                    out[first + q0 + i, h * G + g, d] = acc[row, d] * inv
