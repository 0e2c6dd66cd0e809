"""Speculative decoding in vLLM: no speculation vs vLLM's ``ngram`` vs tkernels' trees.

    tkernels speculation-bench [--model smollm2|tiny|DIR] [--questions 13] [--per-category 1]
        [--max-tokens 64] [--num-spec-tokens 32] [--rounds 1]
        [--methods none,ngram,tree:tr_static,tree:hybrid] [--method M] [--json]

(also ``python -m tkernels.cli.speculation_bench``). The defaults are the main job's comparison:
one question of each Spec-Bench category, vLLM's ``ngram`` against tkernels' tree proposer with
the static Token Recycling template and with the hybrid drafter, 32 draft tokens per step (a
size where trees pay on a GPU: a verify step of 33 tokens costs about what a 1-token step does
at batch 1), MAT and output equality first.

Methods: ``none``; vLLM's ``ngram`` (prompt lookup); ``tr``, Token Recycling's best path
(:class:`~tkernels.plugins.vllm.proposer.TokenRecyclingProposer`, verified by vLLM's rejection
sampler); ``tr-tree``, Token Recycling trees
(:class:`~tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer`, tkernels' tree
verification). All speculative methods draft ``--num-spec-tokens`` tokens per step: the same
verify budget (``tr-tree`` with its per-batch tree sizing off, ``size: fixed``). ``tr-tree`` needs tkernels' attention backend: ``--attention-backend CUSTOM`` on
a GPU; on vLLM-CPU, ``TKERNELS_VLLM_CPU_ATTENTION=torch`` (set here unless set, even empty), tkernels'
attention in vectorised PyTorch, a different attention than the other methods' (vLLM's CPU one), so
tokens/s compare two attentions as well as two methods (MAT is unaffected).

docs/design.md's acceptance-length workload: first turns of the Spec-Bench dev questions through the
chat template, greedy, ``--max-tokens`` new tokens (EOS ignored, so every method generates the
same number), all questions submitted at once; with ``--rounds R`` the set is submitted R times
in sequence on the same engine (Token Recycling keeps its adjacency across requests, so later
rounds measure a warm drafter; round 1 alone is the cold start). Each method runs in its own
subprocess (one in-process engine per process; engines in one process conflict); ``--method``
runs one in this process.

Reported per method:

* CPU tok/s: generated tokens of all questions / wall time of the generation loop, on this
  machine. On vLLM-CPU a verify step of many tokens costs many times a 1-token step and the
  tree methods run tkernels' PyTorch attention, not vLLM's CPU kernel, so speculation is slower
  here than plain decoding: this column says nothing about a GPU.
* GPU tok/s (predicted): tokens per second per request that the step-latency model
  (:mod:`tkernels.sched.latency_model`, default H100 rates, a Llama-3-8B target, batch 1)
  predicts for this run's steps: tokens after each request's prefill over the predicted time
  of its decode steps, each priced at the tokens it verified (tree methods: K + 1; ``ngram``:
  1 + its mean draft per drafting step, 1 when it drafted nothing; plain: 1), weights and
  matmuls only (attention and drafting not counted, as bench/spec_mat.py's prediction without
  ``--draft-cost``). A prediction, not a measurement.
* MAT (mean accepted tokens per step, bonus counted, as Spec-Bench): per request, generated
  tokens / target forward passes that produced tokens for it (its prefill's last chunk counts as
  one step giving one token; every verify step gives 1 + accepted drafts). The engine is
  driven step by step with delta outputs, and a request's step is counted whenever its output
  grows, so this is exact: vLLM's counters are NOT used for it, because their
  ``spec_decode_num_accepted_tokens`` also counts drafts accepted past ``max_tokens`` in the
  last step (discarded from the output) and their acceptance length ``1 + accepted / drafts``
  ignores the steps where the proposer drafted nothing. Overall MAT = sum of tokens / sum of
  steps (per category likewise). No speculation gives exactly 1.
* vLLM's own counters from ``llm.get_metrics()``: ``spec_decode_num_drafts``,
  ``_num_draft_tokens``, ``_num_accepted_tokens``, and the derived acceptance length
  ``1 + accepted / drafts`` (drafting steps only) and draft acceptance rate.
* equal: whether every question's tokens equal the no-speculation run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from tkernels.cli.demo import resolve_model
from tkernels.data import Question, specbench_dev

METHODS = ("none", "ngram", "tr", "tr-tree")  # plus tree:<drafter>[+prompt], see tree_options()
# The main job's comparison (the command's defaults; see the module doc).
DEFAULT_METHODS = ("none", "ngram", "tree:tr_static", "tree:hybrid")
DEFAULT_SPEC_TOKENS = 32
NGRAM_MIN, NGRAM_MAX = 1, 3  # as tkernels.spec.propose_ngram's defaults (prompt lookup, PLD)
SPEC_COUNTERS = ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")


def tree_options(method: str) -> dict | None:
    """The tree proposer's options for a tree method (None for the others): ``tr-tree`` is its
    default drafter, ``tree:<drafter>`` any of ``TREE_DRAFTERS``, ``+prompt`` adds prompt_topk;
    always the whole budget (``size: fixed``)."""
    from tkernels.plugins.vllm.proposer import DEFAULT_TREE_DRAFTER, TREE_DRAFTERS

    if method == "tr-tree":
        return {"size": "fixed", "drafter": DEFAULT_TREE_DRAFTER}
    if not method.startswith("tree:"):
        return None
    drafter, plus, option = method.removeprefix("tree:").partition("+")
    if drafter not in TREE_DRAFTERS or (plus and option != "prompt"):
        raise ValueError(f"method: tree:<drafter>[+prompt] takes a drafter of {TREE_DRAFTERS}, got {method!r}")
    return {"size": "fixed", "drafter": drafter, "prompt_topk": bool(plus)}


def speculative_config(method: str, num_spec_tokens: int) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": num_spec_tokens,
                "prompt_lookup_min": NGRAM_MIN, "prompt_lookup_max": NGRAM_MAX}
    if method == "tr" or tree_options(method) is not None:
        proposer = "TokenRecyclingProposer" if method == "tr" else "TokenRecyclingTreeProposer"
        return {"method": "custom_class", "num_speculative_tokens": num_spec_tokens,
                "model": f"tkernels.plugins.vllm.proposer.{proposer}"}
    raise ValueError(f"method: must be one of {METHODS} or tree:<drafter>[+prompt], got {method!r}")


def run_method(model_dir: Path, questions: list[Question], method: str, max_tokens: int, num_spec_tokens: int,
               rounds: int = 1, sequential: bool = False, eos: bool = False) -> dict:
    """Generate in this process with one engine; returns token ids and step counts per request
    (``rounds`` times the questions, round after round), wall time and vLLM's counters.
    ``sequential``: one request at a time (each submitted when the previous one finished), as
    bench/spec_mat.py decodes; ``eos``: answers end at EOS (else ``max_tokens`` each)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    kwargs = dict(model=str(model_dir), enforce_eager=True, max_model_len=2048, seed=0, disable_log_stats=False,
                  speculative_config=speculative_config(method, num_spec_tokens))
    if not torch.cuda.is_available():
        kwargs["dtype"] = "float32"
    if tree_options(method) is not None:  # tree masks need tkernels' attention backend (see the module doc)
        from tkernels.plugins.vllm.proposer import TREE_CONFIG_KEY

        kwargs["additional_config"] = {TREE_CONFIG_KEY: tree_options(method)}
        if torch.cuda.is_available():
            kwargs["attention_backend"] = "CUSTOM"
        else:
            from tkernels.plugins.vllm.compat import CPU_ATTENTION_ENV, CPU_TEST_ENV

            if CPU_ATTENTION_ENV not in os.environ and CPU_TEST_ENV not in os.environ:  # set empty: none, on purpose
                os.environ[CPU_ATTENTION_ENV] = "torch"
    llm = LLM(**kwargs)
    tokenizer = llm.get_tokenizer()
    prompts = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q.prompt}], tokenize=False,
                                                       add_generation_prompt=True), add_special_tokens=False)
        for q in questions
    ]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=not eos, output_kind=RequestOutputKind.DELTA)
    engine = llm.llm_engine
    tokens: dict[str, list[int]] = {f"{r}-{i}": [] for r in range(rounds) for i in range(len(prompts))}
    steps = dict.fromkeys(tokens, 0)

    def drain() -> None:
        while engine.has_unfinished_requests():
            for out in engine.step():
                new = list(out.outputs[0].token_ids)
                if new:
                    tokens[out.request_id] += new
                    steps[out.request_id] += 1

    start = time.perf_counter()
    for r in range(rounds):
        for i, ids in enumerate(prompts):
            engine.add_request(f"{r}-{i}", TokensPrompt(prompt_token_ids=ids), params)
            if sequential:
                drain()
        drain()
    elapsed = time.perf_counter() - start
    counters = {m.name: m.value for m in llm.get_metrics() if m.name in SPEC_COUNTERS}
    stats = None
    if tree_options(method) is not None:  # the proposer's own counters (in this process: no engine subprocess)
        stats = llm.collective_rpc(lambda worker: dict(worker.model_runner.drafter.stats))[0]
    return {
        "method": method,
        "rounds": rounds,
        "num_spec_tokens": num_spec_tokens,
        "sequential": sequential,
        "eos": eos,
        "token_ids": list(tokens.values()),
        "steps": list(steps.values()),
        "seconds": elapsed,
        "counters": {name.removeprefix("vllm:"): int(counters.get(name, 0)) for name in SPEC_COUNTERS},
        "proposer_stats": stats,
    }


def _run_subprocess(args: argparse.Namespace, method: str, num_spec_tokens: int) -> dict:
    command = [sys.executable, "-m", "tkernels.cli.speculation_bench", "--method", method, "--raw",
               "--model", args.model, "--questions", str(args.questions), "--max-tokens", str(args.max_tokens),
               "--num-spec-tokens", str(num_spec_tokens), "--rounds", str(args.rounds)]
    if args.per_category is not None:
        command += ["--per-category", str(args.per_category)]
    command += ["--sequential"] * args.sequential + ["--eos"] * args.eos
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"method {method} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def predicted_gpu_tokens_per_s(run: dict, requests: int) -> float:
    """Tokens/s per request the step-latency model predicts for ``run``'s decode steps (module
    doc: default H100 rates, Llama-3-8B, batch 1, drafting not counted)."""
    from tkernels.sched import DEFAULT_RATES, LLAMA3_8B, LatencyModel

    model = LatencyModel(LLAMA3_8B, DEFAULT_RATES)
    tokens = sum(map(len, run["token_ids"])) - requests  # each request's prefill gives its first token
    steps = sum(run["steps"]) - requests
    if tokens <= 0 or steps <= 0:
        return 0.0
    k = run.get("num_spec_tokens") or 0
    if run["method"] == "none":
        seconds = steps * model.step_time(1)
    elif run["method"] == "ngram":  # drafts only where the prompt lookup matched
        c = run["counters"]
        drafting = min(c["spec_decode_num_drafts"], steps)
        mean_draft = c["spec_decode_num_draft_tokens"] / drafting if drafting else 0.0
        # the step time at a mean draft length: between the whole token counts around it
        low, frac = int(mean_draft), mean_draft - int(mean_draft)
        mean_step = (1 - frac) * model.step_time(1 + low) + frac * model.step_time(2 + low)
        seconds = drafting * mean_step + (steps - drafting) * model.step_time(1)
    else:  # a draft of K tokens (a tree of K + 1 nodes) every step
        seconds = steps * model.step_time(1 + k)
    return 1e6 * tokens / seconds


def summarize(runs: list[dict], questions: list[Question]) -> list[dict]:
    """One record per method: tokens/s, MAT overall and per category, vLLM counters, equality."""
    # plain decoding of the same workload (answers to EOS or not); batching does not change its tokens
    references = {(r["rounds"], r.get("eos", False)): r["token_ids"] for r in runs if r["method"] == "none"}
    def reference(run):
        return references.get((run["rounds"], run.get("eos", False)))

    records = []
    for run in runs:
        by_category = defaultdict(lambda: [0, 0])
        for q, ids, steps in zip(questions * run["rounds"], run["token_ids"], run["steps"]):
            for key in (q.category, "overall"):
                by_category[key][0] += len(ids)
                by_category[key][1] += steps
        generated = sum(map(len, run["token_ids"]))
        c = run["counters"]
        records.append({
            "method": run["method"],
            "num_spec_tokens": None if run["method"] == "none" else run.get("num_spec_tokens"),
            "sequential": run.get("sequential", False),
            "eos": run.get("eos", False),
            "questions": len(questions),
            "rounds": run["rounds"],
            "tokens": generated,
            "tokens_per_s": generated / run["seconds"],
            "predicted_gpu_tokens_per_s": predicted_gpu_tokens_per_s(run, len(questions) * run["rounds"]),
            "mat": by_category["overall"][0] / by_category["overall"][1],
            "mat_by_category": {k: t / s for k, (t, s) in by_category.items() if k != "overall"},
            **c,
            "vllm_acceptance_length": 1 + c["spec_decode_num_accepted_tokens"] / c["spec_decode_num_drafts"]
            if c["spec_decode_num_drafts"] else None,
            "draft_acceptance_rate": c["spec_decode_num_accepted_tokens"] / c["spec_decode_num_draft_tokens"]
            if c["spec_decode_num_draft_tokens"] else None,
            "equal": None if reference(run) is None else run["token_ids"] == reference(run),
            "proposer_stats": run.get("proposer_stats"),
        })
    return records


def format_table(records: list[dict]) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    def label(r):
        return (r["method"] + (f" K={r['num_spec_tokens']}" if r.get("num_spec_tokens") else "")
                + (" seq" if r.get("sequential") else "") + (" eos" if r.get("eos") else ""))

    lines = [f"{'method':<24} {'MAT':>6} {'equal':>6} {'GPU tok/s':>10} {'CPU tok/s':>10} {'vLLM AL':>8} "
             f"{'accept':>7} {'drafts':>7}"]
    for r in records:
        lines.append(f"{label(r):<24} {r['mat']:>6.3f} {r['equal']!s:>6} {fmt(r.get('predicted_gpu_tokens_per_s'), '.0f'):>10} "
                     f"{r['tokens_per_s']:>10.1f} {fmt(r['vllm_acceptance_length'], '.3f'):>8} "
                     f"{fmt(r['draft_acceptance_rate'], '.3f'):>7} {r['spec_decode_num_drafts']:>7}")
    lines += [
        "MAT: tokens per target forward (bonus counted); equal: tokens identical to plain decoding.",
        "GPU tok/s: PREDICTED per request by the step-latency model (H100 default rates, Llama-3-8B, batch 1;",
        "  attention and drafting not counted) from this run's steps. CPU tok/s: MEASURED wall clock on this machine's",
        "  vLLM-CPU (tree methods on tkernels' PyTorch attention): not a GPU figure.",
    ]
    categories = sorted({c for r in records for c in r["mat_by_category"]})
    width = max(map(len, categories), default=8)
    lines.append(f"MAT by category: {'category':<{width}} " + " ".join(f"{label(r):>24}" for r in records))
    for c in categories:
        lines.append(f"                 {c:<{width}} " + " ".join(f"{r['mat_by_category'].get(c, float('nan')):>24.3f}"
                                                             for r in records))
    return "\n".join(lines)


def _check_method(method: str) -> str:
    speculative_config(method, 1)  # raises "method: ..." for an unknown one
    return method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tkernels speculation-bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="HF folder, 'smollm2' (embedded) or 'tiny'")
    parser.add_argument("--questions", type=int, default=13, help="the first N of the selection")
    parser.add_argument("--per-category", type=int, default=1,
                        help="at most K per category, categories in turn (as bench/spec_mat.py); 0: file order")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--num-spec-tokens", default=str(DEFAULT_SPEC_TOKENS),
                        help="draft tokens per step; comma-separated: one run per value")
    parser.add_argument("--rounds", type=int, default=1, help="submit the questions this many times in sequence")
    parser.add_argument("--sequential", action="store_true", help="one request at a time, as bench/spec_mat.py")
    parser.add_argument("--eos", action="store_true", help="answers end at EOS (default: --max-tokens each)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                        help=f"comma-separated methods to compare: {METHODS} or tree:<drafter>[+prompt]")
    parser.add_argument("--method", help="run only this method, in this process")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep every run (raw) and the records in this JSON file, saved after each run; "
                             "runs it already holds are not repeated")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--require-equal", action="store_true",
                        help="exit 1 unless every speculative method's outputs equal plain decoding's (needs 'none')")
    parser.add_argument("--raw", action="store_true", help=argparse.SUPPRESS)  # a method's raw run, for the parent
    args = parser.parse_args(argv)
    try:
        spec_tokens = [int(k) for k in args.num_spec_tokens.split(",")]
        methods = [_check_method(m) for m in (args.method or args.methods).split(",")]
    except ValueError as err:
        parser.error(f"--num-spec-tokens / --methods: {err}")
    if min(args.questions, args.max_tokens, *spec_tokens, args.rounds, args.per_category or 1) < 1:
        parser.error("--questions, --per-category, --max-tokens, --num-spec-tokens and --rounds must be >= 1")
    questions = specbench_dev(args.questions, args.per_category or None)
    model_dir = resolve_model(args.model)
    if args.method:
        runs = [run_method(model_dir, questions, args.method, args.max_tokens, k, args.rounds, args.sequential, args.eos)
                for k in spec_tokens]
        if args.raw:
            print(json.dumps(runs[0]))
            return 0
    else:
        saved = json.loads(args.out.read_text()) if args.out is not None and args.out.is_file() else {}
        runs = list(saved.get("runs", []))

        def done(method, k):
            return any(r["method"] == method and (r["num_spec_tokens"] == k or method == "none") and r["rounds"] == args.rounds
                       and r["sequential"] == args.sequential and r["eos"] == args.eos for r in runs)

        for method in methods:
            for k in spec_tokens:
                if not done(method, k):
                    runs.append(_run_subprocess(args, method, k))
                    if args.out is not None:
                        args.out.write_text(json.dumps({"model": str(model_dir), "max_tokens": args.max_tokens,
                                                        "question_ids": [q.question_id for q in questions],
                                                        "records": summarize(runs, questions), "runs": runs}) + "\n")
        runs = [r for r in runs if r["method"] in methods and (r["num_spec_tokens"] in spec_tokens or r["method"] == "none")]
    records = summarize(runs, questions)
    result = {"model": str(model_dir), "max_tokens": args.max_tokens, "num_spec_tokens": spec_tokens,
              "rounds": args.rounds, "records": records}
    print(json.dumps(result) if args.json else f"model: {model_dir}\n{format_table(records)}")
    if args.require_equal:
        unequal = [r["method"] for r in records if r["equal"] is not True and r["method"] != "none"]
        if unequal or not any(r["method"] == "none" for r in records):
            print(f"--require-equal: outputs differ from plain decoding for {unequal or 'every method (no none run)'}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
