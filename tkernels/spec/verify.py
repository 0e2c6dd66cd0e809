"""Lossless verification of speculation trees: greedy and exact sampling.

Inputs follow the tree contract (``tkernels.spec.tree``): a ragged batch of BFS trees
(``parents`` LOCAL indices, ``cu_nodes`` offsets), ``draft_tokens`` with node 0 of each request
= its last committed token, and the target's ``logits`` at every node (row ``i`` predicts the
children of node ``i``). Output per request: ``accepted_tokens`` int64[B, max_depth+1] (the
accepted draft tokens along the path, then the bonus token; -1 padded), ``accepted_nodes``
int32[B, max_depth+1] (local node indices of the path from node 0; -1 padded) and
``num_accepted`` int32[B] (accepted drafts + 1).

Rules:

* greedy (:func:`verify_greedy`): descend while some child's token equals the target argmax at
  the current node (first such child in BFS order); the bonus is the argmax at the last node.
* sampling (:func:`verify_sampling`), target distribution ``p(v)`` = softmax(logits/T) after
  top-k then top-p; a request whose temperature is below :data:`GREEDY_TEMPERATURE` (1e-5,
  vLLM's ``_SAMPLING_EPS``; 0 and negative values included) or whose top-k is 1 (SGLang's
  greedy rows) is greedy: ``p(v)`` is one-hot at the argmax, so its outputs are
  :func:`verify_greedy`'s whatever the uniforms:
  - deterministic drafts (``draft_probs=None``), the target-only rule: at the current node draw
    ``x ~ p(v)``, descend to the first child whose token is ``x``, else ``x`` is the bonus. The
    draw at a node does not depend on the path that reached it, so every node's draw is made in
    parallel and the walk only looks them up; exact for any draft.
  - sampled drafts (``draft_probs[v]`` = the distribution ``q`` that node ``v``'s children were
    drawn from, without replacement, in BFS order): recursive rejection sampling (SpecInfer /
    Sequoia). For children c1, c2, ... in order, accept ``ci`` iff ``u_ci * q(ci) < p(ci)``
    (probability min(1, p/q)); on rejection ``p <- norm(max(p - q, 0))`` (if that is all zero,
    ``p`` falls back to the target ``p(v)``) and ``q <- norm(q with q(ci) = 0)`` (zero if
    nothing is left); if every child is rejected the bonus is drawn from the last ``p``. With
    one child per node (a chain) this is standard speculative sampling.

Ties and bad logits. Every argmax here is the first maximal index (``torch.argmax``'s rule, so
plain greedy decoding's): kernels and references, greedy and sampling rules. ``-inf`` logits are
masks (the token has probability 0; vLLM's logits processors write them). NaN or ``+inf`` logits,
a node without a finite logit, or logits whose ``logit / T`` overflows float32 (|logit| > 3.4e33
at T = 1e-5) raise :class:`NonFiniteLogitsError` (a ``ValueError`` starting ``"logits: "`` that
lists the offending requests in ``requests``, so a server can fail those requests alone): no path
returns a token outside ``[0, vocab)``.

Randomness: the kernels consume ``uniforms`` float32[total_nodes, 2]: column 0 is node ``i``'s
acceptance test (a node is tested at most once, as a child of its parent), column 1 is the draw
at node ``i`` (inverse CDF: the first token whose cumulative probability exceeds ``u * total``).
Pass them explicitly (reproducible; the references take the same tensor and agree exactly up to
float rounding at decision boundaries) or pass a seeded ``torch.Generator`` and/or per-request
generators (:func:`draw_uniforms`). :func:`keyed_uniforms` makes them from (seed, position)
alone: with deterministic drafts a seeded request then samples the same tokens whatever was
drafted, whatever the batch.

Kernels take several rows (nodes) or requests per program when the vocabulary is small, one
when it is large. Launch parameters (:data:`DEFAULT_CONFIG`: the vocabulary tile ``block_v`` and
``num_warps``) come from the GPU's config file (``tkernels autotune``
tunes them per vocabulary size, bucket key ``vocab``) or the ``config`` argument. Cost: one pass
over the vocabulary per node for the argmax (greedy) or for the max/sum-exp normaliser (sampling),
plus an inverse-CDF pass that stops at the sampled token; the finiteness check above reads the
argmax pass's row maxima (greedy) or one torch row-max pass (sampling); no [N, V]
probability tensor is ever materialised by the kernels. Top-k/top-p thresholds are computed in
torch before the kernels with one descending sort of the fp32 logits ([N, V] values and
indices: memory!) and only when ``top_k``/``top_p`` are given; a token is kept iff its logit is
>= its node's threshold, so ties at the threshold are all kept. Recursive rejection keeps the
residual ``p``/``q`` of the current node in a per-request fp32 scratch [B, V] and touches it
only after a rejection, so accepted children cost two scalar loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tkernels import config as tkernels_config
from tkernels.checks import fail, in_unit_interval, require
from tkernels.registry import gpu_compile_check
from tkernels.spec.tree import depths, validate_parents

__all__ = [
    "verify_greedy",
    "verify_sampling",
    "verify_greedy_reference",
    "verify_sampling_reference",
    "target_probs",
    "draw_uniforms",
    "keyed_uniforms",
    "DEFAULT_CONFIG",
    "GREEDY_TEMPERATURE",
    "NonFiniteLogitsError",
    "launch_config",
]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Launch parameters of every kernel here; tuned per vocabulary size by ``tkernels autotune``.
DEFAULT_CONFIG = {"block_v": 4096, "num_warps": 8}


def search_space(dry_run: bool, quick: bool) -> list[dict[str, int]]:
    """The configs ``tkernels autotune`` tries over :data:`DEFAULT_CONFIG` (a few tiny ones for a
    CPU dry run, fewer warps for ``--quick``)."""
    if dry_run:
        return [{"block_v": 32, "num_warps": 2}, {"block_v": 64}]
    return [{"block_v": v, "num_warps": w} for v in (1024, 2048, 4096, 8192) for w in ((4, 8) if quick else (4, 8, 16))]

# Temperatures below this are greedy (vLLM's _SAMPLING_EPS, so a server's greedy rows agree).
GREEDY_TEMPERATURE = 1e-5


class NonFiniteLogitsError(ValueError):
    """``logits`` hold NaN or +inf, a node has no finite logit, or ``logit / T`` overflows.

    ``requests``: the batch indices of the offending requests (a server fails those alone).
    """

    def __init__(self, message: str, requests: list[int]):
        super().__init__(message)
        self.requests = requests

# _node_pass_kernel modes
_ARGMAX, _STATS, _SAMPLE = 0, 1, 2
MODES = (_ARGMAX, _STATS, _SAMPLE)  # the node pass's MODE values


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
                  dict(MODE=mode, BLOCK_R=block_r, BLOCK_V=block_v), types={"logits_ptr": f"*{_DTYPES[dtype]}"},
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
    return Launch(f"{_DTYPES[dtype]} {block_b}x{block_v} w{cfg['num_warps']}", dict(BLOCK_B=block_b, BLOCK_V=block_v),
                  types={"logits_ptr": f"*{_DTYPES[dtype]}"},
                  options={"num_warps": cfg["num_warps"], **_REJECTION_MAXNREG}, candidate=candidate)


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
    MODE=_SAMPLE,
    BLOCK_R=1,
    BLOCK_V=2048,
)
@triton.jit
def _node_pass_kernel(
    logits_ptr, stride_row, N, V, inv_temp_ptr, thr_ptr, uniform_ptr, token_ptr, max_ptr, sum_ptr,
    MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # BLOCK_R tree nodes (rows of logits) per program. MODE 0: argmax -> token, row max -> max. MODE 1: max and
    # sum-exp of the processed distribution -> max/sum. MODE 2: inverse-CDF draw with the
    # node's column-1 uniform -> token.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < N
    l_off = rows.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK_V)[None, :]
    if MODE == 0:
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
        if MODE == 1:
            tl.store(max_ptr + rows, row_max, mask=live)
            tl.store(sum_ptr + rows, total, mask=live)
        else:
            u = tl.load(uniform_ptr + rows.to(tl.int64) * 2 + 1, mask=live, other=0.0)
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
    BLOCK_B=1,
    BLOCK_V=1024,
)
@triton.jit
def _rejection_walk_kernel(
    logits_ptr, stride_l, q_ptr, stride_q, V, inv_temp_ptr, thr_ptr, max_ptr, sum_ptr, uniform_ptr,
    scratch_p_ptr, scratch_q_ptr,
    draft_ptr, first_child_ptr, num_children_ptr, cu_ptr, out_tokens_ptr, out_nodes_ptr, num_ptr, B, W, max_children,
    BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
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
            u = tl.load(uniform_ptr + c.to(tl.int64) * 2, mask=tested, other=0.0)
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
            u = tl.load(uniform_ptr + g * 2 + 1, mask=stop, other=0.0)
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


# --- input handling shared by kernels and references -----------------------------------------


class _Shape(NamedTuple):
    width: int  # max depth + 1: the output rows' length
    max_nodes: int
    max_children: int
    row_max: torch.Tensor  # float32[total_nodes]: every node's largest logit (finite)


def _check_tree_batch(logits, draft_tokens, parents, cu_nodes, row_max_pass=None) -> _Shape:
    """Validate the common inputs; return the output width and the per-tree size bounds.
    ``row_max_pass``: a callable launching a pass over the (shape-checked) logits that returns
    every node's largest logit, float32[total_nodes] with NaN for rows holding one (the argmax
    pass of :func:`verify_greedy`); default a torch ``amax``."""
    for name, t in (("logits", logits), ("draft_tokens", draft_tokens), ("parents", parents), ("cu_nodes", cu_nodes)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != logits.device:
            raise ValueError(f"{name} is on {t.device} but logits is on {logits.device}")
    if logits.dim() != 2 or logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"logits must be [total_nodes, vocab] fp32/fp16/bf16, got {tuple(logits.shape)} {logits.dtype}")
    if logits.shape[1] == 0 or logits.stride(1) != 1:
        raise ValueError(f"logits must have a non-empty, contiguous vocab dimension, got shape {tuple(logits.shape)} strides {logits.stride()}")
    if draft_tokens.dim() != 1 or draft_tokens.dtype != torch.int64:
        raise ValueError(f"draft_tokens must be int64[total_nodes], got {tuple(draft_tokens.shape)} {draft_tokens.dtype}")
    if parents.dim() != 1 or parents.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"parents must be int32[total_nodes], got {tuple(parents.shape)} {parents.dtype}")
    if cu_nodes.dim() != 1 or cu_nodes.numel() < 1 or cu_nodes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_nodes must be int32[B+1], got {tuple(cu_nodes.shape)} {cu_nodes.dtype}")
    n = logits.shape[0]
    if draft_tokens.numel() != n or parents.numel() != n:
        raise ValueError(
            f"logits, draft_tokens and parents must all have total_nodes rows: logits {n}, "
            f"draft_tokens {draft_tokens.numel()}, parents {parents.numel()}"
        )
    if cu_nodes.numel() == 1:  # empty batch
        if n != 0 or int(cu_nodes[0]) != 0:
            raise ValueError(f"cu_nodes = {cu_nodes.tolist()} describes no request but there are {n} nodes")
        return _Shape(1, 0, 0, logits.new_empty(0, dtype=torch.float32))
    if n == 0:
        validate_parents(parents, cu_nodes)  # raises: requests without nodes
    # One device-to-host copy (a few KB) of the tree, the token range and the number of nodes
    # whose largest logit is not finite (NaN propagates through amax; +inf and all -inf show).
    row_max = logits.amax(-1).float() if row_max_pass is None else row_max_pass()
    lo_hi = torch.stack(torch.aminmax(draft_tokens))
    bad_rows = (~torch.isfinite(row_max)).sum()[None]
    host = torch.cat([parents.long(), cu_nodes.long(), lo_hi, bad_rows]).cpu()
    par, cu, (lo, hi, bad) = host[:n], host[n:-3], host[-3:].tolist()
    validate_parents(par, cu)
    if lo < 0 or hi >= logits.shape[1]:
        raise ValueError(f"draft_tokens must lie in [0, {logits.shape[1]}) (the vocab), got range [{lo}, {hi}]")
    if bad:
        _raise_non_finite(~torch.isfinite(row_max), cu, "hold NaN or +inf, or no finite logit (all -inf)")
    sizes = cu[1:] - cu[:-1]
    global_parents = torch.where(par >= 0, par + torch.repeat_interleave(cu[:-1], sizes), -1)
    children = torch.bincount(global_parents[par >= 0], minlength=n)
    return _Shape(int(depths(par, cu).max()) + 1, int(sizes.max()), int(children.max()), row_max)


def _raise_non_finite(bad_nodes: torch.Tensor, cu_nodes: torch.Tensor, why: str):
    """Raise :class:`NonFiniteLogitsError` for the requests owning ``bad_nodes`` (bool[total_nodes])."""
    rows = bad_nodes.nonzero().flatten().cpu()
    requests = sorted(set((torch.searchsorted(cu_nodes.cpu().long(), rows, right=True) - 1).tolist()))
    raise NonFiniteLogitsError(
        f"logits: the rows of request{'s' if len(requests) > 1 else ''} {', '.join(map(str, requests))} {why} "
        f"(nodes {rows[:8].tolist()}{' ...' if rows.numel() > 8 else ''}); the model's scores are unusable",
        requests,
    )


def _check_sampling(logits, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, row_max):
    """Validate the sampling inputs of a checked tree batch (kernels and references alike);
    return :func:`_processing`'s per-node ``(inv_temp, thr, greedy)``."""
    batch, n, device = cu_nodes.numel() - 1, logits.shape[0], logits.device
    for name, t, floating in (("temperature", temperature, True), ("top_k", top_k, False), ("top_p", top_p, True)):
        if t is None and name != "temperature":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (batch,) or t.is_floating_point() != floating:
            kind = "float" if floating else "integer"
            fail(name, f"must be a {kind} tensor [B={batch}]{'' if name == 'temperature' else ' or None'}, "
                       f"got {getattr(t, 'shape', t)} {getattr(t, 'dtype', '')}")
        if t.device != device:
            fail(name, f"is on {t.device} but logits is on {device}")
    if uniforms is not None and (not isinstance(uniforms, torch.Tensor) or uniforms.shape != (n, 2)
                                 or uniforms.dtype != torch.float32 or uniforms.device != device
                                 or not uniforms.is_contiguous()):
        fail("uniforms", f"must be a contiguous float32[{n}, 2] tensor on {device}, got {_describe(uniforms)}")
    if draft_probs is not None and (not isinstance(draft_probs, torch.Tensor) or draft_probs.shape != logits.shape
                                    or draft_probs.dtype != torch.float32 or draft_probs.device != device
                                    or draft_probs.stride(1) != 1):
        fail("draft_probs", f"must be float32{list(logits.shape)} on {device} with a contiguous vocab dim, "
                            f"got {_describe(draft_probs)}")
    checks = [("temperature", "must be finite (NaN and inf are not temperatures)", torch.isfinite(temperature).all())]
    if top_p is not None:
        checks.append(("top_p", "must lie in (0, 1]", ((top_p > 0) & (top_p <= 1)).all()))
    if uniforms is not None:
        checks.append(in_unit_interval("uniforms", uniforms))
    if draft_probs is not None:  # probabilities: each at most 1, which keeps greedy rows exact
        checks.append(("draft_probs", "must hold probabilities in [0, 1] (no NaN, inf or negative values)",
                       ((draft_probs >= 0) & (draft_probs <= 1)).all()))
    require(*checks)
    inv_temp, thr, greedy = _processing(logits, cu_nodes, temperature, top_k, top_p, row_max)
    overflow = ~torch.isfinite(row_max * inv_temp)
    if n and bool(overflow.any()):
        _raise_non_finite(overflow, cu_nodes, "overflow float32 when divided by the temperature")
    return inv_temp, thr, greedy


def _per_node(values: torch.Tensor, cu_nodes: torch.Tensor, total: int) -> torch.Tensor:
    return torch.repeat_interleave(values, (cu_nodes[1:] - cu_nodes[:-1]).long(), output_size=total)


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def _greedy_requests(temperature, top_k) -> torch.Tensor:
    """bool[B]: T below GREEDY_TEMPERATURE, or top_k = 1 (SGLang's greedy rows: T = 1, top_k = 1)."""
    greedy = temperature < GREEDY_TEMPERATURE
    return greedy if top_k is None else greedy | (top_k == 1)


def _processing(logits, cu_nodes, temperature, top_k, top_p, row_max=None):
    """Per node: 1/T (1 for greedy), the kept-logit threshold (top-k then top-p; the row max for
    greedy requests, :func:`_greedy_requests`) and whether the node is greedy: fp32, fp32, bool
    [total_nodes]. ``row_max``: the nodes' largest logits when the caller has them."""
    n, vocab = logits.shape
    temp = _per_node(temperature.float(), cu_nodes, n)
    greedy = _per_node(_greedy_requests(temperature, top_k), cu_nodes, n)
    inv_temp = torch.where(greedy, 1.0, 1.0 / torch.where(greedy, 1.0, temp))
    x = logits.float()
    thr = torch.full((n,), float("-inf"), device=logits.device)
    if n and (top_k is not None or top_p is not None):
        ranked = x.sort(dim=-1, descending=True).values
        if top_k is not None:
            k = _per_node(top_k.long(), cu_nodes, n)
            k = torch.where((k <= 0) | (k > vocab), vocab, k)
            thr = ranked.gather(1, (k - 1)[:, None]).squeeze(1)
        if top_p is not None:
            scaled = torch.where(ranked >= thr[:, None], ranked * inv_temp[:, None], float("-inf"))
            probs = torch.softmax(scaled, dim=-1)
            mass_before = probs.cumsum(-1) - probs
            kept = (mass_before < _per_node(top_p.float(), cu_nodes, n)[:, None]).sum(-1).clamp(min=1)
            thr = torch.maximum(thr, ranked.gather(1, (kept - 1)[:, None]).squeeze(1))
    if row_max is None:
        row_max = x.amax(-1) if n else thr
    thr = torch.where(greedy, row_max, thr)
    return inv_temp.contiguous(), thr.contiguous(), greedy


def draw_uniforms(
    cu_nodes: torch.Tensor, generator: torch.Generator | None = None, generators: dict[int, torch.Generator] | None = None
) -> torch.Tensor:
    """The uniforms the sampling kernels consume: float32[total_nodes, 2] in [0, 1).

    Drawn from ``generator`` (or torch's default), except that request ``b``'s rows come from
    ``generators[b]`` where given (vLLM's per-request seeded generators): those depend only on
    that request's seed and tree size, not on the rest of the batch.
    """
    bounds = cu_nodes.tolist()
    device = cu_nodes.device
    for g in [generator, *(generators or {}).values()]:
        if g is not None and g.device.type != device.type:
            raise ValueError(f"generator is on {g.device} but the inputs are on {device}")
    uniforms = torch.rand((bounds[-1], 2), generator=generator, device=device)
    for b, g in (generators or {}).items():
        if not 0 <= b < len(bounds) - 1:
            raise ValueError(f"generators has request {b} but the batch has {len(bounds) - 1}")
        uniforms[bounds[b] : bounds[b + 1]] = torch.rand((bounds[b + 1] - bounds[b], 2), generator=g, device=device)
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
    if not isinstance(seeds, torch.Tensor):
        seeds = torch.tensor([_as_int64(int(seed)) for seed in seeds], dtype=torch.int64, device=positions.device)
    if seeds.dtype != torch.int64 or positions.dtype != torch.int64 or seeds.shape != positions.shape or seeds.dim() != 1:
        raise ValueError(f"seeds and positions must be int64[N] of one shape, got {seeds.dtype}{list(seeds.shape)} "
                         f"and {positions.dtype}{list(positions.shape)}")
    if seeds.device != positions.device:
        raise ValueError(f"seeds and positions must be on one device, got {seeds.device} and {positions.device}")
    if positions.numel() and int(positions.min()) < 0:
        raise ValueError(f"positions must be non-negative, got minimum {int(positions.min())}")
    stream = _splitmix64(seeds + _GOLDEN)  # the seed's own starting point
    counters = (2 * positions[:, None] + torch.arange(1, 3, device=positions.device)) * _GOLDEN
    bits = _shr(_splitmix64(stream[:, None] + counters), 40)  # top 24 bits
    return bits.to(torch.float32) * 2.0**-24


def _empty_outputs(batch: int, width: int, device):
    return (
        torch.empty((batch, width), dtype=torch.int64, device=device),
        torch.empty((batch, width), dtype=torch.int32, device=device),
        torch.empty((batch,), dtype=torch.int32, device=device),
    )


def launch_config(vocab: int, config: dict | None = None) -> dict:
    """The launch parameters for ``vocab``: ``config`` over the GPU's tuned bucket over the defaults."""
    return tkernels_config.launch_config("verify", {"vocab": vocab}, DEFAULT_CONFIG, config)


def _tiles(count: int, vocab: int, cfg: dict) -> tuple[int, int]:
    """(rows per program, vocabulary tile): many small rows share a program (tiny vocabularies,
    big batches); 4096 elements per program at most when rows are packed."""
    block_v = max(16, min(cfg["block_v"], triton.next_power_of_2(vocab)))
    return max(1, min(triton.next_power_of_2(max(count, 1)), 4096 // block_v)), block_v


def _node_pass(mode: int, logits, inv_temp, thr, uniforms, token, row_max, row_sum, cfg: dict) -> None:
    n, vocab = logits.shape
    block_r, block_v = _tiles(n, vocab, cfg)
    _node_pass_kernel[(triton.cdiv(n, block_r),)](
        logits, logits.stride(0), n, vocab, inv_temp, thr, uniforms, token, row_max, row_sum,
        MODE=mode, BLOCK_R=block_r, BLOCK_V=block_v, num_warps=cfg["num_warps"],
    )


def _argmax_pass(logits, node_token, cfg: dict) -> torch.Tensor:
    """Every node's first maximal token into ``node_token``; returns the rows' largest logits
    (float32[total_nodes], NaN where a row holds one)."""
    row_max = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _node_pass(_ARGMAX, logits, logits, logits, logits, node_token, row_max, logits, cfg)
    return row_max


def _children(parents: torch.Tensor, cu_nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every node's first child (global index; ``total_nodes`` if it has none) and its number of
    children, int64[total_nodes] each, on the trees' device and without a host sync. BFS
    order makes a node's children the contiguous run starting at its first child."""
    n = parents.numel()
    node = torch.arange(n, device=parents.device)
    start = _per_node(cu_nodes[:-1].long(), cu_nodes, n)
    slot = torch.where(parents.long() >= 0, parents.long() + start, n)  # roots land in a spare slot
    first = torch.full((n + 1,), n, dtype=torch.long, device=parents.device).scatter_reduce_(0, slot, node, "amin")
    count = torch.zeros(n + 1, dtype=torch.long, device=parents.device).scatter_add_(0, slot, torch.ones_like(node))
    return first[:n], count[:n]


def _walk_args(draft_tokens, parents, cu_nodes, shape: _Shape, out) -> tuple:
    """The tree and output arguments both walk kernels end with."""
    first, count = _children(parents, cu_nodes)
    tokens, nodes, num = out
    return (draft_tokens, first.int(), count.int(), cu_nodes.int(), tokens, nodes, num, num.numel(), shape.width,
            shape.max_children)


def _walk_tiles(batch: int, max_children: int) -> tuple[int, int]:
    """(requests per program, children scanned at once) of the path walk. Latency-bound (one
    dependent level per step): few requests per program, one warp each."""
    return min(triton.next_power_of_2(batch), 16), min(triton.next_power_of_2(max(max_children, 1)), 16)


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
_REJECTION_MAXNREG = {"maxnreg": 255}


def _walk(node_token, draft_tokens, parents, cu_nodes, shape: _Shape, out) -> None:
    batch = out[2].numel()
    block_b, block_c = _walk_tiles(batch, shape.max_children)
    _path_walk_kernel[(triton.cdiv(batch, block_b),)](
        node_token, *_walk_args(draft_tokens, parents, cu_nodes, shape, out), BLOCK_B=block_b, BLOCK_C=block_c,
        num_warps=1,
    )


# --- public API -------------------------------------------------------------------------------


def verify_greedy(logits: torch.Tensor, draft_tokens: torch.Tensor, parents: torch.Tensor, cu_nodes: torch.Tensor,
                  config: dict | None = None):
    """Greedy tree verification -> (accepted_tokens int64[B, W], accepted_nodes int32[B, W],
    num_accepted int32[B]), W = max depth + 1. Chains are trees with parents[i] = i - 1.
    ``config``: launch parameters overriding the tuned ones (see :func:`launch_config`)."""
    node_token = []

    def argmax_pass() -> torch.Tensor:  # runs before the host sync that checks its row maxima
        node_token.append(torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device))
        return _argmax_pass(logits, node_token[0], launch_config(logits.shape[1], config))

    shape = _check_tree_batch(logits, draft_tokens, parents, cu_nodes, argmax_pass)
    batch = cu_nodes.numel() - 1
    out = _empty_outputs(batch, shape.width, logits.device)
    if batch == 0:
        return out
    _walk(node_token[0], draft_tokens, parents, cu_nodes, shape, out)
    return out


def verify_sampling(
    logits: torch.Tensor,
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    cu_nodes: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None = None,
    top_p: torch.Tensor | None = None,
    *,
    uniforms: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    generators: dict[int, torch.Generator] | None = None,
    draft_probs: torch.Tensor | None = None,
    config: dict | None = None,
):
    """Exact (lossless) sampling verification; same outputs as :func:`verify_greedy`.

    ``temperature`` float[B] (below :data:`GREEDY_TEMPERATURE`, 0 and negatives included:
    greedy, exactly :func:`verify_greedy`'s outputs for that request), ``top_k`` int[B] (<= 0 or
    >= vocab: off; 1: greedy, as SGLang writes its greedy rows), ``top_p`` float[B] in (0, 1];
    ``uniforms`` float32[total_nodes, 2] in [0, 1) (see the module doc) or else drawn by
    :func:`draw_uniforms` from ``generator`` / per-request ``generators``; ``draft_probs``
    float32[total_nodes, vocab] in [0, 1]: the distribution each node's children were sampled
    from (None for deterministic drafts); ``config``: launch parameters overriding the tuned
    ones (see :func:`launch_config`).
    Raises :class:`NonFiniteLogitsError` for unusable logits (module doc).
    """
    shape = _check_tree_batch(logits, draft_tokens, parents, cu_nodes)
    cfg = launch_config(logits.shape[1], config)
    batch, (n, vocab) = cu_nodes.numel() - 1, logits.shape
    device = logits.device
    inv_temp, thr, greedy = _check_sampling(logits, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs,
                                            shape.row_max)
    out = _empty_outputs(batch, shape.width, device)
    if batch == 0:
        return out
    if uniforms is None:
        uniforms = draw_uniforms(cu_nodes, generator, generators)
    if draft_probs is None:
        # A greedy node keeps only its maximal logits (thr = row max); its draw at u = 0 is the
        # first token with positive mass: the first maximum, verify_greedy's tie rule.
        uniforms = torch.where(greedy[:, None] & (torch.arange(2, device=device) == 1), 0.0, uniforms)
        node_token = torch.empty(n, dtype=torch.int64, device=device)
        _node_pass(_SAMPLE, logits, inv_temp, thr, uniforms, node_token, inv_temp, inv_temp, cfg)
        _walk(node_token, draft_tokens, parents, cu_nodes, shape, out)
        return out
    row_max = torch.empty(n, dtype=torch.float32, device=device)
    row_sum = torch.empty(n, dtype=torch.float32, device=device)
    _node_pass(_STATS, logits, inv_temp, thr, uniforms, draft_tokens, row_max, row_sum, cfg)
    scratch = torch.empty((2, batch, vocab), dtype=torch.float32, device=device)
    block_b, block_v = _rejection_tiles(vocab, cfg)
    _rejection_walk_kernel[(triton.cdiv(batch, block_b),)](
        logits, logits.stride(0), draft_probs, draft_probs.stride(0), vocab, inv_temp, thr, row_max, row_sum, uniforms,
        scratch[0], scratch[1], *_walk_args(draft_tokens, parents, cu_nodes, shape, out),
        BLOCK_B=block_b, BLOCK_V=block_v, num_warps=cfg["num_warps"],
        **(_REJECTION_MAXNREG if device.type == "cuda" and torch.version.hip is None else {}),
    )
    greedy_requests = _greedy_requests(temperature, top_k)
    if bool(greedy_requests.any()):
        # The rejection walk keeps every tied maximum of a greedy node (p uniform over them);
        # with p one-hot at the first maximum it is the greedy walk, so run that for those rows.
        node_token = torch.empty(n, dtype=torch.int64, device=device)
        _argmax_pass(logits, node_token, cfg)
        greedy_out = _empty_outputs(batch, shape.width, device)
        _walk(node_token, draft_tokens, parents, cu_nodes, shape, greedy_out)
        out = tuple(torch.where(greedy_requests.view(-1, *[1] * (o.dim() - 1)), g, o) for g, o in zip(greedy_out, out))
    return out


# --- references (plain PyTorch, vectorised over requests) ------------------------------------


def target_probs(logits, cu_nodes, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """The processed target distribution p(v) of every node, float64[total_nodes, vocab]
    (one-hot at the first maximum for greedy requests)."""
    inv_temp, thr, greedy = _processing(logits, cu_nodes, temperature, top_k, top_p)
    x = logits.float()
    scaled = torch.where(x >= thr[:, None], x * inv_temp[:, None], float("-inf"))
    probs = torch.softmax(scaled.double(), dim=-1)
    if logits.shape[0]:
        one_hot = torch.nn.functional.one_hot(x.argmax(-1), logits.shape[1]).double()
        probs = torch.where(greedy[:, None], one_hot, probs)
    return probs


def _inverse_cdf_reference(probs: torch.Tensor, u: torch.Tensor):
    """(token, margin): the kernels' inverse-CDF rule; margin = distance of the target to the
    nearest cumulative boundary, relative to the total (small = rounding may flip the token)."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:]
    target = u.double()[:, None] * total
    token = (cdf <= target).sum(-1)
    last_positive = probs.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    token = torch.where(token < probs.shape[1], token, last_positive)
    margin = ((cdf - target).abs() / total).amin(-1)
    return token, margin


class _Walk:
    """Vectorised per-request walk state shared by the references."""

    def __init__(self, draft_tokens, parents, cu_nodes, width):
        self.starts = cu_nodes[:-1].long()
        batch, n = cu_nodes.numel() - 1, draft_tokens.numel()
        self.first_child, self.num_children = _children(parents, cu_nodes)
        self.max_children = int(self.num_children.max()) if n else 0
        self.draft_tokens = draft_tokens
        self.cur = self.starts.clone()
        self.alive = torch.ones(batch, dtype=torch.bool, device=parents.device)
        self.count = torch.zeros(batch, dtype=torch.long, device=parents.device)
        self.tokens = torch.full((batch, width), -1, dtype=torch.int64, device=parents.device)
        self.nodes = torch.full((batch, width), -1, dtype=torch.int32, device=parents.device)
        self.nodes[:, 0] = 0
        self.margin = torch.full((batch,), float("inf"), dtype=torch.float64, device=parents.device)

    def step(self, step: int, child: torch.Tensor, bonus: torch.Tensor) -> None:
        """Record one visited node: descend to ``child`` (global, -1: none) or stop with ``bonus``."""
        advance = self.alive & (child >= 0)
        rows = self.alive.nonzero().flatten()
        token = torch.where(advance, self.draft_tokens[child.clamp(min=0)], bonus)
        self.tokens[rows, step] = token[rows]
        grow = advance.nonzero().flatten()
        if grow.numel():
            self.nodes[grow, step + 1] = (child - self.starts)[grow].int()
        self.count += advance.long()
        self.cur = torch.where(advance, child, self.cur)
        self.alive = advance

    def children(self, r: int) -> torch.Tensor:
        """Global index of the current nodes' r-th child (-1 where there is none)."""
        c = self.first_child[self.cur] + r
        return torch.where(r < self.num_children[self.cur], c, -1)

    def result(self):
        return self.tokens, self.nodes, (self.count + 1).int()


def _walk_reference(node_token, node_margin, draft_tokens, parents, cu_nodes, width):
    """Descend to the first child whose token is the node's target token (greedy / target-only)."""
    walk = _Walk(draft_tokens, parents, cu_nodes, width)
    for step in range(width):
        if not bool(walk.alive.any()):
            break
        target = node_token[walk.cur]
        walk.margin = torch.where(walk.alive, torch.minimum(walk.margin, node_margin[walk.cur]), walk.margin)
        child = torch.full_like(walk.cur, -1)
        for r in reversed(range(walk.max_children)):  # reversed: the first matching child wins
            c = walk.children(r)
            hit = (c >= 0) & (draft_tokens[c.clamp(min=0)] == target)
            child = torch.where(hit, c, child)
        walk.step(step, child, target)
    return walk


def verify_greedy_reference(logits, draft_tokens, parents, cu_nodes):
    """Plain-PyTorch :func:`verify_greedy` (same inputs, same outputs)."""
    width = _check_tree_batch(logits, draft_tokens, parents, cu_nodes).width
    argmax = logits.argmax(-1) if logits.numel() else draft_tokens.clone()  # the first maximum
    no_margin = torch.full(argmax.shape, float("inf"), dtype=torch.float64, device=logits.device)
    return _walk_reference(argmax, no_margin, draft_tokens, parents, cu_nodes, width).result()


def _sampling_reference(logits, draft_tokens, parents, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, width):
    """The walk behind :func:`verify_sampling_reference` on validated inputs (``width`` = max depth + 1)."""
    probs = target_probs(logits, cu_nodes, temperature, top_k, top_p)
    if draft_probs is None:
        token, margin = _inverse_cdf_reference(probs, uniforms[:, 1])
        return _walk_reference(token, margin, draft_tokens, parents, cu_nodes, width)
    walk = _Walk(draft_tokens, parents, cu_nodes, width)
    rows = torch.arange(walk.cur.numel(), device=logits.device)
    for step in range(width):
        if not bool(walk.alive.any()):
            break
        p_node = probs[walk.cur]
        p, q = p_node, draft_probs[walk.cur].double()
        child = torch.full_like(walk.cur, -1)
        for r in range(walk.max_children):
            c = walk.children(r)
            tested = walk.alive & (c >= 0) & (child < 0)
            t = draft_tokens[c.clamp(min=0)]
            u = uniforms[c.clamp(min=0), 0].double()
            p_t, q_t = p[rows, t], q[rows, t]
            gap = (u * q_t - p_t).abs() / torch.maximum(u * q_t, p_t).clamp(min=1e-300)  # relative, like rounding
            walk.margin = torch.where(tested, torch.minimum(walk.margin, gap), walk.margin)
            accept = tested & (u * q_t < p_t)
            child = torch.where(accept, c, child)
            reject = (tested & ~accept)[:, None]
            residual = (p - q).clamp(min=0)
            residual_total = residual.sum(-1, keepdim=True)
            new_p = torch.where(residual_total > 0, residual / residual_total.clamp(min=1e-300), p_node)
            new_q = q.clone()
            new_q[rows, t] = 0
            q_total = new_q.sum(-1, keepdim=True)
            new_q = torch.where(q_total > 0, new_q / q_total.clamp(min=1e-300), 0.0)
            p, q = torch.where(reject, new_p, p), torch.where(reject, new_q, q)
        bonus, margin = _inverse_cdf_reference(p, uniforms[walk.cur, 1])
        stops = walk.alive & (child < 0)
        walk.margin = torch.where(stops, torch.minimum(walk.margin, margin), walk.margin)
        walk.step(step, child, bonus)
    return walk


def verify_sampling_reference(
    logits, draft_tokens, parents, cu_nodes, temperature, top_k=None, top_p=None, *, uniforms, draft_probs=None
):
    """Plain-PyTorch :func:`verify_sampling` on the same ``uniforms`` (float64 probabilities)."""
    shape = _check_tree_batch(logits, draft_tokens, parents, cu_nodes)
    if uniforms is None:
        fail("uniforms", "the reference takes the kernels' uniforms: a float32[total_nodes, 2] tensor")
    _check_sampling(logits, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, shape.row_max)
    width = shape.width
    return _sampling_reference(logits, draft_tokens, parents, cu_nodes, temperature, top_k, top_p, uniforms, draft_probs, width).result()
