"""Token Recycling and prompt-lookup drafters against slow Python references."""

import pytest
import torch

from tkernels.spec.ngram import propose_ngram
from tkernels.spec.token_recycling import TokenRecycling, top_k_probs
from tkernels.spec.tree import chain, from_rank_paths, token_recycling_template, validate_parents


def random_shape(rng, k):
    """A random rank-labelled tree: random rank paths with all their prefixes."""
    paths = set()
    for _ in range(20):
        depth = int(torch.randint(1, 5, (1,), generator=rng))
        path = tuple(torch.randint(0, k, (depth,), generator=rng).tolist())
        paths.update(path[:i] for i in range(1, depth + 1))
    return from_rank_paths(sorted(paths))


def test_token_recycling_draft_matches_reference(rng):
    vocab, k = 50, 4
    tr = TokenRecycling(vocab, k)
    tr.adjacency = torch.randint(0, vocab, (vocab, k), generator=rng, dtype=torch.int32)
    assert tr.memory_bytes == vocab * k * (4 + 2)  # int32 ids + fp16 probabilities
    for shape in (random_shape(rng, k), chain(6), token_recycling_template().truncate(30)):
        if int(shape.ranks.max()) >= k:
            continue
        last = torch.randint(0, vocab, (3,), generator=rng)
        tokens, parents, cu_nodes = tr.draft(last, shape)
        n = len(shape)
        assert tokens.dtype == torch.int64 and tokens.shape == (3 * n,)
        assert cu_nodes.tolist() == [0, n, 2 * n, 3 * n]
        validate_parents(parents, cu_nodes)
        adj, p, r = tr.adjacency.tolist(), shape.parents.tolist(), shape.ranks.tolist()
        for b in range(3):
            ref = [int(last[b])]
            for i in range(1, n):
                ref.append(adj[ref[p[i]]][r[i]])
            assert tokens[b * n : (b + 1) * n].tolist() == ref


def test_token_recycling_update_and_ranks(rng):
    vocab, k = 40, 3
    tr = TokenRecycling(vocab, k)
    assert tr.adjacency.tolist()[7] == [0, 1, 2]  # unseen rows: valid placeholder guesses
    draft_tokens = torch.randperm(vocab, generator=rng)[:6]  # distinct rows
    logits = torch.randn(6, vocab, generator=rng)
    before = tr.adjacency.clone()
    tr.update(logits, draft_tokens)
    top = logits.topk(k).indices.int()
    assert torch.equal(tr.adjacency[draft_tokens], top)
    expected_probs = logits.softmax(-1).topk(k).values
    torch.testing.assert_close(tr.probs[draft_tokens].float(), expected_probs, atol=1e-3, rtol=1e-3)  # fp16 state
    untouched = torch.ones(vocab, dtype=torch.bool)
    untouched[draft_tokens] = False
    assert torch.equal(tr.adjacency[untouched], before[untouched])
    assert not tr.probs[untouched].any()  # unwritten rows: no confidence
    tr.recycle_topk(top[:2], draft_tokens[:2])  # ids without probabilities: confidence unknown
    assert not tr.probs[draft_tokens[:2]].any() and tr.probs[draft_tokens[2:]].all()
    # the next draft from one of those tokens follows the recycled top-k
    tokens, _, _ = tr.draft(draft_tokens[:1], from_rank_paths([(0,), (1,), (2,)]))
    assert tokens[1:].tolist() == top[0].tolist()
    ranks = tr.candidate_ranks(draft_tokens[:3], torch.stack([top[0, 2], top[1, 0], torch.tensor(-5)]))
    assert ranks.tolist() == [2, 0, -1]


def test_token_recycling_bad_inputs():
    tr = TokenRecycling(10, 2)
    with pytest.raises(ValueError, match="k"):
        tr.draft(torch.tensor([1]), from_rank_paths([(0,), (1,), (2,)]))
    with pytest.raises(ValueError, match="last_tokens"):
        tr.draft(torch.tensor([[1]]), chain(3))
    with pytest.raises(ValueError, match="logits"):
        tr.update(torch.randn(3, 11), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="draft_tokens"):
        tr.update(torch.randn(3, 10), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="k"):
        TokenRecycling(10, 11)


def ref_ngram(history: list[int], num_draft: int, max_ngram: int, min_ngram: int) -> list[int]:
    length = len(history)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length <= n:
            continue
        suffix = history[-n:]
        for start in range(length - n - 1, -1, -1):  # latest earlier occurrence first
            if history[start : start + n] == suffix:
                return history[start + n : start + n + num_draft]
    return []


@pytest.mark.parametrize("max_ngram", [1, 3])
def test_ngram_matches_reference(rng, max_ngram):
    batch, width = 6, 40
    tokens = torch.randint(0, 4, (batch, width), generator=rng)  # small vocab: many matches
    lengths = torch.tensor([40, 1, 2, 17, 5, 33])
    tokens[4, :5] = torch.tensor([1, 2, 3, 0, 9])  # no match at all for the last token 9
    draft, parents, cu_nodes = propose_ngram(tokens, lengths, num_draft=5, max_ngram=max_ngram)
    validate_parents(parents, cu_nodes)
    for b in range(batch):
        history = tokens[b, : lengths[b]].tolist()
        got = draft[cu_nodes[b] : cu_nodes[b + 1]].tolist()
        assert got == [history[-1]] + ref_ngram(history, 5, max_ngram, 1), b
        assert parents[cu_nodes[b] : cu_nodes[b + 1]].tolist() == list(range(-1, len(got) - 1))
    assert cu_nodes[5] - cu_nodes[4] == 1


def test_ngram_bad_inputs():
    with pytest.raises(ValueError, match="tokens"):
        propose_ngram(torch.zeros(3, dtype=torch.int64), torch.tensor([3]))
    with pytest.raises(ValueError, match="lengths"):
        propose_ngram(torch.zeros(2, 3, dtype=torch.int64), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="ngram"):
        propose_ngram(torch.zeros(1, 3, dtype=torch.int64), torch.tensor([3]), max_ngram=0)


def test_token_recycling_refuses_ids_outside_the_vocabulary():
    """Issue 14 item 7 (drafters): a negative token id indexed the adjacency from the end and
    top-k ids outside the vocabulary were stored, so later drafts left the vocabulary."""
    tr = TokenRecycling(10, 2)
    for bad in (-1, 10):
        with pytest.raises(ValueError, match=r"^last_tokens: .*\[0, 10\)"):
            tr.draft(torch.tensor([1, bad]), chain(3))
        with pytest.raises(ValueError, match=r"^last_tokens: .*\[0, 10\)"):
            tr.draft_best(torch.tensor([bad]), 4)
        with pytest.raises(ValueError, match=r"^draft_tokens: .*\[0, 10\)"):
            tr.update(torch.randn(2, 10), torch.tensor([1, bad]))
        with pytest.raises(ValueError, match=r"^topk_ids: .*\[0, 10\)"):
            tr.recycle_topk(torch.tensor([[1, bad]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="^topk_probs: "):
        tr.recycle_topk(torch.tensor([[1, 2]]), torch.tensor([3]), torch.tensor([[0.5, float("nan")]]))
    assert (tr.adjacency == torch.arange(2, dtype=torch.int32)).all()  # nothing was stored


_TOKENS, _LENGTHS = torch.zeros(1, 8, dtype=torch.long), torch.tensor([8])


@pytest.mark.parametrize("arg,call", [
    # issue 22: every public drafter entry point, a bad argument named first
    ("num_draft", lambda: propose_ngram(_TOKENS, _LENGTHS, num_draft=0)),
    ("num_draft", lambda: propose_ngram(_TOKENS, _LENGTHS, num_draft=2.0)),
    ("min_ngram", lambda: propose_ngram(_TOKENS, _LENGTHS, max_ngram=1, min_ngram=2)),
    ("max_ngram", lambda: propose_ngram(_TOKENS, _LENGTHS, max_ngram=0)),
    ("lengths", lambda: propose_ngram(_TOKENS, torch.tensor([8, 8]))),
    ("lengths", lambda: propose_ngram(_TOKENS, torch.tensor([9]))),
    ("lengths", lambda: propose_ngram(_TOKENS, torch.tensor([8.0]))),
    ("vocab_size", lambda: TokenRecycling(0)),
    ("vocab_size", lambda: TokenRecycling("16", 4)),
    ("k", lambda: TokenRecycling(16, 2.0)),
    ("k", lambda: TokenRecycling(16, 17)),
    ("shape", lambda: TokenRecycling(16, 4).draft(torch.tensor([1]), chain(3).parents)),
    ("last_tokens", lambda: TokenRecycling(16, 4).draft(torch.tensor([99]), chain(3))),
    ("num_nodes", lambda: TokenRecycling(16, 4).draft_best(torch.tensor([1]), 2.5)),
    ("max_depth", lambda: TokenRecycling(16, 4).draft_best(torch.tensor([1]), 4, max_depth=0)),
    ("draft_tokens", lambda: TokenRecycling(16, 4).update(torch.randn(2, 16), torch.tensor([1.0, 2.0]))),
    ("topk_ids", lambda: TokenRecycling(16, 4).recycle_topk(torch.zeros(2, 4), torch.tensor([1, 2]))),
    ("parent_tokens", lambda: TokenRecycling(16, 4).candidate_ranks(torch.tensor([99]), torch.tensor([1]))),
    ("next_tokens", lambda: TokenRecycling(16, 4).candidate_ranks(torch.tensor([1, 2]), torch.tensor([1]))),
    ("k", lambda: top_k_probs(torch.randn(3, 8), 0)),
    ("k", lambda: top_k_probs(torch.randn(3, 8), 9)),
    ("logits", lambda: top_k_probs(torch.randn(8), 2)),
])
def test_bad_inputs_name_the_argument(arg, call):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        call()
