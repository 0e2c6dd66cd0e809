"""The compiled pass of :func:`tkernels.spec.verify.check_trees` (numba, ``cache=True``, one host
thread): a batch of host trees validated and described in one loop (:func:`tree_tables`).

A serving step checks its trees once on the host (64 trees of 32 nodes): as torch ops on such
small arrays (``spec.tree.validate_parents``, then the sizes and the children table) that cost
~0.1-0.25 ms of host time, nearly all of it per-op overhead; as one compiled loop, a few
microseconds. :func:`tkernels.spec.verify.inputs.check_trees_reference` keeps the plain-PyTorch
derivation, and ``tests/test_spec_verify.py`` asserts that both agree (tables, sizes and the
errors) on random valid and invalid ragged batches. An invalid batch is only detected here: the
caller raises the contract's error with the torch validation (one wording, ``validate_parents``').

Imported lazily by :mod:`tkernels.spec.verify.inputs` (on the first ``check_trees``), so
importing tkernels does not load numba.
"""

from __future__ import annotations

import numpy as np

from tkernels.jit import njit

__all__ = ["tree_tables"]


@njit(cache=True)
def tree_tables(parents, cu):
    """``parents`` (local, int32/int64 [n]) and ``cu`` (int32/int64 [B + 1]) of a ragged batch of
    trees -> ``(valid, width, max_nodes, max_children, children)``.

    ``valid``: ``cu`` starts at 0, ends at n and increases strictly, and every tree passes
    ``validate_parents``' test (node 0's parent -1, then ``0 <= parents[i] < i``, non-decreasing
    from node 1); only then are the rest meaningful: ``width`` the largest depth + 1,
    ``max_nodes`` the largest tree, ``max_children`` the most children of a node and
    ``children`` int32 [2, n]: every node's first child (global index; n where it has none) and
    its number of children (BFS order: a node's children are the run from its first child).
    """
    n = parents.shape[0]
    B = cu.shape[0] - 1
    children = np.empty((2, n), np.int32)
    depth = np.empty(n, np.int64)
    if n == 0 or B < 1 or cu[0] != 0 or cu[B] != n:
        return False, 0, 0, 0, children
    width = 1
    max_nodes = 0
    max_children = 0
    for b in range(B):
        s = cu[b]
        e = cu[b + 1]
        if e <= s:
            return False, 0, 0, 0, children
        max_nodes = max(max_nodes, e - s)
        for i in range(s, e):
            children[0, i] = n
            children[1, i] = 0
        if parents[s] != -1:
            return False, 0, 0, 0, children
        depth[s] = 0
        for i in range(s + 1, e):
            p = parents[i]
            local = i - s
            if p < 0 or p >= local or (local >= 2 and p < parents[i - 1]):
                return False, 0, 0, 0, children
            g = s + p
            if children[1, g] == 0:
                children[0, g] = i
            children[1, g] += 1
            max_children = max(max_children, children[1, g])
            d = depth[g] + 1
            depth[i] = d
            width = max(width, d + 1)
    return True, width, max_nodes, max_children, children
