"""The suffix automaton against brute force: longest earlier match, occurrence counts, continuation trees."""

import random
from collections import Counter

import pytest
import torch

from tkernels.spec import validate_parents
from tkernels.spec.retrieval import SuffixAutomaton, bfs_order


def brute_count(tokens: list[int], sequence: list[int]) -> int:
    m = len(sequence)
    return sum(tokens[i:i + m] == sequence for i in range(len(tokens) - m + 1)) if m else 0


def brute_longest_match(tokens: list[int]) -> int:
    """Longest suffix that also ends at an earlier position."""
    n = len(tokens)
    best = 0
    for end in range(1, n):  # an occurrence ending just before position `end`
        m = 0
        while m < end and tokens[end - 1 - m] == tokens[n - 1 - m]:
            m += 1
        best = max(best, m)
    return best


def brute_followers(tokens: list[int], context: list[int]) -> Counter:
    m = len(context)
    return Counter(tokens[i + m] for i in range(len(tokens) - m) if tokens[i:i + m] == context)


def random_tokens(rng: random.Random, n: int, alphabet: int) -> list[int]:
    tokens = [rng.randrange(alphabet) for _ in range(n)]
    for _ in range(n // 8):  # copy spans, as answers quote their prompts
        start, length = rng.randrange(n), rng.randrange(2, 12)
        at = rng.randrange(n)
        tokens[at:at] = tokens[start:start + length]
    return tokens[:n]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bulk", [False, True])
def test_matches_and_counts_equal_brute_force_at_every_length(seed, bulk):
    rng = random.Random(seed)
    tokens = random_tokens(rng, 150, alphabet=[2, 3, 5, 20][seed % 4])
    sam = SuffixAutomaton(tokens[:100] if bulk else ())  # a long prompt at once, then one at a time
    for n in range(len(sam) + 1, len(tokens) + 1):
        sam.extend(tokens[n - 1:n])
        prefix = tokens[:n]
        state, length = sam.longest_match()
        assert length == brute_longest_match(prefix), n
        assert (state == 0) == (length == 0)
        if length:
            assert sam.count[state] == brute_count(prefix, prefix[n - length:]) >= 2
    for _ in range(200):
        start, m = rng.randrange(len(tokens)), rng.randrange(1, 6)
        sequence = tokens[start:start + m] if rng.random() < 0.7 else [rng.randrange(25) for _ in range(m)]
        assert sam.occurrences(sequence) == brute_count(tokens, sequence)


def test_bulk_and_incremental_counts_agree():
    tokens = random_tokens(random.Random(7), 400, alphabet=4)
    one_by_one = SuffixAutomaton()
    for t in tokens:
        one_by_one.extend([t])
    assert SuffixAutomaton(tokens).count == one_by_one.count


def _check_tree(tokens, parents, scores, features, history, max_nodes, max_children, accept_prob):
    validate_parents(torch.tensor(parents, dtype=torch.int32))
    assert len(tokens) <= max_nodes and tokens[0] == history[-1]
    match = brute_longest_match(history)
    context = {0: history[len(history) - match:]}  # node -> the context its children continue
    for i in range(1, len(tokens)):
        ctx = context[parents[i]]
        followers = brute_followers(history, ctx)
        top = sorted(followers.values(), reverse=True)[:max_children]
        ratio = followers[tokens[i]] / sum(followers.values())
        assert followers[tokens[i]] >= top[-1]  # among the most frequent
        depth = len(ctx) - match + 1
        assert features[i] == (len(ctx), pytest.approx(ratio), sum(followers.values()))
        assert scores[i] == pytest.approx(scores[parents[i]] * accept_prob(ratio, len(ctx), sum(followers.values()), depth))
        context[i] = ctx + [tokens[i]]
    siblings = Counter((parents[i], tokens[i]) for i in range(1, len(tokens)))
    assert max(siblings.values(), default=1) == 1  # distinct tokens under every node


def _brute_best_scores(history, max_nodes, max_children, accept_prob, max_depth):
    """Scores of the best ``max_nodes`` nodes of the whole continuation trie (exhaustive)."""
    match = brute_longest_match(history)
    if not match:
        return [1.0]
    out, stack = [1.0], [(history[len(history) - match:], 1.0, 0)]
    while stack:
        ctx, score, depth = stack.pop()
        if depth >= max_depth:
            continue
        followers = brute_followers(history, ctx)
        total = sum(followers.values())
        for token, c in sorted(followers.items(), key=lambda kv: -kv[1])[:max_children]:
            s = score * accept_prob(c / total, len(ctx), total, depth + 1)
            out.append(s)
            stack.append((ctx + [token], s, depth + 1))
    return sorted(out, reverse=True)[:max_nodes]


@pytest.mark.parametrize("seed", range(8))
def test_continuations_are_the_best_nodes_of_the_continuation_trie(seed):
    rng = random.Random(100 + seed)
    history = random_tokens(rng, rng.randrange(20, 120), alphabet=[3, 4, 8][seed % 3])
    sam = SuffixAutomaton(history)
    max_children = [1, 2, 4][seed % 3]

    def accept_prob(ratio, context_len, support, depth):
        return ratio * min(1.0, 0.4 + 0.1 * context_len) * (0.97 ** depth)

    for max_nodes in (1, 2, 9, 40):
        tree = sam.continuations(max_nodes, accept_prob, max_children=max_children, max_depth=6)
        _check_tree(*tree, history, max_nodes, max_children, accept_prob)
        best = _brute_best_scores(history, max_nodes, max_children, accept_prob, max_depth=6)
        # ties between equal-score nodes may pick different ones: compare the score multisets
        assert sorted(tree[2], reverse=True) == pytest.approx(best)


def test_no_earlier_match_gives_the_root_only():
    sam = SuffixAutomaton([1, 2, 3, 4])
    assert sam.longest_match() == (0, 0)
    assert sam.continuations(8) == ([4], [-1], [1.0], [(0, 1.0, 0)])
    assert SuffixAutomaton().continuations(8)[0] == [-1]


def test_copy_from_the_prompt_is_proposed_as_a_chain():
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    sam = SuffixAutomaton(prompt + [1, 2, 5, 6, 7])  # the answer starts quoting the prompt
    tokens, parents, scores, _ = sam.continuations(8)
    assert tokens == [7, 8, 9, 10, 11, 12, 13, 1] and parents == list(range(-1, 7))
    assert scores == [1.0] * 8  # one occurrence, one continuation: ratio 1 everywhere


def test_bfs_order_renumbers_into_the_tree_contract():
    parents = [-1, 0, 1, 0, 2, 1, 3]  # parent before child, but not BFS
    order = bfs_order(parents)
    new = {old: i for i, old in enumerate(order)}
    renumbered = [-1] + [new[parents[old]] for old in order[1:]]
    validate_parents(torch.tensor(renumbered, dtype=torch.int32))
    assert order == [0, 1, 3, 2, 5, 6, 4]
