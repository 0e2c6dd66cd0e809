"""The engine with drafts the tree proposer did not make, on the tiny model (one JSON line out).

``python tests/vllm/_foreign_draft_runner.py [--tree]``: six greedy requests. With ``--tree``
the tree proposer (K = 8) runs, but every third step request "r0"'s draft list is replaced by
zeros (what vLLM schedules near max_model_len) and request "r1"'s by its tree's tokens reversed,
while the proposer's record of their trees stays as proposed: only those rows may notice
(verified as chains), every output must still be plain decoding's. Prints every request's
tokens and the proposer's stats.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", action="store_true")
    args = parser.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    os.environ["TKERNELS_VLLM_CPU_ATTENTION"] = "reference"

    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from tkernels.models import tiny_llama_dir
    from tkernels.plugins.vllm.proposer import TokenRecyclingTreeProposer

    propose = TokenRecyclingTreeProposer.propose

    def corrupting_propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        drafts = propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        if self.stats["steps"] % 3 == 0:
            for row, req_id in enumerate(self.tree_batch.step.req_ids):
                if drafts[row] and req_id.startswith("r0"):
                    drafts[row] = [0] * len(drafts[row])
                elif len(drafts[row]) > 1 and req_id.startswith("r1"):
                    drafts[row] = drafts[row][::-1]
        return drafts

    TokenRecyclingTreeProposer.propose = corrupting_propose
    spec = {"method": "custom_class", "num_speculative_tokens": 8,
            "model": "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"} if args.tree else None
    llm = LLM(model=str(tiny_llama_dir()), dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
              max_num_seqs=6, speculative_config=spec)
    gen = torch.Generator().manual_seed(3)
    engine = llm.llm_engine
    for i in range(6):
        ids = torch.randint(10, 400, (int(torch.randint(5, 60, (1,), generator=gen)),), generator=gen).tolist()
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=ids),
                           SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    tokens = {}
    for _ in range(10_000):  # bounded: 6 requests x 40 tokens
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = list(out.outputs[0].token_ids)
    stats = llm.collective_rpc(lambda worker: dict(worker.model_runner.drafter.stats))[0] if args.tree else {}
    print(json.dumps({"token_ids": dict(sorted(tokens.items())), "proposer_stats": stats}))


if __name__ == "__main__":
    main()
