"""Numba kernel of the ``hybrid`` drafter: :func:`hybrid_trees` grows every request's tree as
:func:`.reference.hybrid_tree` (the readable reference) does, in one
call for the batch. The reference's per-node candidate dicts become fixed-width rows of arrays
(``[nodes, candidates]``, candidates in the dicts' insertion order), its ``waiting`` lists a
row of keys per expanded node whose next entry is selected when it is needed (:func:`_next_waiting`),
and its heap a binary heap on (key, node, candidate), the same
order as the reference's (key, (ordinal, position)) since a node's ordinal is its index.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .kernels import (
    M_LAST,
    M_OWN,
    S_LEN,
    S_LINK,
    _children,
    _children_scratch,
    _own_row,
    _ret_accept,
    _tr_accept,
    half_to_float,
)


@njit(cache=True, inline="always")
def _less(hk, hn, hj, a, b):
    if hk[a] != hk[b]:
        return hk[a] < hk[b]
    if hn[a] != hn[b]:
        return hn[a] < hn[b]
    return hj[a] < hj[b]


@njit(cache=True, inline="always")
def _swap(hk, hn, hj, a, b):
    hk[a], hk[b] = hk[b], hk[a]
    hn[a], hn[b] = hn[b], hn[a]
    hj[a], hj[b] = hj[b], hj[a]


@njit(cache=True)
def _push(hk, hn, hj, size, key, node, j):
    hk[size], hn[size], hj[size] = key, node, j
    i = size
    while i > 0:
        up = (i - 1) >> 1
        if not _less(hk, hn, hj, i, up):
            break
        _swap(hk, hn, hj, i, up)
        i = up
    return size + 1


@njit(cache=True)
def _heap(size):
    """An empty heap of ``size`` entries for :func:`_push` and :func:`_pop`: keys, nodes, candidates."""
    return np.empty(size, np.float64), np.empty(size, np.int64), np.empty(size, np.int64)


@njit(cache=True)
def _pop(hk, hn, hj, size):
    """Moves the smallest entry to position ``size - 1``; returns the new size."""
    size -= 1
    _swap(hk, hn, hj, 0, size)
    i = 0
    while True:
        left, best = 2 * i + 1, i
        if left < size and _less(hk, hn, hj, left, best):
            best = left
        if left + 1 < size and _less(hk, hn, hj, left + 1, best):
            best = left + 1
        if best == i:
            return size
        _swap(hk, hn, hj, i, best)
        i = best


@njit(cache=True)
def _bfs_order(par, count, nchild, first, kids, layout, new):
    """retrieval.bfs_order of the first ``count`` nodes (``par``: parents): ``layout`` the
    nodes in BFS order (children in index order), ``new`` their new indices; the other
    arguments are scratch arrays of ``count`` (``first``: ``count + 1``) entries."""
    nchild[:count] = 0
    for i in range(1, count):
        nchild[par[i]] += 1
    first[0] = 0
    for i in range(count):
        first[i + 1] = first[i] + nchild[i]
    nchild[:count] = 0
    for i in range(1, count):
        kids[first[par[i]] + nchild[par[i]]] = i
        nchild[par[i]] += 1
    layout[0], tail = 0, 1
    for head in range(count):
        u = layout[head]
        for i in range(first[u], first[u + 1]):
            layout[tail] = kids[i]
            tail += 1
    for i in range(count):
        new[layout[i]] = i


@njit(cache=True)
def _bfs_scratch(n):
    """:func:`_bfs_order`'s scratch arrays for trees of up to ``n`` nodes, in its argument order
    (``nchild``, ``first``, ``kids``, ``layout``, ``new``)."""
    return (np.empty(n, np.int64), np.empty(n + 1, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
            np.empty(n, np.int64))


@njit(cache=True)
def _find(ctok, ncand, node, token):
    for j in range(ncand[node]):
        if ctok[node, j] == token:
            return j
    return -1


@njit(cache=True, inline="always")
def _next_waiting(wkey, waits, ncand, e, after_key, after_j):
    """The reference's next entry of node ``e``'s ``waiting`` list after ``(after_key, after_j)``:
    its waiting candidate of the smallest (key, position) past that pair, or -1. (The list is
    sorted by key, ties by position, and read in order; selecting each next entry when it is
    needed takes one scan, where sorting took a quadratic insertion per node. Keys are finite.)"""
    best = -1
    for j in range(ncand[e]):
        if not waits[e, j]:
            continue
        k = wkey[e, j]
        if k < after_key or (k == after_key and j <= after_j):
            continue
        if best < 0 or k < wkey[e, best]:
            best = j
    return best


@njit(cache=True)
def hybrid_trees(l_states, l_edges, l_own_tables, l_own_ids, l_own_probs, meta, slots, roots,
                 adjacency, prob_bits, factors, cal, prior, prior_weight, depth_bins, match_bins,
                 t_parents, t_ranks, num_nodes, max_depth, root_contexts, max_children,
                 out_tokens, out_parents, out_scores, out_trp, out_depths, out_feat, out_share, out_cu):
    """One hybrid tree per request ``b`` (slot ``slots[b]``, root ``roots[b]``), the batch's trees
    concatenated: tree ``b``'s nodes are ``out_cu[b]:out_cu[b + 1]`` of the outputs (``B *
    num_nodes`` long; ``out_cu`` [B + 1], ``out_cu[0]`` set by the caller), node depths in
    ``out_depths``. ``cal`` float64 [2, ...]: the retrieval calibration's accepted and tested
    counts; ``out_feat`` int64 [B * n, 2] (depth, match length; depth -1: no retrieval features)."""
    k = adjacency.shape[1]
    N = num_nodes
    C = k + root_contexts * max_children
    tok = np.empty(N, np.int64)
    par = np.empty(N, np.int64)
    score = np.empty(N, np.float64)
    ndepth = np.empty(N, np.int64)
    trp = np.empty(N, np.float64)
    fd = np.empty(N, np.int64)
    fm = np.empty(N, np.int64)
    fs = np.empty(N, np.float64)
    cst = np.empty(N, np.int64)  # the node's retrieval context: state (-1 none), length
    cln = np.empty(N, np.int64)
    ncand = np.empty(N, np.int64)
    ctok = np.empty((N, C), np.int64)
    cptr = np.empty((N, C), np.float64)
    cstored = np.empty((N, C), np.float64)
    cpret = np.empty((N, C), np.float64)
    cfd = np.empty((N, C), np.int64)
    cfm = np.empty((N, C), np.int64)
    cfs = np.empty((N, C), np.float64)
    ccs = np.empty((N, C), np.int64)
    ccl = np.empty((N, C), np.int64)
    ctaken = np.empty((N, C), np.bool_)
    waits = np.empty((N, C), np.bool_)  # expanded nodes: which candidates wait, at which heap key
    wkey = np.empty((N, C), np.float64)
    hk, hn, hj = _heap(2 * N + 2)
    at = np.empty(t_parents.shape[0], np.int64)
    root_state = np.empty(root_contexts, np.int64)
    root_len = np.empty(root_contexts, np.int64)
    o_tok, o_child, o_share, o_support = _children_scratch(max_children)
    nchild, first, kids, layout, new = _bfs_scratch(N)
    cal_accepted, cal_tested = cal[0], cal[1]
    for b in range(slots.shape[0]):
        s = slots[b]
        states, edges = l_states[s], l_edges[s]
        own_table, own_ids, own_probs = l_own_tables[s], l_own_ids[s], l_own_probs[s]
        own_rows = meta[s, M_OWN]
        # root: SuffixAutomaton.suffix_states(longest match, root_contexts)
        nroot = 0
        st = max(states[meta[s, M_LAST], S_LINK], 0) if meta[s, M_LAST] else 0  # longest_match()
        while st > 0 and nroot < root_contexts:
            root_state[nroot], root_len[nroot] = st, states[st, S_LEN]
            nroot += 1
            st = states[st, S_LINK]
        heap = 0
        v = 0
        tok[0], par[0], score[0], ndepth[0], trp[0] = roots[b], -1, 1.0, 0, math.nan
        fd[0], fm[0], fs[0], cst[0], cln[0] = -1, 0, 0.0, -1, 0
        count = 1
        t_i = 0  # template position
        at[0] = 0
        expanded = 0
        while True:
            # candidates_of(v): TR's row of its token first, then retrieval's continuations
            d = ndepth[v] + 1
            nc = 0
            if d <= max_depth:
                t = tok[v]
                row = _own_row(own_table, own_rows, t)
                for j in range(k):
                    if row >= 0:
                        cid, stored = np.int64(own_ids[row, j]), np.float64(own_probs[row, j])
                    else:
                        cid, stored = np.int64(adjacency[t, j]), half_to_float(prob_bits[t, j])
                    if stored > 0:
                        found = -1
                        for i in range(nc):
                            if ctok[v, i] == cid:
                                found = i
                                break
                        if found < 0:
                            ctok[v, nc], cptr[v, nc], cstored[v, nc] = cid, _tr_accept(stored, d, factors), stored
                            cpret[v, nc], cfd[v, nc], ccs[v, nc], ctaken[v, nc] = 0.0, -1, -1, False
                            nc += 1
            if d <= 2 * max_depth:
                nctx = nroot if v == 0 else (1 if cst[v] >= 0 else 0)
                for c in range(nctx):  # longest context first: it names a token's features
                    state = root_state[c] if v == 0 else cst[v]
                    context = root_len[c] if v == 0 else cln[v]
                    m = _children(states, edges, state, max_children, o_tok, o_child, o_share, o_support)
                    for i in range(m):
                        found = -1
                        for jj in range(nc):
                            if ctok[v, jj] == o_tok[i]:
                                found = jj
                                break
                        if found < 0:
                            found = nc
                            ctok[v, nc], cptr[v, nc], cstored[v, nc] = o_tok[i], 0.0, math.nan
                            cpret[v, nc], cfd[v, nc], ccs[v, nc], ctaken[v, nc] = 0.0, -1, -1, False
                            nc += 1
                        if cfd[v, found] < 0:
                            cpret[v, found] = _ret_accept(o_share[i], context, o_support[i], d, cal_accepted,
                                                          cal_tested, prior, prior_weight, depth_bins, match_bins)
                            cfd[v, found], cfm[v, found], cfs[v, found] = d, context - d + 1, o_share[i]
                            ccs[v, found], ccl[v, found] = o_child[i], context + 1
            ncand[v] = nc
            # the next node (its parent ``node`` and candidate ``cj``): the template's next
            # drafted node; after the template, the best candidate not yet in the tree
            node, cj = -1, -1
            while t_i + 1 < t_parents.shape[0]:
                t_i += 1
                tp = at[t_parents[t_i]]
                rank = t_ranks[t_i]
                at[t_i] = -1
                if tp < 0 or rank >= k:
                    continue
                row = _own_row(own_table, own_rows, tok[tp])
                if row >= 0:
                    cid, stored = np.int64(own_ids[row, rank]), np.float64(own_probs[row, rank])
                else:
                    cid, stored = np.int64(adjacency[tok[tp], rank]), half_to_float(prob_bits[tok[tp], rank])
                if not stored > 0:  # a row never written: placeholders
                    continue
                j = _find(ctok, ncand, tp, cid)
                if j < 0 or cptr[tp, j] <= 0 or ctaken[tp, j]:
                    continue
                ctaken[tp, j] = True
                node, cj = tp, j
                score[count] = score[tp] * max(cptr[tp, j], cpret[tp, j])
                trp[count] = cstored[tp, j]
                at[t_i] = count
                break
            if node < 0:
                while expanded < count:  # expand(): its waiting candidates' keys, push its best
                    e = expanded
                    expanded += 1
                    for j in range(ncand[e]):
                        p = max(cptr[e, j], cpret[e, j])
                        waits[e, j] = p > 0 and not ctaken[e, j]
                        wkey[e, j] = -score[e] * p
                    j = _next_waiting(wkey, waits, ncand, e, -math.inf, -1)
                    if j >= 0:
                        heap = _push(hk, hn, hj, heap, wkey[e, j], e, j)
                if heap == 0 or count >= N:
                    break
                heap = _pop(hk, hn, hj, heap)
                key, node, cj = hk[heap], hn[heap], hj[heap]
                jn = _next_waiting(wkey, waits, ncand, node, key, cj)
                if jn >= 0:  # its next sibling
                    heap = _push(hk, hn, hj, heap, wkey[node, jn], node, jn)
                score[count] = -key
                trp[count] = cstored[node, cj] if cptr[node, cj] > 0 else math.nan
            v = count
            count += 1
            tok[v], par[v], ndepth[v] = ctok[node, cj], node, ndepth[node] + 1
            fd[v], fm[v], fs[v] = cfd[node, cj], cfm[node, cj], cfs[node, cj]
            cst[v], cln[v] = ccs[node, cj], ccl[node, cj]
        _bfs_order(par, count, nchild, first, kids, layout, new)
        o = out_cu[b]
        for i in range(count):
            u = layout[i]
            out_tokens[o + i], out_parents[o + i] = tok[u], new[par[u]] if par[u] >= 0 else -1
            out_scores[o + i], out_trp[o + i], out_depths[o + i] = score[u], trp[u], ndepth[u]
            out_feat[o + i, 0], out_feat[o + i, 1], out_share[o + i] = fd[u], fm[u] if fd[u] >= 0 else 0, fs[u]
        out_cu[b + 1] = o + count
    return 0
