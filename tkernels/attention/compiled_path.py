"""Mixed-batch attention compiled for the CPU: the paged cache read where it lies by one
compiled loop (:func:`tkernels.attention.compiled_kernel.attend`), every query seeing exactly
its keys (cached prefix, causal new tokens or tree ancestors, the sliding window), in fp32.

Two halves, as the other paths: :func:`plan_compiled_attention` once per step (shared by every
layer: the checked batch as host arrays and the work items) and :func:`mixed_attention_compiled`
once per layer. Caches in float32 or bfloat16 (read as bit patterns, widened exactly), each
tile of keys packed head-major by the task that reads it (:mod:`~tkernels.attention.compiled_kernel`
says why); a task takes an item's KV heads together while the items leave two tasks per
thread (:func:`_heads_per_task`), and a batch of too few tasks for the threads (a lone request)
splits each task's keys into parts merged afterwards (split-KV, :func:`_key_splits`). Other
dtypes run :mod:`tkernels.attention.torch_path`.

Against the vectorised PyTorch path it gathers nothing and pads nothing (a group of requests
is not padded to its longest context, a tree's mask is not materialised); against vLLM-CPU's
own kernels it takes any tree mask, on any x86 or Arm CPU numba compiles for. Prefill chunks
(causal requests of more than the torch path's ``SHORT_MAX_Q`` new tokens) run the torch
path's tiles (torch's fused attention), faster there than the loop (bench/attention_cpu.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from tkernels.attention.launch import _check_inputs
from tkernels.attention.plan import HostBatch, describe_batch
from tkernels.attention.torch_path import TorchAttentionPlan, is_short, mixed_attention_torch, plan_from_layout
from tkernels.checks import fail as _fail
from tkernels.checks import integer, real

__all__ = ["COMPILED_DTYPES", "CompiledAttentionPlan", "CompiledCaches", "compiled_caches", "mixed_attention_compiled",
           "mixed_attention_prepared", "plan_compiled_attention", "warm_up"]

COMPILED_DTYPES = (torch.float32, torch.bfloat16)
# A request's new tokens in work items of at most this many queries: a prefill chunk spreads
# over the threads, while one K/V block load still serves Q_TILE x (query heads / KV heads) rows.
Q_TILE = 32


@dataclass(frozen=True)
class CompiledAttentionPlan:
    """Per-step plan of :func:`mixed_attention_compiled` (host arrays, shared by every layer)."""

    table: np.ndarray  # int32 [B, max_blocks]
    items: np.ndarray  # int64 [N, 3]: (request, first query, end query)
    cu: np.ndarray  # int64 [B + 1]
    ctx: np.ndarray  # int64 [B]
    tree: np.ndarray  # bool [B]
    ancestors: np.ndarray  # int64 [T, words >= 1]
    positions: np.ndarray  # int64 [T]
    window: int  # 0: none
    max_keys: int  # the most keys (context) of any item's request: bounds the split-KV parts
    long: TorchAttentionPlan | None  # the prefill chunks' tiles (None: no chunk this step)
    short_rows: torch.Tensor | None  # int64: the loop's query rows, where there are chunks too
    num_q_heads: int
    num_kv_heads: int
    block_size: int
    num_blocks: int  # the caches' blocks the table was checked against (the loop reads without bounds checks)
    # The loop's launch, chosen once per step for every layer: numba threads (torch's, what the
    # server gave its forward pass), KV heads per task (_heads_per_task), key parts (_key_splits),
    # and the tasks dealt to one worker per thread (_deal).
    threads: int
    tile: int  # keys per online-softmax step (key_tile)
    heads_per_task: int
    key_splits: int
    order: np.ndarray  # int64 [tasks]: worker w runs order[starts[w]:starts[w + 1]]
    starts: np.ndarray  # int64 [threads + 1]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]


def plan_compiled_attention(
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
) -> CompiledAttentionPlan:
    """Validate the batch (as :func:`tkernels.attention.plan_mixed_attention` does, same
    arguments and messages; ``host`` and ``checked`` as :func:`~tkernels.attention.plan.describe_batch`)
    and lay it out for the compiled loop."""
    from tkernels.attention.compiled_kernel import key_tile  # numba: on first use
    from tkernels.jit import use_torch_threads

    layout = describe_batch(cu_seqlens_q, seq_lens, block_table, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                            head_dim=head_dim, num_blocks=num_blocks, block_size=block_size,
                            tree_parents=tree_parents, is_tree=is_tree, window=window, num_tokens=num_tokens,
                            host=host, checked=checked)
    short = is_short(layout).numpy()
    q_len = layout.q_len.numpy()
    tiles = np.where(short, -(-q_len // Q_TILE), 0)
    req = np.repeat(np.arange(q_len.size), tiles)
    first = (np.arange(req.size) - np.repeat(np.cumsum(tiles) - tiles, tiles)) * Q_TILE
    items = np.stack([req, first, np.minimum(first + Q_TILE, q_len[req])], 1).astype(np.int64)
    # Largest first (keys read x queries), for _deal's snake-wise deal to the threads: each
    # thread's list then has about the same work and the threads finish together.
    ctx = layout.ctx.numpy()
    cost = (ctx[req] - q_len[req] + items[:, 2]) * (items[:, 2] - items[:, 1])
    items = items[np.argsort(-cost, kind="stable")]
    long = short_rows = None
    if (~short & (q_len > 0)).any():
        long = plan_from_layout(layout, block_table, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                block_size=block_size, long_only=True)
        short_rows = torch.from_numpy(np.flatnonzero(short[layout.token_req.numpy()]))
    max_keys = int(ctx[req].max()) if req.size else 0
    threads, tile = use_torch_threads(), key_tile(block_size)
    heads_per_task, key_splits, order, starts = _launch(items.shape[0], num_kv_heads, threads, -(-max_keys // tile))
    ancestors = layout.ancestors.numpy()
    if ancestors.shape[1] == 0:
        ancestors = np.zeros((ancestors.shape[0], 1), np.int64)
    return CompiledAttentionPlan(
        table=np.ascontiguousarray(block_table.cpu().numpy(), dtype=np.int32), items=items,
        cu=np.concatenate([[0], np.cumsum(q_len)]).astype(np.int64), ctx=ctx.astype(np.int64),
        tree=layout.tree_req.numpy().astype(np.bool_), ancestors=np.ascontiguousarray(ancestors, dtype=np.int64),
        positions=layout.positions.numpy().astype(np.int64), window=layout.window or 0,
        max_keys=max_keys, long=long, short_rows=short_rows, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
        block_size=block_size, num_blocks=num_blocks, threads=threads, tile=tile,
        heads_per_task=heads_per_task, key_splits=key_splits, order=order, starts=starts)


@dataclass(frozen=True)
class CompiledCaches:
    """A layer's K and V caches as the compiled loop reads them, prepared once per cache by
    :func:`compiled_caches` (a server's caches live as long as its engine): flat arrays over their
    storage and their strides. A layer's call then builds no views of the caches, which cost
    about 10 us per layer alone on the project's 2-core VM and several times that inside an
    engine's step (docs/step_profile.md, seventh round)."""

    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D] (the torch path's prefill chunks read these)
    v_cache: torch.Tensor
    k: np.ndarray  # flat over K's storage: float32, or int16 holding bf16 bit patterns
    v: np.ndarray
    layout: np.ndarray  # int64 (block_size, Hkv, D, K's block / slot / head strides, V's): attend's layout
    bf16: bool


def compiled_caches(k_cache: torch.Tensor, v_cache: torch.Tensor) -> CompiledCaches:
    """Check a layer's caches (``[num_blocks, block_size, num_kv_heads, head_dim]``, float32 or
    bfloat16, on the CPU, rows contiguous; K and V may be halves of one tensor, as vLLM's are)
    and prepare them for :func:`mixed_attention_prepared`. The arrays are views: writes to the
    caches are seen by every later call."""
    for arg, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            _fail(arg, f"must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            _fail(arg, f"must be [num_blocks, block_size, num_kv_heads, head_dim], got shape {tuple(t.shape)}")
        if t.device.type != "cpu":
            _fail(arg, f"must be on the CPU for the compiled CPU attention, got {t.device}")
        if t.dtype not in COMPILED_DTYPES:
            _fail(arg, f"must be float32 or bfloat16 for the compiled CPU attention, got {t.dtype}")
        if t.stride(3) != 1:
            _fail(arg, "last dimension (head_dim) must be contiguous")
    if v_cache.shape != k_cache.shape:
        _fail("v_cache", f"shape {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if v_cache.dtype != k_cache.dtype:
        _fail("v_cache", f"dtype {v_cache.dtype} differs from k_cache's {k_cache.dtype}")
    _, block_size, Hkv, D = k_cache.shape
    if block_size < 1 or Hkv < 1:
        _fail("k_cache", f"needs block_size >= 1 and num_kv_heads >= 1, got shape {tuple(k_cache.shape)}")
    bf16 = k_cache.dtype == torch.bfloat16
    (k, k_strides), (v, v_strides) = (_flat(c.view(torch.int16) if bf16 else c) for c in (k_cache, v_cache))
    return CompiledCaches(k_cache=k_cache, v_cache=v_cache, k=k, v=v, bf16=bf16,
                          layout=np.array([block_size, Hkv, D, *k_strides, *v_strides], np.int64))


def mixed_attention_compiled(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: CompiledAttentionPlan,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    heads_per_task: int | None = None,
    key_splits: int | None = None,
) -> torch.Tensor:
    """One layer's attention over the paged cache (layout as :func:`tkernels.attention.mixed_attention`'s,
    on the CPU) for the batch ``plan`` describes; returns ``out [T, Hq, D]`` (logits and softmax
    in fp32, stored in q's dtype). ``heads_per_task``: KV heads per task of the loop (a divisor
    of the KV heads; None: the plan's choice, :func:`_heads_per_task`'s for its threads);
    ``key_splits``: parts each task's keys are split into, merged afterwards (split-KV; an
    integer >= 1; None: :func:`_key_splits`' choice, 1 unless the tasks are too few for the threads).
    A caller with long-lived caches (a server's layer) prepares them once (:func:`compiled_caches`)
    and calls :func:`mixed_attention_prepared`."""
    _check_inputs(q, k_cache, v_cache, out)
    return mixed_attention_prepared(q, compiled_caches(k_cache, v_cache), plan, scale, softcap=softcap, out=out,
                                    heads_per_task=heads_per_task, key_splits=key_splits)


def mixed_attention_prepared(
    q: torch.Tensor,
    caches: CompiledCaches,
    plan: CompiledAttentionPlan,
    scale: float | None = None,
    *,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
    heads_per_task: int | None = None,
    key_splits: int | None = None,
) -> torch.Tensor:
    """:func:`mixed_attention_compiled` on caches prepared by :func:`compiled_caches` (checked
    there, once): a layer's call checks ``q``, ``out`` and the plan against them and runs the
    loop, in as few Python operations as it can (a server pays them in every layer of every step)."""
    if not isinstance(caches, CompiledCaches):
        _fail("caches", f"must be CompiledCaches (compiled_caches), got {type(caches).__name__}")
    if not isinstance(plan, CompiledAttentionPlan):
        _fail("plan", f"must be a CompiledAttentionPlan (plan_compiled_attention), got {type(plan).__name__}")
    num_blocks, block_size, Hkv, D = caches.k_cache.shape
    if not isinstance(q, torch.Tensor) or q.dtype != caches.k_cache.dtype or q.device.type != "cpu" \
            or q.dim() != 3 or q.shape[2] != D or q.stride(2) != 1:
        _fail("q", f"must be a CPU tensor [T, num_q_heads, {D}] of the caches' dtype {caches.k_cache.dtype} with "
                   f"rows contiguous, got {_describe(q)}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != q.dtype
                            or out.device != q.device or out.stride(2) != 1):
        _fail("out", f"must be a tensor like q ({tuple(q.shape)}, {q.dtype}, {q.device}) with rows contiguous, "
                     f"got {_describe(out)}")
    T, Hq, _ = q.shape
    if (plan.num_tokens, plan.num_q_heads, plan.num_kv_heads, plan.block_size, plan.num_blocks) != \
            (T, Hq, Hkv, block_size, num_blocks):
        _fail("plan", "was built for another batch, head layout, block size or cache size")
    scale = D ** -0.5 if scale is None else real("scale", scale, positive=True)
    softcap = 0.0 if softcap is None else real("softcap", softcap, positive=True)
    out = torch.empty_like(q) if out is None else out
    if heads_per_task is None and key_splits is None:
        heads_per_task, key_splits, order, starts = plan.heads_per_task, plan.key_splits, plan.order, plan.starts
    else:
        heads_per_task, key_splits, order, starts = _launch(plan.items.shape[0], Hkv, plan.threads,
                                                            -(-plan.max_keys // plan.tile), heads_per_task, key_splits)
    if key_splits > 1:
        ws_m, ws_den = np.empty((key_splits, T, Hq), np.float32), np.empty((key_splits, T, Hq), np.float32)
        ws_acc = np.empty((key_splits, T, Hq, D), np.float32)
    else:  # unused
        ws_m = ws_den = _NO_WS3
        ws_acc = _NO_WS4
    # fp32 and contiguous (a server's output buffer): the loop writes its rows in place.
    direct = out.dtype == torch.float32 and out.is_contiguous()
    result = out.numpy() if direct else np.empty((T, Hq, D), np.float32)
    k32, v32, k16, v16 = (_UNUSED32, _UNUSED32, caches.k, caches.v) if caches.bf16 else \
        (caches.k, caches.v, _UNUSED16, _UNUSED16)
    _attend()(q.float().contiguous().numpy(), k32, v32, k16, v16, caches.bf16, caches.layout, result, plan.table,
              plan.items, plan.cu, plan.ctx, plan.tree, plan.ancestors, plan.positions, plan.window,
              np.float32(scale), np.float32(softcap), heads_per_task, plan.tile, key_splits, ws_m, ws_den, ws_acc,
              order, starts)
    if plan.long is None:
        if not direct:
            out.copy_(torch.from_numpy(result))
        return out
    if not direct:
        out[plan.short_rows] = torch.from_numpy(result)[plan.short_rows].to(out.dtype)
    mixed_attention_torch(q, caches.k_cache, caches.v_cache, plan.long, scale, softcap=softcap or None, out=out)
    return out


@functools.cache
def _attend():
    """The compiled loop (numba: imported on first use, then looked up once, not in every layer's call)."""
    from tkernels.attention.compiled_kernel import attend

    return attend


_UNUSED32 = np.empty(0, np.float32)  # the loop's unused cache pair (bf16 caches: the float32 one; else the int16)
_UNUSED16 = np.empty(0, np.int16)
_NO_WS3, _NO_WS4 = np.empty((0, 0, 0), np.float32), np.empty((0, 0, 0, 0), np.float32)  # split-KV's, unsplit


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} on {t.device}, strides {t.stride()}"


def _launch(num_items: int, num_kv_heads: int, threads: int, max_tiles: int, heads_per_task: int | None = None,
            key_splits: int | None = None) -> tuple[int, int, np.ndarray, np.ndarray]:
    """The loop's launch for ``num_items`` items on ``threads`` threads: ``(heads_per_task,
    key_splits, order, starts)``, the first two as given (checked) or chosen
    (:func:`_heads_per_task`, :func:`_key_splits`; ``max_tiles``: key tiles of the longest item),
    the tasks dealt by :func:`_deal`. The plan's choice once per step; a call's own with explicit values."""
    if heads_per_task is None:
        heads_per_task = _heads_per_task(num_items, num_kv_heads, threads)
    elif isinstance(heads_per_task, bool) or not isinstance(heads_per_task, int) or heads_per_task < 1 \
            or num_kv_heads % heads_per_task:
        _fail("heads_per_task", f"must be a divisor of the {num_kv_heads} KV heads, got {heads_per_task!r}")
    groups = num_kv_heads // heads_per_task
    if key_splits is None:
        key_splits = _key_splits(num_items * groups, threads, max_tiles)
    else:
        key_splits = integer("key_splits", key_splits, minimum=1)
    return (heads_per_task, key_splits, *_deal(num_items * groups * key_splits, threads))


def _heads_per_task(num_items: int, num_kv_heads: int, threads: int) -> int:
    """The most KV heads one task of the loop takes (a divisor of ``num_kv_heads``) while the
    items still make two tasks per thread: a task packs its heads' K/V rows of a tile in one
    sequential read of each key's slot, but a lone decode still spreads its heads over threads."""
    for heads in range(num_kv_heads, 1, -1):
        if num_kv_heads % heads == 0 and num_items * (num_kv_heads // heads) >= 2 * threads:
            return heads
    return 1


def _key_splits(num_tasks: int, threads: int, max_tiles: int) -> int:
    """Parts each task's keys are split into (split-KV): 1 while the tasks make two per thread;
    else enough parts for two tasks per thread (a lone request's three KV heads on two threads:
    2, so 6 equal tasks, not 3 of which one thread runs two), at most one per key tile of the
    longest item (a part of no tile is an idle task)."""
    if num_tasks == 0 or num_tasks >= 2 * threads:
        return 1
    return max(1, min(-(-2 * threads // num_tasks), max_tiles))


def _deal(num_tasks: int, workers: int) -> tuple[np.ndarray, np.ndarray]:
    """The loop's tasks (numbered item-major; the plan's items largest first, an item's tasks of
    one size) dealt to ``workers`` lists of about equal work, as :func:`attend` takes them
    (``order``, ``starts``): by size, snake-wise (workers 0, 1, .., W-1, W-1, .., 0, 0, 1, ..).
    numba runs a ``prange`` in equal contiguous runs of iterations per thread (its chunk size
    has no effect under the OpenMP layer), so the items in largest-first order would give the
    first thread every large one: on the 2-core VM, 26 decodes or trees of ragged contexts ran
    23-45% slower per layer (docs/step_profile.md, seventh round)."""
    r, j = np.divmod(np.arange(num_tasks, dtype=np.int64), workers)
    worker = np.where(r % 2 == 0, j, workers - 1 - j)
    starts = np.zeros(workers + 1, np.int64)
    np.cumsum(np.bincount(worker, minlength=workers), out=starts[1:])
    return np.argsort(worker, kind="stable").astype(np.int64), starts


def _flat(cache: torch.Tensor) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A cache [blocks, block_size, kv_heads, D] as a flat array over the storage it spans (a
    view: vLLM's K and V are halves of one tensor) and its block, slot and head strides in
    elements; rows (D) contiguous, copied where they are not."""
    if cache.stride(-1) != 1:
        cache = cache.contiguous()
    span = 0 if cache.numel() == 0 else 1 + sum((n - 1) * stride for n, stride in zip(cache.shape, cache.stride()))
    flat = torch.as_strided(cache, (span,), (1,), cache.storage_offset())
    return flat.numpy(), cache.stride()[:3]


def warm_up(dtype: torch.dtype) -> None:
    """Compile (on a machine's first run; later, load from numba's cache) the loop for ``dtype``
    caches viewed as the vLLM plugin views them (K and V halves of one tensor), so that a
    server pays it at start-up, not in its first requests' steps."""
    cache = torch.zeros(2, 1, 4, 32, dtype=dtype).transpose(1, 2)  # [blocks, block_size, kv_heads, 2 * D]
    k_cache, v_cache = cache.split(16, dim=-1)
    one = torch.tensor([0, 1], dtype=torch.int32)
    plan = plan_compiled_attention(one, one[1:], torch.zeros(1, 1, dtype=torch.int32), num_q_heads=1,
                                   num_kv_heads=1, head_dim=16, num_blocks=2, block_size=4)
    mixed_attention_compiled(torch.zeros(1, 1, 16, dtype=dtype), k_cache, v_cache, plan)
