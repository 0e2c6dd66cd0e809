"""PyTorch stand-ins for the ``sgl_kernel`` ops SGLang's CPU engine calls, where no ``sgl_kernel`` exists.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a handful of ``sgl_kernel`` ops by name
at module level, but ``sgl_kernel`` has no CPU build on the package index (SGLang's CPU docs build
it from source, for Xeons with AMX). Without AMX, SGLang's layers take their own torch
``forward_native`` paths and plain serving calls no ``sgl_kernel`` op; NGRAM speculation calls the
bookkeeping ops below. Each one here has the contract of SGLang's own Triton twin named in its
docstring (``tests/sglang/test_cpu_ops.py`` checks them against each other on random inputs).

:data:`DECLARED` are the other names SGLang's CPU paths import at module level (EAGLE tree
building and cache locations, multi-layer EAGLE): they exist so those modules import, and raise
``NotImplementedError`` when called. Any other name is absent (``AttributeError``, so ``from
sgl_kernel import X`` is an ``ImportError``), exactly as without ``sgl_kernel``: SGLang's own
"no sgl_kernel" fallbacks stay in effect. Nothing here returns a made-up value.

The module is imported as ``sgl_kernel`` through ``cpu_stand_in/`` (see
:mod:`tkernels.plugins.sglang.cpu`), never where a real ``sgl_kernel`` is importable.
"""

from __future__ import annotations

import ctypes

import torch

TKERNELS_STAND_IN = True  # how tkernels (and a curious user) tell this module from the real one

# Imported by name at module level on SGLang 0.5.23's CPU paths, not implemented here.
DECLARED = (
    "assign_draft_cache_locs_contiguous_cpu",  # kernels/ops/speculative/cache_locs.py (EAGLE)
    "build_tree_kernel_efficient_cpu",  # kernels/ops/speculative/spec_tree.py (EAGLE)
    "fill_bonus_tokens_cpu",  # kernels/ops/speculative/eagle.py (EAGLE)
    "rotate_input_ids_cpu",  # kernels/ops/speculative/multi_layer_eagle.py
)


def _not_implemented(name: str):
    def op(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name}: not in tkernels' CPU stand-in for sgl_kernel (it implements "
            f"{', '.join(IMPLEMENTED)}); this SGLang path needs a real sgl_kernel built for the CPU")

    op.__name__ = op.__qualname__ = name
    return op


def _segments(op: str, start_offset: torch.Tensor, end_offset: torch.Tensor, pool_len: int):
    """Per request ``(b, start, end, out_offset)``: the Triton twins pack the requests' ranges back to back.

    A range past the row (``end > pool_len``) is an error here: the Triton twins do not check it
    and read or write the next request's row. SGLang 0.5.23 gets there with NGRAM near the context
    limit (docs/sglang.md: its row headroom, 4 + d tokens, is below its per-step reserve, 2d).
    """
    starts, ends = start_offset.tolist(), end_offset.tolist()
    out = 0
    for b, (start, end) in enumerate(zip(starts, ends)):
        if end > pool_len:
            raise RuntimeError(f"sgl_kernel.{op} (tkernels' CPU stand-in): request {b}'s KV slots [{start}, {end}) "
                               f"pass its req_to_token row of {pool_len}; SGLang reserved past the row's headroom "
                               "(see docs/sglang.md: keep prompt + max_new_tokens further from the context length)")
        yield b, start, end, out
        out += max(end - start, 0)


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """``req_to_token[req_pool_indices[b], start_b:end_b] = out_cache_loc[o_b : o_b + end_b - start_b]``,
    o_b the lengths of the requests before b (SGLang's Triton ``assign_req_to_token_pool``)."""
    rows = req_pool_indices.tolist()
    for b, start, end, out in _segments("assign_req_to_token_pool_cpu", start_offset, end_offset, pool_len):
        if end > start:
            req_to_token[rows[b], start:end] = out_cache_loc[out : out + end - start].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc,
                                 pool_len) -> None:
    """The reverse: ``out_cache_loc[o_b : o_b + end_b - start_b] = req_to_token[req_pool_indices[b],
    start_b:end_b]`` (SGLang's Triton ``assign_extend_cache_locs``)."""
    rows = req_pool_indices.tolist()
    for b, start, end, out in _segments("assign_extend_cache_locs_cpu", start_offset, end_offset, pool_len):
        if end > start:
            out_cache_loc[out : out + end - start] = req_to_token[rows[b], start:end].to(out_cache_loc.dtype)


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc) -> None:
    """The accepted nodes' slots, packed in order: ``accept_out_cache_loc[:n] = out_cache_loc[accept_index
    [accept_index != -1]]`` (SGLang's Triton ``fill_accept_out_cache_loc``)."""
    index = accept_index.flatten()
    src = index[index != -1].long()
    accept_out_cache_loc[: src.numel()] = out_cache_loc[src].to(accept_out_cache_loc.dtype)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc) -> None:
    """In every buffer i (base address ``data_ptrs[i]``, ``strides[i]`` bytes per slot), slot ``tgt_loc[j]``
    takes slot ``src_loc[j]``'s bytes, all read before any is written (SGLang's Triton
    ``copy_all_layer_kv_cache_tiled``, "safe for in-place copy"). The buffers are host memory on the CPU
    engine, viewed here through their addresses, up to the highest slot named."""
    if tgt_loc.numel() == 0:
        return
    src, tgt = src_loc.long(), tgt_loc.long()
    slots = int(torch.maximum(src.max(), tgt.max())) + 1
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist()):
        raw = (ctypes.c_uint8 * (slots * stride)).from_address(ptr)
        buffer = torch.frombuffer(raw, dtype=torch.uint8).view(slots, stride)
        buffer[tgt] = buffer[src]  # the gather copies first


def reconstruct_indices_from_tree_mask(tree_mask, verified_seq_len, positions, retrieve_index,
                                       retrieve_next_token, retrieve_next_sibling, batch_size,
                                       draft_token_num) -> None:
    """NGRAM's verify metadata from its ancestor masks ``bool[bs*n*n]`` (row i: i and its ancestors),
    in place (SGLang's Triton ``reconstruct_indices_from_tree_mask_triton``): positions (depth +
    verified length), flat node indices, first child and next sibling (-1 where none)."""
    n = draft_token_num
    if batch_size == 0:
        return
    node = torch.arange(n)
    mask = tree_mask[: batch_size * n * n].view(batch_size, n, n).bool().cpu()
    ancestors = mask & (node[None, None, :] < node[None, :, None])  # [b, i, j]: j an ancestor of i
    depth = ancestors.sum(-1)
    parent = torch.where(ancestors, node, -1).amax(-1)  # [b, i]
    first_child = torch.where(ancestors, node[None, :, None], n).amin(1)  # [b, j]: min i with j its ancestor
    same_parent = (parent[:, :, None] == parent[:, None, :]) & (node[:, None] > node[None, :])  # [b, k, t]
    first_sibling = torch.where(same_parent, node[None, :, None], n).amin(1)  # [b, t]
    next_sibling = torch.where((parent >= 0) & (first_sibling < n), first_sibling, -1)
    flat = slice(0, batch_size * n)
    device = positions.device
    positions[flat] = (depth + verified_seq_len[:batch_size].cpu().long()[:, None]).flatten().to(device, positions.dtype)
    retrieve_index.view(-1)[flat] = torch.arange(batch_size * n).to(device, retrieve_index.dtype)
    retrieve_next_token.view(-1)[flat] = torch.where(first_child < n, first_child, -1).flatten().to(
        device, retrieve_next_token.dtype)
    retrieve_next_sibling.view(-1)[flat] = next_sibling.flatten().to(device, retrieve_next_sibling.dtype)


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                           retrive_next_sibling, target_predict) -> None:
    """Greedy tree acceptance, in place (SGLang's Triton ``verify_tree_greedy_kernel_triton``; argument
    names ``retrive_*`` as in the op schema). From each request's root, walk down: among the current
    node's children (first child, then next siblings) take the first whose draft token equals the
    target's choice after the current node; ``predicts`` gets the target's token at every accepted
    node, ``accept_index`` the accepted nodes' flat indices (root first), ``accept_token_num`` the
    number of accepted drafts."""
    bs = candidates.shape[0]
    steps = accept_index.shape[1]
    index, next_token, next_sibling = (t.tolist() for t in (retrive_index, retrive_next_token, retrive_next_sibling))
    cand, target = candidates.tolist(), target_predict.flatten().tolist()
    for b in range(bs):
        last = index[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, steps):
            cur = next_token[b][cur]
            match = False
            while cur != -1:
                if cand[b][cur] == target[last]:
                    predicts[last] = target[last]
                    accepted += 1
                    accept_index[b, accepted] = index[b][cur]
                    last, match = index[b][cur], True
                    break
                cur = next_sibling[b][cur]
            if not match:
                break
        accept_token_num[b] = accepted
        predicts[last] = target[last]


IMPLEMENTED = (
    "assign_req_to_token_pool_cpu",
    "assign_extend_cache_locs_cpu",
    "fill_accept_out_cache_loc_cpu",
    "copy_all_layer_kv_cache_cpu",
    "reconstruct_indices_from_tree_mask",
    "verify_tree_greedy_cpu",
)

for _name in DECLARED:
    globals()[_name] = _not_implemented(_name)

__all__ = ["TKERNELS_STAND_IN", *IMPLEMENTED, *DECLARED]
