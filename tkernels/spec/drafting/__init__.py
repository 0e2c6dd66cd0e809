"""Compiled drafters: every :class:`~tkernels.spec.drafters.TreeDrafter` method but ``tr`` drafts
the whole batch in one call of numba-compiled code (one host thread,
``cache=True``: compiled on a machine's first use, a few seconds, then loaded from
``__pycache__``). The Python drafters in :mod:`tkernels.spec.drafters` stay the readable
reference; ``tests/test_spec_drafting.py`` asserts that both draft identical trees.

* ``pld``: :func:`.kernels.prompt_lookup` (``propose_ngram``'s latest-match rule per request).
* ``tr_static``: :func:`.kernels.fill_template` (the template, each token's row from the
  request's own rows first).
* ``hybrid``: :func:`.hybrid.hybrid_trees`, the reference's heap growth over arrays, after
  :func:`.kernels.sync_contexts` extends every request's suffix automaton with its new tokens.
* ``retrieval``: :func:`.retrieval.retrieval_trees` (the automaton's best-first continuations),
  after the same sync.

``tr`` keeps its batched torch beam (one call per batch already; its ties between equal scores
follow ``torch.topk``, which a compiled heap would not reproduce exactly).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from ..draft_tree import DraftTree
from . import kernels as K
from .compiled import CompiledState, Features, flatten
from .hybrid import hybrid_trees
from .retrieval import retrieval_trees

__all__ = ["COMPILED_METHODS", "CompiledState", "draft_hybrid", "draft_pld", "draft_retrieval", "draft_tr_static",
           "flatten"]

COMPILED_METHODS = ("pld", "tr_static", "retrieval", "hybrid")


def _check_tokens(name: str, tokens: np.ndarray, vocab_size: int) -> None:
    """Compiled code indexes the adjacency without bounds checks: ids outside the vocabulary
    must not reach it."""
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, {vocab_size}) (the vocab), "
                         f"got range [{int(tokens.min())}, {int(tokens.max())}]")


def draft_pld(flat: np.ndarray, cu: np.ndarray, num_draft: int) -> list[DraftTree]:
    batch = cu.shape[0] - 1
    out = np.empty(batch * (num_draft + 1), np.int64)
    out_cu = np.empty(batch + 1, np.int64)
    K.prompt_lookup(flat, cu, num_draft, 3, 1, out, out_cu)
    tokens = torch.from_numpy(out)
    chain = torch.arange(-1, num_draft, dtype=torch.int32)
    bounds = out_cu.tolist()
    return [DraftTree(tokens[s:e], chain[:e - s]) for s, e in itertools.pairwise(bounds)]


def draft_tr_static(state: CompiledState, recycling, slots: np.ndarray, roots: np.ndarray, shape) -> list[DraftTree]:
    _check_tokens("histories", roots, recycling.vocab_size)
    if int(shape.ranks.max()) >= recycling.k:
        raise ValueError(f"shape uses rank {int(shape.ranks.max())} but the adjacency keeps k={recycling.k}")
    out = np.empty((roots.shape[0], len(shape)), np.int64)
    K.fill_template(state.own_tables, state.own_ids, state.meta, slots, roots, recycling.adjacency.numpy(),
                    shape.parents.numpy().astype(np.int64), shape.ranks.numpy().astype(np.int64), out)
    tokens, parents = torch.from_numpy(out), shape.parents.int()
    return [DraftTree(tokens[b], parents) for b in range(roots.shape[0])]


def draft_hybrid(drafter, state: CompiledState, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray, num_nodes: int,
                 template, root_contexts: int, max_children: int) -> list[DraftTree]:
    """``TreeDrafter._draft_contexts`` of ``hybrid`` for the batch (``template``: the static
    template of the breadth phase)."""
    recycling, calibration = drafter.recycling, drafter.retrieval_calibration
    _check_tokens("histories", flat, recycling.vocab_size)
    state.sync_contexts(slots, flat, cu)
    batch, n = slots.shape[0], num_nodes
    roots = flat[cu[1:] - 1]
    out_tokens = np.empty((batch, n), np.int64)
    out_parents = np.empty((batch, n), np.int32)
    out_scores = np.empty((batch, n), np.float64)
    out_trp = np.empty((batch, n), np.float32)
    out_feat = np.empty((batch, n, 2), np.int64)
    out_share = np.empty((batch, n), np.float64)
    out_n = np.empty(batch, np.int64)
    cal = torch.stack([calibration.accepted, calibration.tested]).numpy()
    hybrid_trees(state.states, state.edges, state.own_tables, state.own_ids, state.own_probs, state.meta, slots, roots,
                 recycling.adjacency.numpy(), recycling.probs.view(torch.int16).numpy().view(np.uint16),
                 drafter.tr_policy.factors().numpy(), cal, calibration._prior.numpy(), float(calibration.prior_weight),
                 np.array(calibration.DEPTH_BINS, np.int64), np.array(calibration.MATCH_BINS, np.int64),
                 template.parents.numpy().astype(np.int64), template.ranks.numpy().astype(np.int64), n,
                 drafter.max_depth, root_contexts, max_children,
                 out_tokens, out_parents, out_scores, out_trp, out_feat, out_share, out_n)
    tokens, parents = torch.from_numpy(out_tokens), torch.from_numpy(out_parents)
    scores, trp = torch.from_numpy(out_scores), torch.from_numpy(out_trp)
    return [DraftTree(tokens[b, :m], parents[b, :m], scores[b, :m], trp[b, :m], Features(out_feat[b, :m], out_share[b, :m]))
            for b, m in enumerate(out_n.tolist())]


def draft_retrieval(drafter, state: CompiledState, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray,
                    num_nodes: int, max_children: int) -> list[DraftTree]:
    """``TreeDrafter._draft_contexts`` of ``retrieval`` for the batch."""
    calibration = drafter.retrieval_calibration
    _check_tokens("histories", flat, 2**31)  # the automaton's hash keys hold a token in 32 bits
    state.sync_contexts(slots, flat, cu)
    batch, n = slots.shape[0], num_nodes
    out_tokens = np.empty((batch, n), np.int64)
    out_parents = np.empty((batch, n), np.int32)
    out_scores = np.empty((batch, n), np.float64)
    out_feat = np.empty((batch, n, 2), np.int64)
    out_share = np.empty((batch, n), np.float64)
    out_n = np.empty(batch, np.int64)
    retrieval_trees(state.states, state.edges, state.meta, slots, flat[cu[1:] - 1],
                    torch.stack([calibration.accepted, calibration.tested]).numpy(), calibration._prior.numpy(),
                    float(calibration.prior_weight), np.array(calibration.DEPTH_BINS, np.int64),
                    np.array(calibration.MATCH_BINS, np.int64), n, 2 * drafter.max_depth, max_children,
                    out_tokens, out_parents, out_scores, out_feat, out_share, out_n)
    tokens, parents, scores = torch.from_numpy(out_tokens), torch.from_numpy(out_parents), torch.from_numpy(out_scores)
    return [DraftTree(tokens[b, :m], parents[b, :m], scores[b, :m], None, Features(out_feat[b, :m], out_share[b, :m]))
            for b, m in enumerate(out_n.tolist())]
