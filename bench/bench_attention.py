"""Mixed-batch attention benchmark: tkernels vs vLLM, SGLang and torch on workloads W1-W5.

Run on a GPU: ``pytest bench/bench_attention.py --benchmark-enable``. Every implementation gets
the same inputs (``bench/workloads.py``); each output is checked against the fp32 reference
before timing. Times are ``triton.testing.do_bench`` medians; each run also records us, TB/s,
TFLOP/s and % of the roofline floor max(min bytes / copy bandwidth, FLOPs / bf16 matmul rate),
both measured here, into ``bench/results/<device file name>.json`` (docs/design.md "Result files").
Without a GPU the module skips, unless ``TKERNELS_BENCH_TINY=1`` runs tiny shapes under the
Triton interpreter (nothing is written then).

tkernels runs twice: with this GPU's config (``tkernels autotune``'s, else the documented
fallback) and as ``tkernels-default-config`` with the built-in defaults, so the result file
shows what tuning bought. It is timed with its plan built beforehand: a server builds it once per step and reuses
it in every layer. vLLM's ``unified_attention`` runs its single-launch path (no 3D split-softmax
buffers), W5 with the shared tree as ``qq_bias``. SGLang runs ``decode_attention_fwd`` on W3 and
``extend_attention_fwd`` elsewhere (decodes as one-token extends, W5 with its custom mask).
Where a server is not installed (or, like vLLM's CPU build, has no usable Triton), its kernels
come from ``bench/.server_kernels/``, filled beforehand by ``python bench/server_kernels.py prepare``.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import pytest
import server_kernels  # bench/ is on sys.path: pytest's rootdir-relative import
import torch
import workloads
from common import DEVICE, HAS_CUDA, median_us, requires_gpu

from tkernels.attention import mixed_attention, mixed_attention_reference, plan_mixed_attention
from tkernels.attention.plan import default_config

pytestmark = requires_gpu

MAX_REL_ERR = 2e-2  # bf16 inputs and probabilities vs the fp32 reference


@functools.cache
def workload(name: str) -> workloads.Workload:
    return workloads.build(name, device=DEVICE, tiny=not HAS_CUDA)


@functools.cache
def reference(name: str) -> torch.Tensor:
    b = workload(name).batch
    return mixed_attention_reference(*b.inputs(), **b.tree_kwargs())


def _tkernels(w: workloads.Workload, builtin_defaults: bool = False):
    """tkernels with this GPU's tuned config (``tkernels autotune``; the documented fallback when
    there is none), or with the built-in defaults: the pair reports what tuning bought."""
    b = w.batch
    num_blocks, block_size, num_kv_heads, head_dim = b.k_cache.shape
    plan = plan_mixed_attention(b.cu_seqlens_q, b.seq_lens, b.block_table, num_q_heads=b.q.shape[1],
                                num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=num_blocks,
                                block_size=block_size, dtype=b.q.dtype,
                                config=default_config(head_dim, b.q.dtype) if builtin_defaults else None,
                                **b.tree_kwargs())
    out = torch.empty_like(b.q)
    return lambda: mixed_attention(*b.inputs(), out=out, plan=plan, **b.tree_kwargs())


def _torch(w: workloads.Workload):
    b = w.batch
    return lambda: mixed_attention_reference(*b.inputs(), **b.tree_kwargs())


def _shared_tree_visibility(w: workloads.Workload) -> torch.Tensor:
    """bool [n, n] ancestor-or-self matrix of the tree every W5 request shares."""
    b = w.batch
    n = int(b.cu_seqlens_q[1])
    parents = b.tree_parents[:n].tolist()
    visible = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            visible[i, j] = True
            j = parents[j]
    return visible.to(b.q.device)


def _server_kernel(name: str, module: str, function: str):
    """The server's own kernel when it is installed and usable, else the copy prepared by
    ``bench/server_kernels.py`` (``bench/.server_kernels/``), else skip."""
    package = module.split(".")[0]
    try:
        # vLLM's CPU build swaps Triton for placeholders: its kernels only run from the copy.
        if package != "vllm" or importlib.import_module("vllm.triton_utils").HAS_TRITON:
            return getattr(importlib.import_module(module), function)
    except ImportError:
        pass
    try:
        return server_kernels.load(name)
    except FileNotFoundError as err:
        pytest.skip(f"{package} is not usable here and {err}")


def _vllm(w: workloads.Workload):
    unified_attention = _server_kernel(
        "vllm_unified_attention", "vllm.v1.attention.ops.triton_unified_attention", "unified_attention")
    b = w.batch
    if b.is_tree is not None and not HAS_CUDA:
        pytest.skip("vLLM's qq_bias tile loader uses Python `and` on tensors, which the interpreter gets wrong")
    q_lens = (b.cu_seqlens_q[1:] - b.cu_seqlens_q[:-1]).tolist()
    qq_bias = None
    if b.is_tree is not None:
        qq_bias = torch.zeros(max(q_lens), max(q_lens), dtype=torch.float32, device=b.q.device)
        qq_bias.masked_fill_(~_shared_tree_visibility(w), float("-inf"))
    out = torch.empty_like(b.q)
    kwargs = dict(
        q=b.q, k=b.k_cache, v=b.v_cache, out=out, cu_seqlens_q=b.cu_seqlens_q, max_seqlen_q=max(q_lens),
        seqused_k=b.seq_lens, max_seqlen_k=int(b.seq_lens.max()), softmax_scale=b.q.shape[2] ** -0.5, causal=True,
        window_size=(-1, -1), block_table=b.block_table, softcap=0, q_descale=None, k_descale=None, v_descale=None,
        qq_bias=qq_bias,
    )

    def run():
        unified_attention(**kwargs)
        return out

    return run


def _token_indices(b, r: int, start: int, stop: int) -> torch.Tensor:
    """Flat cache slots (page size 1 view, SGLang's layout) of keys start..stop-1 of request r."""
    key = torch.arange(start, stop, device=b.q.device)
    block_size = b.k_cache.shape[1]
    return b.block_table[r, key // block_size].long() * block_size + key % block_size


def _unit_kv_scales(kernel) -> dict:
    """SGLang 0.5.23 made ``k_scale``/``v_scale`` required (1.0: unquantized cache); older ones lack them."""
    params = inspect.signature(kernel).parameters
    return {name: 1.0 for name in ("k_scale", "v_scale") if name in params}


def _sglang(w: workloads.Workload):
    b = w.batch
    num_blocks, block_size, num_kv_heads, head_dim = b.k_cache.shape
    k_buffer = b.k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    v_buffer = b.v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    cu = b.cu_seqlens_q.tolist()
    seq_lens = b.seq_lens.tolist()
    q_lens = [cu[r + 1] - cu[r] for r in range(len(seq_lens))]
    scale = head_dim ** -0.5
    out = torch.empty_like(b.q)
    as_int32 = functools.partial(torch.tensor, dtype=torch.int32, device=b.q.device)

    if all(n == 1 for n in q_lens):
        decode = _server_kernel(
            "sglang_decode_attention", "sglang.kernels.ops.attention.decode_attention", "decode_attention_fwd")
        max_kv_splits = 8  # SGLang's default
        B, num_q_heads = len(seq_lens), b.q.shape[1]
        kwargs = dict(
            q=b.q, k_buffer=k_buffer, v_buffer=v_buffer, o=out,
            kv_indptr=as_int32([0, *torch.tensor(seq_lens).cumsum(0).tolist()]),
            kv_indices=torch.cat([_token_indices(b, r, 0, s) for r, s in enumerate(seq_lens)]).to(torch.int32),
            attn_logits=torch.empty(B, num_q_heads, max_kv_splits, head_dim, dtype=torch.float32, device=b.q.device),
            attn_lse=torch.empty(B, num_q_heads, max_kv_splits, dtype=torch.float32, device=b.q.device),
            num_kv_splits=torch.full((B,), max_kv_splits, dtype=torch.int32, device=b.q.device),
            max_kv_splits=max_kv_splits, sm_scale=scale, **_unit_kv_scales(decode),
        )

        def run():
            decode(**kwargs)
            return out

        return run

    extend = _server_kernel(
        "sglang_extend_attention", "sglang.kernels.ops.attention.extend_attention", "extend_attention_fwd")
    prefixes = [s - n for s, n in zip(seq_lens, q_lens)]
    new_slots = torch.cat([_token_indices(b, r, p, s) for r, (p, s) in enumerate(zip(prefixes, seq_lens))])
    custom_mask = mask_indptr = None
    if b.is_tree is not None:
        # Per request, row-major [n, prefix + n]: the prefix is visible, then the tree mask.
        tree = _shared_tree_visibility(w)
        custom_mask = torch.cat([torch.cat([torch.ones(n, p, dtype=torch.bool, device=b.q.device), tree[:n, :n]], 1).flatten()
                                 for n, p in zip(q_lens, prefixes)])
        mask_indptr = as_int32([0, *torch.tensor([n * s for n, s in zip(q_lens, seq_lens)]).cumsum(0).tolist()])
    kwargs = dict(
        q_extend=b.q, k_extend=k_buffer[new_slots].contiguous(), v_extend=v_buffer[new_slots].contiguous(),
        o_extend=out, k_buffer=k_buffer, v_buffer=v_buffer, qo_indptr=b.cu_seqlens_q,
        kv_indptr=as_int32([0, *torch.tensor(prefixes).cumsum(0).tolist()]),
        kv_indices=torch.cat([_token_indices(b, r, 0, p) for r, p in enumerate(prefixes)]).to(torch.int32),
        custom_mask=custom_mask, is_causal=True, mask_indptr=mask_indptr, max_len_extend=max(q_lens), sm_scale=scale,
        **_unit_kv_scales(extend),
    )

    def run():
        extend(**kwargs)
        return out

    return run


IMPLS = {"tkernels": _tkernels, "tkernels-default-config": functools.partial(_tkernels, builtin_defaults=True),
         "vllm": _vllm, "sglang": _sglang, "torch": _torch}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_attention(benchmark, name, impl, roofline, records):
    w = workload(name)
    fn = IMPLS[impl](w)
    want = reference(name).float()
    got = fn().float()
    rel_err = float((got - want).norm() / want.norm())
    assert rel_err < MAX_REL_ERR, f"{impl} on {name}: relative error {rel_err:.3g}"

    us = benchmark.pedantic(median_us, args=(fn,), rounds=1, iterations=1)
    seconds = us * 1e-6
    record = {"workload": name, "impl": impl, "us": us, "rel_err": rel_err,
              "tbps": w.min_bytes / seconds / 1e12, "tflops": w.flops / seconds / 1e12}
    if roofline is not None:
        bandwidth, matmul = roofline
        record["roofline_pct"] = 100.0 * max(w.min_bytes / bandwidth, w.flops / matmul) / seconds
    benchmark.extra_info.update(record, description=w.description)
    records.append(record)
