"""The compiled kernel of :func:`tkernels.spec.host_topk.top_k_ids` (numba, ``cache=True``, one host
thread; imported on first use, so importing tkernels does not load numba)."""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit

__all__ = ["SKIP_BLOCK", "top_k_rows"]

# Blocks of this many values are skipped on their maximum: a compile-time constant of the kernel
# (its inner loop's trip count), a multiple of the vector width.
SKIP_BLOCK = 32
_LOWEST = np.int32(-(2 ** 31))  # below every key


@njit(cache=True, inline="always")
def _key(b, mag):
    """An int32 ordered as the float whose bits are ``b`` (int16 or int32, sign-extended):
    negatives get their magnitude bits ``mag`` flipped (a larger magnitude is a smaller float)
    and move up by one, so that -0 and +0 share a key.
    Branch-free and 32-bit, so a block's maximum vectorises (16 lanes with AVX-512)."""
    v = np.int32(b)
    sign = v >> 31  # -1 for negatives, else 0
    return (v ^ (sign & mag)) - sign  # - sign: -0 maps to +0's key (equal floats, equal keys)


@njit(cache=True, inline="always")
def _insert(keys, ids, n, k, key, i):
    """Insert (key, id i) into the descending list of ``n`` entries (at most ``k`` kept); equal
    keys keep the earlier id first. Returns the new count."""
    p = n if n < k else k - 1
    while p > 0 and keys[p - 1] < key:
        if p < k:
            keys[p] = keys[p - 1]
            ids[p] = ids[p - 1]
        p -= 1
    keys[p] = key
    ids[p] = i
    return n + 1 if n < k else k


@njit(cache=True)
def top_k_rows(bits, k, mag, out):
    """``out[r]`` (int64 [rows, k]) = the ids of the k largest values of ``bits[r]`` (int16/int32
    float bits, ``mag`` their magnitude mask), largest first, lower id first among equals.
    ``k`` <= the row length. Per row: every block's maximum first (one vectorised pass, a
    constant block size), then only the blocks whose maximum beats the list's last are read."""
    rows, vocab = bits.shape
    blocks = vocab // SKIP_BLOCK
    block_max = np.empty(blocks, np.int32)
    keys = np.empty(k, np.int32)
    ids = np.empty(k, np.int64)
    for r in range(rows):
        row = bits[r]
        for b in range(blocks):
            best = _LOWEST
            for i in range(b * SKIP_BLOCK, (b + 1) * SKIP_BLOCK):
                best = max(best, _key(row[i], mag))
            block_max[b] = best
        n = 0
        for j in range(k):
            n = _insert(keys, ids, n, k, _key(row[j], mag), j)
        for j in range(k, min(vocab, SKIP_BLOCK)):  # the rest of the first block
            key = _key(row[j], mag)
            if key > keys[k - 1]:
                n = _insert(keys, ids, n, k, key, j)
        for b in range(1, blocks):
            if block_max[b] > keys[k - 1]:  # else nothing in the block enters the list
                for j in range(b * SKIP_BLOCK, (b + 1) * SKIP_BLOCK):
                    key = _key(row[j], mag)
                    if key > keys[k - 1]:
                        n = _insert(keys, ids, n, k, key, j)
        for j in range(max(blocks * SKIP_BLOCK, SKIP_BLOCK), vocab):  # the tail past the last whole block
            key = _key(row[j], mag)
            if key > keys[k - 1]:
                n = _insert(keys, ids, n, k, key, j)
        out[r, :] = ids
