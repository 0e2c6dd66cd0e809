"""The tree drafter shared by the offline harness (``bench/spec_mat.py``), the vLLM proposers and
SGLang's worker: the servers' plugins only reshape its trees into their formats.

One :class:`TreeDrafter` serves a batch of requests: every step it drafts one tree per request
(:meth:`TreeDrafter.draft`), optionally prices the batch's nodes against the GPU's step time
(:meth:`TreeDrafter.choose`), and after verification learns from the target's top-k at every
verified node and from which nodes were accepted (:meth:`TreeDrafter.observe`). The harness and
the vLLM tree proposer call the same three methods, so a method drafts the same trees in both.

Methods (:data:`DRAFTERS`: the harness's :data:`METHODS` and ``dynamic``):

* ``pld``: prompt lookup, :func:`tkernels.spec.ngram.propose_ngram` (the latest match of the
  last 1..3 tokens, then what followed it; a chain).
* ``tr_static``: Token Recycling on the static template (:func:`static_template`).
* ``tr``: Token Recycling per request, :meth:`TokenRecycling.draft_best` under the calibrated
  acceptance estimates of :class:`~tkernels.spec.tree_policy.ConfidenceTreePolicy`.
* ``retrieval``: continuations of the request's own context (prompt + generated): the longest
  earlier match of its suffix and what followed it, from a suffix automaton kept per request
  (:class:`~tkernels.spec.retrieval.SuffixAutomaton`), under :class:`RetrievalCalibration`.
* ``hybrid``: one tree merging ``tr``'s and ``retrieval``'s candidates (below).
* ``dynamic`` (:data:`DYNAMIC`, not a harness method): Token Recycling under the online
  per-(depth, rank) estimates of :class:`~tkernels.spec.tree_policy.DynamicTreePolicy`, either
  the policy's best ``num_nodes``-node tree, every node drafted (SGLang's fixed-size trees), or
  the best nodes or best path of a ``candidates`` shape (the vLLM proposers);
  :mod:`tkernels.spec.drafting.dynamic`. It learns through :meth:`TreeDrafter.observe_ranks`
  and :meth:`TreeDrafter.recycle`.

**Hybrid.** Every node of the tree has two sources of children: Token Recycling's adjacency row
of its token (the target's top-k the last time that token was verified, any request) and, while
the node's path continues the request's own context, the suffix automaton's continuations of it
(at the root: of the longest earlier match and of up to two shorter suffix contexts). Each
candidate carries a calibrated estimate of the chance that the target picks it once its parent
is accepted (TR: per depth and stored-probability bin, :class:`ConfidenceTreePolicy`;
retrieval: per depth, match length and share, :class:`RetrievalCalibration`); a token both
sources propose is one node with the larger estimate. A node's score is the product of the
estimates along its path (the estimated probability that the target accepts it), and the tree
grows in two phases. First the static template's breadth: its first ``num_nodes *``
:data:`HYBRID_TEMPLATE_SHARE` nodes, filled from TR rows as ``tr_static`` does, leaving out the
entries of rows never written (placeholder tokens, which the target does not pick). Then
best first: the best-scoring nodes of the joint candidate trie not yet in the tree, up to ``num_nodes``
(best first alone maximises the *estimated* accepted tokens of the step among trees of that
size). The breadth is what makes the hybrid learn as fast as the template: a tree grown from
the estimates alone spends its nodes deep on the few rows it trusts, so it verifies fewer
distinct tokens and writes about half as many adjacency rows, which costs it the cold start of
a run (its first question) against the template. So the rest of the budget goes
to whichever source is likelier at this step, node by node: a long copy of the prompt where
retrieval matches, recycled alternatives where a copy may diverge, and recycling alone where
nothing matches; a recycled token that continues the context picks the copy up again. Each
source's calibration learns from its own candidates' outcomes (a candidate is tested when its
parent was accepted). The growth is a per-request host loop (a heap, ``num_nodes`` pops): in
:mod:`tkernels.spec.drafting.reference`, the readable reference, a few milliseconds per request
at 256 nodes (``bench/bench_drafters.py``); :mod:`tkernels.spec.drafting` runs the same loop
compiled, for the whole batch in one call, and is what :class:`TreeDrafter` drafts with by
default (``bench/bench_host.py``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Sequence

import numpy as np
import torch

from tkernels.checks import integer

from .draft_tree import DraftBatch, DraftTree, RetrievalCalibration, features_of
from .drafting import COMPILED_METHODS, HYBRID_TEMPLATE_SHARE, MAX_CHILDREN, ROOT_CONTEXTS, reference, static_template
from .drafting.dynamic import DynamicDrafting
from .retrieval import SuffixAutomaton
from .token_recycling import TokenRecycling
from .tree import TOP_K, TreeShape
from .tree_policy import ConfidenceTreePolicy, StepTime

__all__ = ["DRAFTERS", "DYNAMIC", "HYBRID_TEMPLATE_SHARE", "MAX_CHILDREN", "METHODS", "ROOT_CONTEXTS", "DraftBatch", "DraftTree",
           "RetrievalCalibration", "TreeDrafter", "static_template"]

METHODS = ("pld", "tr_static", "tr", "retrieval", "hybrid")  # the offline harness's methods (bench/spec_mat.py)
DYNAMIC = "dynamic"  # Token Recycling under DynamicTreePolicy (tkernels.spec.drafting.dynamic): the servers' drafter
DRAFTERS = (DYNAMIC, *METHODS)  # every method TreeDrafter drafts with
HARNESS_MAX_DEPTH = 16  # the harness methods' default depth limit (retrieval: twice that)
OWN_ROWS = ("tr_static", "hybrid")  # methods that keep per-request own adjacency rows (TreeDrafter doc)
# TreeDrafter(compiled=None) reads it: "reference" drafts with the Python reference (tests, debugging)
DRAFTERS_ENV = "TKERNELS_DRAFTERS"


class TreeDrafter:
    """Drafts one tree per request per step with one of :data:`DRAFTERS` (see the module doc).

    State: Token Recycling's adjacency (shared by every request and kept across them, as the
    paper does), the calibrations, and per request (keyed by the caller's ids) a suffix
    automaton of its tokens, synced from the history passed to :meth:`draft` (extended when the
    history extends it, rebuilt otherwise). :meth:`release` forgets a finished request.

    ``tr_static`` and ``hybrid`` also keep, per request, the adjacency rows its own
    verifications wrote (its *own rows*) and read a token's row there first, the shared
    adjacency otherwise (``tr``'s batched beam reads the shared adjacency only). One request
    at a time (the offline harness) that changes nothing: the shared row of a token the request
    verified is its own latest one. With many requests at once (a server) the shared row of a
    common token is whichever request verified it last, another context most of the time; the
    own row keeps the request's latest. ~ (nodes verified) x k x 12 bytes per request.

    ``compiled``: draft with the compiled batch drafters of :mod:`tkernels.spec.drafting`
    (every method but ``tr`` and ``dynamic``; identical trees, one numba call per step), else
    with the Python reference (:mod:`tkernels.spec.drafting.reference`); None (default):
    compiled unless the environment variable ``TKERNELS_DRAFTERS`` is ``reference``.

    ``recycling``: an adjacency to share (a server that also feeds it elsewhere); ``max_depth``:
    the deepest node (default 16 for the harness methods, the policy's 32 for ``dynamic``);
    ``candidates`` and ``path``: ``dynamic``'s options (module doc).
    """

    def __init__(self, vocab_size: int, method: str = "hybrid", k: int = TOP_K, step_time: StepTime | None = None,
                 max_depth: int | None = None, pld_max_draft: int | None = None, compiled: bool | None = None,
                 recycling: TokenRecycling | None = None, candidates: TreeShape | None = None, path: bool = False):
        if method not in DRAFTERS:
            raise ValueError(f"method: must be one of {DRAFTERS}, got {method!r}")
        if recycling is not None and (recycling.vocab_size, recycling.k) != (vocab_size, k):
            raise ValueError(f"recycling: an adjacency of vocab_size={vocab_size} and k={k}, got "
                             f"{recycling.vocab_size} and {recycling.k}")
        if compiled is None:
            compiled = os.environ.get(DRAFTERS_ENV, "compiled") != "reference"
        self.compiled = None  # the compiled drafters' per-request state (None: the Python reference drafts)
        if compiled and method in COMPILED_METHODS:
            from .drafting import batch  # numba: loaded on first use (tkernels.spec.drafting's doc says why)

            self._batch, self.compiled = batch, batch.CompiledState(k)
        self.method = method
        self.max_depth = HARNESS_MAX_DEPTH if max_depth is None and method != DYNAMIC else max_depth
        self.pld_max_draft = pld_max_draft
        # the adjacency: shared with the caller's when given (a server feeding it from elsewhere too)
        uses_tr = method in (DYNAMIC, "tr_static", "tr", "hybrid")
        self.recycling = (recycling or TokenRecycling(vocab_size, k)) if uses_tr else None
        # dynamic: its policy and written rows (tkernels.spec.drafting.dynamic; None for the other methods)
        self.dynamic = DynamicDrafting(self.recycling, max_depth, candidates, path) if method == DYNAMIC else None
        if method != DYNAMIC and (candidates is not None or path):
            raise ValueError("candidates, path: options of the dynamic method only")
        self.tr_policy = ConfidenceTreePolicy(step_time=step_time)  # TR calibration and the batch's pricing
        self.retrieval_calibration = RetrievalCalibration()
        self._contexts: dict[Hashable, SuffixAutomaton] = {}
        self._own: dict[Hashable, dict[int, tuple[list[int], list[float]]]] = {}  # hybrid: per request, token -> row
        if self.compiled is not None:  # load (or, on a fresh install, compile) the kernels now, not at the first requests
            self._batch.warm_up(self)

    @property
    def uses_retrieval(self) -> bool:
        return self.method in ("retrieval", "hybrid")

    # --- requests' contexts ----------------------------------------------------------------------

    def _context(self, key: Hashable, history: list[int]) -> SuffixAutomaton:
        sam = self._contexts.get(key)
        n = len(sam) if sam is not None else 0
        if sam is None or n > len(history) or sam.tokens != history[:n]:
            sam = self._contexts[key] = SuffixAutomaton(history)
        elif len(history) > n:
            sam.extend(history[n:])
        return sam

    def release(self, key: Hashable) -> None:
        """Forget a request's context and own rows (finished or preempted; a later draft
        rebuilds the context)."""
        self._contexts.pop(key, None)
        self._own.pop(key, None)
        if self.compiled is not None:
            self.compiled.release(key)

    def keys(self) -> list[Hashable]:
        """The requests whose state (context, own rows) is kept, until :meth:`release`."""
        if self.compiled is not None:
            return list(self.compiled.slots)
        return list(dict.fromkeys([*self._contexts, *self._own]))

    # --- drafting --------------------------------------------------------------------------------

    def draft(self, keys: Sequence[Hashable], histories: Sequence[Sequence[int]], num_nodes: int) -> list[DraftTree]:
        """One tree of at most ``num_nodes`` nodes (root included) per request.

        Args:
            keys: a hashable id per request (its retrieval context is kept under it).
            histories: per request its tokens so far (prompt + committed), a sequence of ints
                (list, 1-D tensor or array); the last one is the tree's root.
            num_nodes: the node budget per request, >= 1.

        Returns:
            list of :class:`DraftTree`, one per request (:meth:`draft_batch`'s trees).
        """
        return self.draft_batch(keys, histories, num_nodes).trees()

    def draft_batch(self, keys: Sequence[Hashable], histories: Sequence[Sequence[int]], num_nodes: int) -> DraftBatch:
        """:meth:`draft`'s trees as one :class:`DraftBatch` (a server's step: no object per request)."""
        if len(keys) != len(histories):
            raise ValueError(f"keys: one per history, got {len(keys)} keys and {len(histories)} histories")
        num_nodes = integer("num_nodes", num_nodes, minimum=1)
        if len(histories) and min(map(len, histories)) < 1:  # len(): histories may be a [B, L] tensor (SGLang)
            raise ValueError("histories: every request needs at least one token")
        if not keys:
            return DraftBatch.from_trees([])
        if self.compiled is not None:
            return self._draft_compiled(keys, histories, num_nodes)
        roots = [int(h[-1]) for h in histories]
        self._check_roots(roots)
        last = torch.tensor(roots, dtype=torch.int64)
        if self.dynamic is not None:  # the roots alone
            trees = self.dynamic.draft(last, num_nodes)
        else:
            histories = [h.tolist() if hasattr(h, "tolist") else [int(t) for t in h] for h in histories]
            if self.method == "pld":
                trees = reference.draft_pld(histories, num_nodes, self.pld_max_draft)
            elif self.method == "tr_static":
                trees = reference.draft_tr_static(self, keys, histories, last, num_nodes)
            elif self.method == "tr":
                trees = reference.draft_tr(self, last, num_nodes)
            else:
                trees = reference.draft_contexts(self, keys, histories, num_nodes)
        for tree, key in zip(trees, keys):
            tree.key = key
        return DraftBatch.from_trees(trees)

    def _check_roots(self, roots) -> None:
        vocab = self.recycling.vocab_size if self.recycling is not None else None
        low, high = int(min(roots)), int(max(roots))
        if low < 0 or (vocab is not None and high >= vocab):
            bound = "" if vocab is None else f" and < {vocab} (the vocab)"
            raise ValueError(f"histories: the last tokens (the trees' roots) must be >= 0{bound}, got "
                             f"{roots.tolist() if hasattr(roots, 'tolist') else list(roots)}")

    def _draft_compiled(self, keys, histories, num_nodes: int) -> DraftBatch:
        if self.method == "tr_static":  # the roots alone
            roots = np.fromiter((h[-1] for h in histories), np.int64, len(histories))
            self._check_roots(roots)
            return self._batch.draft_tr_static(self.compiled, self.recycling, self.compiled.slots_of(keys), roots,
                                               static_template(num_nodes), keys)
        flat, cu = self._batch.flatten(histories)
        self._check_roots(flat[cu[1:] - 1])
        if self.method == "pld":
            num_draft = num_nodes - 1 if self.pld_max_draft is None else min(num_nodes - 1, self.pld_max_draft)
            return self._batch.draft_pld(flat, cu, max(num_draft, 0), keys)
        slots = self.compiled.slots_of(keys)
        if self.method == "retrieval":
            return self._batch.draft_retrieval(self, self.compiled, slots, flat, cu, num_nodes, MAX_CHILDREN, keys)
        template = static_template(max(1, int(num_nodes * HYBRID_TEMPLATE_SHARE)))
        return self._batch.draft_hybrid(self, self.compiled, slots, flat, cu, num_nodes, template, ROOT_CONTEXTS,
                                        MAX_CHILDREN, keys)

    def choose(self, trees: list[DraftTree], batch_size: int | None = None, other_tokens: int = 0,
               context: int = 0) -> list[DraftTree]:
        """Price the batch's nodes: keep, over all trees, the best-scoring nodes that maximise
        expected tokens per second under the step-time model
        (:meth:`ConfidenceTreePolicy.choose`). ``batch_size``: price one tree as if that many
        requests drafted it (the harness's single request standing for a batch). ``context``:
        the requests' cached tokens (mean), whose attention every node pays (0: unpriced).
        Trees without scores (``pld``, ``tr_static``) are returned unchanged.
        """
        if batch_size is not None:
            integer("batch_size", batch_size, minimum=1)
        if not trees or any(t.scores is None for t in trees):
            return trees
        if batch_size is not None and len(trees) != 1:
            raise ValueError(f"batch_size: prices one tree as a batch, got {len(trees)} trees")
        return self.choose_batch(DraftBatch.from_trees(trees), batch_size, other_tokens, context).trees()

    def choose_batch(self, batch: DraftBatch, batch_size: int | None = None, other_tokens: int = 0,
                     context: int = 0) -> DraftBatch:
        """:meth:`choose` of a :class:`DraftBatch` (returned as is without scores)."""
        if batch_size is not None:
            integer("batch_size", batch_size, minimum=1)
        if not len(batch) or batch.scores is None:
            return batch
        sizes = batch.sizes
        rows = np.repeat(np.arange(len(batch)), sizes)
        local = np.arange(batch.num_nodes) - batch.cu[:-1][rows]
        scores = torch.zeros(len(batch), int(sizes.max()), dtype=torch.float64)
        scores[torch.from_numpy(rows), torch.from_numpy(local)] = batch.scores
        keep = self.tr_policy.choose(scores.expand(batch_size, -1) if batch_size else scores, other_tokens,
                                     context)[:len(batch)]
        # zero-score padding is never worth its time; a kept node's parent scores at least as high
        return batch.select(keep.numpy()[rows, local])

    # --- learning --------------------------------------------------------------------------------

    def observe(self, trees: list[DraftTree], topk_ids: torch.Tensor, topk_probs: torch.Tensor | None,
                accepted: Sequence[Sequence[int]]) -> None:
        """Learn from one verify step of ``trees``.

        Args:
            trees: the drafts as verified (a BFS prefix of what :meth:`draft` returned, if the
                server cut them).
            topk_ids: int [sum of tree sizes, k], the target's top-k ids at every node, trees
                concatenated in order; ``topk_probs`` their probabilities (same shape; None if
                unknown: those adjacency rows are then never expanded by ``tr``).
            accepted: per tree the accepted path's nodes, root first (local indices).
        """
        if len(accepted) != len(trees):
            raise ValueError(f"accepted: one path per tree, got {len(accepted)} for {len(trees)} trees")
        batch = DraftBatch.from_trees(trees)
        on_path = np.zeros(batch.num_nodes, bool)
        on_path[[int(batch.cu[b]) + n for b, path in enumerate(accepted) for n in path]] = True
        self.observe_batch(batch, topk_ids, topk_probs, on_path)

    def observe_batch(self, batch: DraftBatch, topk_ids: torch.Tensor | None, topk_probs: torch.Tensor | None,
                      on_path: np.ndarray) -> None:
        """:meth:`observe` of a :class:`DraftBatch`: ``on_path`` bool [N], the nodes of every
        tree's accepted path (roots included); ``topk_ids`` may be None for a method without Token
        Recycling (``pld``, ``retrieval``: nothing to recycle)."""
        total = batch.num_nodes
        if self.recycling is not None and topk_ids.shape[0] != total:
            raise ValueError(f"topk_ids: one row per tree node ({total}), got {tuple(topk_ids.shape)}")
        if self.compiled is not None and self.recycling is not None:
            # the compiled drafters' (host) adjacency and own rows: checked once, one compiled pass each
            self._batch.observe(self.compiled, self.recycling, batch, topk_ids, topk_probs, self.method in OWN_ROWS)
        elif self.recycling is not None:
            self.recycle(batch.tokens, topk_ids, topk_probs)
        if self.method in OWN_ROWS and self.compiled is None:
            # own rows, as stored in the shared adjacency (int32 ids, fp16 probabilities)
            probs = torch.zeros(topk_ids.shape) if topk_probs is None else topk_probs.to(self.recycling.probs.dtype)
            ids, probs, tokens = topk_ids.tolist(), probs.float().tolist(), batch.tokens.tolist()
            for b, key in enumerate(batch.keys):
                own = self._own.setdefault(key, {})
                for i in range(int(batch.cu[b]), int(batch.cu[b + 1])):  # a token at several nodes: the last one's
                    own[tokens[i]] = (ids[i], probs[i])
        on_path = np.asarray(on_path, bool)
        if batch.scores is not None and len(batch):  # what the kept nodes were worth (choose's factor)
            drafted = batch.depths > 0
            self.tr_policy.record_kept(batch.scores.numpy()[drafted], on_path[drafted])
        self._calibrate(batch, torch.from_numpy(on_path))

    def _calibrate(self, batch: DraftBatch, on_path: torch.Tensor) -> None:
        """Record every *tested* node (its parent is on the accepted path) in the TR and retrieval
        calibrations, whether it was accepted: the whole batch at once (one tensor per quantity;
        a server's batch of 64 trees costs one pass, not 64)."""
        if not len(batch):
            if self.uses_retrieval:
                self.retrieval_calibration.record([], [])
            return
        if batch.tr_probs is None and not self.uses_retrieval:
            return
        if self.compiled is not None and (batch.retrieval is None or hasattr(batch.retrieval, "arrays")):
            # a compiled draft's: one compiled pass (drafting.batch.calibrate); the numpy below is its reference
            self._batch.calibrate(self, batch, on_path.numpy() if isinstance(on_path, torch.Tensor) else on_path)
            return
        # numpy over the batch's nodes (a server's ~2000 a step: torch calls would cost more)
        on_path = on_path.numpy() if isinstance(on_path, torch.Tensor) else np.asarray(on_path, bool)
        parent = batch.global_parents()
        tested = (parent >= 0) & on_path[np.maximum(parent, 0)]
        if batch.tr_probs is not None:  # one record (one decay) per step with TR nodes, as many as they are
            tr_probs = batch.tr_probs.numpy()
            mask = tested & ~np.isnan(tr_probs)
            self.tr_policy.record(torch.from_numpy(tr_probs[mask]), torch.from_numpy(batch.depths[mask].astype(np.int32)),
                                  torch.from_numpy(on_path[mask]))
        if self.uses_retrieval:
            # only the tested nodes' features are read
            nodes = np.flatnonzero(tested)
            ret_features, ret_ok = [], []
            if hasattr(batch.retrieval, "arrays"):  # a compiled draft's: arrays, no tuple per node
                ret_features, proposed = batch.retrieval.arrays(nodes)
                ret_ok = on_path[nodes][proposed]
            elif batch.retrieval is not None:
                for feature, ok in zip(features_of(batch.retrieval, torch.from_numpy(nodes)), on_path[nodes].tolist()):
                    if feature is not None:
                        ret_features.append(feature)
                        ret_ok.append(ok)
            self.retrieval_calibration.record(ret_features, ret_ok)

    def recycle(self, tokens: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor | None = None) -> None:
        """Recycle top-k rows: ``tokens[i]``'s row := the target's top-k after it (``topk_ids``
        int [n, k], best first; ``topk_probs`` their probabilities or None), at verified nodes
        (:meth:`observe`) or computed outside verification (e.g. at a prompt's positions). No-op
        without TR; ``dynamic`` also marks the rows written."""
        if self.recycling is None or not tokens.numel():
            return
        if self.dynamic is not None:
            self.dynamic.recycle(tokens, topk_ids, topk_probs)
        else:
            self.recycling.recycle_topk(topk_ids, tokens, topk_probs)

    def observe_ranks(self, parent_tokens: torch.Tensor, next_tokens: torch.Tensor, num_observed: torch.Tensor) -> None:
        """``dynamic``: teach its policy the candidate rank the target chose after each committed
        token, before this step's rows are recycled (:meth:`DynamicDrafting.observe_ranks`:
        ``next_tokens[b, j]`` followed ``parent_tokens[b, j]``, int [B, W], the first
        ``num_observed[b]`` of row b counting)."""
        if self.dynamic is None:
            raise ValueError(f"observe_ranks: the dynamic method's, not {self.method!r}'s (observe learns the others)")
        self.dynamic.observe_ranks(parent_tokens, next_tokens, num_observed)
