"""Numba kernel of the ``retrieval`` drafter: :func:`retrieval_trees` is
:meth:`SuffixAutomaton.continuations <tkernels.spec.retrieval.SuffixAutomaton.continuations>`
under the retrieval calibration (:func:`.reference.draft_contexts`) for the whole batch. Its heap
orders (-score, push counter) as the reference's does; a popped entry's payload (parent node,
token, child state, context, share, support) sits in side arrays indexed by its push counter.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .hybrid import _bfs_order, _bfs_scratch, _heap, _pop, _push
from .kernels import M_LAST, S_LEN, S_LINK, _children, _children_scratch, _ret_accept


@njit(cache=True)
def retrieval_trees(l_states, l_edges, meta, slots, roots, cal, prior, prior_weight, depth_bins, match_bins,
                    num_nodes, max_depth, max_children,
                    out_tokens, out_parents, out_scores, out_depths, out_feat, out_share, out_cu):
    """One tree per request (slot ``slots[b]``, root ``roots[b]``), outputs as
    :func:`.hybrid.hybrid_trees`'s, concatenated (``max_depth``: the automaton's, twice the drafter's)."""
    N = num_nodes
    P = max_children * N + max_children  # pushes: at most max_children per node
    par = np.empty(N, np.int64)
    tok = np.empty(N, np.int64)
    score = np.empty(N, np.float64)
    depth = np.empty(N, np.int64)
    ctx = np.empty(N, np.int64)  # the node's feature: context length, share
    share = np.empty(N, np.float64)
    hk, hn, hj = _heap(P)
    e_parent = np.empty(P, np.int64)
    e_token = np.empty(P, np.int64)
    e_child = np.empty(P, np.int64)
    e_context = np.empty(P, np.int64)
    e_share = np.empty(P, np.float64)
    o_tok, o_child, o_share, o_support = _children_scratch(max_children)
    nchild, first, kids, layout, new = _bfs_scratch(N)
    cal_accepted, cal_tested = cal[0], cal[1]
    for b in range(slots.shape[0]):
        s = slots[b]
        states, edges = l_states[s], l_edges[s]
        state = max(states[meta[s, M_LAST], S_LINK], 0) if meta[s, M_LAST] else 0  # longest_match()
        tok[0], par[0], score[0], depth[0] = roots[b], -1, 1.0, 0
        count, heap, ties = 1, 0, 0
        if state > 0 and N >= 2:
            node, from_state, context = 0, state, states[state, S_LEN]
            while True:
                if depth[node] < max_depth:  # push_children(node, from_state, score, depth, context)
                    m = _children(states, edges, from_state, max_children, o_tok, o_child, o_share, o_support)
                    for i in range(m):
                        p = _ret_accept(o_share[i], context, o_support[i], depth[node] + 1, cal_accepted, cal_tested,
                                        prior, prior_weight, depth_bins, match_bins)
                        if p > 0:
                            e_parent[ties], e_token[ties], e_child[ties] = node, o_tok[i], o_child[i]
                            e_context[ties], e_share[ties] = context, o_share[i]
                            heap = _push(hk, hn, hj, heap, -score[node] * p, ties, ties)
                            ties += 1
                if heap == 0 or count >= N:
                    break
                heap = _pop(hk, hn, hj, heap)
                e = hn[heap]
                node = count
                count += 1
                tok[node], par[node], score[node] = e_token[e], e_parent[e], -hk[heap]
                depth[node] = depth[e_parent[e]] + 1
                ctx[node], share[node] = e_context[e], e_share[e]
                from_state, context = e_child[e], e_context[e] + 1
        _bfs_order(par, count, nchild, first, kids, layout, new)
        at = out_cu[b]
        for i in range(count):
            u = layout[i]
            out_tokens[at + i], out_parents[at + i], out_scores[at + i] = tok[u], new[par[u]] if par[u] >= 0 else -1, score[u]
            d = depth[u]
            out_depths[at + i] = d
            out_feat[at + i, 0], out_feat[at + i, 1], out_share[at + i] = (d, ctx[u] - d + 1, share[u]) if u > 0 else (-1, 0, 0.0)
        out_cu[b + 1] = at + count
