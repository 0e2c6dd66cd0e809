"""Host planning of mixed-batch attention (:func:`plan_mixed_attention`): the work items of one
step, built once from ``cu_seqlens_q``/``seq_lens`` and shared by every layer, the launch
parameters (defaults, autotune's search space, the shared-memory estimate) and the host layout
of the tables the kernels read (:data:`ITEM_FIELDS`, :data:`MERGE_FIELDS`, the tile classes
:data:`PREFILL`/:data:`DECODE`), passed to the kernels as ``tl.constexpr`` arguments.

Each request is a *prefill* request (more than ``decode_max_q`` new tokens; compute-bound) or a
*decode* request (decodes and trees; bandwidth-bound). Work items are (request, KV head, query
tile, KV range). A tile packs ``BLOCK_M // group`` query tokens times the ``group = Hq / Hkv``
query heads sharing one KV head, so every K/V tile loaded feeds all heads of its group (GQA
packing). Prefill tiles use (``prefill_block_m``, ``prefill_block_n``), skip keys beyond the
tile's causal frontier and before its window. Decode tiles use (``decode_block_m``,
``decode_block_n``), the M size shrunk to the batch's longest decode/tree query so a pure decode
batch runs 16-row tiles; when the batch has too few items to fill the GPU (``2 * SM count``)
their context is split into chunks of at least ``min_split_keys`` keys (split-KV). Items are
ordered by FlashInfer's cost estimate ``2 * tile_rows + kv_len``, largest first, so long prefill
tiles start in the first wave and short decode tiles fill the tail (longest-processing-time list
scheduling over the hardware's in-order block dispatch).

Host cost. The checks run here on NumPy copies of the index tensors; the ragged loops (every
token's request and position, the trees' ancestor bits, the work items and merge table) run in
numba-compiled code (:mod:`tkernels.attention.plan_compiled`, imported on the first plan), with
the tables' layout passed in from here. :mod:`tkernels.attention.plan_reference` keeps them as
plain PyTorch (the readable reference; ~1 ms per serving step against ~0.1 ms compiled, for 64
trees of 32 nodes). The plan is built on the host and moved to the inputs' device once.

Tile shapes, warps, stages and split parameters come from
``tkernels.config.launch_config("mixed_attention", ...)``. The defaults
(:func:`default_config`) are unmeasured starting points (written before any GPU run), chosen
only so that the tiles compile without register spills; ``tkernels autotune`` replaces them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from tkernels.checks import fail as _fail
from tkernels.checks import integer
from tkernels.config import launch_config, next_power_of_2
from tkernels.spec.tree import MAX_TREE_NODES, ancestor_bits, ancestor_words, depths, validate_parents

PREFILL, DECODE = 0, 1
# Columns of a plan's item table (int32 [num_items, ITEM_FIELDS]): request, KV head, tile class,
# first query row, KV range [start, end), workspace row (-1: not split); one more unused (alignment).
ITEM_REQ, ITEM_KV_HEAD, ITEM_CLASS, ITEM_Q_START, ITEM_KV_START, ITEM_KV_END, ITEM_WS_ROW = range(7)
ITEM_FIELDS = 8
# Columns of a plan's merge table (int32 [num_split_tokens, MERGE_FIELDS]): token, first
# workspace row, row stride between splits, number of splits.
MERGE_TOKEN, MERGE_WS_ROW, MERGE_ROW_STRIDE, MERGE_SPLITS = range(4)
MERGE_FIELDS = 4

# The input dtypes the kernels take, with their Triton names.
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

DEFAULT_CONFIG: dict[str, Any] = {
    "prefill_block_m": 128,  # query rows (tokens x group heads) per prefill tile
    # K/V tiles are gathered through the block table with one 64-bit address per element, so
    # BLOCK_N costs registers fast: at head_dim 128, 64-key tiles spill (ptxas, sm_90), 32 do not.
    "prefill_block_n": 32,
    "decode_block_m": 64,  # upper bound; shrunk to the batch's longest decode/tree query
    "decode_block_n": 32,
    "decode_max_q": 64,  # requests with at most this many new tokens use decode tiles
    "min_split_keys": 512,  # split-KV chunks hold at least this many keys
    "max_splits": 32,
    "num_warps": 8,  # shared by both tile classes; a 128x128 fp32 accumulator needs 8 warps
    "num_stages": 2,
}


def search_space(dry_run: bool, quick: bool) -> dict[str, list[dict[str, int]]]:
    """The configs ``tkernels autotune`` tries, per tuning stage (decode-only, prefill-only and
    mixed batches, tuned in that order, each over the best of the stages before): a few tiny
    tiles for a CPU dry run, fewer for ``--quick``."""
    if dry_run:
        return {"decode": [{"decode_block_n": n} for n in (16, 32)],
                "prefill": [{"prefill_block_m": 32, "prefill_block_n": n} for n in (16, 32)],
                "mix": [{"num_warps": 4, "num_stages": 2}]}
    block_n = (32, 64, 128)
    return {
        "decode": [{"decode_block_n": n, "min_split_keys": s} for n in block_n
                   for s in ((512,) if quick else (256, 512, 1024))],
        "prefill": [{"prefill_block_m": m, "prefill_block_n": n} for m in (64, 128) for n in block_n],
        "mix": [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in ((2,) if quick else (2, 3))],
    }


def default_config(head_dim: int, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """:data:`DEFAULT_CONFIG` adjusted to the head size and the input dtype (register budget of
    one tile; ``dtype`` None: 16-bit inputs)."""
    head_dim = integer("head_dim", head_dim, minimum=1)
    if dtype == torch.float32 and head_dim <= 128:
        # fp32 K/V tiles take twice the registers: the 16-bit tiles spill on sm_80 (Triton 3.6:
        # 544-680 B at head_dim 64 and 128, 112 B on sm_90 at 64 with trees); these do not.
        tiles = (64, 32) if head_dim <= 64 else (32, 32)
        return {**DEFAULT_CONFIG, "prefill_block_m": tiles[0], "prefill_block_n": tiles[1],
                "decode_block_m": tiles[0], "decode_block_n": tiles[1]}
    if head_dim <= 64:
        return {**DEFAULT_CONFIG, "prefill_block_n": 64, "decode_block_n": 64}
    if head_dim > 128:
        # 64 x 32 tiles spill at head_dim 256 (sm_90, Triton 3.6: 292-360 B) and, with fp32
        # inputs, need 328 KB of shared memory; 32 x 16 tiles do neither (fp32: 98 KB).
        return {**DEFAULT_CONFIG, "prefill_block_m": 32, "prefill_block_n": 16, "decode_block_m": 32,
                "decode_block_n": 16}
    return dict(DEFAULT_CONFIG)


_DUMMY_SMS = 132  # SM count assumed when planning without a GPU (H100 SXM)


def shared_memory_estimate(config: dict[str, Any], head_dim: int) -> int:
    """Bytes of shared memory :func:`mixed_attention_kernel` allocates for a 16-bit launch of
    ``config`` (tile sizes after planning), an estimate that ``tkernels autotune`` uses to skip
    candidates that cannot launch on the GPU, before compiling them.

    Per tile class (M query rows, N keys, D = head_dim padded to a power of two): the larger of
    the fp32 accumulator's layout conversion (M x D x 4) and the dot operands staged in shared
    memory (Q: M x D, K and V: 2 x N x D, 2 bytes each), with a 25 % margin; the kernel needs the
    larger class's (the branches never run together). ``num_stages`` does not multiply it: the
    K/V rows are gathered through the block table, so the loads are not pipelined. Fitted on
    Triton 3.6 and 3.9 compiles for sm_80 and sm_90; the compile check (``python -m
    tkernels.registry --candidates``) fails when a compile needs more than this.
    """
    d = next_power_of_2(head_dim)

    def tile(m: int, n: int) -> int:
        return max(m * d * 4, (m + 2 * n) * d * 2)

    need = max(tile(config["prefill_block_m"], config["prefill_block_n"]),
               tile(config["decode_block_m"], config["decode_block_n"]))
    return need * 5 // 4


@dataclass(frozen=True)
class MixedAttentionPlan:
    """Per-step schedule shared by every layer (same batch, block table and tree shapes)."""

    items: torch.Tensor  # int32 [num_items, ITEM_FIELDS], in launch order
    merge: torch.Tensor  # int32 [num_split_tokens, MERGE_FIELDS]
    ws_rows: int  # workspace rows (token x split) for split-KV partials
    has_tree: bool  # some request is a tree
    is_tree: torch.Tensor  # int8 [B]
    ancestors: torch.Tensor  # int64 [T, words]: ancestor-or-self bits of tree nodes (0 elsewhere), see ancestor_bits
    positions: torch.Tensor  # int32 [T]: position of each query token
    num_tokens: int
    batch: int
    num_q_heads: int
    num_kv_heads: int
    window: int | None
    config: dict[str, Any]  # final tile shapes and launch parameters
    trees: tuple[torch.Tensor, torch.Tensor] | None = None  # (tree_parents, is_tree) as planned, else None


class HostBatch(NamedTuple):
    """Host copies of a step's index tensors that a server already holds (vLLM's
    ``query_start_loc_cpu``; a tree step's host-built ``seq_lens`` and trees), handed to
    :func:`plan_mixed_attention` as ``host=`` so that planning reads nothing back from the device.
    ``tree_depths``: every token's depth in its tree (0 elsewhere), when the caller has them."""

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    tree_parents: torch.Tensor | None = None
    is_tree: torch.Tensor | None = None
    tree_depths: torch.Tensor | None = None


def _check_int_vector(t: Any, arg: str, length: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(arg, f"must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.dim() != 1:
        _fail(arg, f"must be a 1-D int32 tensor, got {t.dtype} with shape {tuple(t.shape)}")
    if length is not None and t.numel() != length:
        _fail(arg, f"must have {length} entries, got {t.numel()}")
    if not t.is_contiguous():
        _fail(arg, "must be contiguous")


@dataclass(frozen=True)
class BatchLayout:
    """A checked batch description on the host (what every planner starts from)."""

    q_len: torch.Tensor  # int64 [B] new tokens per request
    ctx: torch.Tensor  # int64 [B] context incl. the new tokens
    token_req: torch.Tensor  # int64 [T] request of each query token
    positions: torch.Tensor  # int64 [T] position of each query token (prefix + depth for tree nodes)
    tree_req: torch.Tensor  # bool [B]
    tree_token: torch.Tensor  # bool [T]: the token belongs to a tree request
    ancestors: torch.Tensor  # int64 [T, words]: ancestor-or-self bits of tree nodes (0 elsewhere)
    window: int | None
    device: torch.device  # where the inputs live

    @property
    def num_tokens(self) -> int:
        return self.token_req.numel()

    @property
    def batch(self) -> int:
        return self.q_len.numel()


def describe_batch(
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    tree_parents: torch.Tensor | None = None,
    is_tree: torch.Tensor | None = None,
    window: int | None = None,
    num_tokens: int | None = None,
    host: HostBatch | None = None,
    checked: bool = False,
) -> BatchLayout:
    """Validate a batch description (arguments as :func:`plan_mixed_attention`'s) and derive
    the trees' ancestor bits and every token's position, on the host (one read of the small
    index tensors, one flag for the block table's ids). ``host``: the same index tensors' host
    copies (:class:`HostBatch`), read instead of the device tensors; ``checked``: the caller
    built and checked the trees and the block table (a server's step): the trees' contract and
    the block ids are not validated again (the block-id check is a device read). With both, a
    description costs no device synchronisation."""
    _check_int_vector(cu_seqlens_q, "cu_seqlens_q")
    if cu_seqlens_q.numel() < 1:
        _fail("cu_seqlens_q", "must have B + 1 >= 1 entries")
    B = cu_seqlens_q.numel() - 1
    _check_int_vector(seq_lens, "seq_lens", B)
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2:
        _fail("block_table", "must be a 2-D int32 tensor [B, max_blocks]")
    if block_table.shape[0] != B:
        _fail("block_table", f"must have {B} rows (one per request), got {block_table.shape[0]}")
    if block_table.stride(1) != 1:
        _fail("block_table", "rows must be contiguous")
    for arg, t in (("seq_lens", seq_lens), ("block_table", block_table)):
        if t.device != cu_seqlens_q.device:
            _fail(arg, f"must be on {cu_seqlens_q.device} like cu_seqlens_q, got {t.device}")
    num_kv_heads = integer("num_kv_heads", num_kv_heads, minimum=1)
    if isinstance(num_q_heads, bool) or not isinstance(num_q_heads, int) or num_q_heads <= 0 or num_q_heads % num_kv_heads:
        _fail("num_q_heads", f"must be a positive multiple of num_kv_heads={num_kv_heads}, got {num_q_heads}")
    head_dim, num_blocks = integer("head_dim", head_dim, minimum=1), integer("num_blocks", num_blocks, minimum=0)
    block_size = integer("block_size", block_size, minimum=1)
    if num_tokens is not None:
        integer("num_tokens", num_tokens, minimum=0)
    window = _check_window(window)
    device = cu_seqlens_q.device

    if host is not None and (host.cu_seqlens_q.shape != cu_seqlens_q.shape or host.seq_lens.shape != seq_lens.shape
                             or (host.tree_parents is None) != (tree_parents is None)):
        _fail("host", _HOST_COPIES)
    cu = _host_int64(cu_seqlens_q if host is None else host.cu_seqlens_q)
    ctx = _host_int64(seq_lens if host is None else host.seq_lens)
    if cu[0] != 0:
        _fail("cu_seqlens_q", f"must start at 0, got {int(cu[0])}")
    q_len = cu[1:] - cu[:-1]
    if (q_len < 0).any():
        _fail("cu_seqlens_q", "must be non-decreasing")
    T = int(cu[-1])
    if num_tokens is not None and T != num_tokens:
        _fail("cu_seqlens_q", f"ends at {T} but q holds {num_tokens} tokens")
    if (ctx < q_len).any():
        r = int((ctx < q_len).argmax())
        _fail("seq_lens", f"request {r} has seq_len {int(ctx[r])} < its {int(q_len[r])} new tokens")
    max_blocks_needed = (ctx + block_size - 1) // block_size
    if B and int(max_blocks_needed.max()) > block_table.shape[1]:
        _fail("block_table", f"has {block_table.shape[1]} columns, seq_lens need up to {int(max_blocks_needed.max())}")
    if B and block_table.shape[1] and not checked:
        # Checked where the table lives: only one flag crosses to the host.
        needed = torch.from_numpy(max_blocks_needed).to(device)
        used = torch.arange(block_table.shape[1], device=device)[None, :] < needed[:, None]
        if (used & ((block_table < 0) | (block_table >= num_blocks))).any():
            _fail("block_table", f"holds block ids outside [0, {num_blocks}) within seq_lens")

    # Trees: validate parents, derive ancestor bits and positions (plan_compiled.batch_layout;
    # plan_reference.layout_reference is the torch reference).
    tree_req = np.zeros(B, dtype=np.bool_)
    parents = tree_depths = _EMPTY
    if (tree_parents is None) != (is_tree is None):
        _fail("tree_parents" if tree_parents is None else "is_tree", "tree_parents and is_tree go together")
    if tree_parents is not None:
        _check_int_vector(tree_parents, "tree_parents", T)
        if not isinstance(is_tree, torch.Tensor) or is_tree.dtype != torch.bool or is_tree.shape != (B,):
            _fail("is_tree", f"must be a bool tensor of shape ({B},)")
        for arg, t in (("tree_parents", tree_parents), ("is_tree", is_tree)):
            if t.device != device:
                _fail(arg, f"must be on {device} like cu_seqlens_q, got {t.device}")
        if host is not None and (host.tree_parents.shape != tree_parents.shape or host.is_tree is None
                                 or host.is_tree.shape != is_tree.shape
                                 or (host.tree_depths is not None and host.tree_depths.shape != tree_parents.shape)):
            _fail("host", _HOST_COPIES)
        tree_req = (is_tree if host is None else host.is_tree).cpu().numpy().astype(np.bool_)  # a copy
        if (q_len[tree_req] > MAX_TREE_NODES).any():
            _fail("tree_parents", f"trees hold at most {MAX_TREE_NODES} nodes")
        parents = _host_int64(tree_parents if host is None else host.tree_parents)
        if host is not None and host.tree_depths is not None:
            tree_depths = _host_int64(host.tree_depths)
    words = ancestor_words(int(q_len[tree_req].max()) if tree_req.any() else 0)
    token_req, positions, tree_token, ancestors, simple, bfs = _compiled().batch_layout(
        cu, ctx, tree_req, parents, tree_depths, tree_depths is not _EMPTY, words)
    if not (bfs or checked) or not simple:
        # Trees off the contract: validate_parents' message, or (checked) the contract's own
        # derivations of ancestors and depths for whatever the parents hold.
        tree_token_t = torch.from_numpy(tree_token)
        parents_t = (tree_parents if host is None else host.tree_parents).cpu()[tree_token_t]
        cu_trees = torch.nn.functional.pad(torch.cumsum(torch.from_numpy(q_len[tree_req & (q_len > 0)]), 0), (1, 0))
        if not (bfs or checked):
            try:
                validate_parents(parents_t, cu_trees)
            except ValueError as err:
                _fail("tree_parents", f"tree requests must hold BFS trees: {err}")
        if not simple:
            torch.from_numpy(ancestors)[tree_token_t] = ancestor_bits(parents_t, cu_trees, words)
            if tree_depths is _EMPTY:
                prefix = ctx - q_len
                positions[tree_token] = prefix[token_req][tree_token] + depths(parents_t, cu_trees).long().numpy()

    as_tensor = torch.from_numpy
    return BatchLayout(q_len=as_tensor(q_len), ctx=as_tensor(ctx), token_req=as_tensor(token_req),
                       positions=as_tensor(positions), tree_req=as_tensor(tree_req), tree_token=as_tensor(tree_token),
                       ancestors=as_tensor(ancestors), window=window, device=device)


_HOST_COPIES = "must hold host copies of cu_seqlens_q, seq_lens (and the trees, when given)"
_EMPTY = np.zeros(0, dtype=np.int64)  # no trees, or no host depths


def _host_int64(t: torch.Tensor) -> np.ndarray:
    """A host int64 copy of an index tensor (a device read where it lives on a GPU)."""
    return t.cpu().numpy().astype(np.int64)


def _compiled():
    """:mod:`tkernels.attention.plan_compiled`, imported on first use (it loads numba)."""
    from tkernels.attention import plan_compiled

    return plan_compiled


def plan_mixed_attention(
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    tree_parents: torch.Tensor | None = None,
    is_tree: torch.Tensor | None = None,
    window: int | None = None,
    config: dict[str, Any] | None = None,
    num_sms: int | None = None,
    num_tokens: int | None = None,
    dtype: torch.dtype | None = None,
    host: HostBatch | None = None,
    checked: bool = False,
) -> MixedAttentionPlan:
    """Validate the batch description (:func:`describe_batch`) and schedule it.

    ``config`` overrides entries of the tuned/default launch config; ``dtype`` (q/K/V's element
    type; None: 16-bit) picks the default tiles (:func:`default_config`); ``num_sms`` overrides the
    SM count used to decide split-KV (default: the current GPU's, else 132); ``num_tokens``
    (q's length) is checked against ``cu_seqlens_q``; ``host`` and ``checked``: as
    :func:`describe_batch` (with both, planning costs no device synchronisation).
    """
    if dtype is not None and dtype not in _DTYPES:
        _fail("dtype", f"must be None, torch.float16, torch.bfloat16 or torch.float32, got {dtype}")
    if num_sms is not None:
        integer("num_sms", num_sms, minimum=1)
    layout = describe_batch(cu_seqlens_q, seq_lens, block_table, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, num_blocks=num_blocks, block_size=block_size,
                            tree_parents=tree_parents, is_tree=is_tree, window=window, num_tokens=num_tokens,
                            host=host, checked=checked)
    q_len, ctx, tree_req = layout.q_len.numpy(), layout.ctx.numpy(), layout.tree_req.numpy()
    cfg = _launch_config(num_q_heads // num_kv_heads, head_dim, block_size, q_len, dtype, config)
    items, merge, ws_rows = _schedule(cfg, q_len, ctx, tree_req, num_kv_heads, num_q_heads // num_kv_heads,
                                      layout.window, num_sms or _num_sms(layout.device))
    # A request has items iff it has new tokens: the classes the items hold, without reading them.
    prefill = q_len > cfg["decode_max_q"]
    _one_class_tiles(cfg, {c for c, some in ((PREFILL, prefill.any()), (DECODE, ((q_len > 0) & ~prefill).any())) if some})
    device, as_tensor = layout.device, torch.from_numpy
    return MixedAttentionPlan(
        items=as_tensor(items).to(device), merge=as_tensor(merge).to(device), ws_rows=ws_rows,
        has_tree=bool(tree_req.any()), is_tree=as_tensor(tree_req.astype(np.int8)).to(device),
        ancestors=layout.ancestors.to(device), positions=as_tensor(layout.positions.numpy().astype(np.int32)).to(device),
        num_tokens=layout.num_tokens, batch=layout.batch, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        window=layout.window, config=cfg, trees=None if tree_parents is None else (tree_parents, is_tree),
    )


def _check_window(window: Any) -> int | None:
    return None if window is None else integer("window", window, minimum=1)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _DUMMY_SMS


def _launch_config(group: int, head_dim: int, block_size: int, q_len: np.ndarray | torch.Tensor,
                   dtype: torch.dtype | None, override: dict | None) -> dict[str, Any]:
    # A tuned bucket (measured in bf16) replaces the defaults for every dtype.
    cfg = launch_config("mixed_attention", {"head_dim": head_dim, "group": group, "block_size": block_size},
                        default_config(head_dim, dtype), override)
    min_rows = next_power_of_2(group)
    cfg["prefill_block_m"] = max(cfg["prefill_block_m"], min_rows)
    # A decode tile only needs as many rows as the longest decode/tree query fills (>= 16 for tl.dot).
    q_len = np.asarray(q_len)
    decode_q = q_len[(q_len > 0) & (q_len <= cfg["decode_max_q"])]
    longest = int(decode_q.max()) if decode_q.size else 1
    cfg["decode_block_m"] = max(min(cfg["decode_block_m"], next_power_of_2(group * longest)), 16, min_rows)
    return cfg


def _one_class_tiles(cfg: dict[str, Any], classes: set[int]) -> None:
    """Registers are allocated for the larger of the two compiled tile shapes: a batch with one
    class only compiles that shape into both branches, so it runs at that shape's occupancy."""
    if classes == {DECODE}:
        cfg["prefill_block_m"], cfg["prefill_block_n"] = cfg["decode_block_m"], cfg["decode_block_n"]
    elif classes == {PREFILL}:
        cfg["decode_block_m"], cfg["decode_block_n"] = cfg["prefill_block_m"], cfg["prefill_block_n"]


def _schedule(cfg: dict[str, Any], q_len: np.ndarray, ctx: np.ndarray, tree_req: np.ndarray, num_kv_heads: int,
              group: int, window: int | None, num_sms: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Work items (see ITEM_FIELDS) ordered by cost, the merge table and the workspace size:
    :func:`tkernels.attention.plan_compiled.schedule` on int64 ``q_len``/``ctx`` and bool
    ``tree_req`` [B] (:func:`tkernels.attention.plan_reference.schedule_reference` is the torch
    reference)."""
    items, merge, ws_rows = _compiled().schedule(
        q_len, ctx, tree_req, cfg["prefill_block_m"], cfg["prefill_block_n"], cfg["decode_block_m"],
        cfg["decode_block_n"], cfg["decode_max_q"], cfg["min_split_keys"], cfg["max_splits"], num_kv_heads, group,
        -1 if window is None else window, num_sms, _ITEM_COLUMNS, ITEM_FIELDS, _MERGE_COLUMNS, MERGE_FIELDS,
        PREFILL, DECODE)
    return items, merge, int(ws_rows)


# The tables' columns in the order plan_compiled.schedule fills them.
_ITEM_COLUMNS = np.array([ITEM_REQ, ITEM_KV_HEAD, ITEM_CLASS, ITEM_Q_START, ITEM_KV_START, ITEM_KV_END, ITEM_WS_ROW],
                         dtype=np.int64)
_MERGE_COLUMNS = np.array([MERGE_TOKEN, MERGE_WS_ROW, MERGE_ROW_STRIDE, MERGE_SPLITS], dtype=np.int64)
