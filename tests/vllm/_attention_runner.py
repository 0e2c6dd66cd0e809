"""Greedy generation on the in-process vLLM CPU engine, with vLLM's CPU attention or tkernels'.

``python tests/vllm/_attention_runner.py [--tkernels]`` prints one JSON line: per prompt the
generated token ids and the log-probabilities of every prompt and generated token, the attention
impl classes of the layers and, with ``--tkernels``, the query lengths of every step planned.
One subprocess per engine, because vLLM's backend registry and plugin loading are once per
process. ``--tkernels`` needs TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import json
import os

# Prompts of mixed lengths; with MAX_BATCHED tokens per step the long ones are prefilled in
# chunks, next to the short ones' decodes.
PROMPT_LENGTHS = (3, 21, 90, 250)
MAX_BATCHED = 96
MAX_TOKENS = 8


def prompts(vocab: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def chosen_logprobs(token_ids, logprobs) -> list[float]:
    return [position[token].logprob for token, position in zip(token_ids, logprobs)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tkernels", action="store_true", help="tkernels' backend in CPU_ATTN's place")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["VLLM_PLUGINS"] = ""  # the plugin's other features stay out of this comparison

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tkernels.models import tiny_llama_dir

    query_lens: list[list[int]] = []
    if args.tkernels:
        os.environ["TKERNELS_VLLM_CPU_TEST_BACKEND"] = "1"
        from tkernels.plugins.vllm import attention, register_attention_backend

        register_attention_backend()
        build = attention.TkernelsAttentionMetadataBuilder.build

        def recording_build(self, common_prefix_len, common_attn_metadata, fast_build=False):
            query_lens.append(common_attn_metadata.query_start_loc.diff().tolist())
            return build(self, common_prefix_len, common_attn_metadata, fast_build)

        attention.TkernelsAttentionMetadataBuilder.build = recording_build

    llm = LLM(model=str(tiny_llama_dir()), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              block_size=32, max_num_batched_tokens=MAX_BATCHED, max_num_seqs=8, enable_prefix_caching=False)
    # Log-probabilities of every prompt and generated token: the tiny random model's attention is
    # nearly uniform, so greedy tokens alone barely notice attention errors.
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts(vocab)], params, use_tqdm=False)
    layers = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    print(json.dumps({
        "token_ids": [list(o.outputs[0].token_ids) for o in outputs],
        "logprobs": [chosen_logprobs(o.prompt_token_ids[1:], o.prompt_logprobs[1:])
                     + chosen_logprobs(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs],
        "impls": sorted({type(layer.impl).__name__ for layer in layers.values() if hasattr(layer, "impl")}),
        "query_lens": query_lens,
    }))


if __name__ == "__main__":
    main()
