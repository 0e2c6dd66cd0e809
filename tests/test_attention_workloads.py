"""Benchmark workload definitions: FLOP and byte counts follow docs/design.md's counting rules."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import workloads

from tkernels.attention.batch import PagedBatch


def _shape_only_batch(q_lens, seq_lens, parents=None, elem=torch.bfloat16):
    """Counting reads only shapes and index tensors: tiny caches, real metadata."""
    T = sum(q_lens)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    batch = PagedBatch(q=torch.empty(T, 32, 128, dtype=elem), k_cache=torch.empty(1, 16, 8, 128, dtype=elem),
                       v_cache=torch.empty(1, 16, 8, 128, dtype=elem), block_table=torch.zeros(len(q_lens), 1, dtype=torch.int32),
                       cu_seqlens_q=cu, seq_lens=torch.tensor(seq_lens, dtype=torch.int32))
    if parents is not None:
        batch.tree_parents = torch.tensor(parents, dtype=torch.int32)
        batch.is_tree = torch.ones(len(q_lens), dtype=torch.bool)
    return batch


PER_PAIR = 4 * 128 * 32  # FLOPs per query-key pair over all query heads
KV_PER_KEY = 2 * 8 * 128 * 2  # K and V bytes per key over all KV heads (bf16)
QO_PER_TOKEN = 2 * 32 * 128 * 2  # Q read + O written per query token


@pytest.mark.parametrize("name,q_lens,seq_lens,pairs", [
    ("W1", [512] + [1] * 64, [4096] + [2048] * 64, 512 * 3584 + 512 * 513 // 2 + 64 * 2048),
    ("W2", [2048] + [1] * 128, [2048] + [1024] * 128, 2048 * 2049 // 2 + 128 * 1024),
    ("W3", [1] * 256, [4096] * 256, 256 * 4096),
    ("W4", [1024], [8192], 1024 * 7168 + 1024 * 1025 // 2),
])
def test_causal_counts(name, q_lens, seq_lens, pairs):
    groups = workloads.WORKLOADS[name][1]
    assert [n for new, _, _, count in groups for n in [new] * count] == q_lens
    assert [c for _, ctx, _, count in groups for c in [ctx] * count] == seq_lens
    flops, min_bytes = workloads.count_work(_shape_only_batch(q_lens, seq_lens))
    assert flops == PER_PAIR * pairs
    assert min_bytes == KV_PER_KEY * sum(seq_lens) + QO_PER_TOKEN * sum(q_lens)


def test_tree_counts_ancestors_exactly():
    chain, star = [-1, 0, 1, 2], [-1, 0, 0, 0]  # 4 nodes each, on 10 cached keys
    flops, _ = workloads.count_work(_shape_only_batch([4, 4], [14, 14], chain + star))
    assert flops == PER_PAIR * (2 * 4 * 10 + (1 + 2 + 3 + 4) + (1 + 2 + 2 + 2))


def test_tiny_workloads_build_on_cpu():
    for name in workloads.WORKLOADS:
        w = workloads.build(name, device="cpu", tiny=True)
        assert w.flops > 0 and w.min_bytes > 0
    w5 = workloads.build("W5", device="cpu", tiny=True)
    n = int(w5.batch.cu_seqlens_q[1])
    assert torch.equal(w5.batch.tree_parents[:n], w5.batch.tree_parents[n:2 * n])  # one shared tree shape
