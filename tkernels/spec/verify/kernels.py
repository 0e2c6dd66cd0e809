"""Triton kernels of tree verification (:mod:`tkernels.spec.verify`): the node pass (argmax,
max/sum-exp, inverse-CDF draw), the path walk and the rejection walk; their launch
parameters (defaults, autotune search space, tiles) and the launches the compile check builds."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tkernels import config as tkernels_config
from tkernels.checks import integer
from tkernels.config import next_power_of_2
from tkernels.registry import gpu_compile_check
from tkernels.spec.verify.inputs import ACCEPT_COLUMN, DRAW_COLUMN, UNIFORM_COLUMNS

# Launch parameters of every kernel here; tuned per vocabulary size by ``tkernels autotune``.
DEFAULT_CONFIG = {"block_v": 4096, "num_warps": 8}


def search_space(dry_run: bool, quick: bool) -> list[dict[str, int]]:
    """The configs ``tkernels autotune`` tries over :data:`DEFAULT_CONFIG` (a few tiny ones for a
    CPU dry run, fewer warps for ``--quick``)."""
    if dry_run:
        return [{"block_v": 32, "num_warps": 2}, {"block_v": 64}]
    return [{"block_v": v, "num_warps": w} for v in (1024, 2048, 4096, 8192) for w in ((4, 8) if quick else (4, 8, 16))]


# _node_pass_kernel modes
# The node pass's MODE values, passed to the kernel with MODE (constexprs: one compile per mode).
ARGMAX, STATS, SAMPLE = 0, 1, 2
MODES = (ARGMAX, STATS, SAMPLE)
# The uniforms table's layout (inputs.py), as the constexprs the sampling kernels take.
UNIFORM_CONSTEXPRS = {"U_COLS": UNIFORM_COLUMNS, "U_ACCEPT": ACCEPT_COLUMN, "U_DRAW": DRAW_COLUMN}
# The constexprs every node pass compile takes besides MODE and its tiles.
MODE_CONSTEXPRS = {"ARGMAX": ARGMAX, "STATS": STATS, **UNIFORM_CONSTEXPRS}


def launch_config(vocab: int, config: dict | None = None) -> dict:
    """The launch parameters for ``vocab``: ``config`` over the GPU's tuned bucket over the defaults."""
    integer("vocab", vocab, minimum=1)
    return tkernels_config.launch_config("verify", {"vocab": vocab}, DEFAULT_CONFIG, config)


def _tiles(count: int, vocab: int, cfg: dict) -> tuple[int, int]:
    """(rows per program, vocabulary tile): many small rows share a program (tiny vocabularies,
    big batches); 4096 elements per program at most when rows are packed."""
    block_v = max(16, min(cfg["block_v"], next_power_of_2(vocab)))
    return max(1, min(next_power_of_2(max(count, 1)), 4096 // block_v)), block_v


def _walk_tiles(batch: int, max_children: int) -> tuple[int, int]:
    """(requests per program, children scanned at once) of the path walk. Latency-bound (one
    dependent level per step): few requests per program, one warp each."""
    return min(next_power_of_2(batch), 16), min(next_power_of_2(max(max_children, 1)), 16)


def _rejection_tiles(vocab: int, cfg: dict) -> tuple[int, int]:
    """(requests per program, vocabulary tile) of the rejection walk: one request per program
    (packed requests, possible below 4096 tokens only, spill: Triton 3.6, 8 warps, fp32, 4 B at
    2 x 1024 and 4 x 1024 on sm_90, 12 B at 2 x 512 on sm_80)."""
    return 1, _tiles(1, vocab, cfg)[1]


# Left to itself ptxas squeezes the rejection walk into fewer registers than it needs, for
# occupancy, and spills 4-24 B (Triton 3.6 sm_90 fp32 1 x 2048: 80 registers, 24 B; Triton 3.9
# sm_80 1 x 4096: 128, 8 B). Allowing it 255 (Triton's ``maxnreg``, NVIDIA only) it takes
# 96-222 registers and spills nothing at 1024-4096-token tiles, sm_80 and sm_90. One program per
# request, a few per SM: the occupancy it gives up is not used anyway.
REJECTION_MAXNREG = {"maxnreg": 255}


@triton.jit
def _p_tile(logits_ptr, l_off, scratch_ptr, s_off, offs, V, live, from_scratch, inv_temp, thr, row_max):
    """Unnormalised probabilities of tokens ``offs`` [R, C] for rows ``l_off``/``s_off`` [R, 1]:
    exp(logit/T - max) over kept logits, or the row's stored residual where ``from_scratch``."""
    in_vocab = (offs < V) & live
    x = tl.load(logits_ptr + l_off + offs, mask=in_vocab & (from_scratch == 0), other=float("-inf")).to(tl.float32)
    p = tl.where(in_vocab & (x >= thr), tl.exp(x * inv_temp - row_max), 0.0)
    stored = tl.load(scratch_ptr + s_off + offs, mask=in_vocab & (from_scratch != 0), other=0.0)
    return tl.where(from_scratch != 0, stored, p)


@triton.jit
def _inverse_cdf(logits_ptr, l_off, scratch_ptr, s_off, V, live, from_scratch, inv_temp, thr, row_max, target,
                 BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row [R]: first token whose running sum of _p_tile exceeds ``target`` (the last
    positive token if rounding left the total below it). Chunks where every row is done are skipped."""
    offs = tl.arange(0, BLOCK_V)[None, :]
    found = tl.full([BLOCK_R], -1, tl.int32)
    last = tl.full([BLOCK_R], -1, tl.int32)
    running = tl.zeros([BLOCK_R], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        pending = live & (found < 0)
        if tl.max(pending.to(tl.int32), 0) > 0:
            o = v0 + offs
            p = _p_tile(logits_ptr, l_off[:, None], scratch_ptr, s_off[:, None], o, V, pending[:, None],
                        from_scratch[:, None], inv_temp[:, None], thr[:, None], row_max[:, None])
            cdf = tl.cumsum(p, 1) + running[:, None]
            first = tl.min(tl.where((cdf > target[:, None]) & (o < V), o, V), 1)
            found = tl.where(pending & (first < V), first, found)
            last = tl.where(pending, tl.maximum(last, tl.max(tl.where(p > 0, o, -1), 1)), last)
            running += tl.sum(p, 1)
    return tl.where(found >= 0, found, last)


# --- what the launchers compile (the GPU-target compile check, tkernels.registry) ---------------

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# (nodes or requests, vocabulary): a large vocabulary (one row per program) and a small one
# (rows packed into a program).
CHECK_SHAPES = ((64, 128256), (64, 1000))
# Most children of a node in the path walk's check: Token Recycling's fan-out and a 256-node
# star (the walks' tiles do not depend on a tree's size or depth, only this).
_CHECK_CHILDREN = (8, 255)


def node_pass_launch(mode, dtype, count, vocab, cfg, candidate=False):
    """The node pass's compile for ``count`` rows of ``vocab`` logits under ``cfg``."""
    from tkernels.registry import Launch

    block_r, block_v = _tiles(count, vocab, cfg)
    return Launch(f"{('argmax', 'stats', 'sample')[mode]} {_DTYPES[dtype]} {block_r}x{block_v} w{cfg['num_warps']}",
                  dict(MODE=mode, **MODE_CONSTEXPRS, BLOCK_R=block_r, BLOCK_V=block_v), types={"logits_ptr": f"*{_DTYPES[dtype]}"},
                  options={"num_warps": cfg["num_warps"]}, candidate=candidate)


def _node_pass_launches(shared_limit):
    for mode in MODES:
        for dtype in _DTYPES:
            for count, vocab in CHECK_SHAPES:
                yield node_pass_launch(mode, dtype, count, vocab, DEFAULT_CONFIG)


def _path_walk_launches(shared_limit):
    from tkernels.registry import Launch

    for children in _CHECK_CHILDREN:
        block_b, block_c = _walk_tiles(64, children)
        yield Launch(f"{block_b} trees, {block_c} children at a time", dict(BLOCK_B=block_b, BLOCK_C=block_c),
                     options={"num_warps": 1})


def rejection_walk_launch(dtype, vocab, cfg, candidate=False):
    """The rejection walk's compile for ``vocab`` logits under ``cfg``."""
    from tkernels.registry import Launch

    block_b, block_v = _rejection_tiles(vocab, cfg)
    return Launch(f"{_DTYPES[dtype]} {block_b}x{block_v} w{cfg['num_warps']}",
                  dict(**UNIFORM_CONSTEXPRS, BLOCK_B=block_b, BLOCK_V=block_v),
                  types={"logits_ptr": f"*{_DTYPES[dtype]}"},
                  options={"num_warps": cfg["num_warps"], **REJECTION_MAXNREG}, candidate=candidate)


def _rejection_walk_launches(shared_limit):
    for dtype in _DTYPES:
        for _batch, vocab in CHECK_SHAPES:
            yield rejection_walk_launch(dtype, vocab, DEFAULT_CONFIG)


@gpu_compile_check(
    {
        "logits_ptr": "*bf16", "stride_row": "i64", "N": "i32", "V": "i32", "inv_temp_ptr": "*fp32", "thr_ptr": "*fp32",
        "uniform_ptr": "*fp32", "token_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32",
    },
    _node_pass_launches,
    MODE=SAMPLE,
    **MODE_CONSTEXPRS,
    BLOCK_R=1,
    BLOCK_V=2048,
)
@triton.jit
def _node_pass_kernel(
    logits_ptr, stride_row, N, V, inv_temp_ptr, thr_ptr, uniform_ptr, token_ptr, max_ptr, sum_ptr,
    MODE: tl.constexpr, ARGMAX: tl.constexpr, STATS: tl.constexpr, U_COLS: tl.constexpr, U_ACCEPT: tl.constexpr,
    U_DRAW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # BLOCK_R tree nodes (rows of logits) per program. MODE ARGMAX: argmax -> token, row max -> max. STATS: max and
    # sum-exp of the processed distribution -> max/sum. SAMPLE: inverse-CDF draw with the
    # node's column-1 uniform -> token.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < N
    l_off = rows.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)[None, :]
    if MODE == ARGMAX:
        best = tl.full([BLOCK_R, BLOCK_V], float("-inf"), tl.float32)
        best_idx = tl.zeros([BLOCK_R, BLOCK_V], tl.int32) + offs
        for v0 in range(0, V, BLOCK_V):
            o = v0 + offs
            x = tl.load(logits_ptr + l_off[:, None] + o, mask=live[:, None] & (o < V), other=float("-inf")).to(tl.float32)
            # strict: each lane keeps its first maximum. A NaN is taken and then kept (nothing
            # compares greater), so the lane shows it after the loop: a per-tile NaN reduction
            # instead cost sm_80 8 B of spills (Triton 3.6, 1 x 4096, 8 warps).
            better = (x > best) | (x != x)
            best_idx = tl.where(better, o, best_idx)
            best = tl.where(better, x, best)
        top = tl.max(best, 1)
        token = tl.min(tl.where(best == top[:, None], best_idx, V), 1)
        tl.store(token_ptr + rows, token.to(tl.int64), mask=live)
        # the row max as torch's amax has it (NaN if any logit is NaN): the finiteness check
        # reads it instead of a second pass over the logits (a NaN row's token is never used)
        nan_row = tl.max((best != best).to(tl.int32), 1) > 0
        tl.store(max_ptr + rows, tl.where(nan_row, float("nan"), top), mask=live)
    else:
        inv_temp = tl.load(inv_temp_ptr + rows, mask=live, other=1.0)
        thr = tl.load(thr_ptr + rows, mask=live, other=0.0)
        row_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_R], tl.float32)
        for v0 in range(0, V, BLOCK_V):  # online max / sum-exp over the kept tokens
            o = v0 + offs
            x = tl.load(logits_ptr + l_off[:, None] + o, mask=live[:, None] & (o < V), other=float("-inf")).to(tl.float32)
            y = tl.where((o < V) & (x >= thr[:, None]), x * inv_temp[:, None], float("-inf"))
            new_max = tl.maximum(row_max, tl.max(y, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no inf - inf before the first kept token
            total = total * tl.exp(row_max - safe_max) + tl.sum(tl.exp(y - safe_max[:, None]), 1)
            row_max = new_max
        if MODE == STATS:
            tl.store(max_ptr + rows, row_max, mask=live)
            tl.store(sum_ptr + rows, total, mask=live)
        else:
            u = tl.load(uniform_ptr + rows.to(tl.int64) * U_COLS + U_DRAW, mask=live, other=0.0)
            no_scratch = tl.zeros([BLOCK_R], tl.int32)
            token = _inverse_cdf(logits_ptr, l_off, max_ptr, l_off, V, live, no_scratch, inv_temp, thr,
                                 tl.where(live, row_max, 0.0), u * total, BLOCK_R, BLOCK_V)
            tl.store(token_ptr + rows, token.to(tl.int64), mask=live)


@triton.jit
def _requests(cu_ptr, B, BLOCK_B: tl.constexpr):
    """This program's BLOCK_B requests: ids, liveness and first (global) node."""
    reqs = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = reqs < B
    return reqs, live, tl.load(cu_ptr + reqs, mask=live, other=0)


# The walks hold no tree in registers: a node's children are contiguous (BFS), so a walk step
# reads the current node's first child and child count (global indices, see _children) and
# then only those children, whatever the tree's size. Nor do they hold the path: step s writes
# column s of the accepted tokens and column s + 1 of the nodes (-1 once the walk has
# stopped), every output element once. (Written out in each kernel: a @triton.jit helper
# called every step costs the CPU interpreter milliseconds per call.)
_WALK_SIGNATURE = {
    "draft_ptr": "*i64", "first_child_ptr": "*i32", "num_children_ptr": "*i32", "cu_ptr": "*i32",
    "out_tokens_ptr": "*i64", "out_nodes_ptr": "*i32", "num_ptr": "*i32", "B": "i32", "W": "i32", "max_children": "i32",
}


@gpu_compile_check({"node_token_ptr": "*i64", **_WALK_SIGNATURE}, _path_walk_launches, BLOCK_B=16, BLOCK_C=16)
@triton.jit
def _path_walk_kernel(
    node_token_ptr, draft_ptr, first_child_ptr, num_children_ptr, cu_ptr, out_tokens_ptr, out_nodes_ptr, num_ptr,
    B, W, max_children,
    BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # BLOCK_B requests per program: descend to the first child whose draft token equals the
    # current node's target token (argmax or draw); that token is the bonus where none does.
    # Children are scanned BLOCK_C at a time.
    reqs, live, start = _requests(cu_ptr, B, BLOCK_B)
    out = reqs.to(tl.int64) * W
    tl.store(out_nodes_ptr + out, reqs * 0, mask=live)  # every path starts at node 0
    c_off = tl.arange(0, BLOCK_C)[None, :]
    cur = start  # global index of the current node
    count = tl.zeros([BLOCK_B], tl.int32)
    alive = live
    for step in range(0, W):  # W = max depth + 1: one level per step
        target = tl.load(node_token_ptr + cur, mask=alive, other=-1)
        first = tl.load(first_child_ptr + cur, mask=alive, other=0)
        kids = tl.load(num_children_ptr + cur, mask=alive, other=0)
        child = tl.full([BLOCK_B], -1, tl.int32)
        for c0 in range(0, max_children, BLOCK_C):  # masked, not skipped: most nodes have <= BLOCK_C children
            scanning = alive & (child < 0) & (c0 < kids)
            r = c0 + c_off
            is_child = scanning[:, None] & (r < kids[:, None])
            tok = tl.load(draft_ptr + first[:, None] + r, mask=is_child, other=-1)
            hit = tl.min(tl.where(is_child & (tok == target[:, None]), r, max_children), 1)
            child = tl.where(scanning & (hit < kids), first + hit, child)
        advance = child >= 0
        next_col = count * 0 + step + 1  # a tensor: the interpreter takes tensor masks only
        tl.store(out_tokens_ptr + out + step, tl.where(alive, target, -1), mask=live)
        tl.store(out_nodes_ptr + out + next_col, tl.where(advance, child - start, -1), mask=live & (next_col < W))
        cur = tl.where(advance, child, cur)
        count += advance.to(tl.int32)
        alive = advance
    tl.store(num_ptr + reqs, count + 1, mask=live)


@gpu_compile_check(
    {
        "logits_ptr": "*bf16", "stride_l": "i64", "q_ptr": "*fp32", "stride_q": "i64", "V": "i32",
        "inv_temp_ptr": "*fp32", "thr_ptr": "*fp32", "max_ptr": "*fp32", "sum_ptr": "*fp32", "uniform_ptr": "*fp32",
        "scratch_p_ptr": "*fp32", "scratch_q_ptr": "*fp32", **_WALK_SIGNATURE,
    },
    _rejection_walk_launches,
    **UNIFORM_CONSTEXPRS,
    BLOCK_B=1,
    BLOCK_V=1024,
)
@triton.jit
def _rejection_walk_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, V, inv_temp_ptr, thr_ptr, max_ptr, sum_ptr, uniform_ptr,
    scratch_p_ptr, scratch_q_ptr,
    draft_ptr, first_child_ptr, num_children_ptr, cu_ptr, out_tokens_ptr, out_nodes_ptr, num_ptr, B, W, max_children,
    U_COLS: tl.constexpr, U_ACCEPT: tl.constexpr, U_DRAW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # BLOCK_B requests per program walk their trees with recursive rejection sampling. A node's
    # p and q are read from logits / draft_probs until its first rejected child; after that the
    # residuals live in the request's scratch rows (unnormalised; totals p_total / q_total).
    reqs, live, start = _requests(cu_ptr, B, BLOCK_B)
    out = reqs.to(tl.int64) * W
    tl.store(out_nodes_ptr + out, reqs * 0, mask=live)  # every path starts at node 0
    s_off = reqs.to(tl.int64) * V
    offs = tl.arange(0, BLOCK_V)[None, :]
    cur = start  # global index of the current node
    count = tl.zeros([BLOCK_B], tl.int32)
    alive = live
    for step in range(0, W):  # one node visited per level; W = max depth + 1
        g = cur.to(tl.int64)
        l_off = g * stride_l
        q_off = g * stride_q
        inv_temp = tl.load(inv_temp_ptr + g, mask=alive, other=1.0)
        thr = tl.load(thr_ptr + g, mask=alive, other=0.0)
        row_max = tl.load(max_ptr + g, mask=alive, other=0.0)
        row_sum = tl.load(sum_ptr + g, mask=alive, other=1.0)
        first_child = tl.load(first_child_ptr + g, mask=alive, other=0)
        num_children = tl.load(num_children_ptr + g, mask=alive, other=0)
        p_scratch = tl.zeros([BLOCK_B], tl.int32)
        q_scratch = tl.zeros([BLOCK_B], tl.int32)
        p_total = row_sum
        q_total = tl.full([BLOCK_B], 1.0, tl.float32)
        accepted = tl.full([BLOCK_B], -1, tl.int32)
        r = max_children * 0  # the child tested next (a runtime scalar: it is loop-carried)
        tested = alive & (num_children > 0)
        while tl.max(tested.to(tl.int32), 0) > 0:  # until every request accepted a child or ran out of them
            c = first_child + r
            t = tl.load(draft_ptr + c, mask=tested, other=0)
            u = tl.load(uniform_ptr + c.to(tl.int64) * U_COLS + U_ACCEPT, mask=tested, other=0.0)
            p_t = _p_tile(logits_ptr, l_off, scratch_p_ptr, s_off, t, V, tested, p_scratch, inv_temp, thr, row_max) / p_total
            inv_q = tl.where(q_total > 0, 1.0 / q_total, 0.0)
            q_t = tl.where(
                q_scratch != 0,
                tl.load(scratch_q_ptr + s_off + t, mask=tested & (q_scratch != 0), other=0.0) * inv_q,
                tl.load(q_ptr + q_off + t, mask=tested & (q_scratch == 0), other=0.0).to(tl.float32),
            )
            accept = tested & (u * q_t < p_t)
            accepted = tl.where(accept, c, accepted)
            reject = tested & ~accept
            if tl.max(reject.to(tl.int32), 0) > 0:  # residual pass: p <- max(p - q, 0), q <- q without t
                new_p_total = tl.zeros([BLOCK_B], tl.float32)
                new_q_total = tl.zeros([BLOCK_B], tl.float32)
                rows = reject[:, None]
                for v0 in range(0, V, BLOCK_V):
                    o = v0 + offs
                    m = rows & (o < V)
                    p = _p_tile(logits_ptr, l_off[:, None], scratch_p_ptr, s_off[:, None], o, V, rows,
                                p_scratch[:, None], inv_temp[:, None], thr[:, None], row_max[:, None]) / p_total[:, None]
                    q = tl.where(
                        q_scratch[:, None] != 0,
                        tl.load(scratch_q_ptr + s_off[:, None] + o, mask=m & (q_scratch[:, None] != 0), other=0.0) * inv_q[:, None],
                        tl.load(q_ptr + q_off[:, None] + o, mask=m & (q_scratch[:, None] == 0), other=0.0).to(tl.float32),
                    )
                    residual = tl.where(m, tl.maximum(p - q, 0.0), 0.0)
                    q = tl.where(m & (o != t[:, None]), q, 0.0)
                    tl.store(scratch_p_ptr + s_off[:, None] + o, residual, mask=m)
                    tl.store(scratch_q_ptr + s_off[:, None] + o, q, mask=m)
                    new_p_total += tl.sum(residual, 1)
                    new_q_total += tl.sum(q, 1)
                tl.debug_barrier()  # the scratch rows are read back by other threads
                has_residual = new_p_total > 0  # an all-zero residual falls back to p(v)
                p_scratch = tl.where(reject, has_residual.to(tl.int32), p_scratch)
                p_total = tl.where(reject, tl.where(has_residual, new_p_total, row_sum), p_total)
                q_scratch = tl.where(reject, 1, q_scratch)
                q_total = tl.where(reject, new_q_total, q_total)
            r += 1
            tested = alive & (r < num_children) & (accepted < 0)
        advance = alive & (accepted >= 0)
        stop = alive & (accepted < 0)
        token = tl.load(draft_ptr + accepted, mask=advance, other=-1)
        if tl.max(stop.to(tl.int32), 0) > 0:
            u = tl.load(uniform_ptr + g * U_COLS + U_DRAW, mask=stop, other=0.0)
            bonus = _inverse_cdf(logits_ptr, l_off, scratch_p_ptr, s_off, V, stop, p_scratch, inv_temp, thr, row_max,
                                 u * p_total, BLOCK_B, BLOCK_V)
            token = tl.where(stop, bonus.to(tl.int64), token)
        next_col = count * 0 + step + 1  # a tensor: the interpreter takes tensor masks only
        tl.store(out_tokens_ptr + out + step, token, mask=live)
        tl.store(out_nodes_ptr + out + next_col, tl.where(advance, accepted - start, -1), mask=live & (next_col < W))
        cur = tl.where(advance, accepted, cur)
        count += advance.to(tl.int32)
        alive = advance
    tl.store(num_ptr + reqs, count + 1, mask=live)
