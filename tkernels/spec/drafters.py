"""Tree drafters shared by the offline harness (``bench/spec_mat.py``) and the vLLM tree proposer.

One :class:`TreeDrafter` serves a batch of requests: every step it drafts one tree per request
(:meth:`TreeDrafter.draft`), optionally prices the batch's nodes against the GPU's step time
(:meth:`TreeDrafter.choose`), and after verification learns from the target's top-k at every
verified node and from which nodes were accepted (:meth:`TreeDrafter.observe`). The harness and
the vLLM proposer call the same three methods, so a method drafts the same trees in both.

Methods (:data:`METHODS`):

* ``pld``: prompt lookup, :func:`tkernels.spec.ngram.propose_ngram` (the latest match of the
  last 1..3 tokens, then what followed it; a chain).
* ``tr_static``: Token Recycling on the static template (:func:`static_template`).
* ``tr``: Token Recycling per request, :meth:`TokenRecycling.draft_best` under the calibrated
  acceptance estimates of :class:`~tkernels.spec.tree_policy.ConfidenceTreePolicy`.
* ``retrieval``: continuations of the request's own context (prompt + generated): the longest
  earlier match of its suffix and what followed it, from a suffix automaton kept per request
  (:class:`~tkernels.spec.retrieval.SuffixAutomaton`), under :class:`RetrievalCalibration`.
* ``hybrid``: one tree merging ``tr``'s and ``retrieval``'s candidates (below).

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
parent was accepted). The growth is a per-request host loop (a heap, ``num_nodes`` pops): here,
the readable reference, a few milliseconds per request at 256 nodes (``bench/bench_drafters.py``);
:mod:`tkernels.spec.drafting` runs the same loop compiled, for the whole batch in one call, and
is what :class:`TreeDrafter` drafts with by default (``bench/bench_host.py``).
"""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Hashable, Sequence
from functools import cache

import torch

from tkernels.checks import integer

from .draft_tree import DraftTree, RetrievalCalibration
from .drafting import COMPILED_METHODS
from .ngram import propose_ngram
from .retrieval import SuffixAutomaton, bfs_order
from .token_recycling import TokenRecycling
from .tree import MAX_TREE_NODES, TOP_K, TreeShape, depths, token_recycling_tree
from .tree_policy import ConfidenceTreePolicy, StepTime

__all__ = ["METHODS", "DraftTree", "RetrievalCalibration", "TreeDrafter", "static_template"]

METHODS = ("pld", "tr_static", "tr", "retrieval", "hybrid")
MAX_CHILDREN = 4  # retrieval: continuations kept per context (most frequent first)
ROOT_CONTEXTS = 3  # hybrid: the longest earlier match and up to two shorter suffix contexts at the root
# hybrid: the share of the node budget given to the static template's breadth before best-first
# growth (module doc). Measured on the dev questions (bench/spec_mat.py, README): best first
# alone (share 0) lost to the template by 3-5% in writing, where cold roots dominate; half the
# budget closed that and raised the hybrid's overall MAT (+6.5% / +3.2% / +3.6% at 32 / 80 / 128
# nodes, -1% at 9), on questions outside the benchmark too (+2% / +5% at 32 / 80).
HYBRID_TEMPLATE_SHARE = 0.5
OWN_ROWS = ("tr_static", "hybrid")  # methods that keep per-request own adjacency rows (TreeDrafter doc)
# TreeDrafter(compiled=None) reads it: "reference" drafts with the Python reference (tests, debugging)
DRAFTERS_ENV = "TKERNELS_DRAFTERS"

def static_template(num_nodes: int) -> TreeShape:
    """The static Token Recycling tree of ``num_nodes`` nodes (root included, at most
    :data:`~tkernels.spec.tree.MAX_TREE_NODES`): the first ``num_nodes`` nodes, in BFS order,
    of :func:`~tkernels.spec.tree.token_recycling_tree` (the paper's 80-node template up to 80
    nodes, then its fan-out rule widened)."""
    num_nodes = integer("num_nodes", num_nodes, minimum=1)
    if num_nodes > MAX_TREE_NODES:
        raise ValueError(f"num_nodes: must be at most {MAX_TREE_NODES} (MAX_TREE_NODES), got {num_nodes}")
    return _template(num_nodes)


@cache
def _template(num_nodes: int) -> TreeShape:
    return token_recycling_tree(num_nodes).truncate(num_nodes)


class TreeDrafter:
    """Drafts one tree per request per step with one of :data:`METHODS` (see the module doc).

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
    (every method but ``tr``; identical trees, one numba call per step), else with the Python
    reference in this module; None (default): compiled unless the environment variable
    ``TKERNELS_DRAFTERS`` is ``reference``.
    """

    def __init__(self, vocab_size: int, method: str = "hybrid", k: int = TOP_K, step_time: StepTime | None = None,
                 max_depth: int = 16, pld_max_draft: int | None = None, compiled: bool | None = None):
        if method not in METHODS:
            raise ValueError(f"method: must be one of {METHODS}, got {method!r}")
        if compiled is None:
            compiled = os.environ.get(DRAFTERS_ENV, "compiled") != "reference"
        self.compiled = None  # the compiled drafters' per-request state (None: the Python reference drafts)
        if compiled and method in COMPILED_METHODS:
            from .drafting import batch  # numba: loaded on first use (tkernels.spec.drafting's doc says why)

            self._batch, self.compiled = batch, batch.CompiledState(k)
        self.method, self.max_depth = method, max_depth
        self.pld_max_draft = pld_max_draft
        self.recycling = TokenRecycling(vocab_size, k) if method in ("tr_static", "tr", "hybrid") else None
        self.tr_policy = ConfidenceTreePolicy(step_time=step_time)  # TR calibration and the batch's pricing
        self.retrieval_calibration = RetrievalCalibration()
        self._contexts: dict[Hashable, SuffixAutomaton] = {}
        self._own: dict[Hashable, dict[int, tuple[list[int], list[float]]]] = {}  # hybrid: per request, token -> row

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
            list of :class:`DraftTree`, one per request.
        """
        if len(keys) != len(histories):
            raise ValueError(f"keys: one per history, got {len(keys)} keys and {len(histories)} histories")
        num_nodes = integer("num_nodes", num_nodes, minimum=1)
        if any(len(h) < 1 for h in histories):
            raise ValueError("histories: every request needs at least one token")
        if not keys:
            return []
        roots = [int(h[-1]) for h in histories]
        vocab = self.recycling.vocab_size if self.recycling is not None else None
        if min(roots) < 0 or (vocab is not None and max(roots) >= vocab):
            bound = "" if vocab is None else f" and < {vocab} (the vocab)"
            raise ValueError(f"histories: the last tokens (the trees' roots) must be >= 0{bound}, got {roots}")
        if self.compiled is not None:
            return self._draft_compiled(keys, histories, num_nodes)
        histories = [h.tolist() if hasattr(h, "tolist") else [int(t) for t in h] for h in histories]
        last = torch.tensor(roots, dtype=torch.int64)
        if self.method == "pld":
            trees = self._draft_pld(histories, num_nodes)
        elif self.method == "tr_static":
            shape = static_template(num_nodes)
            tokens, parents, _ = self.recycling.draft(last, shape)
            n = num_nodes
            trees = [DraftTree(tokens[b * n:(b + 1) * n], parents[b * n:(b + 1) * n]) for b in range(len(keys))]
            for b, key in enumerate(keys):  # requests with own rows: the template filled from them first
                if self._own.get(key):
                    trees[b].tokens = self._fill_template(shape, histories[b][-1], self._own[key])
        elif self.method == "tr":
            trees = self._draft_tr(last, num_nodes)
        else:
            trees = self._draft_contexts(keys, histories, num_nodes)
        for tree, key in zip(trees, keys):
            tree.key = key
        return trees

    def _draft_compiled(self, keys, histories, num_nodes: int) -> list[DraftTree]:
        flat, cu = self._batch.flatten(histories)
        if self.method == "pld":
            num_draft = num_nodes - 1 if self.pld_max_draft is None else min(num_nodes - 1, self.pld_max_draft)
            trees = self._batch.draft_pld(flat, cu, max(num_draft, 0))
        elif self.method == "tr_static":
            trees = self._batch.draft_tr_static(self.compiled, self.recycling, self.compiled.slots_of(keys), flat[cu[1:] - 1],
                                             static_template(num_nodes))
        elif self.method == "retrieval":
            trees = self._batch.draft_retrieval(self, self.compiled, self.compiled.slots_of(keys), flat, cu, num_nodes,
                                             MAX_CHILDREN)
        else:
            template = static_template(max(1, int(num_nodes * HYBRID_TEMPLATE_SHARE)))
            trees = self._batch.draft_hybrid(self, self.compiled, self.compiled.slots_of(keys), flat, cu, num_nodes,
                                          template, ROOT_CONTEXTS, MAX_CHILDREN)
        for tree, key in zip(trees, keys):
            tree.key = key
        return trees

    def _fill_template(self, shape: TreeShape, root: int, own: dict[int, tuple[list[int], list[float]]]) -> torch.Tensor:
        """:meth:`TokenRecycling.draft` of one request, reading a token's row from ``own`` first."""
        parents, ranks = shape.parents.tolist(), shape.ranks.tolist()
        tokens = [root]
        for i in range(1, len(parents)):
            parent = tokens[parents[i]]
            row = own.get(parent)
            tokens.append(row[0][ranks[i]] if row is not None else int(self.recycling.adjacency[parent, ranks[i]]))
        return torch.tensor(tokens, dtype=torch.int64)

    def _draft_contexts(self, keys, histories, num_nodes: int) -> list[DraftTree]:
        trees = []
        tr_accept = self.tr_policy.accept_prob_host() if self.method == "hybrid" else None  # one snapshot per step
        for key, history in zip(keys, histories):
            sam = self._context(key, history)
            if self.method == "hybrid":
                trees.append(self._hybrid_tree(sam, num_nodes, self._own.get(key, {}), tr_accept))
                continue
            tokens, parents, scores, features = sam.continuations(
                num_nodes, self.retrieval_calibration.accept_prob, MAX_CHILDREN, 2 * self.max_depth)
            trees.append(DraftTree(torch.tensor(tokens, dtype=torch.int64), torch.tensor(parents, dtype=torch.int32),
                                   torch.tensor(scores, dtype=torch.float64), None,
                                   [None] + [(d, c - d + 1, share) for (c, share, _), d in
                                             zip(features[1:], depths(torch.tensor(parents)).tolist()[1:])]))
        return trees

    def _draft_pld(self, histories, num_nodes: int) -> list[DraftTree]:
        num_draft = num_nodes - 1 if self.pld_max_draft is None else min(num_nodes - 1, self.pld_max_draft)
        if num_draft < 1:
            return [DraftTree(torch.tensor([h[-1]]), torch.tensor([-1], dtype=torch.int32)) for h in histories]
        lengths = torch.tensor([len(h) for h in histories])
        padded = torch.zeros(len(histories), int(lengths.max()), dtype=torch.int64)
        for b, h in enumerate(histories):
            padded[b, :len(h)] = torch.tensor(h, dtype=torch.int64)
        tokens, parents, cu = propose_ngram(padded, lengths, num_draft=num_draft)
        return [DraftTree(tokens[s:e], parents[s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]

    def _draft_tr(self, last: torch.Tensor, num_nodes: int) -> list[DraftTree]:
        tokens, parents, scores, probs = self.recycling.draft_best(last, num_nodes, self.tr_policy.accept_prob,
                                                                   max_depth=self.max_depth)
        return [DraftTree(tokens[b], parents[b], scores[b], probs[b]) for b in range(last.numel())]

    def _hybrid_tree(self, sam: SuffixAutomaton, num_nodes: int, own: dict[int, tuple[list[int], list[float]]],
                     tr_accept) -> DraftTree:
        """The hybrid tree of ``num_nodes`` nodes (module doc): the static template's first
        ``num_nodes *`` :data:`HYBRID_TEMPLATE_SHARE` nodes where their TR rows were written,
        then the best nodes of the joint TR + retrieval candidate trie; a token's TR row from
        the request's ``own`` rows first (class doc); ``tr_accept``:
        :meth:`ConfidenceTreePolicy.accept_prob_host`.

        Best first with lazy siblings: a node's candidates are ranked once, when it joins the
        tree, and only the best not yet taken waits in the heap (the next is pushed when it is
        popped), so the heap holds about two entries per node instead of every candidate. The
        keys (score, then the order candidates were found in) are those of pushing every
        candidate at once, so the same nodes come out in the same order."""
        recycling, calibration = self.recycling, self.retrieval_calibration
        tokens, parents, scores, node_depth = [sam.tokens[-1]], [-1], [1.0], [0]
        tr_probs, features = [math.nan], [None]
        state, _ = sam.longest_match()
        contexts = [sam.suffix_states(state, ROOT_CONTEXTS)]  # per node, the contexts its path continues
        found: list[dict[int, list]] = []  # per node, its candidates (candidates_of)
        taken: set[tuple[int, int]] = set()  # (parent, token) of the template's nodes
        heap: list = []
        waiting: list[list] = []  # per expanded node, its ranked candidates not yet in the heap
        rows: dict[int, tuple[list[int], list[float]]] = {}  # token -> its TR row, read once per tree

        def row_of(token: int) -> tuple[list[int], list[float]]:
            row = rows.get(token)
            if row is None:
                row = own.get(token)
                if row is None:
                    row = (recycling.adjacency[token].tolist(), recycling.probs[token].tolist())
                rows[token] = row
            return row

        def candidates_of(node: int) -> dict[int, list]:
            """token -> [TR estimate, stored prob, retrieval estimate, features, next context]"""
            depth = node_depth[node] + 1
            candidates: dict[int, list] = {}
            if depth <= self.max_depth:
                for token, stored in zip(*row_of(tokens[node])):
                    if stored > 0:
                        candidates.setdefault(token, [tr_accept(stored, depth), stored, 0.0, None, None])
            if depth <= 2 * self.max_depth:
                for state, context in contexts[node]:  # longest context first: it names a token's features
                    for token, child, share, support in sam.children(state, MAX_CHILDREN):
                        c = candidates.setdefault(token, [0.0, math.nan, 0.0, None, None])
                        if c[3] is None:
                            c[2] = calibration.accept_prob(share, context, support, depth)
                            c[3], c[4] = (depth, context - depth + 1, share), (child, context + 1)
            return candidates

        def add(parent: int, score: float, token: int, stored: float, feature, context) -> None:
            tokens.append(token)
            parents.append(parent)
            scores.append(score)
            node_depth.append(node_depth[parent] + 1)
            tr_probs.append(stored)
            features.append(feature)
            contexts.append([context] if context is not None else [])
            found.append(candidates_of(len(tokens) - 1))

        def expand(node: int) -> None:
            ranked, parent_score, ordinal = [], scores[node], len(waiting)
            for position, (token, (p_tr, stored, p_ret, feature, context)) in enumerate(found[node].items()):
                p = max(p_tr, p_ret)
                if p > 0 and (node, token) not in taken:
                    ranked.append((-parent_score * p, (ordinal, position), node, token,
                                   stored if p_tr > 0 else math.nan, feature, context))
            ranked.sort(key=lambda entry: entry[:2], reverse=True)  # best last: popped from the end
            waiting.append(ranked)
            if ranked:
                heapq.heappush(heap, ranked.pop())

        found.append(candidates_of(0))
        shape = static_template(max(1, int(num_nodes * HYBRID_TEMPLATE_SHARE)))
        at: list[int | None] = [0]  # template node -> tree node (None: not drafted, nor its subtree)
        for template_parent, rank in zip(shape.parents.tolist()[1:], shape.ranks.tolist()[1:]):
            node = at[template_parent]
            ids, probs = row_of(tokens[node]) if node is not None else ((), ())
            # a row never written holds placeholder tokens, which the target does not pick (module doc)
            candidate = found[node].get(ids[rank]) if rank < len(ids) and probs[rank] > 0 else None
            if candidate is None or candidate[0] <= 0 or (node, ids[rank]) in taken:  # TR's: depth <= max_depth
                at.append(None)
                continue
            p_tr, stored, p_ret, feature, context = candidate
            taken.add((node, ids[rank]))
            add(node, scores[node] * max(p_tr, p_ret), ids[rank], stored, feature, context)
            at.append(len(tokens) - 1)
        for node in range(len(tokens)):
            expand(node)
        while heap and len(tokens) < num_nodes:
            neg_score, (ordinal, _), parent, token, stored, feature, context = heapq.heappop(heap)
            if waiting[ordinal]:
                heapq.heappush(heap, waiting[ordinal].pop())  # its next sibling
            add(parent, -neg_score, token, stored, feature, context)
            expand(len(tokens) - 1)
        layout = bfs_order(parents)  # the template's nodes first, then best first, per parent
        new = {old: i for i, old in enumerate(layout)}
        return DraftTree(
            tokens=torch.tensor([tokens[j] for j in layout], dtype=torch.int64),
            parents=torch.tensor([new[parents[j]] if parents[j] >= 0 else -1 for j in layout], dtype=torch.int32),
            scores=torch.tensor([scores[j] for j in layout], dtype=torch.float64),
            tr_probs=torch.tensor([tr_probs[j] for j in layout], dtype=torch.float32),
            retrieval=[features[j] for j in layout],
        )

    def choose(self, trees: list[DraftTree], batch_size: int | None = None, other_tokens: int = 0) -> list[DraftTree]:
        """Price the batch's nodes: keep, over all trees, the best-scoring nodes that maximise
        expected tokens per second under the step-time model
        (:meth:`ConfidenceTreePolicy.choose`). ``batch_size``: price one tree as if that many
        requests drafted it (the harness's single request standing for a batch). Trees without
        scores (``pld``, ``tr_static``) are returned unchanged.
        """
        if batch_size is not None:
            integer("batch_size", batch_size, minimum=1)
        if not trees or any(t.scores is None for t in trees):
            return trees
        if batch_size is not None and len(trees) != 1:
            raise ValueError(f"batch_size: prices one tree as a batch, got {len(trees)} trees")
        width = max(map(len, trees))
        scores = torch.zeros(len(trees), width, dtype=torch.float64)
        for b, t in enumerate(trees):
            scores[b, :len(t)] = t.scores
        keep = self.tr_policy.choose(scores.expand(batch_size, -1) if batch_size else scores, other_tokens)[:len(trees)]
        # zero-score padding is never worth its time; a kept node's parent scores at least as high
        return [t.select(keep[b, :len(t)].nonzero().flatten()) for b, t in enumerate(trees)]

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
        total = sum(map(len, trees))
        if self.recycling is not None:
            if topk_ids.shape[0] != total:
                raise ValueError(f"topk_ids: one row per tree node ({total}), got {tuple(topk_ids.shape)}")
            self.recycling.recycle_topk(topk_ids, torch.cat([t.tokens for t in trees]), topk_probs)
        if self.method in OWN_ROWS:  # own rows, as stored in the shared adjacency (int32 ids, fp16 probabilities)
            probs = torch.zeros(topk_ids.shape) if topk_probs is None else topk_probs.to(self.recycling.probs.dtype)
            if self.compiled is not None:
                self.compiled.write_own_rows([t.key for t in trees], [len(t) for t in trees],
                                             torch.cat([t.tokens for t in trees]).numpy(), topk_ids.cpu().numpy(),
                                             probs.float().cpu().numpy())
        if self.method in OWN_ROWS and self.compiled is None:
            ids, probs, start = topk_ids.tolist(), probs.float().tolist(), 0
            for tree in trees:
                own = self._own.setdefault(tree.key, {})
                for i, token in enumerate(tree.tokens.tolist()):  # a token at several nodes: the last one's
                    own[token] = (ids[start + i], probs[start + i])
                start += len(tree)
        tr_probs, tr_depths, tr_ok, ret_features, ret_ok = [], [], [], [], []
        for tree, path in zip(trees, accepted):
            on_path = torch.zeros(len(tree), dtype=torch.bool)
            on_path[torch.as_tensor(list(path), dtype=torch.int64)] = True
            parents = tree.parents.long()
            tested = (parents >= 0) & on_path[parents.clamp(min=0)]
            if tree.tr_probs is not None:
                mask = tested & ~torch.isnan(tree.tr_probs)
                tr_probs.append(tree.tr_probs[mask])
                tr_depths.append(depths(tree.parents)[mask])
                tr_ok.append(on_path[mask])
            if tree.retrieval is not None:
                for i in tested.nonzero().flatten().tolist():
                    if tree.retrieval[i] is not None:
                        ret_features.append(tree.retrieval[i])
                        ret_ok.append(bool(on_path[i]))
        if tr_probs:
            self.tr_policy.record(torch.cat(tr_probs), torch.cat(tr_depths), torch.cat(tr_ok))
        if self.uses_retrieval:
            self.retrieval_calibration.record(ret_features, ret_ok)

    def recycle(self, tokens: torch.Tensor, topk_ids: torch.Tensor, topk_probs: torch.Tensor | None = None) -> None:
        """Recycle top-k rows the target computed outside verification (e.g. at a prompt's
        positions: ``tokens[i]``'s row := the target's top-k after position i). No-op without TR."""
        if self.recycling is not None and tokens.numel():
            self.recycling.recycle_topk(topk_ids, tokens, topk_probs)
