"""KV compaction after tree verification: the accepted path's K/V into contiguous positions.

During verification, tree node ``i`` of request ``b`` wrote its K/V at position
``prefix_lens[b] + i`` of the paged cache (slot ``block_table[b, pos // block_size] *
block_size + pos % block_size``). After verification the accepted path (``accepted_nodes[b, :n]``
from :mod:`tkernels.spec.verify`, ``n = num_accepted[b]``) must sit at positions
``prefix_lens[b] + 0 .. n - 1``: path entry ``d`` moves from node ``accepted_nodes[b, d]`` to
position ``d``. Entry 0 is node 0 (the last committed token) and stays; so does every entry whose
node already is ``d``. The last entry is the bonus token's node: its K/V is needed too (the bonus
token itself has no K/V yet and is written by the next step).

In place and overlapping: path nodes increase strictly and ``d <= accepted_nodes[b, d]``, but a
destination can be another entry's source (path 0, 2, 3: entry 1 reads position 2, which entry
2 writes). Each program therefore loads all of its request's source rows (one column tile) into
registers, synchronises, then stores.

API: :func:`compact_kv` takes one cache tensor or a list of them (e.g. ``[k_cache, v_cache]`` of
one layer, or every layer's); each is ``[..., num_blocks, block_size, num_kv_heads, head_dim]``
(vLLM's layout, leading dims such as a stacked K/V or layer axis allowed) and gets one launch
whose grid covers requests x leading planes x column tiles. Launch parameters
(:data:`DEFAULT_CONFIG`: the column tile and warps) are tuned per row size (bucket key
``kv_dim`` = heads x head_dim) by ``tkernels autotune``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from tkernels.checks import integer
from tkernels.config import cdiv, next_power_of_2
from tkernels.config import launch_config as _launch_config
from tkernels.registry import gpu_compile_check

__all__ = ["compact_kv", "compact_kv_cpu", "compact_kv_reference", "DEFAULT_CONFIG", "launch_config"]

DEFAULT_CONFIG = {"block_hd": 512, "num_warps": 4}  # columns of a row per program (<= 4096 elements in all)


def search_space(dry_run: bool, quick: bool) -> list[dict[str, int]]:
    """The configs ``tkernels autotune`` tries over :data:`DEFAULT_CONFIG`."""
    if dry_run:
        return [{"block_hd": 16, "num_warps": 1}, {"block_hd": 32}]
    return [{"block_hd": c, "num_warps": w} for c in (64, 128, 256, 512) for w in ((4,) if quick else (1, 2, 4, 8))]


def launch_config(kv_dim: int, config: dict | None = None) -> dict:
    """compact_kv's launch parameters for rows of ``kv_dim`` = heads x head_dim elements:
    ``config`` over the GPU's tuned bucket over :data:`DEFAULT_CONFIG`."""
    integer("kv_dim", kv_dim, minimum=1)
    return _launch_config("kv_compaction", {"kv_dim": kv_dim}, DEFAULT_CONFIG, config)


def _tiles(width: int, kv_dim: int, cfg: dict) -> tuple[int, int]:
    """(path slots, columns) per program: at most 4096 elements in registers."""
    block_a = next_power_of_2(width)
    return block_a, min(cfg["block_hd"], next_power_of_2(kv_dim), max(16, 4096 // block_a))


def compile_launch(dtype: str, width: int, cfg: dict, candidate: bool = False):
    """What compact_kv compiles for ``width``-wide accepted paths in 8 x 128 KV rows under ``cfg``."""
    from tkernels.registry import Launch

    block_a, block_hd = _tiles(width, 1024, cfg)
    return Launch(f"{dtype} {block_a}x{block_hd} w{cfg['num_warps']}", dict(BLOCK_A=block_a, BLOCK_HD=block_hd),
                  types={"cache_ptr": f"*{dtype}"}, options={"num_warps": cfg["num_warps"]}, candidate=candidate)


def _launches(shared_limit):
    """What compact_kv compiles by default (GPU-target compile check, tkernels.registry): each
    cache dtype for 8-wide and 64-wide accepted paths (autotune's candidates:
    :mod:`tkernels.autotune.candidates`)."""
    for dtype in ("fp32", "fp16", "bf16"):
        for width in (8, 64):
            yield compile_launch(dtype, width, DEFAULT_CONFIG)


@gpu_compile_check(
    {
        "cache_ptr": "*bf16", "stride_plane": "i64", "stride_block": "i64", "stride_slot": "i64",
        "block_table_ptr": "*i32", "stride_bt": "i64", "prefix_ptr": "*i32", "nodes_ptr": "*i32",
        "num_ptr": "*i32", "W": "i32", "HD": "i32", "block_size": "i32",
    },
    _launches,
    BLOCK_A=8,
    BLOCK_HD=512,
)
@triton.jit
def _compact_kv_kernel(
    cache_ptr, stride_plane, stride_block, stride_slot, block_table_ptr, stride_bt, prefix_ptr,
    nodes_ptr, num_ptr, W, HD, block_size,
    BLOCK_A: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    b = tl.program_id(0)
    plane = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    num = tl.load(num_ptr + b)
    prefix = tl.load(prefix_ptr + b)
    d = tl.arange(0, BLOCK_A)
    node = tl.load(nodes_ptr + b * W + d, mask=d < W, other=0)
    move = (d >= 1) & (d < num) & (node != d)
    table = block_table_ptr + b.to(tl.int64) * stride_bt
    src_pos = prefix + node
    dst_pos = prefix + d
    src_block = tl.load(table + src_pos // block_size, mask=move, other=0).to(tl.int64)
    dst_block = tl.load(table + dst_pos // block_size, mask=move, other=0).to(tl.int64)
    src = src_block * stride_block + (src_pos % block_size).to(tl.int64) * stride_slot
    dst = dst_block * stride_block + (dst_pos % block_size).to(tl.int64) * stride_slot
    cols = tile * BLOCK_HD + tl.arange(0, BLOCK_HD)
    mask = move[:, None] & (cols < HD)[None, :]
    base = cache_ptr + plane * stride_plane
    rows = tl.load(base + src[:, None] + cols[None, :], mask=mask)
    tl.debug_barrier()  # every source row is read before any destination is written
    tl.store(base + dst[:, None] + cols[None, :], rows, mask=mask)


def _as_list(kv_caches) -> list[torch.Tensor]:
    caches = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches)
    if not caches or not all(isinstance(c, torch.Tensor) for c in caches):
        raise ValueError("kv_caches must be a tensor or a non-empty sequence of tensors")
    return caches


def _check(caches, block_table, prefix_lens, accepted_nodes, num_accepted, checked: bool = False) -> None:
    """Types and shapes (host metadata), then the values in one device read (``checked``: the
    values are trusted, as a server's verification outputs are: no read at all)."""
    device = block_table.device if isinstance(block_table, torch.Tensor) else None
    for name, t, dtypes in (
        ("block_table", block_table, (torch.int32,)),
        ("prefix_lens", prefix_lens, (torch.int32, torch.int64)),
        ("accepted_nodes", accepted_nodes, (torch.int32,)),
        ("num_accepted", num_accepted, (torch.int32,)),
    ):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            raise ValueError(f"{name} must be a {' or '.join(map(str, dtypes))} tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but block_table is on {device}")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [B, max_blocks], got {tuple(block_table.shape)}")
    batch = block_table.shape[0]
    if prefix_lens.shape != (batch,) or num_accepted.shape != (batch,):
        raise ValueError(f"prefix_lens and num_accepted must be [B={batch}], got {tuple(prefix_lens.shape)} and {tuple(num_accepted.shape)}")
    if accepted_nodes.dim() != 2 or accepted_nodes.shape[0] != batch or accepted_nodes.shape[1] < 1:
        raise ValueError(f"accepted_nodes must be [B={batch}, W>=1], got {tuple(accepted_nodes.shape)}")
    if block_table.stride(1) != 1 or not accepted_nodes.is_contiguous():
        raise ValueError("block_table rows and accepted_nodes must be contiguous")
    shape = caches[0].shape
    for i, c in enumerate(caches):
        if c.dim() < 4 or c.shape != shape or c.device != device or not c.is_floating_point():
            raise ValueError(
                f"kv_caches[{i}] must be a float [..., num_blocks, block_size, num_kv_heads, head_dim] tensor "
                f"on {device} shaped like kv_caches[0] {tuple(shape)}, got {tuple(c.shape)} {c.dtype} on {c.device}"
            )
        if c.stride(-1) != 1 or c.stride(-2) != c.shape[-1]:
            raise ValueError(f"kv_caches[{i}]: each slot's [num_kv_heads, head_dim] must be contiguous, strides {c.stride()}")
    if batch == 0 or checked:
        return
    # The values, checked where they live and read back together (one device synchronisation).
    width = accepted_nodes.shape[1]
    num = num_accepted.long()
    d = torch.arange(width, device=device)
    used = d[None, :] < num[:, None]
    nodes = accepted_nodes.long()
    positions = prefix_lens.long()[:, None] + torch.where(used, nodes, 0)
    block_size, num_blocks = shape[-3], shape[-4]
    inside = positions < block_table.shape[1] * block_size
    blocks = block_table.long().gather(1, torch.where(inside, positions, 0).clamp(min=0) // block_size)
    flags = torch.stack([
        ((num >= 1) & (num <= width)).all(),
        (nodes[:, 0] == 0).all() & ((nodes[:, 1:] > nodes[:, :-1]) | ~used[:, 1:]).all(),
        (prefix_lens >= 0).all(),
        (inside | ~used).all(),
        (~(used & ((blocks < 0) | (blocks >= num_blocks)))).all(),
    ]).tolist()
    if not flags[0]:
        raise ValueError(f"num_accepted must lie in [1, {width}], got {num_accepted.tolist()}")
    if not flags[1]:
        raise ValueError("accepted_nodes must start at node 0 and increase strictly along each accepted path")
    if not flags[2]:
        raise ValueError(f"prefix_lens: must be >= 0 (node 0's position), got {prefix_lens.tolist()}")
    if not flags[3]:
        raise ValueError(f"prefix_lens + accepted_nodes reach past block_table's {block_table.shape[1]} blocks of {block_size}")
    if not flags[4]:
        raise ValueError(f"block_table has block ids outside [0, {num_blocks}) at accepted positions")


def compact_kv(
    kv_caches: torch.Tensor | Sequence[torch.Tensor],
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    num_accepted: torch.Tensor,
    config: dict | None = None,
    *,
    checked: bool = False,
) -> None:
    """Move every accepted node's K/V to its path position, in place, in each cache tensor.

    ``block_table`` int32[B, max_blocks], ``prefix_lens`` int32[B] (position of node 0),
    ``accepted_nodes`` int32[B, W] and ``num_accepted`` int32[B] as returned by verification;
    ``config``: launch parameters overriding the tuned ones (:func:`launch_config`).
    Their values are checked on the device and read back once (one synchronisation);
    ``checked=True`` trusts them (a server passing verification's outputs and its own block
    table and prefixes straight on): no synchronisation at all.
    """
    caches = _as_list(kv_caches)
    _check(caches, block_table, prefix_lens, accepted_nodes, num_accepted, checked)
    num_blocks, block_size, heads, head_dim = caches[0].shape[-4:]
    hd = heads * head_dim
    cfg = launch_config(hd, config)
    batch, width = accepted_nodes.shape
    if batch == 0:
        return
    block_a, block_hd = _tiles(width, hd, cfg)
    prefix = prefix_lens.int()
    for cache in caches:
        planes = cache.view(-1, num_blocks, block_size, heads, head_dim) if cache.dim() > 4 else cache[None]
        grid = (batch, planes.shape[0], cdiv(hd, block_hd))
        _compact_kv_kernel[grid](
            planes, planes.stride(0), planes.stride(1), planes.stride(2), block_table, block_table.stride(0), prefix,
            accepted_nodes, num_accepted, width, hd, block_size,
            BLOCK_A=block_a, BLOCK_HD=block_hd, num_warps=cfg["num_warps"],
        )


def compact_kv_reference(kv_caches, block_table, prefix_lens, accepted_nodes, num_accepted, *, checked: bool = False) -> None:
    """Plain-PyTorch :func:`compact_kv` (in place): gather every source slot, then scatter."""
    caches = _as_list(kv_caches)
    _check(caches, block_table, prefix_lens, accepted_nodes, num_accepted, checked)
    block_size = caches[0].shape[-3]
    rows, cols = (accepted_nodes >= 0).nonzero(as_tuple=True)
    keep = (cols >= 1) & (cols < num_accepted.long()[rows])
    rows, cols = rows[keep], cols[keep]
    src_pos = prefix_lens.long()[rows] + accepted_nodes.long()[rows, cols]
    dst_pos = prefix_lens.long()[rows] + cols
    src_block = block_table.long()[rows, src_pos // block_size]
    dst_block = block_table.long()[rows, dst_pos // block_size]
    for cache in caches:
        moved = cache[..., src_block, src_pos % block_size, :, :].clone()
        cache[..., dst_block, dst_pos % block_size, :, :] = moved


def compact_kv_cpu(kv_caches, block_table, prefix_lens, accepted_nodes, num_accepted, *, checked: bool = False) -> None:
    """:func:`compact_kv` for caches on the CPU (vLLM-CPU's tree steps; Triton needs a GPU): the
    moves computed once for every cache, the entries whose node already sits at its depth
    dropped, and nothing done when none is left (a tree that accepted its first child only, or
    nothing: often, at a mean acceptance near two), else two indexed copies per cache (sources
    gathered before any write, as the reference). Every layer's K and V are caches here, so a
    step without a move saves two torch calls per cache (on the 2-core VM about 2 ms per step
    of SmolLM2's 60)."""
    caches = _as_list(kv_caches)
    _check(caches, block_table, prefix_lens, accepted_nodes, num_accepted, checked)
    block_size = caches[0].shape[-3]
    rows, cols = (accepted_nodes >= 0).nonzero(as_tuple=True)
    keep = (cols >= 1) & (cols < num_accepted.long()[rows]) & (accepted_nodes.long()[rows, cols] != cols)
    if not bool(keep.any()):
        return
    rows, cols = rows[keep], cols[keep]
    src_pos = prefix_lens.long()[rows] + accepted_nodes.long()[rows, cols]
    dst_pos = prefix_lens.long()[rows] + cols
    src_block, src_slot = block_table.long()[rows, src_pos // block_size], src_pos % block_size
    dst_block, dst_slot = block_table.long()[rows, dst_pos // block_size], dst_pos % block_size
    for cache in caches:
        cache[..., dst_block, dst_slot, :, :] = cache[..., src_block, src_slot, :, :]
