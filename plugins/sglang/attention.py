"""SGLang attention backend ``tkernels``: SGLang's Triton backend with tkernels' mixed-batch kernel.

    python -m sglang.launch_server --model-path M --attention-backend tkernels

:class:`TkernelsAttnBackend` subclasses ``TritonAttnBackend`` and keeps everything around the
kernels (metadata, KV writes, CUDA-graph buffers); the kernel calls of its extend, decode and
target-verify paths go to :func:`tkernels.attention.mixed_attention`:

- SGLang's KV pool is token-indexed (``[slots, kv_heads, head_dim]`` per layer), which is
  tkernels' paged layout with one token per block: the pool is viewed as ``[slots, 1, kv_heads,
  head_dim]`` and each request's block-table row lists its slots, the ones SGLang's kernels read
  (``kv_indices``), then, in an extend, the new tokens' slots (``out_cache_loc``: SGLang writes
  their K/V there before the kernel runs);
- target verify (speculation trees): SGLang's flat ``custom_mask`` (per request an
  ``n x (prefix + n)`` block) becomes tree ``parents`` (each node's nearest masked-in earlier
  node), the kernel's tree form;
- the plan (:func:`tkernels.attention.plan_mixed_attention`) is built once per forward batch and
  head layout and shared by all layers.

What the kernel does not cover takes SGLang's own Triton kernels, per call: attention sinks,
sliding windows, non-causal extends without a tree mask, scaled (fp8) KV, custom score mods,
xAI temperature, dLLM. Models whose layers use sliding windows or MLA are refused at start-up
(SGLang's window layers read a separate KV rail that the decode call does not identify), and
so are CUDA graphs (the plan is built on the host each batch): run with ``--disable-cuda-graph``.
With NGRAM it serves Token Recycling's trees (``TKERNELS_SGLANG=token_recycling``; SGLang's own
NGRAM trees are not in BFS order, refused at start-up), and on SGLang's CPU engine it makes NGRAM
build the verify mask in the layout above (:func:`tkernels.plugins.sglang.cpu.use_triton_verify_mask`).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from tkernels.attention import mixed_attention, plan_mixed_attention
from tkernels.plugins.sglang.compat import BACKEND_NAME, selected_features
from tkernels.plugins.sglang.cpu import cpu_engine, use_triton_verify_mask


def block_table(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, qo_indptr: torch.Tensor | None = None,
                new_slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_table int32[B, max_len], seq_lens int32[B])`` with one-token blocks: request b's
    ``kv_indices`` slots, then its ``new_slots`` (``qo_indptr`` segments), 0 past its length."""
    prefix = (kv_indptr[1:] - kv_indptr[:-1]).long()
    new = torch.zeros_like(prefix) if qo_indptr is None else (qo_indptr[1:] - qo_indptr[:-1]).long()
    seq_lens = prefix + new
    col = torch.arange(max(int(seq_lens.max()) if seq_lens.numel() else 0, 1), device=kv_indices.device)
    padded = torch.cat([kv_indices.long(), kv_indices.new_zeros(1).long()])  # a safe target for masked lanes
    table = padded[(kv_indptr[:-1, None].long() + col).clamp(max=kv_indices.numel())]
    if new_slots is not None:
        padded_new = torch.cat([new_slots.long(), new_slots.new_zeros(1).long()])
        new_index = (qo_indptr[:-1, None].long() + col - prefix[:, None]).clamp(0, new_slots.numel())
        table = torch.where(col < prefix[:, None], table, padded_new[new_index])
    table = torch.where(col < seq_lens[:, None], table, 0)
    return table.to(torch.int32), seq_lens.to(torch.int32)


def tree_parents_from_mask(custom_mask: torch.Tensor, mask_indptr: torch.Tensor, prefix_lens: torch.Tensor,
                           num_nodes: int) -> torch.Tensor:
    """Local parents int32[B*n] of B trees of ``num_nodes`` nodes from SGLang's verify mask.

    Request b's block starts at ``mask_indptr[b]`` and is ``n x (prefix_b + n)`` row-major; node
    i's parent is the largest j < i visible to i among the tree columns (-1 for the root).
    """
    n = num_nodes
    node = torch.arange(n, device=custom_mask.device)
    row_len = (prefix_lens.long() + n)[:, None, None]
    index = mask_indptr[:-1].long()[:, None, None] + node[None, :, None] * row_len + prefix_lens.long()[:, None, None] \
        + node[None, None, :]
    ancestors = custom_mask[index].bool() & (node[None, None, :] < node[None, :, None])  # [B, i, j]
    return torch.where(ancestors, node, -1).amax(-1).to(torch.int32).flatten()


class TkernelsAttnBackend(TritonAttnBackend):
    """``TritonAttnBackend`` whose extend/decode/verify kernels are tkernels' mixed-batch kernel."""

    def __init__(self, model_runner, *args, **kwargs):
        super().__init__(model_runner, *args, **kwargs)
        if self.use_mla or self.sliding_window_size is not None:
            raise ValueError("--attention-backend tkernels: MLA and sliding-window models are not supported; "
                             "use --attention-backend triton")
        self.sglang_decode_attention_fwd = self.decode_attention_fwd
        self.decode_attention_fwd = self._decode_attention_fwd
        self.forward_batch = None
        self.plans = {}  # this forward's (block table, seq_lens, plan) per head layout, shared by its layers
        if model_runner.spec_algorithm.is_ngram():
            if "token_recycling" not in selected_features():
                # SGLang's own NGRAM trees are not in BFS order (a node's parent may precede an
                # earlier node's), which the kernel's tree form requires: refuse now, not at the first verify.
                raise ValueError("--attention-backend tkernels with --speculative-algorithm NGRAM verifies Token "
                                 "Recycling's trees only: set TKERNELS_SGLANG=token_recycling, or use "
                                 "--attention-backend triton for SGLang's own NGRAM drafts")
            if cpu_engine():
                use_triton_verify_mask(BACKEND_NAME)  # NGRAM's CPU default is the AMX backend's compact mask

    def init_forward_metadata(self, forward_batch) -> None:
        super().init_forward_metadata(forward_batch)
        self.forward_batch, self.plans = forward_batch, {}

    def init_cuda_graph_state(self, *args, **kwargs):
        raise ValueError("--attention-backend tkernels plans each batch on the host, which CUDA graphs cannot "
                         "capture: add --disable-cuda-graph")

    def _mixed_attention(self, q, k_buffer, v_buffer, o, cu_seqlens_q, kv_indptr, kv_indices, new_slots, scale,
                         logit_cap, tree_mask=None):
        """``new_slots``: the extend tokens' slots (None in a decode, whose kv_indices hold them);
        ``tree_mask``: target verify's ``(custom_mask, mask_indptr)``."""
        key = (q.shape[1], k_buffer.shape[1], q.shape[2], k_buffer.shape[0])
        if key not in self.plans:
            table, seq_lens = block_table(kv_indptr, kv_indices, None if new_slots is None else cu_seqlens_q, new_slots)
            parents = is_tree = None
            if tree_mask is not None:  # every request holds a tree of the same size
                batch = cu_seqlens_q.numel() - 1
                parents = tree_parents_from_mask(*tree_mask, kv_indptr[1:] - kv_indptr[:-1], q.shape[0] // max(batch, 1))
                is_tree = torch.ones(batch, dtype=torch.bool, device=q.device)
            plan = plan_mixed_attention(
                cu_seqlens_q, seq_lens, table, num_q_heads=q.shape[1], num_kv_heads=k_buffer.shape[1],
                head_dim=q.shape[2], num_blocks=k_buffer.shape[0], block_size=1, num_tokens=q.shape[0],
                tree_parents=parents, is_tree=is_tree, dtype=q.dtype)
            self.plans[key] = (table, seq_lens, plan)
        table, seq_lens, plan = self.plans[key]
        k_cache, v_cache = (buf.view(buf.shape[0], 1, *buf.shape[1:]) for buf in (k_buffer, v_buffer))
        mixed_attention(q, k_cache, v_cache, table, cu_seqlens_q, seq_lens, scale,
                        softcap=logit_cap if logit_cap and logit_cap > 0 else None, out=o, plan=plan)

    def _forward_extend_kernel(self, layer, q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices,
                               custom_mask, causal, mask_indptr, max_extend_len, k_descale, v_descale, scale, *,
                               logit_cap=0.0, sliding_window_size=-1, sinks=None, window_kv_offsets=None,
                               xai_temperature_len=-1, score_mod=None, **kwargs):
        served = (self.dllm_attention is None and sinks is None and score_mod is None and xai_temperature_len <= 0
                  and sliding_window_size in (None, -1) and (causal or custom_mask is not None)
                  and k_descale == 1.0 and v_descale == 1.0 and k_buffer.dtype == q.dtype)
        if not served:
            return super()._forward_extend_kernel(
                layer, q, k, v, o, k_buffer, v_buffer, qo_indptr, kv_indptr, kv_indices, custom_mask, causal,
                mask_indptr, max_extend_len, k_descale, v_descale, scale, logit_cap=logit_cap,
                sliding_window_size=sliding_window_size, sinks=sinks, window_kv_offsets=window_kv_offsets,
                xai_temperature_len=xai_temperature_len, score_mod=score_mod, **kwargs)
        self._mixed_attention(q, k_buffer, v_buffer, o, qo_indptr.int(), kv_indptr, kv_indices,
                              self.forward_batch.out_cache_loc, scale, logit_cap,
                              None if custom_mask is None else (custom_mask, mask_indptr))

    def _decode_attention_fwd(self, q, k_buffer, v_buffer, o, kv_indptr, kv_indices, *args, logit_cap=0.0,
                              sinks=None, xai_temperature_len=-1, **kwargs):
        sm_scale, k_scale, v_scale = args[4:7]  # after attn_logits, attn_lse, num_kv_splits, max_kv_splits
        if sinks is not None or xai_temperature_len > 0 or k_scale != 1.0 or v_scale != 1.0 \
                or k_buffer.dtype != q.dtype:
            return self.sglang_decode_attention_fwd(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, *args,
                                                    logit_cap=logit_cap, sinks=sinks,
                                                    xai_temperature_len=xai_temperature_len, **kwargs)
        cu_seqlens_q = torch.arange(kv_indptr.numel(), dtype=torch.int32, device=q.device)
        self._mixed_attention(q, k_buffer, v_buffer, o, cu_seqlens_q, kv_indptr, kv_indices, None, sm_scale, logit_cap)
