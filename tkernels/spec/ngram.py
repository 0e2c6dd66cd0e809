"""Prompt-lookup / n-gram drafter (the linear-draft baseline, as in PLD and vLLM's ``ngram``).

For each request, find the latest earlier occurrence of its last ``n`` tokens (``n`` from
``max_ngram`` down to ``min_ngram``, longest match wins) and propose the tokens that followed
it. Batched over padded histories with one unfold-and-compare per n-gram size; no per-request
or per-token Python loop.
"""

from __future__ import annotations

import torch

from tkernels.checks import fail, integer

__all__ = ["propose_ngram"]


def propose_ngram(tokens: torch.Tensor, lengths: torch.Tensor, num_draft: int = 10, max_ngram: int = 3, min_ngram: int = 1):
    """Linear drafts for a batch of token histories.

    ``tokens`` int[B, L] (row b valid up to ``lengths[b]``, its last valid token being the last
    committed one). Returns the ragged chain batch ``(draft_tokens int64[total], parents
    int32[total], cu_nodes int32[B+1])``: request b has ``1 + m_b`` nodes, node 0 = its last
    token, ``m_b <= num_draft`` proposed tokens (0 when nothing matches).
    """
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be a 2-D integer tensor [B, L], got {tuple(tokens.shape)} {tokens.dtype}")
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool \
            or lengths.shape != tokens.shape[:1] or bool(((lengths < 1) | (lengths > tokens.shape[1])).any()):
        raise ValueError(f"lengths must be [B] with 1 <= lengths <= {tokens.shape[1]}, got {lengths.tolist()}")
    integer("num_draft", num_draft, minimum=1)
    if integer("min_ngram", min_ngram, minimum=1) > integer("max_ngram", max_ngram, minimum=1):
        fail("min_ngram", f"must be <= max_ngram ({max_ngram}), got {min_ngram}")
    device, batch, length = tokens.device, tokens.shape[0], tokens.shape[1]
    lengths = lengths.to(device).long()
    continuation = torch.full((batch,), -1, dtype=torch.int64, device=device)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length <= n:
            continue
        suffix_idx = (lengths[:, None] - n + torch.arange(n, device=device)).clamp(min=0)
        suffix = tokens.gather(1, suffix_idx)
        windows = tokens.unfold(1, n, 1)  # [B, L - n + 1, n]
        starts = torch.arange(windows.shape[1], device=device)
        # the continuation (start + n) must exist, which also excludes the suffix itself
        match = (windows == suffix[:, None, :]).all(-1) & (starts + n < lengths[:, None])
        latest = torch.where(match, starts, -1).max(-1).values
        take = (continuation < 0) & (latest >= 0) & (lengths >= n)
        continuation = torch.where(take, latest + n, continuation)
    num = torch.where(continuation >= 0, (lengths - continuation).clamp(max=num_draft), 0)
    offsets = torch.arange(num_draft, device=device)
    proposed = tokens.gather(1, (continuation.clamp(min=0)[:, None] + offsets).clamp(max=length - 1))
    last = tokens.gather(1, (lengths - 1)[:, None])
    nodes = torch.cat([last, proposed], 1).long()
    keep = torch.cat([torch.ones(batch, 1, dtype=torch.bool, device=device), offsets < num[:, None]], 1)
    local = torch.arange(num_draft + 1, device=device).expand(batch, -1)
    parents = (local - 1)[keep].int()
    cu_nodes = torch.zeros(batch + 1, dtype=torch.int32, device=device)
    cu_nodes[1:] = (num + 1).cumsum(0)
    return nodes[keep], parents, cu_nodes
