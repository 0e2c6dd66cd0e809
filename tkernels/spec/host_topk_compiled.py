"""The compiled kernels of :mod:`tkernels.spec.host_topk` (numba, ``cache=True``; imported on first
use, so importing tkernels does not load numba): :func:`top_k_rows` (the ids, one host thread)
and :func:`top_k_probs_rows` (ids and softmax probabilities of fp32 rows, rows over threads)."""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit  # isort: split

from numba import prange  # after tkernels.jit (its llvmlite fix)

from tkernels.compiled_math import FASTMATH, exp_shifted

__all__ = ["SKIP_BLOCK", "top_k_probs_rows", "top_k_rows"]

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


@njit(cache=True, inline="always")
def _row_top_k(row, k, mag, block_max, keys, ids):
    """``ids`` (int64 [k]) := the ids of the k largest values of ``row`` (int16/int32 float bits,
    ``mag`` their magnitude mask), largest first, lower id first among equals; ``k`` <= the row
    length. Every block's maximum first (one vectorised pass, a constant block size), then only
    the blocks whose maximum beats the list's last are read (``block_max``, ``keys``: scratch)."""
    vocab = row.shape[0]
    blocks = vocab // SKIP_BLOCK
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


@njit(cache=True)
def top_k_rows(bits, k, mag, out):
    """``out[r]`` (int64 [rows, k]) = the ids of the k largest values of ``bits[r]`` (int16/int32
    float bits, ``mag`` their magnitude mask), largest first, lower id first among equals
    (:func:`_row_top_k`); ``k`` <= the row length."""
    rows, vocab = bits.shape
    block_max = np.empty(vocab // SKIP_BLOCK, np.int32)
    keys = np.empty(k, np.int32)
    ids = np.empty(k, np.int64)
    for r in range(rows):
        _row_top_k(bits[r], k, mag, block_max, keys, ids)
        out[r, :] = ids


@njit(cache=True, fastmath=FASTMATH, parallel=True)
def top_k_probs_rows(values, bits, k, mag, out_ids, out_probs):
    """Per row of ``values`` (float32 [rows, vocab], finite or -inf; ``bits`` their int32 view,
    ``mag`` its magnitude mask; ``k`` <= vocab):
    ``out_ids[r]`` (int64 [rows, k]) the ids of its k largest values as :func:`top_k_rows` orders
    them, and ``out_probs[r]`` (float32 [rows, k]) their softmax probabilities,
    ``exp(v - max) / sum(exp(row - max))``: the row's exponentials in one vectorised pass over
    the row just read (still in cache), not a second pass over every row. Rows over threads."""
    rows, vocab = values.shape
    for r in prange(rows):
        keys = np.empty(k, np.int32)
        ids = np.empty(k, np.int64)
        _row_top_k(bits[r], k, mag, np.empty(vocab // SKIP_BLOCK, np.int32), keys, ids)
        row = values[r]
        top = row[ids[0]]
        e = np.empty(vocab, np.float32)
        e[:] = row
        exp_shifted(e, vocab, top, np.empty(vocab, np.int32))
        total = np.float32(0.0)
        for j in range(vocab):
            total += e[j]
        for j in range(k):
            out_ids[r, j] = ids[j]
            out_probs[r, j] = e[ids[j]] / total
