"""vLLM attention backend running tkernels' mixed-batch kernel (``--attention-backend CUSTOM``).

A thin adapter over :func:`tkernels.attention.mixed_attention`: the metadata builder plans the
step once (prefill chunks and decodes scheduled together, split-KV where decodes leave the GPU
idle) and every layer of the KV-cache group reuses that plan; each layer writes its new K/V
into vLLM's paged cache and runs one launch for the whole mixed batch.

KV cache: vLLM's logical per-layer cache ``[num_blocks, num_kv_heads, block_size, 2 * head_size]``
(K and V side by side in the last dimension, any physical layout), viewed as the kernel's
``[num_blocks, block_size, num_kv_heads, head_size]`` K and V tensors through strides, exactly
as vLLM's Triton backend does; new K/V are written with vLLM's own Triton
``reshape_and_cache_flash`` on a GPU (inherited from ``TritonAttentionImpl``) and with an
indexed copy on the CPU.

Supported: decoder self-attention, fp16/bf16 (fp32 too), GQA/MQA, head sizes 16-256, sliding
window, logits softcap, any block size, KV cache dtype ``auto``/``float16``/``bfloat16``.
Not supported (rejected when vLLM validates the backend or builds a layer): FP8/quantized KV
caches, ALiBi, attention sinks, encoder/cross attention, non-causal decoders, multimodal
bidirectional prefixes, full CUDA graphs (vLLM falls back to piecewise graphs, where attention
runs eagerly).

Where the kernel cannot run. vLLM never picks CUSTOM on its own, so this backend only runs
when asked for; when the Triton kernel cannot launch (no CUDA/ROCm device and no
``TRITON_INTERPRET=1``) the request fails with a clear error rather than dying inside Triton.
vLLM's CPU platform ignores ``--attention-backend`` altogether and uses ``CPU_ATTN`` (logging
"Cannot use ... CUSTOM backend on CPU"). ``TKERNELS_VLLM_CPU_ATTENTION=interpreter`` (with
``TRITON_INTERPRET=1``; older name ``TKERNELS_VLLM_CPU_TEST_BACKEND=1``) makes
:func:`tkernels.plugins.vllm.register_attention_backend` put this backend in ``CPU_ATTN``'s place,
running the kernel under Triton's interpreter (tests); ``TKERNELS_VLLM_CPU_ATTENTION=native`` runs
vLLM-CPU's own compiled extend-attention kernel with the step's tree mask
(:mod:`tkernels.plugins.vllm.cpu_attention`: bf16 layers without window or softcap; the builder
builds that plan, and the compiled path's for the other layers, logged once);
``TKERNELS_VLLM_CPU_ATTENTION=compiled`` runs :mod:`tkernels.attention.compiled_path` (a compiled
loop over the paged cache, fp32 and bf16 caches; fp16 layers run the torch path);
``TKERNELS_VLLM_CPU_ATTENTION=torch`` runs :mod:`tkernels.attention.torch_path` (vectorised
PyTorch, no interpreter, any dtype), the builder building its per-step plan
(:func:`~tkernels.attention.torch_path.plan_torch_attention`) in place of the Triton kernel's;
the layer's forward runs whichever plan it is given. ``TKERNELS_VLLM_CPU_ATTENTION=reference`` runs
:func:`tkernels.attention.mixed_attention_reference` (a Python loop per request; slow, kept to
check against), the builder only checking the batch (:func:`~tkernels.attention.plan.describe_batch`).

Trees: when tkernels' tree speculation runs (:mod:`tkernels.plugins.vllm.tree`), each step's
tree rows are handed to this step's metadata builders (:attr:`TkernelsAttentionMetadataBuilder.step_trees`,
set by ``TreeBatch.begin_step`` before vLLM builds the metadata and cleared after verification),
and the builder passes them to the plan, so each tree node attends to the prefix, its ancestors
and itself. The plan reads host copies only (vLLM's ``query_start_loc_cpu`` and
``seq_lens_cpu_upper_bound``, exact without async speculative scheduling, and the step's
host-built trees, ``step_trees_host``, checked once by the tree path): planning a step costs no
device synchronisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.triton_attn import TritonAttentionImpl
from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers
from vllm.v1.kv_cache_interface import AttentionSpec

from tkernels.attention import (
    HostBatch,
    MixedAttentionPlan,
    mixed_attention,
    mixed_attention_reference,
    plan_mixed_attention,
)
from tkernels.attention.compiled_path import (
    COMPILED_DTYPES,
    CompiledAttentionPlan,
    CompiledCaches,
    compiled_caches,
    mixed_attention_prepared,
    plan_compiled_attention,
)
from tkernels.attention.compiled_path import warm_up as warm_up_compiled
from tkernels.attention.plan import BatchLayout, describe_batch
from tkernels.attention.torch_path import TorchAttentionPlan, mixed_attention_torch, plan_torch_attention
from tkernels.plugins.vllm.cache_write import cache_bits, write_kv
from tkernels.plugins.vllm.compat import CPU_ATTENTION_ENV, CPU_PYTORCH_MODES, cpu_test_mode, require_supported_vllm
from tkernels.plugins.vllm.cpu_attention import (
    NativeCpuPlan,
    native_cpu_attention,
    native_unavailable_reason,
    plan_native_cpu_attention,
)

logger = logging.getLogger("tkernels")

def kernel_unavailable_reason() -> str | None:
    """Why the Triton kernel cannot launch in this process, or None when it can."""
    import triton

    if triton.knobs.runtime.interpret or torch.cuda.is_available() or cpu_test_mode() in CPU_PYTORCH_MODES:
        return None
    return ("tkernels' attention backend runs a Triton GPU kernel: it needs a CUDA or ROCm device "
            "(or TRITON_INTERPRET=1, Triton's CPU interpreter, for tests)")


@dataclass
class TkernelsAttentionMetadata:
    query_start_loc: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B], context including the new tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]
    # One per sliding window in the group: the Triton kernel's plan, vLLM-CPU's kernel's
    # (TKERNELS_VLLM_CPU_ATTENTION=native), the compiled CPU path's (=compiled, and =native where
    # that kernel does not apply; fp32/bf16), the torch path's (=torch, other dtypes) or, for the
    # reference, the checked batch alone.
    plans: dict[int | None, MixedAttentionPlan | TorchAttentionPlan | CompiledAttentionPlan | NativeCpuPlan | BatchLayout]
    tree_parents: torch.Tensor | None = None  # int32 [T]: speculation trees' local parents (tree rows)
    is_tree: torch.Tensor | None = None  # bool [B]


class TkernelsAttentionMetadataBuilder(AttentionMetadataBuilder[TkernelsAttentionMetadata]):
    """Plans each step once for every layer of its KV-cache group (one plan per window size)."""

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        model_config = vllm_config.model_config
        self.num_q_heads = get_num_attention_heads_from_layers(vllm_config, layer_names) or \
            model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self.head_dim = kv_cache_spec.head_size
        self.block_size = kv_cache_spec.block_size
        self.dtype = kv_cache_spec.dtype  # the cache's element type picks the default tiles
        self.layers = list(get_layers_from_vllm_config(vllm_config, Attention, layer_names).values())
        # Layers sharing a KV-cache group may still differ in window (e.g. Gemma-3 without the
        # hybrid KV-cache manager); each window gets its own plan.
        self.windows = {layer.impl.window for layer in self.layers} or {None}
        # The running step's (tree_parents int32 [T], is_tree bool [B]), handed over by the tree
        # path for this step only (None: no tree rows); see the module doc.
        self.step_trees: tuple[torch.Tensor, torch.Tensor] | None = None
        self.mode = cpu_test_mode()  # read once: which attention forward runs, so which plan to build
        # Their host copies with every token's depth (tree_parents, is_tree, tree_depths), checked by the tree path.
        self.step_trees_host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # vLLM's host seq_lens are exact unless drafts are scheduled asynchronously (optimistic then).
        self.exact_host_seq_lens = not (getattr(vllm_config.scheduler_config, "async_scheduling", False)
                                        and vllm_config.speculative_config is not None)
        # TKERNELS_VLLM_CPU_ATTENTION=native: the windows vLLM-CPU's kernel runs; the others run
        # the compiled path, or the torch path for dtypes it does not take (said once, here).
        self.native_windows = set()
        # =compiled, and =native's other windows: the compiled CPU path where it takes the cache's dtype.
        self.compiled = self.mode in ("native", "compiled") and self.dtype in COMPILED_DTYPES
        if self.mode == "native":
            model_dtype = model_config.dtype  # q and the layers' new K/V; the kernel takes one dtype for all
            for window in self.windows:
                capped = any(layer.impl.softcap for layer in self.layers if layer.impl.window == window)
                reason = native_unavailable_reason(model_dtype, window, capped) if model_dtype == self.dtype else \
                    f"the KV cache ({self.dtype}) and the model ({model_dtype}) differ in dtype"
                if reason is None:
                    self.native_windows.add(window)
                else:
                    logger.warning("tkernels: %s=native: %s; layers of window %s run %s", CPU_ATTENTION_ENV, reason,
                                   window, "tkernels' compiled CPU attention" if self.compiled
                                   else "the vectorised PyTorch path")
        if self.compiled and self.native_windows != self.windows:
            warm_up_compiled(self.dtype)  # compiled (or loaded) now, not in the first requests' steps
        if self.mode == "compiled" and self.dtype not in COMPILED_DTYPES:
            logger.warning("tkernels: %s=compiled runs float32 and bfloat16 caches, not %s: the vectorised PyTorch "
                           "path runs instead", CPU_ATTENTION_ENV, self.dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TkernelsAttentionMetadata:
        m = common_attn_metadata
        if m.causal is not True:
            raise NotImplementedError("tkernels' attention backend supports causal decoder attention only")
        num_blocks = self.layers[0].kv_cache.shape[0]
        tree_parents, is_tree = self._trees(m)
        host = self._host(m)
        plans = {window: self._plan(m, num_blocks, tree_parents, is_tree, window, host) for window in self.windows}
        return TkernelsAttentionMetadata(
            query_start_loc=m.query_start_loc, seq_lens=m.seq_lens, block_table=m.block_table_tensor, plans=plans,
            tree_parents=tree_parents, is_tree=is_tree,
        )

    def _plan(self, m: CommonAttentionMetadata, num_blocks: int, tree_parents: torch.Tensor | None,
              is_tree: torch.Tensor | None, window: int | None, host: HostBatch | None):
        """The plan the layers' forward runs (only that one: the Triton plan costs tens of ms of
        host time per step on a CPU, where it is not used), from ``host`` copies where there are
        (:meth:`_host`: then nothing is read back from the device and nothing checked twice)."""
        layout = dict(num_q_heads=self.num_q_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                      num_blocks=num_blocks, block_size=self.block_size, tree_parents=tree_parents, is_tree=is_tree,
                      window=window, host=host, checked=host is not None)
        batch = (m.query_start_loc, m.seq_lens, m.block_table_tensor)
        if window in self.native_windows:
            return plan_native_cpu_attention(describe_batch(*batch, **layout), m.block_table_tensor, self.block_size)
        if self.compiled:
            return plan_compiled_attention(*batch, **layout)
        if self.mode in ("torch", "native", "compiled"):
            return plan_torch_attention(*batch, **layout)
        if self.mode == "reference":  # the reference plans nothing; the batch is still checked
            return describe_batch(*batch, **layout)
        return plan_mixed_attention(*batch, **layout, dtype=self.dtype)

    def _trees(self, m: CommonAttentionMetadata) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The running step's speculation trees, padded to this batch's (padded) rows and tokens."""
        trees = self.step_trees
        if trees is None:
            return None, None
        tree_parents, is_tree = trees
        num_reqs, num_tokens = m.query_start_loc.numel() - 1, int(m.query_start_loc_cpu[-1])
        if is_tree.numel() > num_reqs or tree_parents.numel() > num_tokens:
            raise RuntimeError(f"tkernels: the step's trees ({is_tree.numel()} rows, {tree_parents.numel()} tokens) do "
                               f"not fit the attention batch ({num_reqs} rows, {num_tokens} tokens)")
        return _padded(tree_parents, num_tokens, -1), _padded(is_tree, num_reqs, False)

    def _host(self, m: CommonAttentionMetadata) -> HostBatch | None:
        """vLLM's host copies of the batch and the step's host trees, padded as :meth:`_trees`
        pads the device ones (None where vLLM's host seq_lens are not exact: the plan reads back)."""
        if m.seq_lens_cpu_upper_bound is None or not self.exact_host_seq_lens \
                or m.seq_lens_cpu_upper_bound.shape != m.seq_lens.shape \
                or (self.step_trees is None) != (self.step_trees_host is None):
            return None
        if self.step_trees_host is None:
            return HostBatch(m.query_start_loc_cpu, m.seq_lens_cpu_upper_bound)
        tree_parents, is_tree, tree_depths = self.step_trees_host
        num_reqs, num_tokens = m.query_start_loc_cpu.numel() - 1, int(m.query_start_loc_cpu[-1])
        return HostBatch(m.query_start_loc_cpu, m.seq_lens_cpu_upper_bound, _padded(tree_parents, num_tokens, -1),
                         _padded(is_tree, num_reqs, False), _padded(tree_depths, num_tokens, 0))


def _padded(t: torch.Tensor, n: int, value) -> torch.Tensor:
    """``t`` padded with ``value`` to ``n`` entries (vLLM pads its batch for CUDA graphs); itself when no padding is needed."""
    return t if t.numel() == n else torch.nn.functional.pad(t, (0, n - t.numel()), value=value)


class TkernelsAttentionImpl(TritonAttentionImpl):
    """Triton backend's layer (construction, GPU cache writes) with tkernels' kernel in forward."""

    # Read by tree.check_attention_backend: this layer applies the step's tree mask.
    applies_tree_mask: ClassVar[bool] = True

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None, kv_cache_dtype: str,
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: torch.Tensor | None = None,
                 use_alibi_sqrt: bool = False, chunk_lookback: int = -1) -> None:
        require_supported_vllm()
        reason = kernel_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        unsupported = [
            name for name, asked in (
                ("ALiBi", alibi_slopes is not None or use_alibi_sqrt),
                ("attention sinks", sinks is not None),
                ("chunked local attention", chunk_lookback != -1),
                (f"attention type {attn_type}", attn_type != AttentionType.DECODER),
                ("KV sharing between layers with TKERNELS_VLLM_CPU_ATTENTION=native (it reads each layer's new K/V)",
                 kv_sharing_target_layer_name is not None and cpu_test_mode() == "native"),
                (f"KV cache dtype {kv_cache_dtype}",
                 kv_cache_dtype not in TkernelsAttentionBackend.supported_kv_cache_dtypes),
            ) if asked
        ]
        if unsupported:
            raise NotImplementedError(f"tkernels' attention backend does not support {', '.join(unsupported)}")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.window = sliding_window
        self.softcap = logits_soft_cap or None  # vLLM passes 0 or None for "no softcap"
        self.mode = cpu_test_mode()  # as the builder's: the plan it builds is the one forward takes
        self._prepared: _PreparedCache | None = None

    def _kv_caches(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [blocks, kv_heads, block_size, 2 * head_size] -> K, V views [blocks, block_size, kv_heads, head_size]
        return kv_cache.transpose(1, 2).split(self.head_size, dim=-1)

    def _prepare(self, kv_cache: torch.Tensor) -> _PreparedCache:
        """The layer's CPU cache prepared once (vLLM allocates it once and passes the same tensor
        every step), not in every step's calls; prepared again if the tensor or its storage changes."""
        prepared = self._prepared
        if prepared is None or prepared.kv_cache is not kv_cache or prepared.data_ptr != kv_cache.data_ptr():
            prepared = self._prepared = _PreparedCache(kv_cache, kv_cache.data_ptr(), cache_bits(kv_cache))
        return prepared

    def _compiled_caches(self, kv_cache: torch.Tensor) -> CompiledCaches:
        prepared = self._prepare(kv_cache)
        if prepared.compiled is None:
            prepared.compiled = compiled_caches(*self._kv_caches(kv_cache))
        return prepared.compiled

    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: TkernelsAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("tkernels' attention backend does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        plan = attn_metadata.plans[self.window]
        num_tokens = plan.num_tokens  # the batch's real tokens; rows beyond are padding
        if isinstance(plan, NativeCpuPlan):
            native_cpu_attention(query, key, value, kv_cache, plan, self.scale, output, softcap=self.softcap)
            return output
        if isinstance(plan, CompiledAttentionPlan):
            mixed_attention_prepared(query[:num_tokens], self._compiled_caches(kv_cache), plan, self.scale,
                                     softcap=self.softcap, out=output[:num_tokens])
            return output
        k_cache, v_cache = self._kv_caches(kv_cache)
        m = attn_metadata
        if isinstance(plan, TorchAttentionPlan):
            mixed_attention_torch(query[:num_tokens], k_cache, v_cache, plan, self.scale, softcap=self.softcap,
                                  out=output[:num_tokens])
            return output
        if self.mode == "reference":
            output[:num_tokens] = mixed_attention_reference(
                query[:num_tokens], k_cache, v_cache, m.block_table, m.query_start_loc, m.seq_lens, self.scale,
                tree_parents=m.tree_parents, is_tree=m.is_tree, window=self.window, softcap=self.softcap,
            )
            return output
        mixed_attention(
            query[:num_tokens], k_cache, v_cache, m.block_table, m.query_start_loc, m.seq_lens, self.scale,
            window=self.window, softcap=self.softcap, out=output[:num_tokens], plan=plan,
        )
        return output

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        if kv_cache.is_cuda:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        # CPU: vLLM's Triton cache writer needs a GPU; one compiled copy per layer (cache_write.py).
        write_kv(kv_cache, self._prepare(kv_cache).bits, key, value, slot_mapping)


@dataclass(eq=False)
class _PreparedCache:
    """A layer's CPU cache as the compiled paths take it, kept by the layer's impl across steps."""

    kv_cache: torch.Tensor
    data_ptr: int
    bits: np.ndarray | None  # cache_write.cache_bits
    compiled: CompiledCaches | None = None  # the compiled attention's K/V views (built on its first call)


class TkernelsAttentionBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"  # vLLM looks the layer's backend up in AttentionBackendEnum by this name

    @staticmethod
    def get_impl_cls() -> type[TkernelsAttentionImpl]:
        return TkernelsAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TkernelsAttentionMetadataBuilder]:
        return TkernelsAttentionMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return 16 <= head_size <= 256

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability) -> str | None:
        return kernel_unavailable_reason()
