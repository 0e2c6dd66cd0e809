"""Per-request state of the compiled drafters and the batch calls into :mod:`.kernels` / :mod:`.hybrid`.

:class:`CompiledState` gives every request (by key) a *slot*: its suffix automaton and its own
Token Recycling rows as arrays in numba typed lists (one list per field, indexed by slot; see
:mod:`.kernels` for the layouts). Slots are reused after :meth:`CompiledState.release`; a
slot's arrays grow here, on the host, before a kernel needs them (a suffix automaton of n
tokens has at most 2n - 1 states and 3n - 4 transitions), so the kernels never allocate state.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np
import torch
from numba import njit, typed, types

from tkernels.config import next_power_of_2

from ..draft_tree import offsets
from . import kernels as K

_INT32_2D = types.Array(types.int32, 2, "C")
_INT64_2D = types.Array(types.int64, 2, "C")
_INT64_1D = types.Array(types.int64, 1, "C")
_F32_2D = types.Array(types.float32, 2, "C")


@njit(cache=True)
def _rehash(old, new):
    new[:, 0] = -1
    for i in range(old.shape[0]):
        if old[i, 0] != -1:
            j = K._probe(new, old[i, 0])
            new[j, 0], new[j, 1] = old[i, 0], old[i, 1]


# The typed lists are only ever touched inside compiled code: numba compiles its own Python-side
# typed-list operations (append, item get/set, len) afresh in every process, about 2.5 s in all,
# which a server would pay at its first requests, mid-serving; these helpers are cached on disk.
@njit(cache=True)
def _new_lists():
    return (typed.List.empty_list(_INT32_2D), typed.List.empty_list(_INT32_2D), typed.List.empty_list(_INT64_2D),
            typed.List.empty_list(_INT64_1D), typed.List.empty_list(_INT64_2D), typed.List.empty_list(_INT32_2D),
            typed.List.empty_list(_F32_2D))


@njit(cache=True)
def _add_slot(states, edges, tables, tokens, own_tables, own_ids, own_probs, k):
    states.append(np.zeros((2, 6), np.int32))
    edges.append(np.zeros((4, 3), np.int32))
    tables.append(np.full((8, 2), -1, np.int64))
    tokens.append(np.zeros(1, np.int64))
    own_tables.append(np.full((16, 2), -1, np.int64))
    own_ids.append(np.zeros((8, k), np.int32))
    own_probs.append(np.zeros((8, k), np.float32))


@njit(cache=True)
def _clear_table(tables, s):
    tables[s][:, 0] = -1


@njit(cache=True)
def _grow_rows(arrays, s, rows):
    """``arrays[s]`` (2-D) grown to ``rows`` rows, zero-filled."""
    old = arrays[s]
    new = np.zeros((rows, old.shape[1]), old.dtype)
    new[:old.shape[0]] = old
    arrays[s] = new


@njit(cache=True)
def _grow_vector(arrays, s, n):
    old = arrays[s]
    new = np.zeros(n, old.dtype)
    new[:old.shape[0]] = old
    arrays[s] = new


@njit(cache=True)
def _grow_table(tables, s, rows):
    """``tables[s]`` rehashed into ``rows`` (a power of two) rows."""
    new = np.empty((rows, 2), np.int64)
    _rehash(tables[s], new)
    tables[s] = new


@njit(cache=True)
def _item(arrays, s):
    return arrays[s]


def _grown(array: np.ndarray, rows: int, fill: int = 0) -> np.ndarray:
    out = np.full((rows,) + array.shape[1:], fill, dtype=array.dtype)
    out[:array.shape[0]] = array
    return out


def flatten(histories: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Histories (lists, 1-D tensors or arrays) as one int64 array and offsets ``cu`` [B + 1]."""
    arrays = [h if isinstance(h, np.ndarray) else h.numpy() if isinstance(h, torch.Tensor) else np.asarray(h, np.int64)
              for h in histories]
    cu = offsets([a.shape[0] for a in arrays])
    return np.concatenate(arrays, dtype=np.int64, casting="unsafe"), cu  # astype while copying (one pass)


class Features(Sequence):
    """:attr:`DraftTree.retrieval` of a compiled draft, read lazily from its arrays: per node
    ``(depth, match length, share)`` or None (not proposed by retrieval)."""

    __slots__ = ("feat", "share")

    def __init__(self, feat: np.ndarray, share: np.ndarray):
        self.feat, self.share = feat, share

    def __len__(self) -> int:
        return self.share.shape[0]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        depth = int(self.feat[i, 0])
        return None if depth < 0 else (depth, int(self.feat[i, 1]), float(self.share[i]))

    def tolist(self) -> list[tuple[int, int, float] | None]:
        """Every node's features at once (array reads, not one ``__getitem__`` per node)."""
        depth, match, share = self.feat[:, 0].tolist(), self.feat[:, 1].tolist(), self.share.tolist()
        return [None if d < 0 else (d, m, s) for d, m, s in zip(depth, match, share)]

    def take(self, nodes: np.ndarray) -> Features:
        """The features of ``nodes`` (int indices), still a lazy view (:meth:`DraftTree.select`)."""
        return Features(self.feat[nodes], self.share[nodes])

    def arrays(self, nodes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The features of those of ``nodes`` that retrieval proposed, float64 ``[m, 3]`` (depth,
        match length, share: :meth:`RetrievalCalibration.record`'s rows), and which those are
        (bool mask over ``nodes``)."""
        feat, share = self.feat[nodes], self.share[nodes]
        proposed = feat[:, 0] >= 0
        return np.column_stack([feat[proposed].astype(np.float64), share[proposed]]), proposed

    def slice(self, start: int, stop: int) -> Features:
        """Nodes ``start:stop`` (a view: one tree of a :class:`~tkernels.spec.draft_tree.DraftBatch`)."""
        return Features(self.feat[start:stop], self.share[start:stop])

    @classmethod
    def cat(cls, parts: Sequence) -> Features:
        """Several trees' features as one view; a part that is a list (a tree without retrieval:
        ``[None] * n``, or a reference draft's tuples) is converted."""
        feats, shares = [], []
        for part in parts:
            if not isinstance(part, Features):
                part = cls(np.array([(-1, 0) if f is None else f[:2] for f in part], np.int64).reshape(-1, 2),
                           np.array([0.0 if f is None else f[2] for f in part], np.float64))
            feats.append(part.feat)
            shares.append(part.share)
        return cls(np.concatenate(feats), np.concatenate(shares))

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __repr__(self) -> str:
        return repr(list(self))


class CompiledState:
    """Slots of per-request state for the compiled drafters (module doc); ``k`` the adjacency's width."""

    def __init__(self, k: int):
        self.k = k
        self.slots: dict[Hashable, int] = {}
        self.free: list[int] = []
        self.meta = np.zeros((8, 8), np.int64)
        self.capacity = np.zeros(8, np.int64)  # tokens a slot's automaton has room for
        self.own_capacity = np.zeros(8, np.int64)  # own rows a slot has room for (not read from the typed lists)
        self.num_slots = 0
        self._last: tuple[list, np.ndarray] | None = None  # slots_of's last keys and their slots
        (self.states, self.edges, self.tables, self.tokens, self.own_tables, self.own_ids,
         self.own_probs) = _new_lists()

    def slot(self, key: Hashable) -> int:
        s = self.slots.get(key)
        if s is not None:
            return s
        if self.free:
            s = self.free.pop()
        else:
            s = self.num_slots
            self.num_slots += 1
            if s >= self.meta.shape[0]:
                self.meta = _grown(self.meta, 2 * s)
                self.capacity = _grown(self.capacity, 2 * s)
                self.own_capacity = _grown(self.own_capacity, 2 * s)
            _add_slot(self.states, self.edges, self.tables, self.tokens, self.own_tables, self.own_ids, self.own_probs,
                      self.k)
            self.own_capacity[s] = 8
        self.meta[s] = 0  # no automaton yet (0 states): the next sync builds it
        _clear_table(self.own_tables, s)
        self.slots[key] = s
        return s

    def slots_of(self, keys: Sequence[Hashable]) -> np.ndarray:
        """The slots of ``keys`` (new keys get one), int64 [len(keys)]. A server's step asks for
        the same keys twice or more (learning, then drafting, step after step): the last list's
        slots are kept until a release (the only change of a kept key's slot)."""
        last = self._last
        if last is not None and isinstance(keys, list) and last[0] == keys:
            return last[1]
        slots = np.fromiter((self.slot(key) for key in keys), np.int64, len(keys))
        self._last = (list(keys), slots) if isinstance(keys, list) else None
        return slots

    def release(self, key: Hashable) -> None:
        s = self.slots.pop(key, None)
        if s is not None:
            self._last = None
            self.meta[s] = 0
            self.free.append(s)

    # --- suffix automata --------------------------------------------------------------------------

    def _grow_context(self, s: int, n: int) -> None:
        n = max(n, 2 * int(self.capacity[s]))  # doubling: amortised O(1) per token
        _grow_rows(self.states, s, 2 * n + 2)
        _grow_rows(self.edges, s, 3 * n + 4)
        _grow_vector(self.tokens, s, n)
        _grow_table(self.tables, s, next_power_of_2(2 * (3 * n + 4)))
        self.capacity[s] = n

    def sync_contexts(self, slots: np.ndarray, flat: np.ndarray, cu: np.ndarray, vocab: int) -> bool:
        """Every request's automaton holds its history (TreeDrafter._context); False, and nothing
        synced, when a token of the histories lies outside ``[0, vocab)``."""
        for b in np.flatnonzero(np.diff(cu) > self.capacity[slots]).tolist():
            self._grow_context(int(slots[b]), int(cu[b + 1] - cu[b]))
        return K.sync_contexts(self.states, self.edges, self.tables, self.tokens, self.meta, slots, flat, cu, vocab) == 0

    def context_tokens(self, key: Hashable) -> list[int]:
        """The tokens a request's automaton holds (tests)."""
        s = self.slots[key]
        return _item(self.tokens, s)[:self.meta[s, K.M_TOKENS]].tolist()

    # --- own rows ---------------------------------------------------------------------------------

    def own_room(self, keys: Sequence[Hashable], sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Room in the own rows of ``keys``' slots for one step of trees of ``sizes`` nodes (a
        row per node at most; a slot's tables grown here, on the host, before the kernel
        writes); returns the trees' slots and node offsets, :func:`.kernels.learn_rows`' own-row
        arguments."""
        slots = self.slots_of(keys)
        sizes = np.asarray(sizes, np.int64)
        # Several trees may share a slot (one request's trees, or trees without a key), so the
        # room is counted per slot over all of them: a table filled past its size would make
        # the kernel's probe loop forever.
        needs = np.empty(slots.shape[0], np.int64)
        if K.own_rows_needed(self.meta, self.own_capacity, slots, sizes, needs):
            for b in np.flatnonzero(needs).tolist():
                s = int(slots[b])
                if needs[b] <= self.own_capacity[s]:  # grown already (a shared slot)
                    continue
                rows = max(int(needs[b]), 2 * int(self.own_capacity[s]))
                _grow_rows(self.own_ids, s, rows)
                _grow_rows(self.own_probs, s, rows)
                _grow_table(self.own_tables, s, next_power_of_2(2 * rows))
                self.own_capacity[s] = rows
        return slots, offsets(sizes)

    def own_row(self, key: Hashable, token: int) -> tuple[list[int], list[float]] | None:
        """A request's own row of ``token`` (tests)."""
        s = self.slots.get(key)
        if s is None or self.meta[s, K.M_OWN] == 0:
            return None
        row = K._get(_item(self.own_tables, s), np.int64(token))
        return None if row < 0 else (_item(self.own_ids, s)[row].tolist(), _item(self.own_probs, s)[row].tolist())
