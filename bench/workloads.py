"""Attention benchmark workloads W1-W5 (docs/design.md "Benchmark workloads"), defined once.

Llama-3-8B heads (32 query heads, 8 KV heads, head_dim 128), bf16, block size 16, random block
tables and data. "At context C" means C keys in total, new tokens included. Counting rules:
FLOPs = 4 x useful query-key pairs (causal and tree masks counted exactly) x head_dim x query
heads; minimum bytes = every touched K/V byte once + Q read once + O written once.

``tiny=True`` shrinks every workload (lengths / 32, batch / 16, 8 query and 2 KV heads of 32
dims, fp16) so the benchmark code can run on a CPU under the Triton interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tkernels.attention.batch import PagedBatch, random_paged_batch, random_parents

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
TREE_NODES = 64

# name -> (description, [(new tokens, context, is_tree, request count), ...])
WORKLOADS: dict[str, tuple[str, list[tuple[int, int, bool, int]]]] = {
    "W1": ("decode-maximal: 1 chunk of 512 on 3584 cached + 64 decodes at 2048",
           [(512, 3584 + 512, False, 1), (1, 2048, False, 64)]),
    "W2": ("1 chunk of 2048 (no prefix) + 128 decodes at 1024", [(2048, 2048, False, 1), (1, 1024, False, 128)]),
    "W3": ("decode-only: 256 decodes at 4096", [(1, 4096, False, 256)]),
    "W4": ("prefill-only: 1 chunk of 1024 on 7168 cached", [(1024, 7168 + 1024, False, 1)]),
    "W5": ("tree verification: 32 requests x 64-node tree at 2048", [(TREE_NODES, 2048, True, 32)]),
}


@dataclass
class Workload:
    name: str
    description: str
    batch: PagedBatch
    flops: float
    min_bytes: float


def build(name: str, *, device: str | torch.device = "cuda", seed: int = 0, tiny: bool = False) -> Workload:
    """The inputs of workload ``name``. All requests of W5 share one random tree shape, so
    kernels taking a single tree mask for the batch (vLLM's ``qq_bias``) can run it too."""
    description, groups = WORKLOADS[name]
    q_lens, seq_lens, trees = [], [], []
    for new, ctx, tree, count in groups:
        if tiny:
            new, ctx, count = max(1, new // 32) if not tree else new // 4, max(1, ctx // 32), max(1, count // 16)
            ctx = max(ctx, new)
        q_lens += [new] * count
        seq_lens += [ctx] * count
        trees += [tree] * count
    heads = dict(num_q_heads=8, num_kv_heads=2, head_dim=32) if tiny else \
        dict(num_q_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM)
    device = torch.device(device)
    generator = torch.Generator(device).manual_seed(seed)
    batch = random_paged_batch(q_lens, seq_lens, **heads, block_size=BLOCK_SIZE,
                               dtype=torch.float16 if tiny else torch.bfloat16, device=device,
                               generator=generator, trees=trees if any(trees) else None, pad_block=0)
    if batch.is_tree is not None:
        shape = random_parents(max(q_lens), torch.Generator().manual_seed(seed))
        batch.tree_parents = torch.cat([shape[:n] for n in q_lens]).to(device)
    flops, min_bytes = count_work(batch)
    return Workload(name, description, batch, flops, min_bytes)


def count_work(batch: PagedBatch) -> tuple[float, float]:
    """(FLOPs, minimum bytes) of ``batch`` under docs/design.md's counting rules."""
    T, num_q_heads, head_dim = batch.q.shape
    num_kv_heads = batch.k_cache.shape[2]
    elem = batch.q.element_size()
    cu = batch.cu_seqlens_q.tolist()
    seq_lens = batch.seq_lens.tolist()
    parents = batch.tree_parents.tolist() if batch.is_tree is not None else None
    pairs = 0
    for r, ctx in enumerate(seq_lens):
        n = cu[r + 1] - cu[r]
        prefix = ctx - n
        if parents is not None and bool(batch.is_tree[r]):
            depth = []
            for p in parents[cu[r]:cu[r + 1]]:
                depth.append(0 if p < 0 else depth[p] + 1)
            new_pairs = sum(d + 1 for d in depth)  # each node sees its ancestors and itself
        else:
            new_pairs = n * (n + 1) // 2
        pairs += n * prefix + new_pairs
    flops = 4.0 * pairs * head_dim * num_q_heads
    kv_bytes = 2.0 * sum(seq_lens) * num_kv_heads * head_dim * elem
    return flops, kv_bytes + 2.0 * T * num_q_heads * head_dim * elem
