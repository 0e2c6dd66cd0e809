"""The batch calls of the compiled drafters (:mod:`tkernels.spec.drafting`): checks, output
arrays, the kernels, and their trees as one :class:`~tkernels.spec.draft_tree.DraftBatch`."""

from __future__ import annotations

import numpy as np
import torch

import tkernels.jit  # noqa: F401  (llvmlite's fix, before the modules below load numba)
from tkernels.checks import fail

from ..draft_tree import DraftBatch
from . import kernels as K
from .compiled import CompiledState, Features, flatten
from .hybrid import hybrid_trees
from .retrieval import retrieval_trees

__all__ = ["CompiledState", "draft_hybrid", "draft_pld", "draft_retrieval", "draft_tr_static", "flatten", "observe", "warm_up"]


def _check_tokens(name: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Compiled code indexes the adjacency without bounds checks: ids outside the vocabulary
    must not reach it."""
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}) (the vocab), "
                         f"got range [{int(tokens.min())}, {int(tokens.max())}]")


def observe(state: CompiledState, recycling, batch: DraftBatch, topk_ids: torch.Tensor,
            topk_probs: torch.Tensor | None, own_rows: bool) -> None:
    """What :meth:`TreeDrafter.observe_batch` stores of a step for a host adjacency: every node's
    row recycled (:meth:`TokenRecycling.recycle_topk`'s checks and rows kept) and, with
    ``own_rows``, each request's own rows, checked, converted and written by one compiled pass
    (:func:`.kernels.learn_rows`: a server learns from every node of every step)."""
    tokens = batch.tokens
    if topk_ids.dim() != 2 or topk_ids.shape != (tokens.numel(), recycling.k):
        raise ValueError(f"topk_ids must be [{tokens.numel()}, {recycling.k}], got {tuple(topk_ids.shape)}")
    if topk_probs is not None and topk_probs.shape != topk_ids.shape:
        raise ValueError(f"topk_probs must have topk_ids' shape {tuple(topk_ids.shape)}, got {tuple(topk_probs.shape)}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype.is_complex or topk_ids.dtype == torch.bool:
        fail("topk_ids", f"must be an integer tensor of token ids, got {topk_ids.dtype}")
    tokens, ids = np.ascontiguousarray(tokens.cpu().numpy(), np.int64), np.ascontiguousarray(topk_ids.cpu().numpy())
    probs = None if topk_probs is None else topk_probs.cpu()
    # float32 probabilities (the capture's) are checked in the pass; others here, as they are,
    # after the ids (the pass's order), then converted to float32 (torch's float16 conversion
    # goes through float32 too)
    in_pass = probs is None or probs.dtype == torch.float32
    if not in_pass:
        _check_tokens("draft_tokens", tokens, recycling.vocab_size)
        _check_tokens("topk_ids", ids, recycling.vocab_size)
        if probs.numel() and not bool(((probs >= 0) & (probs < np.inf)).all()):
            _bad_probs()
    probs = torch.zeros(ids.shape) if probs is None else probs.float().contiguous()
    slots, cu = state.own_room(batch.keys, batch.sizes) if own_rows else (_NO_SLOTS, _NO_SLOTS)
    bad = K.learn_rows(recycling.adjacency.numpy(), recycling.probs.view(torch.int16).numpy().view(np.uint16), tokens,
                       ids, probs.numpy(), in_pass, state.own_tables, state.own_ids, state.own_probs, state.meta,
                       slots, cu)
    if bad == 1:
        _check_tokens("draft_tokens", tokens, recycling.vocab_size)
    if bad == 2:
        _check_tokens("topk_ids", ids, recycling.vocab_size)
    if bad == 3:
        _bad_probs()


def calibrate(drafter, batch: DraftBatch, on_path: np.ndarray) -> None:
    """TreeDrafter._calibrate (its numpy form is the reference) of a batch whose retrieval
    features are a compiled draft's arrays (or absent): one compiled pass,
    :func:`.kernels.record_tested`, writing the calibrations' sums in place."""
    policy, retrieval = drafter.tr_policy, drafter.retrieval_calibration
    uses_retrieval = drafter.uses_retrieval
    tr_probs = _NO_PROBS if batch.tr_probs is None else batch.tr_probs.numpy()
    feat, share = (batch.retrieval.feat, batch.retrieval.share) if batch.retrieval is not None else (_NO_FEAT, _NO_SHARE)
    ret_tested, ret_accepted = (retrieval.tested.numpy(), retrieval.accepted.numpy()) if uses_retrieval else \
        (np.zeros((1, 1, 1)), np.zeros((1, 1, 1)))
    bins = _BINS.get(type(retrieval))
    if bins is None:
        bins = _BINS[type(retrieval)] = (np.array(retrieval.DEPTH_BINS, np.int64), np.array(retrieval.MATCH_BINS, np.int64))
    if K.record_tested(batch.parents.numpy(), batch.cu, np.asarray(on_path, bool), tr_probs, batch.depths, feat, share,
                       policy.mass.numpy(), policy.accepted.numpy(), policy.decay, ret_tested, ret_accepted,
                       retrieval.decay, *bins):
        fail("probs", "must be a 1-D float tensor of probabilities in [0, 1] (no NaN)")


_NO_PROBS = np.zeros(0, np.float32)
_NO_FEAT = np.zeros((0, 2), np.int64)
_NO_SHARE = np.zeros(0, np.float64)
_BINS: dict = {}


def _bad_probs():
    raise ValueError("topk_probs: must hold finite probabilities >= 0 (no NaN, inf or negative values)")


_NO_SLOTS = np.zeros(0, np.int64)


def warm_up(drafter) -> None:
    """Run every compiled kernel ``drafter`` uses once, on a throw-away request and on empty
    learning inputs (its state unchanged), so a server loads them from numba's cache (or compiles
    them, the first time on a machine) when it builds the drafter rather than mid-serving."""
    key = object()  # no caller's key
    drafter.draft_batch([key], [np.zeros(2, np.int64)], 2)
    drafter.release(key)
    # the calibrations' pass on throw-away sums (the drafter's own are not touched)
    one = np.zeros((1, 1, 1))
    K.record_tested(np.full(1, -1, np.int32), np.array([0, 1], np.int64), np.zeros(1, bool), _NO_PROBS,
                    np.zeros(1, np.int64), _NO_FEAT, _NO_SHARE, one[0].copy(), one[0].copy(), 1.0, one, one.copy(), 1.0,
                    np.zeros(1, np.int64), np.zeros(1, np.int64))
    recycling, state = drafter.recycling, drafter.compiled
    if recycling is None:
        return
    # a step's learning with no node, as a server's capture hands it (int64 ids, float32 probabilities)
    empty = DraftBatch(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32), np.zeros(1, np.int64))
    observe(state, recycling, empty, torch.zeros(0, recycling.k, dtype=torch.int64),
            torch.zeros(0, recycling.k), own_rows=True)


def draft_pld(flat: np.ndarray, cu: np.ndarray, num_draft: int, keys) -> DraftBatch:
    batch = cu.shape[0] - 1
    out = np.empty(batch * (num_draft + 1), np.int64)
    out_cu = np.empty(batch + 1, np.int64)
    K.prompt_lookup(flat, cu, num_draft, 3, 1, out, out_cu)
    local = np.arange(int(out_cu[-1]), dtype=np.int64) - np.repeat(out_cu[:-1], np.diff(out_cu))  # chains
    return DraftBatch(torch.from_numpy(out[:out_cu[-1]]), torch.from_numpy((local - 1).astype(np.int32)), out_cu.copy(),
                      keys, node_depths=local)


def draft_tr_static(state: CompiledState, recycling, slots: np.ndarray, roots: np.ndarray, shape, keys) -> DraftBatch:
    """``roots``: checked by the caller (:meth:`TreeDrafter._check_roots`: in the vocabulary)."""
    parents, parents32, ranks, depths = _template(shape)
    if ranks.size and int(ranks.max()) >= recycling.k:
        raise ValueError(f"shape uses rank {int(ranks.max())} but the adjacency keeps k={recycling.k}")
    batch, n = roots.shape[0], len(shape)
    out = np.empty((batch, n), np.int64)
    K.fill_template(state.own_tables, state.own_ids, state.meta, slots, roots, recycling.adjacency.numpy(),
                    parents, ranks, out)
    return DraftBatch(torch.from_numpy(out.reshape(-1)), torch.from_numpy(np.tile(parents32, batch)),
                      np.arange(0, (batch + 1) * n, n, dtype=np.int64), keys, node_depths=np.tile(depths, batch))


def _template(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A template's arrays as the kernels and the batch take them, converted once per shape (the
    templates are cached, :func:`~tkernels.spec.drafting.static_template`): parents int64 and int32,
    ranks int64, node depths int64."""
    arrays = getattr(shape, "_kernel_arrays", None)
    if arrays is None:
        from ..tree import depths

        parents = shape.parents.numpy().astype(np.int64)
        arrays = (parents, parents.astype(np.int32), shape.ranks.numpy().astype(np.int64),
                  depths(shape.parents).numpy().astype(np.int64))
        object.__setattr__(shape, "_kernel_arrays", arrays)
    return arrays


def _outputs(batch: int, n: int) -> tuple[np.ndarray, ...]:
    """The context kernels' outputs, the batch's trees concatenated (room for ``batch * n``
    nodes): tokens, parents, scores, TR probabilities (hybrid's only), depths, retrieval features
    (depth, match length) and shares per node, and the trees' offsets (``cu[0] = 0``, the kernel
    writes the rest)."""
    total = batch * n
    cu = np.empty(batch + 1, np.int64)
    cu[0] = 0
    return (np.empty(total, np.int64), np.empty(total, np.int32), np.empty(total, np.float64), np.empty(total, np.float32),
            np.empty(total, np.int64), np.empty((total, 2), np.int64), np.empty(total, np.float64), cu)


def _drafted(keys, tokens, parents, scores, tr_probs, depths, feat, share, cu) -> DraftBatch:
    """The context kernels' trees as one :class:`DraftBatch` (views of the outputs' used part)."""
    n = int(cu[-1])
    return DraftBatch(torch.from_numpy(tokens[:n]), torch.from_numpy(parents[:n]), cu, keys,
                      torch.from_numpy(scores[:n]), None if tr_probs is None else torch.from_numpy(tr_probs[:n]),
                      Features(feat[:n], share[:n]), depths[:n])


def _calibration(calibration) -> tuple:
    """The retrieval calibration as the kernels read it: counts (accepted, tested), prior, its
    weight, depth and match-length bins."""
    return (torch.stack([calibration.accepted, calibration.tested]).numpy(), calibration._prior.numpy(),
            float(calibration.prior_weight), np.array(calibration.DEPTH_BINS, np.int64),
            np.array(calibration.MATCH_BINS, np.int64))


def draft_hybrid(drafter, state: CompiledState, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray, num_nodes: int,
                 template, root_contexts: int, max_children: int, keys) -> DraftBatch:
    """:func:`.reference.draft_contexts` of ``hybrid`` for the batch (``template``: the static
    template of the breadth phase)."""
    recycling, calibration = drafter.recycling, drafter.retrieval_calibration
    if not state.sync_contexts(slots, flat, cu, recycling.vocab_size):  # the histories checked in its pass
        _check_tokens("histories", flat, recycling.vocab_size)
    batch, n = slots.shape[0], num_nodes
    roots = flat[cu[1:] - 1]
    outputs = _outputs(batch, n)
    template_parents, _, template_ranks, _ = _template(template)
    hybrid_trees(state.states, state.edges, state.own_tables, state.own_ids, state.own_probs, state.meta, slots, roots,
                 recycling.adjacency.numpy(), recycling.probs.view(torch.int16).numpy().view(np.uint16),
                 drafter.tr_policy.factors().numpy(), *_calibration(calibration),
                 template_parents, template_ranks, n,
                 drafter.max_depth, root_contexts, max_children, *outputs)
    return _drafted(keys, *outputs)


def draft_retrieval(drafter, state: CompiledState, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray,
                    num_nodes: int, max_children: int, keys) -> DraftBatch:
    """:func:`.reference.draft_contexts` of ``retrieval`` for the batch."""
    calibration = drafter.retrieval_calibration
    if not state.sync_contexts(slots, flat, cu, 2**31):  # the automaton's hash keys hold a token in 32 bits
        _check_tokens("histories", flat, 2**31)
    batch, n = slots.shape[0], num_nodes
    tokens, parents, scores, _, depths, feat, share, out_cu = _outputs(batch, n)
    retrieval_trees(state.states, state.edges, state.meta, slots, flat[cu[1:] - 1], *_calibration(calibration),
                    n, 2 * drafter.max_depth, max_children, tokens, parents, scores, depths, feat, share, out_cu)
    return _drafted(keys, tokens, parents, scores, None, depths, feat, share, out_cu)
