"""Token Recycling drafts and tkernels verification in SGLang's NGRAM contracts (no engine, no GPU).

SGLang's own Triton kernels (interpreter on CPU) are the judges: ``reconstruct_indices_from_tree_mask``
must accept the drafter's tokens/masks, and ``verify_tree_greedy`` (its Triton version; the CUDA
op and the CPU sgl_kernel op are not available here) on the links it builds must accept the same
paths as the plugin's ``eagle_sample`` hook, which must also equal tkernels' reference.
"""

from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch

pytestmark = pytest.mark.sglang

VOCAB, NODES = 40, 8


@pytest.fixture(scope="module")
def sg():
    from sglang.kernels.ops.speculative.reconstruct_tree import reconstruct_indices_from_tree_mask_triton
    from sglang.kernels.ops.speculative.spec_tree import verify_tree_greedy_triton
    from sglang.srt.speculative.ngram_info import NgramVerifyInput
    from sglang.srt.speculative.ngram_worker import NGRAMWorker, _derive_tree_links

    from tkernels.plugins.sglang import drafter, verify

    return SimpleNamespace(reconstruct=reconstruct_indices_from_tree_mask_triton, verify_greedy=verify_tree_greedy_triton,
                           NgramVerifyInput=NgramVerifyInput, NGRAMWorker=NGRAMWorker, derive_links=_derive_tree_links,
                           drafter=drafter, verify=verify)


def trained_drafter(sg, rng, num_nodes=NODES):
    """A drafter whose adjacency has seen one verify step's logits at every token."""
    tree = sg.drafter.NgramDrafter(VOCAB, num_nodes)
    tree.recycling.update(torch.randn(VOCAB, VOCAB, generator=rng), torch.randperm(VOCAB, generator=rng))
    return tree


def sglang_links(sg, mask, seq_lens, bs, n):
    """SGLang's verify metadata from a tree mask: positions, retrieve_index/next_token/next_sibling."""
    out = [torch.full((bs * n,), -7, dtype=torch.int64) for _ in range(4)]
    sg.reconstruct(mask, seq_lens, *out, bs, n)
    return out


@pytest.mark.parametrize("n", [NODES, 100, 256])
@pytest.mark.parametrize("bs", [1, 3])
def test_drafts_are_accepted_by_sglang_reconstruct(sg, rng, bs, n):
    from tkernels.spec import depths

    tree = trained_drafter(sg, rng, n)
    last = torch.randint(VOCAB, (bs,), generator=rng)
    tokens, mask, parents = tree.draft(last)
    assert tokens.dtype == torch.int64 and tokens.shape == (bs * n,)
    assert mask.dtype == torch.bool and mask.shape == (bs * n * n,)
    assert torch.equal(tokens.view(bs, n)[:, 0], last)
    shape = tree.shape()
    for b in range(bs):  # node i = adjacency[token of parent, rank]
        row = tokens.view(bs, n)[b]
        assert torch.equal(row[1:], tree.recycling.adjacency[row[shape.parents[1:].long()], shape.ranks[1:].long()].long())

    seq_lens = torch.randint(5, 50, (bs,), generator=rng)
    positions, retrieve_index, next_token, next_sibling = sglang_links(sg, mask, seq_lens, bs, n)
    local = parents.view(bs, n)
    assert torch.equal(positions.view(bs, n), seq_lens[:, None] + depths(local[0]).long())
    assert torch.equal(retrieve_index, torch.arange(bs * n))
    host_next, host_sibling = sg.derive_links(mask.numpy(), bs, n)  # NGRAM's host-side links agree
    assert torch.equal(next_token.view(bs, n), host_next) and torch.equal(next_sibling.view(bs, n), host_sibling)
    for b in range(bs):  # links walk exactly the drafted tree
        for i in range(n):
            children = (local[b] == i).nonzero().flatten().tolist()
            assert next_token.view(bs, n)[b, i] == (children[0] if children else -1)


def test_worker_prepares_ngram_format_from_last_tokens(sg, rng):
    worker = object.__new__(sg.drafter.TokenRecyclingWorker)  # the drafting methods need no model
    worker.drafter, worker.enable_overlap = trained_drafter(sg, rng), False
    reqs = [SimpleNamespace(output_ids=[3, 17], origin_input_ids_unpadded=[1, 2]),
            SimpleNamespace(output_ids=[], origin_input_ids_unpadded=[5, 9])]
    batch = SimpleNamespace(reqs=reqs, grammar_needs_sync=lambda: False)
    tokens, mask = worker._prepare_draft_tokens(batch)
    assert tokens.shape == (2 * NODES,) and mask.shape == (2 * NODES * NODES,)
    assert (tokens[0], tokens[NODES]) == (17, 9)
    assert torch.equal(worker.draft_parents[:NODES], worker.drafter.shape().parents)


def test_worker_takes_the_last_accepted_token_under_overlap(sg, rng):
    worker = object.__new__(sg.drafter.TokenRecyclingWorker)
    worker.enable_overlap = True
    reqs = [SimpleNamespace(output_ids=[3], origin_input_ids_unpadded=[1])] * 2
    spec_info = SimpleNamespace(accept_tokens=torch.tensor([7, 8, 0, 0, 4, 0, 0, 0]), accept_lens=torch.tensor([2, 0]))
    batch = SimpleNamespace(reqs=reqs, grammar_needs_sync=lambda: False, spec_info=spec_info)
    assert sg.drafter.last_committed_tokens(worker, batch) == [8, 3]


def test_create_worker_hook_swaps_only_ngram(sg):
    assert sg.drafter.replace_ngram_worker(sg.NGRAMWorker) is sg.drafter.TokenRecyclingWorker
    assert sg.drafter.replace_ngram_worker(int) is int


def verify_case(sg, rng, bs, n=NODES):
    """Drafts, their verify input and target logits whose argmax follows some draft paths."""
    tree = trained_drafter(sg, rng, n)
    tokens, mask, parents = tree.draft(torch.randint(VOCAB, (bs,), generator=rng))
    logits = torch.randn(bs * n, VOCAB, generator=rng)
    local = parents.view(bs, n)
    for b in range(bs):  # at random nodes, make the target pick one of the node's children
        for i in range(n):
            children = (local[b] == i).nonzero().flatten()
            if children.numel() and (i == 0 or torch.rand((), generator=rng) < 0.7):  # root: always
                child = children[torch.randint(children.numel(), (), generator=rng)]
                logits[b * n + i, tokens[b * n + child]] += 10.0
    positions, retrieve_index, next_token, next_sibling = sglang_links(sg, mask, torch.full((bs,), 9), bs, n)
    verify_input = sg.NgramVerifyInput(draft_token=tokens, custom_mask=mask, positions=positions,
                                       retrieve_index=retrieve_index.view(bs, n), retrieve_next_token=next_token.view(bs, n),
                                       retrieve_next_sibling=next_sibling.view(bs, n), draft_token_num=n)
    verify_input.tkernels_drafter, verify_input.tkernels_parents = tree, parents
    return tree, verify_input, logits


def sampling_info(bs, greedy=True, **overrides):
    fields = dict(is_all_greedy=greedy, acc_additive_penalties=None, acc_scaling_penalties=None, logit_bias=None,
                  has_watermark_candidates=False, temperatures=torch.full((bs, 1), 0.7),
                  top_ks=torch.full((bs,), 1 if greedy else 1 << 30, dtype=torch.int32), top_ps=torch.ones(bs))
    return SimpleNamespace(**{**fields, **overrides})


def sglang_greedy(sg, verify_input, logits, bs, n):
    predict = torch.zeros(bs * n, dtype=torch.int32)
    accept_index = torch.full((bs, verify_input.max_tree_depth), -1, dtype=torch.int32)
    num_correct = torch.empty(bs, dtype=torch.int32)
    sg.verify_greedy(predict, accept_index, num_correct, verify_input.draft_token.view(bs, n), verify_input.retrieve_index,
                     verify_input.retrieve_next_token, verify_input.retrieve_next_sibling, logits.argmax(-1).view(bs, n))
    return predict, num_correct + 1, accept_index


@pytest.mark.parametrize("n", [NODES, 100, 256])
@pytest.mark.parametrize("bs", [1, 4])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampling_top_k1"])
def test_eagle_sample_hook_matches_sglang_and_reference(sg, rng, bs, greedy, n):
    from tkernels.spec.verify import verify_greedy_reference

    _tree, verify_input, logits = verify_case(sg, rng, bs, n)
    # sampling with top_k = 1 is greedy whatever the temperature: same answer, through verify_sampling
    info = sampling_info(bs, greedy=greedy, top_ks=torch.ones(bs, dtype=torch.int32))
    batch = SimpleNamespace(sampling_info=info)
    original = MagicMock()
    predict, accept_lens, accept_index = sg.verify.eagle_sample(
        original, verify_input, batch, SimpleNamespace(next_token_logits=logits.clone()))
    original.assert_not_called()
    assert (predict.dtype, accept_lens.dtype, accept_index.dtype) == (torch.int32,) * 3
    assert accept_index.shape == (bs, n)

    want_predict, want_lens, want_index = sglang_greedy(sg, verify_input, logits, bs, n)
    assert torch.equal(accept_lens, want_lens) and torch.equal(accept_index, want_index)
    assert int(accept_lens.min()) >= 2  # the planted root child is accepted
    assert torch.equal(predict[accept_index.clamp(min=0)], want_predict[want_index.clamp(min=0)])

    cu = torch.arange(0, (bs + 1) * n, n, dtype=torch.int32)
    tokens, nodes, num = verify_greedy_reference(logits, verify_input.draft_token, verify_input.tkernels_parents, cu)
    assert torch.equal(accept_lens, num)
    for b in range(bs):
        k = int(num[b])
        assert torch.equal(accept_index[b, :k] - b * n, nodes[b, :k])
        assert torch.equal(predict[accept_index[b, :k].long()].long(), tokens[b, :k])


def test_sampled_paths_follow_the_tree(sg, rng):
    bs = 4
    _, verify_input, logits = verify_case(sg, rng, bs)
    info = sampling_info(bs, greedy=False, top_ps=torch.full((bs,), 0.9))
    predict, accept_lens, accept_index = sg.verify.eagle_sample(MagicMock(), verify_input, SimpleNamespace(sampling_info=info),
                                                                SimpleNamespace(next_token_logits=logits))
    parents = verify_input.tkernels_parents.view(bs, NODES)
    for b in range(bs):
        path = accept_index[b, : int(accept_lens[b])].long() - b * NODES
        assert path[0] == 0 and bool((accept_index[b, int(accept_lens[b]):] == -1).all())
        for parent, child in zip(path[:-1].tolist(), path[1:].tolist()):
            assert parents[b, child] == parent
            assert predict[b * NODES + parent] == verify_input.draft_token[b * NODES + child]


def test_eagle_sample_hook_teaches_the_drafter(sg, rng):
    tree, verify_input, logits = verify_case(sg, rng, 2)
    trials = tree.policy.trials.clone()
    sg.verify.eagle_sample(MagicMock(), verify_input, SimpleNamespace(sampling_info=sampling_info(2)),
                           SimpleNamespace(next_token_logits=logits))
    rows = tree.recycling.adjacency[verify_input.draft_token]
    assert torch.equal(rows[-1], logits[-1].topk(tree.recycling.k).indices.int())  # last write of each token wins
    assert not torch.equal(tree.policy.trials, trials)


def test_eagle_sample_hook_defers_to_sglang(sg, rng):
    _tree, verify_input, logits = verify_case(sg, rng, 2)
    original = MagicMock(return_value=sglang_greedy(sg, verify_input, logits, 2, NODES))
    info = sampling_info(2, logit_bias=torch.zeros(2, VOCAB))
    result = sg.verify.eagle_sample(original, verify_input, SimpleNamespace(sampling_info=info),
                                    SimpleNamespace(next_token_logits=logits))
    assert result is original.return_value  # SGLang's processing and verification, drafter still learns
    other = SimpleNamespace(draft_token_num=NODES)  # not tkernels' draft (EAGLE, SGLang's NGRAM)
    sg.verify.eagle_sample(original, other, None, None)
    original.assert_called_with(other, None, None, None)


@pytest.mark.parametrize("overlap_off", [True, False], ids=["no_overlap", "overlap"])
@pytest.mark.parametrize("asked", [True, False], ids=["mixed_chunk", "no_mixed_chunk"])
def test_ngram_keeps_mixed_chunk_without_overlap(sg, monkeypatch, overlap_off, asked):
    """SGLang's NGRAM server-args handling and validation, with the plugin's hooks wrapped in the way
    HookRegistry wraps them (patched only for this test)."""
    from sglang.srt.arg_groups import speculative_hook
    from sglang.srt.arg_groups.overrides import resolution_result
    from sglang.srt.plugins.hook_registry import HookType, _wrap_fn
    from sglang.srt.server_args import ServerArgs
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from tkernels.plugins.sglang import keep_mixed_chunk, supports_mixed_chunk

    def args():
        return ServerArgs(model_path="dummy", speculative_algorithm="NGRAM", enable_mixed_chunk=asked,
                          chunked_prefill_size=512, disable_overlap_schedule=overlap_off, device="cuda", page_size=1)

    plain = args()
    speculative_hook._handle_ngram(plain)
    assert resolution_result(plain, "enable_mixed_chunk") is False  # SGLang alone: always off
    assert not SpeculativeAlgorithm.NGRAM.supports_mixed_chunk()

    monkeypatch.setattr(speculative_hook, "_handle_ngram",
                        _wrap_fn(speculative_hook._handle_ngram, keep_mixed_chunk, HookType.AFTER))
    monkeypatch.setattr(SpeculativeAlgorithm, "supports_mixed_chunk",
                        _wrap_fn(SpeculativeAlgorithm.supports_mixed_chunk, supports_mixed_chunk, HookType.AROUND))
    hooked = args()
    speculative_hook._handle_ngram(hooked)
    assert resolution_result(hooked, "enable_mixed_chunk") is (asked and overlap_off)
    assert SpeculativeAlgorithm.NGRAM.supports_mixed_chunk() and not SpeculativeAlgorithm.NONE.supports_mixed_chunk()
