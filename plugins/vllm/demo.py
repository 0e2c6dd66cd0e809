"""End-to-end generation on vLLM with the tkernels plugin installed (the README's main job).

``python -m tkernels.plugins.vllm.demo [--model DIR|smollm2|tiny] [--json]`` starts an in-process
vLLM engine (CPU-friendly settings unless a GPU is present), generates greedily for a few
Spec-Bench dev questions (or built-in prompts when the data file is absent) and prints the text,
tokens/s and whether vLLM's plugin loader ran tkernels' ``register()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BUILTIN_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about GPUs.",
    "Explain speculative decoding in one sentence.",
]


SPECBENCH_DEV = Path(__file__).resolve().parents[3] / "shared" / "data" / "specbench_dev.jsonl"


def load_questions(n: int, path: Path = SPECBENCH_DEV) -> list[dict]:
    """``[{"category", "prompt"}]``: the first ``n`` Spec-Bench dev questions' first turns
    (``../shared/data`` beside the checkout)."""
    if not path.is_file():
        raise FileNotFoundError(f"Spec-Bench dev data not found at {path}")
    with open(path) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(n))]
    return [{"category": r["category"], "prompt": r["turns"][0]} for r in rows]


def demo_prompts(n: int) -> list[str]:
    """Spec-Bench dev first turns, or built-in prompts where the data file is absent."""
    try:
        return [q["prompt"] for q in load_questions(n)]
    except FileNotFoundError:
        return BUILTIN_PROMPTS[:n]


def resolve_model(model: str) -> Path:
    from tkernels import models

    if model == "smollm2":
        return models.smollm2_dir()
    if model == "tiny":
        return models.tiny_llama_dir()
    return Path(model)


def generate(model_dir: Path, prompts: list[str], max_tokens: int, **llm_kwargs) -> dict:
    """Greedy chat completions; returns token ids, texts, timing and plugin state."""
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
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
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
        "tokens_per_s": sum(map(len, tokens)) / elapsed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="HF folder, 'smollm2' (embedded) or 'tiny'")
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object only")


def run(args: argparse.Namespace) -> int:
    prompts = demo_prompts(args.questions)
    result = generate(resolve_model(args.model), prompts, args.max_tokens)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {result['model']}")
    print(f"tkernels plugin registered by vLLM's loader: {result['plugin_registered']}")
    for prompt, text in zip(prompts, result["texts"]):
        print(f"\n>>> {prompt[:100]}\n{text.strip()}")
    print(f"\n{sum(map(len, result['token_ids']))} tokens, {result['tokens_per_s']:.1f} tokens/s (greedy)")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tkernels.plugins.vllm.demo", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
