"""TokenRecyclingProposer: the recycling bookkeeping without an engine, then inside vLLM."""

import itertools
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

VOCAB, K = 64, 3


class FakeTarget:
    """Stands in for the target model: ``compute_logits`` returns the rows it is given."""

    def compute_logits(self, hidden_states):
        return hidden_states


def make_proposer(max_model_len=256):
    from tkernels.plugins.vllm.proposer import TokenRecyclingProposer

    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=K),
        model_config=SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: VOCAB),
    )
    proposer = TokenRecyclingProposer(config)
    target = FakeTarget()
    proposer.load_model(target)
    return proposer, target


def logits_preferring(tokens, rng):
    """One logits row per entry, whose argmax is that entry (rest random, below it)."""
    rows = torch.rand(len(tokens), VOCAB, generator=rng)
    rows[torch.arange(len(tokens)), torch.tensor(tokens)] = 2.0
    return rows


class Batch:
    """vLLM's persistent-batch arrays as the model runner hands them to ``propose``."""

    def __init__(self, prompts):
        self.token_ids = np.zeros((len(prompts), 256), dtype=np.int32)
        self.num_tokens = np.array([len(p) for p in prompts])
        for i, p in enumerate(prompts):
            self.token_ids[i, : len(p)] = p

    def commit(self, sampled):
        for i, s in enumerate(sampled):
            n = self.num_tokens[i]
            self.token_ids[i, n : n + len(s)] = s
            self.num_tokens[i] += len(s)


def step(proposer, target, batch, sampled, next_tokens, rng):
    """One engine step: the target's logits rows (argmax = ``next_tokens``), bookkeeping, propose."""
    target.compute_logits(logits_preferring(list(itertools.chain.from_iterable(next_tokens)), rng))
    batch.commit(sampled)
    return proposer.propose(sampled, batch.num_tokens.copy(), batch.token_ids)


def test_drafts_follow_recycled_rows_and_stop_at_unwritten_ones(rng):
    proposer, target = make_proposer()
    batch = Batch([[1, 2]])
    # The target says 2 -> 5 (prefill row), then 5 -> 6, 6 -> 7: one verified row per step.
    assert step(proposer, target, batch, [[5]], [[5]], rng) == [[]]  # row 5 unwritten: no draft
    assert step(proposer, target, batch, [[6]], [[6]], rng) == [[]]
    assert step(proposer, target, batch, [[7]], [[7]], rng) == [[]]
    # A new request (a fresh batch row) reaching token 5 drafts the chain learned above, up to
    # the unwritten row 7.
    assert step(proposer, target, Batch([[9]]), [[5]], [[5]], rng) == [[6, 7]]
    assert proposer.stats["skipped_steps"] == 0
    assert proposer.drafter.adjacency[2, 0] == 5 and proposer.drafter.adjacency[6, 0] == 7


def test_every_verified_position_is_recycled_including_rejected_drafts(rng):
    proposer, target = make_proposer()
    batch = Batch([[3], [40, 41]])
    # Rows 4 -> 8 -> 12 -> 16 as if recycled earlier: after token 4, request 0 drafts [8, 12, 16].
    for a, b in ((4, 8), (8, 12), (12, 16)):
        proposer.drafter.adjacency[a, 0] = b
        proposer.tree_drafter.dynamic.recycled[a] = True
    drafts = step(proposer, target, batch, [[4], [42]], [[4], [42]], rng)
    assert drafts[0] == [8, 12, 16]
    # Verify: row 0 owns 1 + 3 logits rows (4, 8, 12, 16), row 1 owns 1 (+ its drafts, if any).
    d1 = drafts[1]
    target_next = [[8, 12, 30, 31], [43] + [50] * len(d1)]  # accepts 8, 12; the target says 30 after 12
    sampled = [[8, 12, 30], [43]]
    step(proposer, target, batch, sampled, target_next, rng)
    adjacency = proposer.drafter.adjacency
    assert adjacency[4, 0] == 8 and adjacency[8, 0] == 12 and adjacency[12, 0] == 30
    assert adjacency[16, 0] == 31  # the last, rejected draft's row was recycled too
    assert adjacency[42, 0] == 43
    assert proposer.stats["skipped_steps"] == 0


def test_step_whose_rows_do_not_add_up_is_skipped_not_guessed(rng):
    proposer, target = make_proposer()
    batch = Batch([[3]])
    step(proposer, target, batch, [[4]], [[4]], rng)
    before = proposer.drafter.adjacency.clone()
    target.compute_logits(logits_preferring([1, 2, 3], rng))  # 3 rows for a batch that owns 1
    batch.commit([[9]])
    proposer.propose([[9]], batch.num_tokens.copy(), batch.token_ids)
    assert proposer.stats["skipped_steps"] == 1
    assert torch.equal(proposer.drafter.adjacency, before)


def test_rows_with_nothing_sampled_get_no_draft_and_drafts_respect_max_model_len(rng):
    proposer, target = make_proposer(max_model_len=5)
    batch = Batch([[1, 2], [7]])
    proposer.drafter.adjacency[5, 0] = 6
    proposer.drafter.adjacency[6, 0] = 7
    proposer.tree_drafter.dynamic.recycled[[5, 6]] = True
    drafts = step(proposer, target, batch, [[5], []], [[5], [8]], rng)
    assert drafts == [[6], []]  # 3 tokens + 1 draft + its bonus fill max_model_len 5; row 1 is mid-prefill


def test_logits_of_another_vocabulary_are_a_clear_error(rng):
    _proposer, target = make_proposer()
    with pytest.raises(ValueError, match=f"logits have {VOCAB + 1} columns"):
        target.compute_logits(torch.rand(2, VOCAB + 1, generator=rng))


def test_draft_tree_has_the_requested_depth():
    from tkernels.plugins.vllm.proposer import draft_tree
    from tkernels.spec import depths, token_recycling_template

    for depth in (1, 3, 8, 12):
        assert int(depths(draft_tree(depth).parents).max()) == depth
    assert torch.equal(draft_tree(8).parents, token_recycling_template().parents)
    with pytest.raises(ValueError, match="depth"):
        draft_tree(0)


def test_draft_tree_widens_for_budgets_past_the_template():
    from tkernels.plugins.vllm.proposer import TOP_K, draft_tree
    from tkernels.spec import depths

    assert torch.equal(draft_tree(63, 128).parents, draft_tree(63).parents)  # 135 nodes: the template + a chain
    for depth in (64, 100, 127, 255):
        shape = draft_tree(depth, 2 * (depth + 1))
        assert len(shape) >= 2 * (depth + 1) and int(depths(shape.parents).max()) == depth
        assert int(shape.ranks.max()) < TOP_K  # candidate ranks stay inside the adjacency's k columns


# --- inside vLLM ------------------------------------------------------------------------------


def _bench(method: str, rounds: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "tkernels.cli.speculation_bench", "--method", method, "--raw",
         "--model", "smollm2", "--questions", "2", "--max-tokens", "32", "--num-spec-tokens", "4",
         "--rounds", str(rounds)],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_token_recycling_in_vllm_is_lossless_and_accepts_drafts():
    from tkernels.models import smollm2_dir

    smollm2_dir()  # build before two engines race for it
    # TR runs the 2 questions twice on one engine: the adjacency is kept across requests (round
    # 1 is the cold start, and 32 tokens are few to learn from), so round 2 finds recycled drafts.
    with ThreadPoolExecutor(2) as pool:
        plain, tr = pool.map(_bench, ["none", "tr"], [1, 2])
    assert [len(t) for t in plain["token_ids"]] == [32, 32]
    assert tr["token_ids"] == plain["token_ids"] * 2  # greedy outputs identical, every request
    assert sum(plain["steps"]) == 64  # no speculation: one token per step
    mat = sum(map(len, tr["token_ids"])) / sum(tr["steps"])
    assert mat > 1.0 and tr["counters"]["spec_decode_num_accepted_tokens"] > 0
