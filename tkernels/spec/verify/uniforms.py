"""The uniforms the sampling kernels consume: drawn from generators, or keyed by (seed, position)."""

from __future__ import annotations

import torch

from tkernels.checks import fail, integer
from tkernels.spec.verify.inputs import UNIFORM_COLUMNS, _describe


def draw_uniforms(
    cu_nodes: torch.Tensor, generator: torch.Generator | None = None, generators: dict[int, torch.Generator] | None = None
) -> torch.Tensor:
    """The uniforms the sampling kernels consume: float32[total_nodes, 2] in [0, 1).

    Drawn from ``generator`` (or torch's default), except that request ``b``'s rows come from
    ``generators[b]`` where given (vLLM's per-request seeded generators): those depend only on
    that request's seed and tree size, not on the rest of the batch.
    """
    if not isinstance(cu_nodes, torch.Tensor) or cu_nodes.dim() != 1 or cu_nodes.numel() < 1 \
            or cu_nodes.dtype not in (torch.int32, torch.int64):
        fail("cu_nodes", f"must be a 1-D int32 tensor [B+1], got {_describe(cu_nodes)}")
    bounds = cu_nodes.tolist()
    if bounds[0] != 0 or sorted(bounds) != bounds:
        fail("cu_nodes", f"must start at 0 and never decrease, got {bounds}")
    device = cu_nodes.device
    for g in [generator, *(generators or {}).values()]:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"generator is on {g.device} but the inputs are on {device}")
    uniforms = torch.rand((bounds[-1], UNIFORM_COLUMNS), generator=generator, device=device)
    for b, g in (generators or {}).items():
        if not 0 <= b < len(bounds) - 1:
            raise ValueError(f"generators has request {b} but the batch has {len(bounds) - 1}")
        uniforms[bounds[b] : bounds[b + 1]] = torch.rand((bounds[b + 1] - bounds[b], UNIFORM_COLUMNS), generator=g, device=device)
    return uniforms


def _as_int64(value: int) -> int:
    """``value`` mod 2**64 as a signed 64-bit integer (torch has no uint64 arithmetic)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = (_as_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 bit patterns (multiplications wrap mod 2**64)."""
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def keyed_uniforms(seeds: torch.Tensor | list[int], positions: torch.Tensor) -> torch.Tensor:
    """Uniforms that depend only on ``(seed, position)``: float32[N, 2] in [0, 1), 24 random bits each.

    ``seeds`` int64[N] or N Python ints (a request's seed; any integer, taken mod 2**64),
    ``positions`` int64[N] on the output's device
    (for the sampling kernels: the index in the sequence of the token a node's draw samples).
    Row ``i`` is SplitMix64's stream for the mixed seed at counters ``2 * position + c``, so
    every (seed, position) pair gets its own uniforms wherever it sits in a batch, whatever
    tree it belongs to and whatever was drafted. Used as :func:`verify_sampling`'s
    ``uniforms`` for deterministic drafts (the target-only rule visits one node per depth, so
    the draws along the accepted path use distinct positions: independent uniforms, and the
    output of a seeded request is a function of its seed and prompt alone). Not for sampled
    drafts: recursive rejection tests sibling nodes, which share a position, with column 0.
    """
    if not isinstance(positions, torch.Tensor):
        fail("positions", f"must be an int64[N] tensor, got {type(positions).__name__}")
    if not isinstance(seeds, torch.Tensor):
        seeds = torch.tensor([_as_int64(integer(f"seeds[{i}]", seed)) for i, seed in enumerate(seeds)],
                             dtype=torch.int64, device=positions.device)
    if seeds.dtype != torch.int64 or positions.dtype != torch.int64 or seeds.shape != positions.shape or seeds.dim() != 1:
        raise ValueError(f"seeds and positions must be int64[N] of one shape, got {seeds.dtype}{list(seeds.shape)} "
                         f"and {positions.dtype}{list(positions.shape)}")
    if seeds.device != positions.device:
        raise ValueError(f"seeds and positions must be on one device, got {seeds.device} and {positions.device}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"positions must be non-negative, got minimum {int(positions.min())}")
    stream = _splitmix64(seeds + _GOLDEN)  # the seed's own starting point
    counters = (UNIFORM_COLUMNS * positions[:, None] + torch.arange(1, UNIFORM_COLUMNS + 1, device=positions.device)) * _GOLDEN
    bits = _shr(_splitmix64(stream[:, None] + counters), 40)  # top 24 bits
    return bits.to(torch.float32) * 2.0**-24
