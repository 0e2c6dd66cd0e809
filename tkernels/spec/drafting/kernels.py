"""Numba kernels of the compiled drafters (:mod:`tkernels.spec.drafting`): one call per step
drafts the whole batch, one host thread, ``cache=True`` (compiled once per machine, then loaded).

Every function mirrors a Python reference line by line (named in its doc); the tests assert
identical trees. Per-request state lives in per-slot arrays held by numba typed lists (one list
per field, indexed by the request's slot); :mod:`.compiled` allocates and grows them, so the
kernels never allocate per-request state. Layouts:

* ``states`` int32 [cap, 6]: suffix automaton state: link, length, count, clone, first edge, last edge.
* ``edges`` int32 [cap, 3]: transition: token, target state, next edge of the same state
  (insertion order: the reference's dict order, which breaks count ties in ``children``).
* ``table`` int64 [cap, 2]: open-addressing hash (key, value), key -1 empty, capacity a power of
  two at least twice the entries: the automaton's ``(state << 32) | token -> edge``, and the own
  rows' ``token -> row``.
* ``meta`` int64 [slots, 8]: per slot the counts below (``M_*``).
"""

from __future__ import annotations

import math

import numpy as np

from tkernels.jit import njit

M_TOKENS, M_STATES, M_EDGES, M_LAST, M_OWN = 0, 1, 2, 3, 4
BULK = 64  # retrieval._BULK: above this many tokens at once, counts are recomputed in one pass
S_LINK, S_LEN, S_COUNT, S_CLONE, S_HEAD, S_TAIL = 0, 1, 2, 3, 4, 5
NONE = -1

# --- hash table --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _probe(table, key):
    """Position of ``key`` in ``table``, or of the empty entry where it would go."""
    mask = table.shape[0] - 1
    h = key * 0x9E3779B1
    i = (h ^ (h >> 29)) & mask
    while table[i, 0] != -1 and table[i, 0] != key:
        i = (i + 1) & mask
    return i


@njit(cache=True)
def _get(table, key):
    i = _probe(table, key)
    return table[i, 1] if table[i, 0] == key else -1


# --- fp16 ----------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def half_to_float(bits):
    """The value of fp16 ``bits`` (uint16) as float64, exactly (torch's fp16 -> float): a normal,
    infinite or NaN half becomes the float32 of the same sign, exponent rebiased and mantissa
    widened, built in integer bits (no libm call per read: the drafters read a stored
    probability per candidate); a subnormal is its mantissa times 2**-24."""
    b = np.uint32(bits)
    sign = (b & 0x8000) << 16
    e = (b >> 10) & 0x1F
    m = b & 0x3FF
    if e == 0:
        v = np.float64(m) * 5.9604644775390625e-08  # 2**-24: exact
        return -v if sign else v
    f = sign | (np.uint32(0x7F800000) if e == 31 else (e + 112) << 23) | (m << 13)
    return np.float64(np.uint32(f).view(np.float32))


@njit(cache=True, inline="always")
def float_to_half(value):
    """The fp16 bits (uint16) of float32 ``value``, rounded to nearest even as torch's
    ``.to(torch.float16)`` rounds (numpy's ``npy_floatbits_to_halfbits``; checked against torch
    on every finite float32). A NaN, which learning refuses, becomes 0x7E00."""
    f = np.int64(np.float32(value).view(np.uint32))
    sign = (f & 0x80000000) >> 16
    f_exp = f & 0x7F800000
    if f_exp >= 0x47800000:  # overflow, inf, NaN
        if f_exp == 0x7F800000 and f & 0x007FFFFF:
            return np.uint16(sign + 0x7E00)
        return np.uint16(sign + 0x7C00)
    if f_exp <= 0x38000000:  # a subnormal half or a signed zero
        if f_exp < 0x33000000:
            return np.uint16(sign)
        e = f_exp >> 23
        sig = 0x00800000 + (f & 0x007FFFFF)
        shifted = sig >> (113 - e)
        # round half to even: the bits shifted out (the original's low bits included) decide
        if (shifted & 0x00003FFF) != 0x00001000 or (f & 0x000007FF):
            shifted += 0x00001000
        return np.uint16(sign + (shifted >> 13))
    sig = f & 0x007FFFFF
    if (sig & 0x00003FFF) != 0x00001000:
        sig += 0x00001000
    return np.uint16(sign + ((f_exp - 0x38000000) >> 13) + (sig >> 13))


# --- suffix automaton (retrieval.SuffixAutomaton) ----------------------------------------------


@njit(cache=True)
def _sam_reset(states, meta, s):
    states[0, S_LINK], states[0, S_LEN], states[0, S_COUNT] = -1, 0, 0
    states[0, S_CLONE], states[0, S_HEAD], states[0, S_TAIL] = 0, NONE, NONE
    meta[s, M_TOKENS], meta[s, M_STATES], meta[s, M_EDGES], meta[s, M_LAST] = 0, 1, 0, 0


@njit(cache=True)
def _new_state(states, meta, s, length, link, count, clone):
    v = meta[s, M_STATES]
    meta[s, M_STATES] = v + 1
    states[v, S_LINK], states[v, S_LEN], states[v, S_COUNT] = link, length, count
    states[v, S_CLONE], states[v, S_HEAD], states[v, S_TAIL] = clone, NONE, NONE
    return v


@njit(cache=True)
def _add_edge(states, edges, table, meta, s, state, token, target):
    key = (np.int64(state) << 32) | token
    _add_edge_at(states, edges, table, meta, s, state, token, target, key, _probe(table, key))


@njit(cache=True, inline="always")
def _add_edge_at(states, edges, table, meta, s, state, token, target, key, i):
    """:func:`_add_edge` where the probe for ``key`` already found its empty entry ``i``."""
    e = meta[s, M_EDGES]
    meta[s, M_EDGES] = e + 1
    edges[e, 0], edges[e, 1], edges[e, 2] = token, target, NONE
    if states[state, S_TAIL] == NONE:
        states[state, S_HEAD] = e
    else:
        edges[states[state, S_TAIL], 2] = e
    states[state, S_TAIL] = e
    table[i, 0], table[i, 1] = key, e


@njit(cache=True)
def _sam_add(states, edges, table, toks, meta, s, token, count):
    """SuffixAutomaton._add."""
    toks[meta[s, M_TOKENS]] = token
    meta[s, M_TOKENS] += 1
    last = meta[s, M_LAST]
    cur = _new_state(states, meta, s, states[last, S_LEN] + 1, 0, 0, 0)
    p = last
    found = -1  # the table entry of (p, token) where the walk stopped
    while p != -1:  # one probe per state: a missing transition is added where the probe ended
        key = (np.int64(p) << 32) | token
        i = _probe(table, key)
        if table[i, 0] == key:
            found = i
            break
        _add_edge_at(states, edges, table, meta, s, p, token, cur, key, i)
        p = states[p, S_LINK]
    if p != -1:
        q = edges[table[found, 1], 1]
        if states[p, S_LEN] + 1 == states[q, S_LEN]:
            states[cur, S_LINK] = q
        else:
            clone = _new_state(states, meta, s, states[p, S_LEN] + 1, states[q, S_LINK], states[q, S_COUNT], 1)
            e = states[q, S_HEAD]
            while e != NONE:  # dict(nxt[q]): the same transitions in the same order
                _add_edge(states, edges, table, meta, s, clone, edges[e, 0], edges[e, 1])
                e = edges[e, 2]
            while p != -1:
                e = _get(table, (np.int64(p) << 32) | token)
                if e < 0 or edges[e, 1] != q:
                    break
                edges[e, 1] = clone
                p = states[p, S_LINK]
            states[q, S_LINK] = clone
            states[cur, S_LINK] = clone
    meta[s, M_LAST] = cur
    if count:
        v = cur
        while v > 0:
            states[v, S_COUNT] += 1
            v = states[v, S_LINK]


@njit(cache=True)
def _sam_recount(states, meta, s):
    """SuffixAutomaton._recount: 1 per non-clone state, summed up the suffix-link tree in
    decreasing length order (a counting sort by length)."""
    n = meta[s, M_STATES]
    max_len = meta[s, M_TOKENS]
    start = np.zeros(max_len + 2, np.int64)
    for v in range(1, n):
        start[states[v, S_LEN] + 1] += 1
    for i in range(1, max_len + 2):
        start[i] += start[i - 1]
    order = np.empty(max(n - 1, 0), np.int64)
    for v in range(1, n):
        order[start[states[v, S_LEN]]] = v
        start[states[v, S_LEN]] += 1
    states[0, S_COUNT] = 0
    for v in range(1, n):
        states[v, S_COUNT] = 0 if states[v, S_CLONE] else 1
    for i in range(n - 2, -1, -1):
        v = order[i]
        if states[v, S_LINK] > 0:
            states[states[v, S_LINK], S_COUNT] += states[v, S_COUNT]


@njit(cache=True)
def _sam_extend(states, edges, table, toks, meta, s, history, lo, hi):
    bulk = hi - lo > BULK
    for i in range(lo, hi):
        _sam_add(states, edges, table, toks, meta, s, history[i], not bulk)
    if bulk:
        _sam_recount(states, meta, s)


@njit(cache=True)
def sync_contexts(l_states, l_edges, l_tables, l_tokens, meta, slots, flat, cu, vocab):
    """TreeDrafter._context for every request: extend its automaton with the history's new
    tokens, or rebuild it when the history does not extend what it holds. Capacities were
    ensured by the caller (2 n + 2 states, 3 n + 4 edges, hash >= 2 x edges). Returns 1, before
    touching any automaton, when a token of ``flat`` lies outside ``[0, vocab)`` (the caller
    raises), else 0."""
    bad = False
    for i in range(flat.shape[0]):  # no early exit: a vectorised pass
        bad |= (flat[i] < 0) | (flat[i] >= vocab)
    if bad:
        return 1
    for b in range(slots.shape[0]):
        s = slots[b]
        states, edges, table, toks = l_states[s], l_edges[s], l_tables[s], l_tokens[s]
        history = flat[cu[b]:cu[b + 1]]
        n = meta[s, M_TOKENS]
        same = n <= history.shape[0] and meta[s, M_STATES] > 0
        if same:
            differ = 0
            for i in range(n):  # no early exit: a vectorised pass (the histories extend them, mostly)
                differ |= toks[i] ^ history[i]
            same = differ == 0
        if not same:
            table[:, 0] = -1
            _sam_reset(states, meta, s)
            n = 0
        if history.shape[0] > n:
            _sam_extend(states, edges, table, toks, meta, s, history, n, history.shape[0])
    return 0


@njit(cache=True)
def _children_scratch(max_children):
    """:func:`_children`'s output arrays (``out_tok``, ``out_child``, ``out_share``, ``out_support``)."""
    return (np.empty(max_children, np.int64), np.empty(max_children, np.int64), np.empty(max_children, np.float64),
            np.empty(max_children, np.int64))


@njit(cache=True)
def _children(states, edges, state, max_children, out_tok, out_child, out_share, out_support):
    """SuffixAutomaton.children: the ``max_children`` most frequent continuations (ties: the
    first inserted), written to the ``out_*`` arrays; returns how many."""
    e = states[state, S_HEAD]
    support = 0
    m = 0
    while e != NONE:
        c = states[edges[e, 1], S_COUNT]
        support += c
        j = m if m < max_children else max_children
        while j > 0 and states[out_child[j - 1], S_COUNT] < c:  # stable: move past strictly smaller
            if j < max_children:
                out_tok[j], out_child[j] = out_tok[j - 1], out_child[j - 1]
            j -= 1
        if j < max_children:
            out_tok[j], out_child[j] = edges[e, 0], edges[e, 1]
            if m < max_children:
                m += 1
        e = edges[e, 2]
    for j in range(m):
        out_share[j] = states[out_child[j], S_COUNT] / support
        out_support[j] = support
    return m


# --- calibrations --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _tr_accept(prob, depth, factors):
    """ConfidenceTreePolicy.accept_prob_host of a stored probability (an fp16 value, > 0)."""
    bins, max_depth = factors.shape[1], factors.shape[0]
    q_bin = min(max(_neg_log2_floor(max(prob, 1e-30)), 0), bins - 1)
    return min(prob * factors[min(max(depth, 1), max_depth) - 1, q_bin], 1.0)


@njit(cache=True, inline="always")
def _neg_log2_floor(value):
    """``math.floor(-math.log2(value))`` of a positive normal float64 from its exponent bits (no
    libm call): ``-exponent`` for a power of two, one less otherwise. Equal to the log2 form for
    every value not within a few ulps of a power of two, so for every fp16 value and 1e-30
    (tests/test_spec_drafting.py checks them all)."""
    bits = np.float64(value).view(np.int64)
    exponent = ((bits >> 52) & 0x7FF) - 1023
    return -exponent if bits & 0xFFFFFFFFFFFFF == 0 else -exponent - 1


@njit(cache=True, inline="always")
def _bin(value, edges):
    if value < edges[0]:
        return 0
    i = 0
    for j in range(edges.shape[0]):
        if value >= edges[j]:
            i = j
    return i


@njit(cache=True)
def _ret_accept(share, context, support, depth, cal_accepted, cal_tested, prior, prior_weight, depth_bins, match_bins):
    """RetrievalCalibration.accept_prob (the same float64 operations in the same order)."""
    d = _bin(depth, depth_bins)
    m = _bin(context - depth + 1, match_bins)
    sh = 0 if share >= 1 else (1 if share >= 0.5 else 2)
    return (cal_accepted[d, m, sh] + prior_weight * prior[d, m] * share) / (cal_tested[d, m, sh] + prior_weight)


# --- Token Recycling rows -------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _own_row(own_table, own_rows, token):
    if own_rows == 0:
        return -1
    return _get(own_table, np.int64(token))


@njit(cache=True)
def own_rows_needed(meta, own_capacity, slots, sizes, out):
    """The rows each tree's slot may need for one :func:`learn_rows` of trees of ``sizes``
    nodes (at most one new row per node, counted over every tree of a shared slot) where its
    capacity is short, into ``out`` [B] (0: room enough); returns how many are short."""
    need = np.zeros(own_capacity.shape[0], np.int64)
    for b in range(slots.shape[0]):
        need[slots[b]] += sizes[b]
    short = 0
    for b in range(slots.shape[0]):
        s = slots[b]
        total = meta[s, M_OWN] + need[s]
        out[b] = total if total > own_capacity[s] else 0
        short += out[b] > 0
    return short


@njit(cache=True)
def accepted_paths(parents, cu, depths, nodes, num, rows, max_depth, on_path, ranks, observed):
    """A verify step's accepted paths in BFS trees ``b`` (nodes ``cu[b]:cu[b + 1]``, local
    ``parents``, node ``depths``): the nodes ``nodes[rows[b], :num[rows[b]]]`` (local indices,
    verification's accepted path, root first) marked in ``on_path`` bool [N], and what the tree
    proposer's size policy learns from them, ``batch_sibling_ranks``' (its reference, in
    ``plugins/vllm/tree_proposer.py``) ``ranks`` int64 [B, max_depth] (-1 padded) and
    ``observed`` int64 [B]: at each depth of the path the accepted node's rank among its siblings
    (BFS keeps them together), then one depth more when the last accepted node has children."""
    on_path[:] = False
    ranks[:] = -1
    for b in range(cu.shape[0] - 1):
        start, end, r = cu[b], cu[b + 1], rows[b]
        for j in range(num[r]):
            on_path[start + nodes[r, j]] = True
        last = -1
        for i in range(start, end):
            if not on_path[i]:
                continue
            last = i
            column = min(depths[i], max_depth + 1) - 1
            if 0 <= column < max_depth:
                first = i
                while first - 1 > start and parents[first - 1] == parents[i]:
                    first -= 1
                ranks[b, column] = i - first
        has_child = 0
        for i in range(last + 1, end):
            if parents[i] == last - start:
                has_child = 1
                break
        observed[b] = min(depths[last] + has_child, max_depth)


@njit(cache=True)
def update_rank_estimates(hits, trials, decay, ranks, observed):
    """DynamicTreePolicy.update (its numpy is the reference) of :func:`accepted_paths`' ``ranks``
    [B, W] (>= -1, W <= max_depth) and ``observed`` [B], in place on the estimates ``hits``
    [max_depth, k] and ``trials`` [max_depth]: one decay, then each cell's count of the step
    added once (the same float64 additions)."""
    max_depth, k = hits.shape[0], hits.shape[1]
    width = min(ranks.shape[1], max_depth)
    seen = np.zeros(max_depth, np.int64)
    hit = np.zeros((max_depth, k), np.int64)
    for b in range(ranks.shape[0]):
        for d in range(min(width, observed[b])):
            seen[d] += 1
            r = ranks[b, d]
            if 0 <= r < k:
                hit[d, r] += 1
    hits *= decay
    trials *= decay
    for d in range(width):
        trials[d] += seen[d]
        for r in range(k):
            hits[d, r] += hit[d, r]


@njit(cache=True)
def record_tested(parents, cu, on_path, tr_probs, depths, feat, share, tr_mass, tr_hits, tr_decay, ret_tested,
                  ret_accepted, ret_decay, depth_bins, match_bins):
    """TreeDrafter._calibrate of a compiled draft, in one pass: every *tested* node (its parent on
    the accepted path, ``on_path`` bool [N]; trees ``cu[b]:cu[b + 1]``, local ``parents``) is
    recorded, as ConfidenceTreePolicy.record and RetrievalCalibration.record record them (one
    decay each, then the sums in node order: the same float64 operations), in the TR
    calibration's ``tr_mass`` / ``tr_hits`` [max_depth, bins] with its stored probability when
    ``tr_probs`` (float32 [N], NaN: not TR's; size 0: no TR field, nothing recorded) holds one,
    and in the retrieval calibration's ``ret_tested`` / ``ret_accepted`` [depth, match, share]
    with its features when ``feat[i, 0] >= 0`` (size 0: no retrieval field, only the decay).
    Returns 1, before recording anything, when a tested TR probability lies outside [0, 1]
    (the caller raises ConfidenceTreePolicy.record's error), else 0."""
    n = parents.shape[0]
    use_tr = tr_probs.shape[0] == n and n > 0
    if use_tr:
        for b in range(cu.shape[0] - 1):
            start = cu[b]
            for i in range(start + 1, cu[b + 1]):
                if parents[i] >= 0 and on_path[start + parents[i]]:
                    p = tr_probs[i]
                    if p == p and not (p >= 0 and p <= 1):
                        return 1
        max_depth, bins = tr_mass.shape[0], tr_mass.shape[1]
        tr_mass *= tr_decay
        tr_hits *= tr_decay
    ret_tested *= ret_decay
    ret_accepted *= ret_decay
    use_ret = feat.shape[0] == n
    step_tested = np.zeros(ret_tested.shape)
    step_accepted = np.zeros(ret_tested.shape)
    for b in range(cu.shape[0] - 1):
        start = cu[b]
        for i in range(start, cu[b + 1]):
            if parents[i] < 0 or not on_path[start + parents[i]]:
                continue
            ok = 1.0 if on_path[i] else 0.0
            if use_tr:
                p = np.float64(tr_probs[i])
                if p == p:
                    q = min(max(math.floor(-math.log2(max(p, 1e-30))), 0), bins - 1)
                    cell = (min(max(depths[i], 1), max_depth) - 1, q)
                    tr_mass[cell] += p
                    tr_hits[cell] += ok
            if use_ret and feat[i, 0] >= 0:
                sh = share[i]
                cell3 = (_bin(feat[i, 0], depth_bins), _bin(feat[i, 1], match_bins), 0 if sh >= 1 else (1 if sh >= 0.5 else 2))
                step_tested[cell3] += 1.0
                step_accepted[cell3] += ok
    ret_tested += step_tested
    ret_accepted += step_accepted
    return 0


@njit(cache=True)
def learn_rows(adjacency, prob_bits, tokens, ids, probs, check_probs, l_own_tables, l_own_ids, l_own_probs, meta,
               slots, cu):
    """TreeDrafter.observe's rows of a step, checked first: returns 1 (a token outside the
    vocabulary), 2 (an id outside it) or 3 (with ``check_probs``: a probability that is not
    finite and >= 0), the first check that failed, before writing anything; else 0, once
    TokenRecycling.recycle_topk's rows (row ``tokens[i]`` := ``ids[i]`` and ``probs[i]`` as
    float16 bits, in node order, so a token at several nodes keeps the last one's) and, for
    trees ``b`` (slot ``slots[b]``, nodes ``cu[b]:cu[b+1]``; none without slots), the own rows
    (``own[token] := (ids[i], probs[i] as stored)``, the last node of a repeated token winning)
    are written. Own-row capacity ensured by the caller."""
    vocab = adjacency.shape[0]
    n, k = ids.shape[0], ids.shape[1]
    # The checks as flags without early exits (vectorised passes: a valid step, the common
    # case, reads every value anyway); the first failed check is reported, in this order.
    bad_token = False
    for i in range(n):
        bad_token |= (tokens[i] < 0) | (tokens[i] >= vocab)
    if bad_token:
        return 1
    bad_id = False
    for i in range(n):
        for j in range(k):
            bad_id |= (ids[i, j] < 0) | (ids[i, j] >= vocab)
    if bad_id:
        return 2
    if check_probs:
        bad_prob = False
        for i in range(n):
            for j in range(k):
                p = probs[i, j]
                bad_prob |= not ((p >= 0) & (p < np.inf))
        if bad_prob:
            return 3
    half = np.empty((n, k), np.uint16)  # every probability's fp16 bits, converted once
    for i in range(n):
        t = tokens[i]
        for j in range(k):
            half[i, j] = float_to_half(probs[i, j])
            adjacency[t, j] = ids[i, j]
            prob_bits[t, j] = half[i, j]
    for b in range(slots.shape[0]):
        s = slots[b]
        table, own_ids, own_probs = l_own_tables[s], l_own_ids[s], l_own_probs[s]
        for i in range(cu[b], cu[b + 1]):
            key = np.int64(tokens[i])
            h = _probe(table, key)
            if table[h, 0] != key:
                table[h, 0], table[h, 1] = key, meta[s, M_OWN]
                meta[s, M_OWN] += 1
            row = table[h, 1]
            for j in range(k):
                own_ids[row, j] = ids[i, j]
                own_probs[row, j] = half_to_float(half[i, j])
    return 0


@njit(cache=True)
def fill_template(l_own_tables, l_own_ids, meta, slots, roots, adjacency, parents, ranks, out):
    """``tr_static``: TokenRecycling.draft of the template (``parents``, ``ranks``) per request,
    a token's row from the request's own rows first (:func:`.reference.fill_template`); ``out`` int64 [B, n]."""
    n = parents.shape[0]
    for b in range(roots.shape[0]):
        s = slots[b]
        own_rows = meta[s, M_OWN] if s >= 0 else 0
        out[b, 0] = roots[b]
        if own_rows == 0:
            for i in range(1, n):
                out[b, i] = adjacency[out[b, parents[i]], ranks[i]]
            continue
        table, own_ids = l_own_tables[s], l_own_ids[s]  # read once per request, not per node
        for i in range(1, n):
            parent = out[b, parents[i]]
            row = _get(table, np.int64(parent))
            out[b, i] = own_ids[row, ranks[i]] if row >= 0 else adjacency[parent, ranks[i]]


# --- prompt lookup (ngram.propose_ngram) -----------------------------------------------------------


@njit(cache=True)
def prompt_lookup(flat, cu, num_draft, max_ngram, min_ngram, out_tokens, out_cu):
    """Per request the latest earlier match of its last ``max_ngram`` .. ``min_ngram`` tokens
    (longest first) and up to ``num_draft`` tokens that followed it: a chain, root first.
    ``out_tokens`` holds ``B * (num_draft + 1)``; ``out_cu`` [B + 1] the chains' offsets."""
    out_cu[0] = 0
    for b in range(cu.shape[0] - 1):
        h = flat[cu[b]:cu[b + 1]]
        length = h.shape[0]
        cont = -1
        for n in range(max_ngram, min_ngram - 1, -1):
            if length < n:
                continue
            for start in range(length - n - 1, -1, -1):  # the continuation start + n must exist
                ok = True
                for j in range(n):
                    if h[start + j] != h[length - n + j]:
                        ok = False
                        break
                if ok:
                    cont = start + n
                    break
            if cont >= 0:
                break
        num = min(length - cont, num_draft) if cont >= 0 else 0
        at = out_cu[b]
        out_tokens[at] = h[length - 1]
        for j in range(num):
            out_tokens[at + 1 + j] = h[cont + j]
        out_cu[b + 1] = at + 1 + num
