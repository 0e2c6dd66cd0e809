"""Retrieval from a request's own context: an incremental suffix automaton over its tokens.

Prompt lookup (:mod:`tkernels.spec.ngram`) proposes what followed the latest match of the last
1..3 tokens. Here every request keeps a suffix automaton (SAM) of its tokens (prompt, then every
committed token, appended as they come; amortised O(1) states and transitions per token), which
answers, at every step and in time independent of the history's length:

* the longest suffix of the history that occurred before (any length, not 1..3), and how often;
* every distinct continuation of it and how often each followed, then recursively what followed
  those: the SAM's transitions from a state are the distinct next tokens after its strings, and
  the count of the target state is how many times the extended string occurred.

:meth:`SuffixAutomaton.continuations` grows, best first, a tree of continuations of that longest
match under a caller's acceptance estimate (the hybrid drafter's calibration, see
:mod:`tkernels.spec.drafters`), so several continuations, long and short, compete for the nodes.

Counts: a state's count is the number of end positions of its strings (occurrences). Adding a
token gives the new end position to every state on the new state's suffix-link path; appending
one token walks that path (short for natural text), and a long append (a prompt) recounts every
state once in length order instead.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from tkernels.checks import integer

__all__ = ["SuffixAutomaton", "bfs_order"]

# Above this many tokens at once, extend() recounts occurrences in one pass over the states
# (O(states)) instead of walking suffix-link paths per token (O(path) each, long on repetitive text).
_BULK = 64


class SuffixAutomaton:
    """Suffix automaton of one token sequence, extended in place.

    State 0 is the empty string. Per state: ``next`` (token -> state), ``link`` (suffix link),
    ``length`` (its longest string), ``count`` (occurrences of its strings).
    """

    def __init__(self, tokens: Iterable[int] = ()):
        self.next: list[dict[int, int]] = [{}]
        self.link = [-1]
        self.length = [0]
        self.count = [0]
        self._clone = [False]
        self.last = 0
        self.tokens: list[int] = []
        self.extend(tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]) -> None:
        tokens = [int(t) for t in tokens]
        bulk = len(tokens) > _BULK
        for token in tokens:
            self._add(token, count=not bulk)
        if bulk:
            self._recount()

    def _new_state(self, length: int, link: int, nxt: dict[int, int], count: int, clone: bool) -> int:
        self.next.append(nxt)
        self.link.append(link)
        self.length.append(length)
        self.count.append(count)
        self._clone.append(clone)
        return len(self.next) - 1

    def _add(self, token: int, count: bool) -> None:
        self.tokens.append(token)
        nxt, link, length = self.next, self.link, self.length
        cur = self._new_state(length[self.last] + 1, 0, {}, 0, False)
        p = self.last
        while p != -1 and token not in nxt[p]:
            nxt[p][token] = cur
            p = link[p]
        if p != -1:
            q = nxt[p][token]
            if length[p] + 1 == length[q]:
                link[cur] = q
            else:  # q also holds longer strings: split off the suffix-of-the-new-string part
                clone = self._new_state(length[p] + 1, link[q], dict(nxt[q]), self.count[q], True)
                while p != -1 and nxt[p].get(token) == q:
                    nxt[p][token] = clone
                    p = link[p]
                link[q] = link[cur] = clone
        self.last = cur
        if count:  # the new end position is an occurrence of every suffix of the sequence
            s = cur
            while s > 0:
                self.count[s] += 1
                s = link[s]

    def _recount(self) -> None:
        """Counts from scratch: 1 per position's own state, summed up the suffix-link tree."""
        count = [0 if clone else 1 for clone in self._clone]
        count[0] = 0
        buckets: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for s in range(1, len(self.next)):
            buckets[self.length[s]].append(s)
        for states in reversed(buckets):
            for s in states:
                if self.link[s] > 0:
                    count[self.link[s]] += count[s]
        self.count = count

    def longest_match(self) -> tuple[int, int]:
        """``(state, length)`` of the longest suffix that also ended earlier (``(0, 0)``: none)."""
        state = self.link[self.last] if self.last else 0
        return max(state, 0), self.length[max(state, 0)]

    def occurrences(self, sequence: Iterable[int]) -> int:
        """How many times ``sequence`` occurs in the tokens (0 if never; the empty one: 0)."""
        state = 0
        for token in sequence:
            state = self.next[state].get(int(token), -1)
            if state < 0:
                return 0
        return self.count[state]

    def children(self, state: int, max_children: int) -> list[tuple[int, int, float, int]]:
        """What followed the strings of ``state``: at most ``max_children`` ``(token, next
        state, share, support)``, most frequent first, where ``share`` is the token's share of
        the ``support`` earlier continuations."""
        nxt = self.next[state]
        if not nxt:
            return []
        support = sum(self.count[s] for s in nxt.values())
        best = sorted(nxt.items(), key=lambda kv: -self.count[kv[1]])[:max_children]
        return [(token, child, self.count[child] / support, support) for token, child in best]

    def suffix_states(self, state: int, levels: int) -> list[tuple[int, int]]:
        """``(state, length)`` of ``state`` and up to ``levels - 1`` shorter suffix contexts
        (suffix links; the empty context excluded)."""
        out = []
        while state > 0 and len(out) < levels:
            out.append((state, self.length[state]))
            state = self.link[state]
        return out

    def continuations(
        self,
        max_nodes: int,
        accept_prob: Callable[[float, int, int, int], float] | None = None,
        max_children: int = 4,
        max_depth: int = 32,
    ) -> tuple[list[int], list[int], list[float], list[tuple[int, float, int]]]:
        """A best-first tree of what followed the longest earlier match of the sequence's suffix.

        Node 0 is the last token; a node's children are the distinct tokens that followed its
        context (the match, then the path to the node) anywhere earlier, at most ``max_children``
        (most frequent first). A child's acceptance estimate is ``accept_prob(ratio, context_len,
        support, depth)`` (default: ``ratio``), where ``ratio`` is the share of the context's
        continuations that were this token, ``context_len`` the matched context's length,
        ``support`` how many continuations the context had and ``depth`` the child's depth; a
        node's score is the product of the estimates along its path. The ``max_nodes`` (root
        included) best-scoring nodes are returned, which form a tree when estimates lie in [0, 1].

        Returns ``(tokens, parents, scores, features)``, nodes in BFS order, ``features[i] =
        (context_len, ratio, support)`` of node i (the root's ``(match length, 1.0, 0)``).
        """
        integer("max_nodes", max_nodes, minimum=1)
        integer("max_children", max_children, minimum=1)
        integer("max_depth", max_depth, minimum=1)
        state, match = self.longest_match()
        last = self.tokens[-1] if self.tokens else -1
        tokens, parents, scores, features, depth_of = [last], [-1], [1.0], [(match, 1.0, 0)], [0]
        if state == 0 or max_nodes < 2:
            return tokens, parents, scores, features
        # heap: (-score, tie, parent node, token, child state, feature)
        heap: list = []
        tie = 0

        def push_children(node: int, from_state: int, score: float, depth: int, context: int) -> None:
            nonlocal tie
            if depth >= max_depth:
                return
            for token, child, ratio, support in self.children(from_state, max_children):
                p = ratio if accept_prob is None else accept_prob(ratio, context, support, depth + 1)
                if p > 0:
                    heapq.heappush(heap, (-score * p, tie, node, token, child, (context, ratio, support)))
                    tie += 1

        push_children(0, state, 1.0, 0, match)
        while heap and len(tokens) < max_nodes:
            neg, _, parent, token, child, feature = heapq.heappop(heap)
            node = len(tokens)
            tokens.append(token)
            parents.append(parent)
            scores.append(-neg)
            features.append(feature)
            depth_of.append(depth_of[parent] + 1)
            push_children(node, child, -neg, depth_of[node], feature[0] + 1)
        layout = bfs_order(parents)
        new = {old: rank for rank, old in enumerate(layout)}
        return ([tokens[i] for i in layout], [new[parents[i]] if parents[i] >= 0 else -1 for i in layout],
                [scores[i] for i in layout], [features[i] for i in layout])


def bfs_order(parents: list[int]) -> list[int]:
    """The nodes of a tree given by ``parents`` (root 0, any parent-before-child order) in BFS
    order: parents before children, every depth contiguous and grouped by parent, siblings in
    their given order; ``parents`` renumbered by this order satisfy the tree contract."""
    for i, parent in enumerate(parents[1:], 1):
        if not 0 <= parent < i:
            raise ValueError(f"parents[{i}] = {parent} must be a node listed before it (0 <= parents[i] < i)")
    children: list[list[int]] = [[] for _ in parents]
    for i in range(1, len(parents)):
        children[parents[i]].append(i)
    order, head = [0], 0
    while head < len(order):
        order += children[order[head]]
        head += 1
    return order
