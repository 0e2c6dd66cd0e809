"""Random mixed batches over a paged K/V cache, for tests and benchmarks.

One builder for every caller so tests and benchmark workloads describe batches the same way:
per-request new-token counts, context lengths (new tokens included), and which requests are
speculation trees (random valid BFS parents).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_table: torch.Tensor  # int32 [B, max_blocks]
    cu_seqlens_q: torch.Tensor  # int32 [B + 1]
    seq_lens: torch.Tensor  # int32 [B]
    tree_parents: torch.Tensor | None = None  # int32 [T], local parents (trees only)
    is_tree: torch.Tensor | None = None  # bool [B]

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Positional arguments of ``mixed_attention`` / ``mixed_attention_reference``."""
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.cu_seqlens_q, self.seq_lens)

    def tree_kwargs(self) -> dict[str, Any]:
        return {} if self.is_tree is None else {"tree_parents": self.tree_parents, "is_tree": self.is_tree}


def random_parents(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random valid tree of ``n`` nodes in the parents contract (BFS order: parents[0] = -1,
    0 <= parents[i] < i, parents[1:] non-decreasing)."""
    if n == 0:
        return torch.zeros(0, dtype=torch.int32)
    # parents[i] uniform in [0, i): floor(u * i) for u in [0, 1); sorting keeps parents[i] < i
    # (the k-th smallest of them is at most k - 1) and puts the tree in BFS order.
    u = torch.rand(n - 1, generator=generator)
    rest = (u * torch.arange(1, n)).long().clamp(max=torch.arange(0, n - 1)).sort().values
    return torch.cat([torch.tensor([-1]), rest]).to(torch.int32)


TREE_KINDS = ("chain", "star", "random")


def tree_parents(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """An ``n``-node tree (int32 parents) of one kind: ``chain`` (depth n - 1), ``star`` (every
    node a child of the root) or ``random`` (:func:`random_parents`); the shapes tests of every
    tree kernel take at each size."""
    if kind == "chain":
        return torch.arange(-1, n - 1, dtype=torch.int32)
    if kind == "star":
        return torch.cat([torch.tensor([-1]), torch.zeros(max(n - 1, 0), dtype=torch.long)]).to(torch.int32)[:n]
    if kind == "random":
        return random_parents(n, generator)
    raise ValueError(f"kind must be one of {TREE_KINDS}, got {kind!r}")


def random_paged_batch(
    q_lens: Sequence[int],
    seq_lens: Sequence[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
    trees: Sequence[bool] | None = None,
    spare_blocks: int = 3,
    pad_block: int = -1,
) -> PagedBatch:
    """Random q/K/V, a shuffled block table and (for ``trees[r]``) random tree parents.

    ``generator`` may live on ``device`` (fast for large caches) or on the CPU. Block-table
    columns past a request's blocks hold ``pad_block`` (-1 catches reads past ``seq_lens``;
    benchmarks pass 0 like vLLM, whose kernels may read one padded entry).
    """
    assert len(q_lens) == len(seq_lens) and all(s >= q for q, s in zip(q_lens, seq_lens))
    generator = generator or torch.Generator().manual_seed(0)
    device = torch.device(device)
    gen_device = generator.device
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + spare_blocks
    order = torch.randperm(num_blocks, generator=generator, device=gen_device).to(torch.int32).cpu()
    table = torch.full((len(q_lens), max(blocks, default=0) or 1), pad_block, dtype=torch.int32)
    used = 0
    for r, n in enumerate(blocks):
        table[r, :n] = order[used:used + n]
        used += n
    T = sum(q_lens)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, dtype)

    batch = PagedBatch(
        q=randn(T, num_q_heads, head_dim),
        k_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        v_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        block_table=table.to(device),
        cu_seqlens_q=torch.tensor([0, *torch.tensor(list(q_lens), dtype=torch.long).cumsum(0).tolist()],
                                  dtype=torch.int32, device=device),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int32, device=device),
    )
    if trees is not None and any(trees):
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(2**31, (1,), generator=generator, device=gen_device)))
        # Non-tree requests get parents too (ignored by the kernel) so the tensor covers every token.
        parents = [random_parents(n, cpu_gen) for n in q_lens]
        batch.tree_parents = torch.cat(parents).to(device) if parents else torch.zeros(0, dtype=torch.int32, device=device)
        batch.is_tree = torch.tensor(list(trees), dtype=torch.bool, device=device)
    return batch
