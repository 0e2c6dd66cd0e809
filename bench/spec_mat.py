"""Acceptance length (MAT) of tkernels' drafters on SmolLM2-135M-Instruct, on the CPU.

Workload (docs/design.md): chat template, first turns of Spec-Bench's dev half
(``tkernels/data/specbench_dev.jsonl``), greedy, 128 new tokens. A reference decoding loop on
transformers verifies each draft tree in ONE target forward: tree tokens at positions
prefix + depth under a 4-D tree attention mask over the KV cache; after greedy verification
(:func:`tkernels.spec.verify.verify_greedy_reference`) the accepted path's K/V is kept and the
rest dropped, and the bonus token becomes the next root.

MAT (mean accepted tokens per target forward) = tokens the user receives (the first from the
prefill's forward, then every verify step's accepted drafts and bonus, up to the cap or EOS) /
target forwards that produced them (the prefill + every verify step; a step with no draft gives
one token), summed over questions; the vLLM speculation bench
(:mod:`tkernels.cli.speculation_bench`) counts the same way. Each speculative output is
compared token-for-token with plain greedy decoding (``equal``). Drafters keep their state (TR's
adjacency matrix, the policies' estimates) across the questions of a run, which go round-robin
over the categories (file order within each) and share one prefill per question.

Methods (:mod:`tkernels.spec.drafters`, the code the vLLM tree proposer runs too): ``pld``;
``tr_static:N`` (the static template's first N nodes; past 80 nodes a wider template of the same
rule, :func:`tkernels.spec.drafters.static_template`); ``tr:N`` (every request's own best N-node
Token Recycling tree by calibrated confidence); ``retrieval:N`` (continuations of the request's
own context); ``hybrid:N`` (one tree of both); ``...@B`` (scored methods: at most N nodes, as
many as pay for their H100 step time in a batch of B); ``...+prompt`` (also recycle the
target's top-k at the prompt's positions, from the prefill). Besides MAT, every record
predicts tokens/s per request on an H100 and an H200 at batch sizes 1/8/32/64 from the
step-latency model (:data:`STEP_MODELS`): tokens received after the prefill's over the summed
predicted times of the verify steps, each of B times its tree's nodes (every request of the
batch drafting like this one); with ``--draft-cost`` (D1's file, ``bench/bench_drafters.py``, or
H1's, ``bench/bench_host.py``, timed per batch size) also with the host's drafting time per
request added to every step.

Results keep every method's per-question raw counts, so runs of different methods in parallel
processes merge (``--merge``) and an interrupted run resumes (``--resume``) at method granularity.

    python bench/spec_mat.py --questions-per-category 2 --methods pld,tr_static:32,hybrid:32 --out a.json
    python bench/spec_mat.py --questions-per-category 2 --methods tr:80,hybrid:80@32 --out b.json
    python bench/spec_mat.py --questions-per-category 2 --merge a.json b.json   # -> --out

Writes ``bench/results/spec_mat_smollm2.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from tkernels.data import SPECBENCH_DEV, Question, specbench_dev
from tkernels.sched.latency_model import DEFAULT_RATES, LLAMA3_8B, LatencyModel
from tkernels.spec.drafters import METHODS, TreeDrafter
from tkernels.spec.token_recycling import top_k_probs
from tkernels.spec.tree import TOP_K, ancestor_mask, depths

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = SPECBENCH_DEV
DEFAULT_OUT = REPO / "bench/results/spec_mat_smollm2.json"
# the full comparison (run as parallel processes, then --merge); the committed
# bench/results/spec_mat_smollm2.json holds the methods measured so far (README, Speculation)
DEFAULT_METHODS = ("pld,tr_static:9,tr_static:16,tr_static:32,tr_static:80,tr_static:128,tr:32,tr:80,"
                   "hybrid:9,hybrid:16,hybrid:32,hybrid:80,hybrid:128,hybrid:256")
# Predicted tokens/s per request: tokens over the step times of a Llama-3-8B target at these batch
# sizes, every request of the batch drafting like the measured one. H100: the analytic default
# rates. H200: the same chip's compute with HBM3e weight/KV bandwidth (4.3 / 3.6 TB/s effective,
# the H100 default's 90% / 75% of 4.8 TB/s); it predicts x1.14 at 128 and x1.30 at 192 batch
# tokens over one token, against x1.12 / x1.31 measured on an H200 (issue 15).
H100 = LatencyModel(LLAMA3_8B, DEFAULT_RATES)
H200 = LatencyModel(LLAMA3_8B, dataclasses.replace(DEFAULT_RATES, weight_gbps=4300.0, kv_gbps=3600.0))
STEP_MODELS = {"H100": H100, "H200": H200}
PREDICTED_BATCHES = (1, 8, 32, 64)


# --- drafters: draft(history) -> ragged one-request tree; observe(...) after verification ---


class HarnessDrafter:
    """One method of :class:`tkernels.spec.drafters.TreeDrafter` on the harness's single request.

    ``spec`` = ``method[:nodes][@batch][+prompt]``: ``nodes`` the tree budget (root included;
    ``pld`` default 11, i.e. 10 drafted tokens), ``@batch`` prices the tree's nodes for a batch
    of that many requests like this one (:meth:`TreeDrafter.choose`, scored methods only),
    ``+prompt`` recycles the target's top-k at the prompt's positions from the prefill.
    """

    def __init__(self, spec: str, vocab_size: int):
        name, nodes, batch, prompt = parse_method(spec)
        if name not in METHODS or (nodes is None and name != "pld") or (batch and name in ("pld", "tr_static")):
            raise ValueError(f"--methods: unknown method {spec!r} (pld[:N], tr_static:N, tr:N, retrieval:N or hybrid:N, "
                             "with @batch for tr/retrieval/hybrid, +prompt for prompt recycling)")
        self.method, self.nodes, self.batch, self.prompt = name, nodes or 11, batch, prompt
        self.drafter = TreeDrafter(vocab_size, name, step_time=H100)
        self.tree = None

    def begin(self, prompt: torch.Tensor, prompt_topk) -> None:
        """A new question: its prompt and the target's top-k (ids, probs) at every prompt position."""
        for key in self.drafter.keys():
            self.drafter.release(key)
        if self.prompt:
            self.drafter.recycle(prompt, *prompt_topk)

    def draft(self, history: torch.Tensor):
        trees = self.drafter.draft([0], [history], self.nodes)
        if self.batch:
            trees = self.drafter.choose(trees, batch_size=self.batch)
        self.tree = trees[0]
        return self.tree.tokens, self.tree.parents, torch.tensor([0, len(self.tree)], dtype=torch.int32)

    def observe(self, logits, draft_tokens, path_tokens, path_nodes):
        ids, probs = self.drafter.recycling.top_k(logits) if self.drafter.recycling is not None else (None, None)
        self.drafter.observe([self.tree], ids, probs, [path_nodes.tolist()])


def parse_method(spec: str) -> tuple[str, int | None, int | None, bool]:
    """``"hybrid:80@32+prompt"`` -> ``("hybrid", 80, 32, True)``; missing parts are None / False."""
    spec, plus, option = spec.partition("+")
    if plus and option != "prompt":
        raise ValueError(f"--methods: unknown option +{option} in {spec + plus + option!r} (only +prompt)")
    name, _, rest = spec.partition(":")
    nodes, _, batch = rest.partition("@")
    if not (nodes.isdigit() or not nodes) or not (batch.isdigit() or not batch):
        raise ValueError(f"--methods: bad method {spec!r}")
    return name, int(nodes) if nodes else None, int(batch) if batch else None, bool(plus)


def make_drafter(spec: str, vocab_size: int) -> HarnessDrafter:
    return HarnessDrafter(spec, vocab_size)


# --- decoding loops -------------------------------------------------------------------------


@torch.no_grad()
def prefill(model, prompt: torch.Tensor, k: int = TOP_K):
    """The prompt's forward, shared by every decoding of one question: (KV cache, first token,
    (top-k ids, their probabilities) at every prompt position, for ``+prompt`` recycling)."""
    out = model(input_ids=prompt[None], use_cache=True)
    return out.past_key_values, int(out.logits[0, -1].float().argmax()), top_k_probs(out.logits[0], k)


@torch.no_grad()
def greedy_decode(model, prefilled, max_new_tokens: int, eos: set[int]) -> list[int]:
    """Plain greedy decoding with a KV cache, one token per forward."""
    cache, first = copy.deepcopy(prefilled[0]), prefilled[1]
    tokens = [first]
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].float().argmax()))
    return tokens


def _keep_kv(cache, prefix_len: int, keep: torch.Tensor) -> None:
    """Keep the first ``prefix_len`` cached positions and the tree positions ``prefix_len + keep``."""
    index = torch.cat([torch.arange(prefix_len), prefix_len + keep.long()])
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


@torch.no_grad()
def speculative_decode(model, prompt: torch.Tensor, prefilled, max_new_tokens: int, eos: set[int], drafter):
    """Greedy speculative decoding; returns (tokens, every verify step's tree nodes, the host
    seconds spent drafting).

    ``tokens`` are what the user receives: the prefill's token, then each step's accepted drafts
    and bonus up to ``max_new_tokens`` or EOS (a step's tokens past either are dropped)."""
    from tkernels.spec.verify import verify_greedy, verify_greedy_reference

    cache, first = copy.deepcopy(prefilled[0]), prefilled[1]
    if hasattr(drafter, "begin"):
        drafter.begin(prompt, prefilled[2])
    tokens = [first]
    history = torch.cat([prompt, torch.tensor(tokens)])
    step_nodes, draft_s = [], 0.0
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        start = time.perf_counter()
        draft_tokens, parents, cu_nodes = drafter.draft(history)
        draft_s += time.perf_counter() - start
        n, prefix_len = draft_tokens.numel(), cache.get_seq_length()
        mask = torch.ones(1, 1, n, prefix_len + n, dtype=torch.bool)
        mask[0, 0, :, prefix_len:] = ancestor_mask(parents)
        logits = model(
            input_ids=draft_tokens[None],
            position_ids=(prefix_len + depths(parents).long())[None],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
        ).logits[0].float()  # verification takes fp32/fp16/bf16; greedy_decode argmaxes fp32 too
        if n == 1:  # no draft: a plain decode step, nothing to verify
            path_nodes, path_tokens = torch.zeros(1, dtype=torch.int64), torch.stack([draft_tokens[0], logits[0].argmax()])
        else:
            verify = verify_greedy if logits.is_cuda else verify_greedy_reference  # the kernel needs a GPU
            accepted_tokens, accepted_nodes, num_accepted = verify(logits, draft_tokens, parents, cu_nodes)
            num = int(num_accepted[0])
            path_nodes = accepted_nodes[0, :num].long()  # root + accepted drafts
            path_tokens = torch.cat([draft_tokens[:1], accepted_tokens[0, :num]])  # root, accepted, bonus
        drafter.observe(logits, draft_tokens, path_tokens, path_nodes)
        _keep_kv(cache, prefix_len, path_nodes)
        step_nodes.append(n)
        for token in path_tokens[1:].tolist():
            if len(tokens) < max_new_tokens and tokens[-1] not in eos:
                tokens.append(token)
        history = torch.cat([history, path_tokens[1:]])
    return tokens, step_nodes, draft_s


# --- workload and report --------------------------------------------------------------------


def load_questions(path: Path, per_category: int | None) -> list[Question]:
    """At most ``per_category`` questions per category, round-robin over categories (file order
    within each), so a run cut short still covers every category."""
    return specbench_dev(per_category=per_category, round_robin=True, path=path)


def encode_prompt(tokenizer, question: str) -> torch.Tensor:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(tokenizer(question)["input_ids"])


def run(model, tokenizer, questions: list[Question], methods: list[str], max_new_tokens: int, log=print,
        on_question=None) -> dict[str, list[dict]]:
    """Every method's decoding of every question, as raw per-question records.

    Questions run in order, each prefilled once for greedy decoding and every method; each
    method's drafter keeps its state across questions. Returns ``{method: [record per question]}``,
    a record ``{"question_id", "category", "prompt_tokens", "tokens", "forwards", "step_nodes",
    "draft_s", "equal"}``: ``tokens`` received (up to the cap or EOS), ``forwards`` the target
    forwards that produced them (the prefill + one per verify step), ``step_nodes`` every verify
    step's tree size, ``draft_s`` the host seconds its drafter took over those steps.
    ``on_question(raw)`` is called after every question (partial results on long runs).
    """
    eos = {model.config.eos_token_id} if isinstance(model.config.eos_token_id, int) else set(model.config.eos_token_id or [])
    drafters = [make_drafter(spec, model.config.vocab_size) for spec in methods]
    raw: dict[str, list[dict]] = {spec: [] for spec in methods}
    for index, q in enumerate(questions):
        start = time.perf_counter()
        prompt = encode_prompt(tokenizer, q.prompt)
        prefilled = prefill(model, prompt)
        reference = greedy_decode(model, prefilled, max_new_tokens, eos)
        for spec, drafter in zip(methods, drafters):
            tokens, step_nodes, draft_s = speculative_decode(model, prompt, prefilled, max_new_tokens, eos, drafter)
            raw[spec].append({"question_id": q.question_id, "category": q.category, "prompt_tokens": prompt.numel(),
                              "tokens": len(tokens), "forwards": 1 + len(step_nodes), "step_nodes": step_nodes,
                              "draft_s": draft_s, "equal": tokens == reference})
        mats = " ".join(f"{r['mat']:.2f}" for r in summarize(raw) if r["category"] == "overall")
        log(f"[{index + 1}/{len(questions)}] {q.category}: {prompt.numel()} prompt tokens, {time.perf_counter() - start:.0f} s; "
            f"overall MAT {mats}")
        if on_question:
            on_question(raw)
    return raw


def predicted_tokens_per_s(steps: list[int], decode_tokens: int,
                           host_us_per_request: float | dict[int, float] = 0.0) -> dict[str, dict[str, float]]:
    """Tokens/s per request per GPU and batch size: ``decode_tokens`` over the predicted times of
    the verify ``steps`` (tree sizes; each step ``batch`` times its tree), plus ``batch`` requests'
    host drafting per step (``host_us_per_request``: one time for every batch, or per batch size)."""
    def host(b: int) -> float:
        return host_us_per_request[b] if isinstance(host_us_per_request, dict) else host_us_per_request

    return {gpu: {str(b): 1e6 * decode_tokens / max(sum(model.step_time(b * n) for n in steps)
                                                     + len(steps) * b * host(b), 1e-9)
                  for b in PREDICTED_BATCHES}
            for gpu, model in STEP_MODELS.items()}


def load_draft_cost(path: Path) -> dict[tuple[str, int], float | dict[int, float]]:
    """Drafting time per request, µs, by ``(method, nodes)``, from the pytest-benchmark JSON of
    ``bench/bench_drafters.py`` (D1, one batch size: a time) or ``bench/bench_host.py`` (H1,
    batch 1/8/32/64: per batch size a time, each predicted batch priced at its own): each
    benchmark's median over its batch."""
    costs: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for bench in json.loads(Path(path).read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        if str(info.get("workload", "")).startswith("H2-"):  # bench_host.py's whole-step records
            continue
        if {"impl", "nodes", "batch"} <= set(info):
            costs[(info["impl"], int(info["nodes"]))][int(info["batch"])] = 1e6 * bench["stats"]["median"] / info["batch"]
    if not costs:
        raise ValueError(f"path: {path} holds no bench_drafters.py records (extra_info impl, nodes, batch)")
    if all(len(by_batch) == 1 for by_batch in costs.values()):
        return {key: next(iter(by_batch.values())) for key, by_batch in costs.items()}
    missing = {key: sorted(set(PREDICTED_BATCHES) - set(by_batch)) for key, by_batch in costs.items()
               if not set(PREDICTED_BATCHES) <= set(by_batch)}
    if missing:
        raise ValueError(f"path: per-batch costs must cover batches {PREDICTED_BATCHES}, missing {missing}")
    return dict(costs)


def summarize(raw: dict[str, list[dict]], draft_us: dict[tuple[str, int], float] | None = None) -> list[dict]:
    """Result records per (method, category) and overall from :func:`run`'s raw records.

    ``mat`` = tokens received / target forwards that produced them (summed over the questions),
    the definition :mod:`tkernels.cli.speculation_bench` uses too. ``predicted_tokens_per_s``
    per GPU and batch size: tokens received after the prefill's / the summed predicted time of the
    verify steps, ``batch`` times each step's tree (every request of the batch drafting like this one).
    With ``draft_us`` (:func:`load_draft_cost`), records of a (method, nodes) it prices also get
    ``draft_us_per_request`` and ``predicted_tokens_per_s_with_drafting``: every step also pays
    ``batch`` requests' drafting on the host, before the GPU step and not overlapped with it.
    """
    records = []
    for spec, per_question in raw.items():
        method, nodes, batch, prompt = parse_method(spec)
        method += "+prompt" if prompt else ""
        drafter_nodes = 11 if nodes is None else nodes  # pld's default
        by_category: dict[str, list[dict]] = defaultdict(list)
        for r in per_question:
            by_category[r["category"]].append(r)
            by_category["overall"].append(r)
        host_us = (draft_us or {}).get((method, drafter_nodes))
        for category, rs in by_category.items():
            steps = [n for r in rs for n in r["step_nodes"]]
            decode_tokens = sum(r["tokens"] - 1 for r in rs)
            drafting = {} if host_us is None else {
                "draft_us_per_request": host_us if not isinstance(host_us, dict) else {str(b): us for b, us in host_us.items()},
                "predicted_tokens_per_s_with_drafting": predicted_tokens_per_s(steps, decode_tokens, host_us)}
            records.append({
                "method": method, "nodes": drafter_nodes, "batch": batch, "category": category, "questions": len(rs),
                "tokens": sum(r["tokens"] for r in rs), "forwards": sum(r["forwards"] for r in rs),
                "mat": sum(r["tokens"] for r in rs) / sum(r["forwards"] for r in rs),
                "equal": all(r["equal"] for r in rs), "mean_tree_nodes": sum(steps) / max(len(steps), 1),
                # host time per drafting step on the machine that ran it (None: a run from before it was kept)
                "draft_ms_per_step": (1e3 * sum(r["draft_s"] for r in rs) / max(len(steps), 1)
                                      if all("draft_s" in r for r in rs) else None),
                "predicted_tokens_per_s": predicted_tokens_per_s(steps, decode_tokens),
                **drafting,
            })
    return records


def format_table(records: list[dict]) -> str:
    """MAT per category, then the overall predicted tokens/s (per request) per GPU and batch size."""
    categories = list(dict.fromkeys(r["category"] for r in records if r["category"] != "overall")) + ["overall"]
    rows = defaultdict(dict)
    for r in records:
        rows[(r["method"], f"{r['nodes']}" + (f"@{r['batch']}" if r["batch"] else ""))][r["category"]] = r
    lines = [f"{'method':<12}{'nodes':>7}{'used':>6}  " + "".join(f"{c[:11]:>12}" for c in categories) + "   equal"]
    for (method, nodes), by_cat in rows.items():
        cells = "".join(f"{by_cat[c]['mat']:>12.3f}" if c in by_cat else f"{'-':>12}" for c in categories)
        lines.append(f"{method:<12}{nodes:>7}{by_cat['overall']['mean_tree_nodes']:>6.1f}  {cells}   {all(r['equal'] for r in by_cat.values())}")
    for gpu in STEP_MODELS:
        lines.append(f"\npredicted {gpu} tokens/s per request (Llama-3-8B step-time model)\n{'method':<12}{'nodes':>7}"
                     + "".join(f"{'batch ' + str(b):>12}" for b in PREDICTED_BATCHES))
        for (method, nodes), by_cat in rows.items():
            predicted = by_cat["overall"]["predicted_tokens_per_s"][gpu]
            lines.append(f"{method:<12}{nodes:>7}" + "".join(f"{predicted[str(b)]:>12.0f}" for b in PREDICTED_BATCHES))
    drafted = {key: by_cat["overall"] for key, by_cat in rows.items()
               if "predicted_tokens_per_s_with_drafting" in by_cat["overall"]}
    for gpu in STEP_MODELS if drafted else ():
        lines.append(f"\npredicted {gpu} tokens/s per request with the host's drafting (--draft-cost)\n"
                     f"{'method':<12}{'nodes':>7}{'us/req':>16}" + "".join(f"{'batch ' + str(b):>12}" for b in PREDICTED_BATCHES))
        for (method, nodes), r in drafted.items():
            predicted = r["predicted_tokens_per_s_with_drafting"][gpu]
            cost = r["draft_us_per_request"]
            cost = "/".join(f"{v:.0f}" for v in cost.values()) if isinstance(cost, dict) else f"{cost:.0f}"
            lines.append(f"{method:<12}{nodes:>7}{cost:>16}"
                         + "".join(f"{predicted[str(b)]:>12.0f}" for b in PREDICTED_BATCHES))
    return "\n".join(lines)


def merge_raw(documents: list[dict], question_ids: list[int] | None = None) -> dict[str, list[dict]]:
    """Per method, the raw records of the documents that ran it over every question (``question_ids``,
    default the first document's): runs of different methods merge, incomplete ones are dropped."""
    if question_ids is None and documents:
        question_ids = documents[0].get("question_ids")
    merged: dict[str, list[dict]] = {}
    for doc in documents:
        for spec, per_question in doc.get("raw", {}).items():
            ids = [r["question_id"] for r in per_question]
            if question_ids is None or ids == question_ids:
                merged[spec] = per_question
    return merged


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model-dir", type=Path, default=None, help="HF folder (default: tkernels.models.smollm2_dir())")
    parser.add_argument("--questions-per-category", type=int, default=None, help="default: all")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--resume", action="store_true",
                        help="keep the methods --out already holds for every question and run only the others")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="no run: merge these result files' complete methods into --out and print the table")
    parser.add_argument("--draft-cost", type=Path, default=None,
                        help="bench/bench_drafters.py's or bench/bench_host.py's pytest-benchmark JSON: also predict "
                             "tokens/s with that host's drafting time per step (e.g. bench/results/host_cpu_vm.json)")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"--data: {args.data} not found (the Spec-Bench dev questions ship as {SPECBENCH_DEV})")
    questions = load_questions(args.data, args.questions_per_category)
    question_ids = [q.question_id for q in questions]
    meta = {"model": "SmolLM2-135M-Instruct", "max_new_tokens": args.max_new_tokens, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "question_ids": question_ids,
            "mat": "tokens received (up to max_new_tokens or EOS) / target forwards that produced them (prefill included)",
            "step_models": {gpu: dataclasses.asdict(m.rates) for gpu, m in STEP_MODELS.items()}}
    draft_us = None
    if args.draft_cost is not None:
        draft_us = load_draft_cost(args.draft_cost)
        path = args.draft_cost.resolve()
        meta["draft_cost"] = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else path.name

    def save(raw):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "records": summarize(raw, draft_us), "raw": raw}, indent=1) + "\n")

    if args.merge:
        documents = [json.loads(p.read_text()) for p in args.merge]
        # the questions: --questions-per-category's where given, else the first file's
        raw = merge_raw(documents, question_ids if args.questions_per_category is not None else None)
        if not raw:  # never overwrite --out (the committed results, by default) with nothing
            which = (f"the {len(question_ids)} questions of --questions-per-category {args.questions_per_category}"
                     if args.questions_per_category is not None else "the first file's questions")
            raise SystemExit(f"--merge: no method of {[str(p) for p in args.merge]} ran over every one of {which}; "
                             f"{args.out} left as it was")
        meta["question_ids"] = [r["question_id"] for r in next(iter(raw.values()))]
        save(raw)
        print(format_table(summarize(raw, draft_us)))
        print(f"wrote {args.out}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_dir is None:
        from tkernels.models import smollm2_dir

        args.model_dir = smollm2_dir()
    if "smollm2" not in str(args.model_dir).lower():
        meta["model"] = args.model_dir.name
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    methods = args.methods.split(",")
    kept = merge_raw([json.loads(args.out.read_text())], question_ids) if args.resume and args.out.is_file() else {}
    todo = [m for m in methods if m not in kept]
    print(f"{len(questions)} questions, {args.max_new_tokens} new tokens, model {args.model_dir.name}; "
          f"running {todo}" + (f", kept {list(kept)}" if kept else ""))
    raw = {**kept, **run(model, tokenizer, questions, todo, args.max_new_tokens, on_question=lambda r: save({**kept, **r}))}
    save(raw)
    print(format_table(summarize(raw, draft_us)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
