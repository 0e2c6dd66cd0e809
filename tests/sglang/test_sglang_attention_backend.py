"""``--attention-backend tkernels`` equals SGLang's Triton backend on the same batch (interpreter).

Both backends are built from the same model-runner stand-in (SGLang's real ReqToTokenPool,
MHATokenToKVPool and KVIndexTranslator; a Llama config) and run their real
``init_forward_metadata`` + ``forward_extend`` / ``forward_decode`` on the same forward-batch
stand-in; the layer is SGLang's RadixAttention. Extend covers prefixes and a target-verify
tree mask (NGRAM's layout); decode covers ragged contexts. Outputs are poisoned with NaN first.
"""

from types import SimpleNamespace

import pytest
import torch

pytestmark = pytest.mark.sglang

HEADS, KV_HEADS, HEAD_DIM, SLOTS, MAX_LEN = 4, 2, 32, 1024, 320


@pytest.fixture(scope="module")
def sg():
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(ServerArgs(model_path="dummy"))
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.speculative.ngram_info import NgramVerifyInput
    from transformers import LlamaConfig

    from tkernels.plugins.sglang.attention import TkernelsAttnBackend

    return SimpleNamespace(
        AttentionArch=AttentionArch, TritonAttnBackend=TritonAttnBackend, RadixAttention=RadixAttention,
        KVIndexTranslator=KVIndexTranslator, MHATokenToKVPool=MHATokenToKVPool, ReqToTokenPool=ReqToTokenPool,
        ForwardMode=ForwardMode, NgramVerifyInput=NgramVerifyInput, LlamaConfig=LlamaConfig,
        TkernelsAttnBackend=TkernelsAttnBackend,
    )


def model_runner(sg):
    req_pool = sg.ReqToTokenPool(size=8, max_context_len=MAX_LEN, device="cpu", enable_memory_saver=False)
    kv_pool = sg.MHATokenToKVPool(size=SLOTS, page_size=1, dtype=torch.float16, head_num=KV_HEADS, head_dim=HEAD_DIM,
                                  layer_num=1, device="cpu", enable_memory_saver=False)
    allocator = SimpleNamespace(page_size=1, get_kvcache=lambda: kv_pool)
    hf_config = sg.LlamaConfig(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                               num_hidden_layers=1, architectures=["LlamaForCausalLM"])
    model_config = SimpleNamespace(
        attention_arch=sg.AttentionArch.MHA, get_max_num_attention_heads=lambda: HEADS,
        get_num_kv_heads=lambda *_: KV_HEADS, num_attention_heads=HEADS, head_dim=HEAD_DIM, v_head_dim=HEAD_DIM,
        swa_v_head_dim=None, context_len=MAX_LEN, is_encoder_decoder=False, hf_config=hf_config,
        linear_attn_registry_result=None)
    runner = SimpleNamespace(
        req_to_token_pool=req_pool, token_to_kv_pool=kv_pool, token_to_kv_pool_allocator=allocator, page_size=1,
        sliding_window_size=None, model_config=model_config, device="cpu", gpu_id=0, is_draft_worker=False,
        decode_num_tokens_per_req=lambda: 1, spec_algorithm=SimpleNamespace(is_dspark=lambda: False, is_ngram=lambda: False))
    runner.kv_index_translator = sg.KVIndexTranslator(
        req_to_token=req_pool.req_to_token, token_to_kv_pool_allocator=allocator, token_to_kv_pool=kv_pool,
        page_size=1, device="cpu")
    return runner


def setup_batch(sg, rng, prefix_lens, new_lens):
    """Random pool contents; requests' slots scattered; req_to_token rows filled (prefix + new)."""
    runner = model_runner(sg)
    k_pool, v_pool = runner.token_to_kv_pool.get_kv_buffer(0)
    k_pool.copy_(torch.randn(k_pool.shape, generator=rng))
    v_pool.copy_(torch.randn(v_pool.shape, generator=rng))
    seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
    slots = torch.randperm(SLOTS - 1, generator=rng)[: sum(seq_lens)] + 1  # slot 0 is SGLang's padding slot
    out_cache_loc, start = [], 0
    for r, (seq, prefix) in enumerate(zip(seq_lens, prefix_lens)):
        runner.req_to_token_pool.req_to_token[r, :seq] = slots[start:start + seq].int()
        out_cache_loc.append(slots[start + prefix:start + seq])
        start += seq
    return runner, torch.cat(out_cache_loc)


def forward_batch(sg, mode, prefix_lens, new_lens, out_cache_loc, spec_info=None):
    bs = len(prefix_lens)
    # a verify batch's seq_lens are the committed lengths, without the tree tokens (SGLang's NGRAM/EAGLE)
    verify = mode.is_target_verify()
    seq_lens = torch.tensor([p + (0 if verify else n) for p, n in zip(prefix_lens, new_lens)])
    return SimpleNamespace(
        forward_mode=mode, batch_size=bs, req_pool_indices=torch.arange(bs), seq_lens=seq_lens,
        seq_lens_cpu=seq_lens, seq_lens_sum=int(seq_lens.sum()), extend_prefix_lens=torch.tensor(prefix_lens),
        extend_prefix_lens_cpu=list(prefix_lens), extend_seq_lens=torch.tensor(new_lens), extend_seq_lens_cpu=list(new_lens),
        out_cache_loc=out_cache_loc, out_cache_loc_is_physical=False, spec_info=spec_info, kv_loc_plan=None,
        positions=None, mha_one_shot=False, attn_attend_prefix_cache=False, encoder_lens=None)


def run(sg, backend_cls, rng_state, prefix_lens, new_lens, mode, tree_mask=None, decode=False):
    """One layer's output under ``backend_cls`` (same seed, so same pool, q/k/v and slots)."""
    rng = torch.Generator().manual_seed(rng_state)
    runner, out_cache_loc = setup_batch(sg, rng, prefix_lens, new_lens)
    tokens = sum(new_lens)
    q, k, v = (torch.randn(tokens, h, HEAD_DIM, generator=rng, dtype=torch.float32).half() for h in (HEADS, KV_HEADS, KV_HEADS))
    spec_info = None
    if tree_mask is not None:
        n = new_lens[0]
        spec_info = sg.NgramVerifyInput(draft_token=torch.zeros(tokens, dtype=torch.int64), custom_mask=tree_mask,
                                        positions=torch.zeros(tokens, dtype=torch.int64), draft_token_num=n)
    batch = forward_batch(sg, mode, prefix_lens, new_lens, out_cache_loc, spec_info)
    backend = backend_cls(runner)
    layer = sg.RadixAttention(num_heads=HEADS, head_dim=HEAD_DIM, scaling=HEAD_DIM**-0.5, num_kv_heads=KV_HEADS,
                              layer_id=0)
    backend.init_forward_metadata(batch)
    batch._attn_output = torch.full((tokens, HEADS * HEAD_DIM), float("nan"), dtype=torch.float16)
    forward = backend.forward_decode if decode else backend.forward_extend
    out = forward(q.view(tokens, -1), k, v, layer, batch)  # as RadixAttention passes them
    if backend_cls is sg.TkernelsAttnBackend:
        assert len(backend.plans) == 1  # tkernels' kernel ran, not a fallback to SGLang's
    return out.view(tokens, HEADS, HEAD_DIM).float()


def test_extend_matches_sglang_triton(sg, rng):
    seed = int(torch.randint(2**31, (1,), generator=rng))
    prefix_lens, new_lens = [3, 0, 70], [5, 17, 2]
    mode = sg.ForwardMode.EXTEND
    ours = run(sg, sg.TkernelsAttnBackend, seed, prefix_lens, new_lens, mode)
    theirs = run(sg, sg.TritonAttnBackend, seed, prefix_lens, new_lens, mode)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("n", [6, 100, 256])
def test_target_verify_tree_matches_sglang_triton(sg, rng, n):
    from tkernels.attention.batch import random_parents, tree_parents
    from tkernels.spec import ancestor_mask

    seed = int(torch.randint(2**31, (1,), generator=rng))
    prefix_lens = [9, 40, 1]
    masks = [ancestor_mask(p) for p in (random_parents(n, rng), tree_parents("chain", n, rng), tree_parents("star", n, rng))]
    tree_mask = torch.cat([torch.cat([torch.ones(n, p, dtype=torch.bool), m], 1).flatten() for p, m in zip(prefix_lens, masks)])
    mode = sg.ForwardMode.TARGET_VERIFY
    ours = run(sg, sg.TkernelsAttnBackend, seed, prefix_lens, [n] * 3, mode, tree_mask)
    theirs = run(sg, sg.TritonAttnBackend, seed, prefix_lens, [n] * 3, mode, tree_mask)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)


def test_decode_matches_sglang_triton(sg, rng):
    seed = int(torch.randint(2**31, (1,), generator=rng))
    prefix_lens = [0, 69, 32, 150]
    mode = sg.ForwardMode.DECODE
    ours = run(sg, sg.TkernelsAttnBackend, seed, prefix_lens, [1] * 4, mode, decode=True)
    theirs = run(sg, sg.TritonAttnBackend, seed, prefix_lens, [1] * 4, mode, decode=True)
    assert not ours.isnan().any()
    torch.testing.assert_close(ours, theirs, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("n", [7, 65, 256])
def test_tree_parents_from_sglang_mask(sg, rng, n):
    from tkernels.attention.batch import TREE_KINDS, tree_parents
    from tkernels.plugins.sglang.attention import tree_parents_from_mask
    from tkernels.spec import ancestor_mask

    prefix_lens = torch.tensor([0, 5, 12])
    parents = [tree_parents(kind, n, rng) for kind in TREE_KINDS]
    blocks = [torch.cat([torch.ones(n, int(p), dtype=torch.bool), ancestor_mask(par)], 1).flatten()
              for p, par in zip(prefix_lens, parents)]
    mask_indptr = torch.tensor([0] + [b.numel() for b in blocks]).cumsum(0)
    assert torch.equal(tree_parents_from_mask(torch.cat(blocks), mask_indptr, prefix_lens, n), torch.cat(parents))


def test_cuda_graphs_are_refused_clearly(sg):
    backend = sg.TkernelsAttnBackend(model_runner(sg))
    with pytest.raises(ValueError, match="--disable-cuda-graph"):
        backend.init_cuda_graph_state(8, 8)


def test_sglang_own_ngram_trees_are_refused_at_start(sg, monkeypatch):
    """SGLang's own NGRAM drafts are not BFS trees: the backend refuses them when it is built."""
    runner = model_runner(sg)
    runner.spec_algorithm = SimpleNamespace(is_dspark=lambda: False, is_ngram=lambda: True)
    monkeypatch.delenv("TKERNELS_SGLANG", raising=False)
    with pytest.raises(ValueError, match="TKERNELS_SGLANG=token_recycling"):
        sg.TkernelsAttnBackend(runner)
    monkeypatch.setenv("TKERNELS_SGLANG", "token_recycling")
    sg.TkernelsAttnBackend(runner)  # off the CPU engine: the verify mask is left as NGRAM builds it
