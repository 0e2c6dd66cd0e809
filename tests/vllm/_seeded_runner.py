"""Seeded sampling under Token Recycling tree speculation, alone and in a mixed batch.

``python tests/vllm/_seeded_runner.py NUM_SPEC`` prints one JSON line. One in-process engine
(tiny model, float32, tkernels' reference backend, 64-token steps so the 100-token prompt is
chunked) runs the seeded request (temperature 0.8, top-p 0.95, seed 123) first alone, then
again beside greedy, unseeded and other-seeded requests that arrive while it decodes (the
drafter is warm by then, so its drafts differ). The test compares the seeded request's tokens
across both phases and across processes with different ``num_speculative_tokens``.
"""

from __future__ import annotations

import json
import os
import sys

SEEDED = dict(temperature=0.8, top_p=0.95, seed=123)
MAX_TOKENS = 24


def prompt(length: int, salt: int) -> list[int]:
    return [(37 * i + 11 * salt) % 480 + 20 for i in range(length)]


def main() -> None:
    num_spec = int(sys.argv[1])
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["TKERNELS_VLLM_CPU_TEST_BACKEND"] = "reference"

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tkernels.models import tiny_llama_dir

    spec = {"method": "custom_class", "num_speculative_tokens": num_spec,
            "model": "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"}
    llm = LLM(model=str(tiny_llama_dir()), dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
              block_size=32, max_num_batched_tokens=64, max_num_seqs=8, speculative_config=spec)
    engine = llm.llm_engine

    def run(arrivals: dict[int, list[tuple[str, list[int], dict]]]) -> dict[str, list[int]]:
        tokens, step = {}, 0
        while arrivals or engine.has_unfinished_requests():
            for req_id, ids, params in arrivals.pop(step, []):
                engine.add_request(req_id, TokensPrompt(prompt_token_ids=ids),
                                   SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **params))
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = list(out.outputs[0].token_ids)
            step += 1
        return tokens

    alone = run({0: [("seeded", prompt(100, 0), SEEDED)]})
    mixed = run({
        0: [("greedy", prompt(30, 1), dict(temperature=0.0)), ("free", prompt(20, 2), dict(temperature=1.0))],
        2: [("seeded", prompt(100, 0), SEEDED), ("other_seed", prompt(100, 0), dict(SEEDED, seed=7))],
        5: [("late", prompt(70, 3), dict(temperature=0.7, seed=5))],
    })
    print(json.dumps({"alone": alone["seeded"], "mixed": mixed["seeded"], "other_seed": mixed["other_seed"],
                      "greedy": mixed["greedy"], "late": mixed["late"]}))


if __name__ == "__main__":
    main()
