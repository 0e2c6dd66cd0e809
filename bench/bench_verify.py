"""Verification benchmark V1 (docs/design.md): batch 64, vocab 128256, bf16 logits in, tokens out.

Trees: ``chain4`` (4 draft tokens: 5 nodes per request) and ``tree64`` (Token Recycling's
template cut to 64 nodes per request). Modes: ``greedy``; ``sampling`` (temperature 1, the
target-only rule for deterministic drafts; vLLM: ``draft_probs=None``, as for n-gram drafts);
``sampling-q`` (drafts sampled from a draft distribution q, recursive rejection with
``draft_probs``). Draft tokens follow the target's argmax at their parent with probability 0.7.
Each timed call is the whole path from logits to accepted tokens, uniforms/noise included.

Implementations on the same inputs: ``tkernels`` (:mod:`tkernels.spec.verify` with this GPU's
tuned launch config, or the documented fallback), ``tkernels-default-config`` (the built-in
launch defaults: the pair reports what tuning bought), ``torch`` (the
plain-PyTorch reference: argmax / softmax + multinomial, then the vectorised walk), and
``vllm`` (``vllm.v1.sample.rejection_sampler.rejection_sample``, chains only: vLLM 0.33 has no
tree verification; bonus tokens by argmax / torch.multinomial as its sampler would). Every
output is checked before timing: greedy outputs must equal the reference exactly; sampled
outputs must be valid paths (accepted tokens = the drafts along the path), and tkernels must
equal the reference exactly on shared uniforms.

Run on a GPU: ``pytest bench/bench_verify.py --benchmark-enable``; medians of
``triton.testing.do_bench`` are merged into ``bench/results/<device file name>.json`` as
``{"workload": "V1-greedy-chain4", "impl": ..., "us": ..., "tbps": ...}`` records (tbps: logits
bytes / time). Without a GPU the
module skips unless ``TKERNELS_BENCH_TINY=1`` (tiny shapes under the interpreter, nothing written).
"""

from __future__ import annotations

import functools

import pytest
import torch
from common import DEVICE, HAS_CUDA, median_us, requires_gpu

from tkernels.spec import verify as V
from tkernels.spec.tree import chain, depths, token_recycling_template
from tkernels.spec.verify import reference as VR

pytestmark = requires_gpu

BATCH, VOCAB = (64, 128256) if HAS_CUDA else (4, 512)
TREES = {"chain4": chain(5).parents, "tree64": token_recycling_template().truncate(64 if HAS_CUDA else 12).parents}
MODES = ("greedy", "sampling", "sampling-q")


def _vllm_rejection_sample():
    """vLLM's rejection_sample, or None (not installed, or the CPU build without Triton)."""
    if not HAS_CUDA:
        return None
    try:
        from vllm.v1.sample.rejection_sampler import rejection_sample
    except Exception:
        return None
    return rejection_sample


@functools.cache
def inputs(tree: str, mode: str):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = TREES[tree]
    n = shape.numel()
    parents = shape.repeat(BATCH).int().to(DEVICE)
    cu = torch.arange(0, n * BATCH + 1, n, dtype=torch.int32, device=DEVICE)
    logits = (torch.randn(n * BATCH, VOCAB, generator=g, device=DEVICE) * 2).to(torch.bfloat16 if HAS_CUDA else torch.float16)
    gpar = (parents.long() + torch.repeat_interleave(cu[:-1].long(), n)).clamp(min=0)
    follow = torch.rand(n * BATCH, generator=g, device=DEVICE) < 0.7
    tokens = torch.where(follow, logits.argmax(-1)[gpar], torch.randint(0, VOCAB, (n * BATCH,), generator=g, device=DEVICE))
    draft_probs = None
    if mode == "sampling-q":  # each node's children: draws without replacement from q(node) (Gumbel-top-k)
        draft_probs = torch.softmax(logits.float() + torch.randn(logits.shape, generator=g, device=DEVICE), -1)
        idx = torch.arange(parents.numel(), device=DEVICE)
        has_parent = parents >= 0
        first_sibling = torch.full_like(idx, parents.numel()).scatter_reduce(0, gpar[has_parent], idx[has_parent], "amin")
        rank = torch.where(has_parent, idx - first_sibling[gpar], 0)  # BFS: siblings are contiguous
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=g, device=DEVICE)))
        drawn = (draft_probs.log() + gumbel).topk(int(rank.max()) + 1, dim=-1).indices
        tokens = torch.where(has_parent, drawn[gpar, rank], tokens)
    temperature = torch.ones(BATCH, device=DEVICE)
    return logits, tokens, parents, cu, temperature, draft_probs


def _torch_baseline(tree, mode):
    logits, tokens, parents, cu, temperature, draft_probs = inputs(tree, mode)
    if mode == "greedy":
        return lambda: V.verify_greedy_reference(logits, tokens, parents, cu)
    uniforms = V.draw_uniforms(cu)
    if mode == "sampling-q":
        return lambda: V.verify_sampling_reference(logits, tokens, parents, cu, temperature, uniforms=uniforms, draft_probs=draft_probs)
    width = int(depths(TREES[tree]).max()) + 1

    def run():
        drawn = torch.multinomial(torch.softmax(logits.float(), -1), 1).squeeze(1)
        no_margin = torch.zeros(drawn.shape, dtype=torch.float64, device=DEVICE)
        return VR._walk_reference(drawn, no_margin, tokens, parents, cu, width).result()

    return run


def _tkernels(tree, mode, builtin_defaults=False):
    logits, tokens, parents, cu, temperature, draft_probs = inputs(tree, mode)
    config = V.DEFAULT_CONFIG if builtin_defaults else None
    if mode == "greedy":
        return lambda: V.verify_greedy(logits, tokens, parents, cu, config=config)
    return lambda: V.verify_sampling(logits, tokens, parents, cu, temperature, draft_probs=draft_probs, config=config)


def _vllm(tree, mode):
    rejection_sample = _vllm_rejection_sample()
    if rejection_sample is None or tree != "chain4":
        return None
    from types import SimpleNamespace

    from vllm.v1.sample.rejection_sampler import apply_sampling_constraints

    logits, tokens, _parents, _cu, temperature, draft_probs = inputs(tree, mode)
    n = TREES[tree].numel()
    k = n - 1
    rows = torch.arange(BATCH * n, device=DEVICE).view(BATCH, n)
    target_idx, bonus_idx = rows[:, :k].flatten(), rows[:, k]
    draft = tokens.view(BATCH, n)[:, 1:].flatten().contiguous()
    q = None if draft_probs is None else draft_probs[target_idx].contiguous()
    greedy = mode == "greedy"
    metadata = SimpleNamespace(
        all_greedy=greedy, all_random=not greedy, temperature=torch.zeros_like(temperature) if greedy else temperature,
        top_k=None, top_p=None, generators={},
    )
    cu_draft = torch.arange(k, k * BATCH + 1, k, dtype=torch.int32, device=DEVICE)

    def run():
        bonus_logits = logits[bonus_idx].float()
        if greedy:
            bonus = bonus_logits.argmax(-1, keepdim=True)
            target = logits[target_idx].float()  # vLLM's forward() verifies fp32 logits
        else:
            bonus = torch.multinomial(torch.softmax(bonus_logits, -1), 1)
            target = apply_sampling_constraints(logits[target_idx].float(), cu_draft, metadata)
        return rejection_sample(draft, [k] * BATCH, k, cu_draft, q, target, bonus, metadata)

    return run


IMPLS = {"tkernels": _tkernels, "tkernels-default-config": functools.partial(_tkernels, builtin_defaults=True),
         "torch": _torch_baseline, "vllm": _vllm}


def _check(impl, tree, mode, out):
    logits, tokens, parents, cu, temperature, draft_probs = inputs(tree, mode)
    n = TREES[tree].numel()
    if impl == "vllm":  # [B, k+1] accepted drafts then the recovered/bonus token, -1 padded
        out_tokens = out.long()
        num = (out_tokens >= 0).sum(1)
        nodes = torch.where(torch.arange(n, device=DEVICE)[None, :] < num[:, None], torch.arange(n, device=DEVICE)[None, :], -1)
    else:
        out_tokens, nodes, num = out
    if mode == "greedy":
        ref = V.verify_greedy_reference(logits, tokens, parents, cu)
        assert torch.equal(out_tokens, ref[0]) and torch.equal(num.int(), ref[2]), f"{impl} greedy output differs"
        return
    flat = tokens.view(BATCH, n)
    for b in range(BATCH):  # sampled: a valid path whose accepted tokens are its drafts
        k = int(num[b])
        path = nodes[b, :k].long()
        assert int(path[0]) == 0 and 1 <= k <= out_tokens.shape[1]
        assert torch.equal(out_tokens[b, : k - 1], flat[b, path[1:]]), f"{impl} request {b}"
        assert all(int(parents[b * n + int(path[d])]) == int(path[d - 1]) for d in range(1, k))
    if impl.startswith("tkernels"):  # against the reference on shared uniforms (fp32 vs fp64 may flip a borderline draw)
        uniforms = V.draw_uniforms(cu)
        config = V.DEFAULT_CONFIG if impl == "tkernels-default-config" else None
        got = V.verify_sampling(logits, tokens, parents, cu, temperature, uniforms=uniforms, draft_probs=draft_probs,
                                config=config)
        want = V.verify_sampling_reference(logits, tokens, parents, cu, temperature, uniforms=uniforms, draft_probs=draft_probs)
        same = torch.ones(BATCH, dtype=torch.bool, device=DEVICE)
        for a, w in zip(got, want):
            same &= (a == w).view(BATCH, -1).all(1)
        assert int(same.sum()) >= BATCH - 1, f"tkernels differs from the reference on {BATCH - int(same.sum())} requests"


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tree", list(TREES))
def test_verify(benchmark, tree, mode, impl, records):
    fn = IMPLS[impl](tree, mode)
    if fn is None:
        pytest.skip(f"{impl} not available for {tree} here (vLLM: chains only, GPU build with Triton)")
    _check(impl, tree, mode, fn())
    us = benchmark.pedantic(median_us, args=(fn,), rounds=1, iterations=1)
    logits = inputs(tree, mode)[0]
    record = {"workload": f"V1-{mode}-{tree}", "impl": impl, "us": us, "tbps": logits.nbytes / (us * 1e-6) / 1e12}
    benchmark.extra_info.update(record)
    records.append(record)
