"""The Python reference of :class:`~tkernels.spec.drafters.TreeDrafter`'s methods (its module
doc describes them): readable, one request at a time (``tr``: its batched torch beam). The
compiled drafters of :mod:`tkernels.spec.drafting` mirror these line by line;
``tests/test_spec_drafting.py`` asserts identical trees. Each function takes the drafter whose
state it reads (adjacency, calibrations, per-request contexts and own rows)."""

from __future__ import annotations

import heapq
import math

import torch

from ..draft_tree import DraftTree
from ..ngram import propose_ngram
from ..retrieval import SuffixAutomaton, bfs_order
from ..tree import TreeShape, depths
from . import HYBRID_TEMPLATE_SHARE, MAX_CHILDREN, ROOT_CONTEXTS, static_template

__all__ = ["draft_contexts", "draft_pld", "draft_tr", "draft_tr_static", "fill_template", "hybrid_tree"]


def draft_tr_static(drafter, keys, histories, last: torch.Tensor, num_nodes: int) -> list[DraftTree]:
    """The static template filled from the adjacency, from a request's own rows first (class doc)."""
    shape = static_template(num_nodes)
    tokens, parents, _ = drafter.recycling.draft(last, shape)
    n = num_nodes
    trees = [DraftTree(tokens[b * n:(b + 1) * n], parents[b * n:(b + 1) * n]) for b in range(len(keys))]
    for b, key in enumerate(keys):  # requests with own rows: the template filled from them first
        if drafter._own.get(key):
            trees[b].tokens = fill_template(drafter.recycling, shape, histories[b][-1], drafter._own[key])
    return trees


def fill_template(recycling, shape: TreeShape, root: int, own: dict[int, tuple[list[int], list[float]]]) -> torch.Tensor:
    """:meth:`TokenRecycling.draft` of one request, reading a token's row from ``own`` first."""
    parents, ranks = shape.parents.tolist(), shape.ranks.tolist()
    tokens = [root]
    for i in range(1, len(parents)):
        parent = tokens[parents[i]]
        row = own.get(parent)
        tokens.append(row[0][ranks[i]] if row is not None else int(recycling.adjacency[parent, ranks[i]]))
    return torch.tensor(tokens, dtype=torch.int64)


def draft_contexts(drafter, keys, histories, num_nodes: int) -> list[DraftTree]:
    """``retrieval`` and ``hybrid``: per request from its suffix automaton (synced to its history)."""
    trees = []
    tr_accept = drafter.tr_policy.accept_prob_host() if drafter.method == "hybrid" else None  # one snapshot per step
    for key, history in zip(keys, histories):
        sam = drafter._context(key, history)
        if drafter.method == "hybrid":
            trees.append(hybrid_tree(drafter, sam, num_nodes, drafter._own.get(key, {}), tr_accept))
            continue
        tokens, parents, scores, features = sam.continuations(
            num_nodes, drafter.retrieval_calibration.accept_prob, MAX_CHILDREN, 2 * drafter.max_depth)
        trees.append(DraftTree(torch.tensor(tokens, dtype=torch.int64), torch.tensor(parents, dtype=torch.int32),
                               torch.tensor(scores, dtype=torch.float64), None,
                               [None] + [(d, c - d + 1, share) for (c, share, _), d in
                                         zip(features[1:], depths(torch.tensor(parents)).tolist()[1:])]))
    return trees


def draft_pld(histories, num_nodes: int, max_draft: int | None) -> list[DraftTree]:
    """Prompt lookup chains of at most ``num_nodes - 1`` (and ``max_draft``) draft tokens."""
    num_draft = num_nodes - 1 if max_draft is None else min(num_nodes - 1, max_draft)
    if num_draft < 1:
        return [DraftTree(torch.tensor([h[-1]]), torch.tensor([-1], dtype=torch.int32)) for h in histories]
    lengths = torch.tensor([len(h) for h in histories])
    padded = torch.zeros(len(histories), int(lengths.max()), dtype=torch.int64)
    for b, h in enumerate(histories):
        padded[b, :len(h)] = torch.tensor(h, dtype=torch.int64)
    tokens, parents, cu = propose_ngram(padded, lengths, num_draft=num_draft)
    return [DraftTree(tokens[s:e], parents[s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]


def draft_tr(drafter, last: torch.Tensor, num_nodes: int) -> list[DraftTree]:
    """Every request's own best tree under the calibrated TR estimates (a batched torch beam)."""
    tokens, parents, scores, probs = drafter.recycling.draft_best(last, num_nodes, drafter.tr_policy.accept_prob,
                                                                  max_depth=drafter.max_depth)
    return [DraftTree(tokens[b], parents[b], scores[b], probs[b]) for b in range(last.numel())]


def hybrid_tree(drafter, sam: SuffixAutomaton, num_nodes: int, own: dict[int, tuple[list[int], list[float]]],
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
    recycling, calibration = drafter.recycling, drafter.retrieval_calibration
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
        if depth <= drafter.max_depth:
            for token, stored in zip(*row_of(tokens[node])):
                if stored > 0:
                    candidates.setdefault(token, [tr_accept(stored, depth), stored, 0.0, None, None])
        if depth <= 2 * drafter.max_depth:
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
