"""End-to-end generation on vLLM with the tkernels plugin installed (the README's main job).

``tkernels demo [--model DIR|smollm2|tiny] [--json]`` (or ``python -m tkernels.cli.demo``) starts an in-process
vLLM engine (CPU-friendly settings unless a GPU is present), answers a few Spec-Bench dev
questions (shipped with tkernels) greedily through the chat template, and prints each answer up
to its end of turn (or ``--max-tokens``), tokens/s over the tokens generated, and whether vLLM's
plugin loader ran tkernels' ``register()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from tkernels.data import specbench_dev


def demo_prompts(n: int) -> list[str]:
    """``n`` Spec-Bench dev first turns (shipped with tkernels), one category after another."""
    return [q.prompt for q in specbench_dev(n, round_robin=True)]


def resolve_model(model: str) -> Path:
    from tkernels import models

    if model == "smollm2":
        return models.smollm2_dir()
    if model == "tiny":
        return models.tiny_llama_dir()
    return Path(model)


def generate(model_dir: Path, prompts: list[str], max_tokens: int, **llm_kwargs) -> dict:
    """Greedy chat completions, each ending at the model's end of turn (EOS is honoured, so an
    answer never runs on into invented turns) or at ``max_tokens``; returns token ids, texts,
    finish reasons ("stop" or "length"), tokens/s over the tokens generated, and plugin state."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams

    import tkernels.plugins.vllm as plugin

    kwargs = dict(model=str(model_dir), enforce_eager=True, max_model_len=2048, seed=0)
    if not torch.cuda.is_available():
        kwargs["dtype"] = "float32"
    kwargs.update(llm_kwargs)
    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    start = time.perf_counter()
    outputs = llm.chat(messages, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    return {
        "model": str(model_dir),
        "plugin_registered": plugin.REGISTERED,
        "token_ids": tokens,
        "texts": [o.outputs[0].text for o in outputs],
        "finish_reasons": [o.outputs[0].finish_reason for o in outputs],
        "tokens_per_s": sum(map(len, tokens)) / elapsed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="HF folder, 'smollm2' (embedded) or 'tiny'")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256, help="cap per answer (answers end at end of turn)")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")


def run(args: argparse.Namespace) -> int:
    prompts = demo_prompts(args.questions)
    result = generate(resolve_model(args.model), prompts, args.max_tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {result['model']}")
    print(f"tkernels plugin registered by vLLM's loader: {result['plugin_registered']}")
    for prompt, text, reason in zip(prompts, result["texts"], result["finish_reasons"]):
        cut = "" if reason == "stop" else f"\n[cut at --max-tokens {args.max_tokens}]"
        print(f"\n>>> {prompt[:100]}\n{text.strip()}{cut}")
    print(f"\n{sum(map(len, result['token_ids']))} tokens, {result['tokens_per_s']:.1f} tokens/s "
          "(greedy; all answers in one batch, tokens generated / wall time)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="tkernels demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
