"""The batch calls of the compiled drafters (:mod:`tkernels.spec.drafting`): checks, output
arrays, the kernels, and :class:`~tkernels.spec.draft_tree.DraftTree` views of their rows."""

from __future__ import annotations

import numpy as np
import torch

import tkernels.jit  # noqa: F401  (llvmlite's fix, before the modules below load numba)

from ..draft_tree import DraftTree
from . import kernels as K
from .compiled import CompiledState, Features, flatten
from .hybrid import hybrid_trees
from .retrieval import retrieval_trees

__all__ = ["CompiledState", "draft_hybrid", "draft_pld", "draft_retrieval", "draft_tr_static", "flatten"]


def _check_tokens(name: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Compiled code indexes the adjacency without bounds checks: ids outside the vocabulary
    must not reach it."""
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}) (the vocab), "
                         f"got range [{int(tokens.min())}, {int(tokens.max())}]")


def _rows(array, counts: list[int], n: int) -> list:
    """Row b of ``array`` [B, n, ...] cut to ``counts[b]`` entries: views, one unbind for the
    batch (cheaper than indexing every row)."""
    rows = array.unbind(0) if isinstance(array, torch.Tensor) else list(array)
    return [row if m == n else row[:m] for row, m in zip(rows, counts)]


def draft_pld(flat: np.ndarray, cu: np.ndarray, num_draft: int) -> list[DraftTree]:
    batch = cu.shape[0] - 1
    out = np.empty(batch * (num_draft + 1), np.int64)
    out_cu = np.empty(batch + 1, np.int64)
    K.prompt_lookup(flat, cu, num_draft, 3, 1, out, out_cu)
    sizes = np.diff(out_cu).tolist()
    chain = torch.arange(-1, num_draft, dtype=torch.int32)
    chains = {m: chain[:m] for m in set(sizes)}  # views, shared by the trees of a size
    return [DraftTree(t, chains[m]) for t, m in zip(torch.from_numpy(out[:out_cu[-1]]).split(sizes), sizes)]


def draft_tr_static(state: CompiledState, recycling, slots: np.ndarray, roots: np.ndarray, shape) -> list[DraftTree]:
    _check_tokens("histories", roots, recycling.vocab_size)
    if int(shape.ranks.max()) >= recycling.k:
        raise ValueError(f"shape uses rank {int(shape.ranks.max())} but the adjacency keeps k={recycling.k}")
    out = np.empty((roots.shape[0], len(shape)), np.int64)
    K.fill_template(state.own_tables, state.own_ids, state.meta, slots, roots, recycling.adjacency.numpy(),
                    shape.parents.numpy().astype(np.int64), shape.ranks.numpy().astype(np.int64), out)
    parents = shape.parents.int()
    return [DraftTree(t, parents) for t in torch.from_numpy(out).unbind(0)]


def _outputs(batch: int, n: int) -> tuple[np.ndarray, ...]:
    """The context kernels' outputs: tokens, parents, scores, TR probabilities (hybrid's only),
    retrieval features (depth, match length) and shares per node, and each tree's node count."""
    return (np.empty((batch, n), np.int64), np.empty((batch, n), np.int32), np.empty((batch, n), np.float64),
            np.empty((batch, n), np.float32), np.empty((batch, n, 2), np.int64), np.empty((batch, n), np.float64),
            np.empty(batch, np.int64))


def _calibration(calibration) -> tuple:
    """The retrieval calibration as the kernels read it: counts (accepted, tested), prior, its
    weight, depth and match-length bins."""
    return (torch.stack([calibration.accepted, calibration.tested]).numpy(), calibration._prior.numpy(),
            float(calibration.prior_weight), np.array(calibration.DEPTH_BINS, np.int64),
            np.array(calibration.MATCH_BINS, np.int64))


def draft_hybrid(drafter, state: CompiledState, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray, num_nodes: int,
                 template, root_contexts: int, max_children: int) -> list[DraftTree]:
    """:func:`.reference.draft_contexts` of ``hybrid`` for the batch (``template``: the static
    template of the breadth phase)."""
    recycling, calibration = drafter.recycling, drafter.retrieval_calibration
    _check_tokens("histories", flat, recycling.vocab_size)
    state.sync_contexts(slots, flat, cu)
    batch, n = slots.shape[0], num_nodes
    roots = flat[cu[1:] - 1]
    out_tokens, out_parents, out_scores, out_trp, out_feat, out_share, out_n = _outputs(batch, n)
    hybrid_trees(state.states, state.edges, state.own_tables, state.own_ids, state.own_probs, state.meta, slots, roots,
                 recycling.adjacency.numpy(), recycling.probs.view(torch.int16).numpy().view(np.uint16),
                 drafter.tr_policy.factors().numpy(), *_calibration(calibration),
                 template.parents.numpy().astype(np.int64), template.ranks.numpy().astype(np.int64), n,
                 drafter.max_depth, root_contexts, max_children,
                 out_tokens, out_parents, out_scores, out_trp, out_feat, out_share, out_n)
    counts = out_n.tolist()
    return [DraftTree(*fields, Features(feat, share)) for *fields, feat, share in
            zip(*(_rows(torch.from_numpy(a), counts, n) for a in (out_tokens, out_parents, out_scores, out_trp)),
                _rows(out_feat, counts, n), _rows(out_share, counts, n))]


def draft_retrieval(drafter, state: CompiledState, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray,
                    num_nodes: int, max_children: int) -> list[DraftTree]:
    """:func:`.reference.draft_contexts` of ``retrieval`` for the batch."""
    calibration = drafter.retrieval_calibration
    _check_tokens("histories", flat, 2**31)  # the automaton's hash keys hold a token in 32 bits
    state.sync_contexts(slots, flat, cu)
    batch, n = slots.shape[0], num_nodes
    out_tokens, out_parents, out_scores, _, out_feat, out_share, out_n = _outputs(batch, n)
    retrieval_trees(state.states, state.edges, state.meta, slots, flat[cu[1:] - 1], *_calibration(calibration),
                    n, 2 * drafter.max_depth, max_children,
                    out_tokens, out_parents, out_scores, out_feat, out_share, out_n)
    counts = out_n.tolist()
    return [DraftTree(tokens, parents, scores, None, Features(feat, share)) for tokens, parents, scores, feat, share in
            zip(*(_rows(torch.from_numpy(a), counts, n) for a in (out_tokens, out_parents, out_scores)),
                _rows(out_feat, counts, n), _rows(out_share, counts, n))]
