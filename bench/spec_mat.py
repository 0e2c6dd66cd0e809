"""Acceptance length (MAT) of tkernels' drafters on SmolLM2-135M-Instruct, on the CPU.

Workload (docs/design.md): chat template, first turns of Spec-Bench's dev half
(``tkernels/data/specbench_dev.jsonl``), greedy, 128 new tokens. A reference decoding loop on
transformers verifies each draft tree in ONE target forward: tree tokens at positions
prefix + depth under a 4-D tree attention mask over the KV cache; after greedy verification
(:func:`tkernels.spec.verify.verify_greedy_reference`) the accepted path's K/V is kept and the
rest dropped, and the bonus token becomes the next root.

MAT = mean accepted tokens per verify step, bonus counted (= tokens generated / target forward
passes after the prefill; a step with no draft counts 1). Each speculative output is compared
token-for-token with plain greedy decoding (``equal``). Drafters keep their state (TR's
adjacency matrix, the dynamic policy's estimates) across the questions of a run, which go
round-robin over the categories (file order within each) and share one prefill per question.

Methods: ``pld``; ``tr_static:N`` (the static template's first N nodes); ``tr_dynamic:N`` (every
request's own best N-node tree by calibrated confidence); ``tr_dynamic:N@B`` (at most N nodes,
as many as pay for their H100 step time in a batch of B). Besides MAT, every record predicts
H100 tokens/s per request at batch sizes 1/8/32/64: accepted tokens over the summed step times
of :data:`H100` for B times each step's tree (every request of the batch drafting like this one).

    python bench/spec_mat.py --questions-per-category 4 --max-new-tokens 128
    python bench/spec_mat.py --methods pld,tr_static:80,tr_dynamic:80,tr_dynamic:80@32

Writes ``bench/results/spec_mat_smollm2.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

from tkernels.data import SPECBENCH_DEV, specbench_dev
from tkernels.sched.latency_model import DEFAULT_RATES, LLAMA3_8B, LatencyModel
from tkernels.spec.ngram import propose_ngram
from tkernels.spec.token_recycling import TokenRecycling
from tkernels.spec.tree import ancestor_mask, depths, select_subtree, token_recycling_template
from tkernels.spec.tree_policy import ConfidenceTreePolicy

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = SPECBENCH_DEV
DEFAULT_OUT = REPO / "bench/results/spec_mat_smollm2.json"
DEFAULT_METHODS = ("pld,tr_static:4,tr_static:8,tr_static:16,tr_static:32,tr_static:64,tr_static:80,tr_dynamic:16,"
                   "tr_dynamic:32,tr_dynamic:64,tr_dynamic:80,tr_dynamic:80@1,tr_dynamic:80@8,tr_dynamic:80@32,tr_dynamic:80@64")
# Predicted tokens/s: MAT over the step time of the analytic H100 model (Llama-3-8B target) at
# these batch sizes, every request of the batch drafting like the measured one.
H100 = LatencyModel(LLAMA3_8B, DEFAULT_RATES)
PREDICTED_BATCHES = (1, 8, 32, 64)


# --- drafters: draft(history) -> ragged one-request tree; observe(...) after verification ---


class PromptLookup:
    """Prompt lookup (PLD): the tokens that followed the latest match of the last 1..3 tokens."""

    method, batch = "pld", None

    def __init__(self, num_draft: int = 10):
        self.num_draft, self.nodes = num_draft, num_draft + 1

    def draft(self, history: torch.Tensor):
        return propose_ngram(history[None], torch.tensor([history.numel()]), num_draft=self.num_draft)

    def observe(self, logits, draft_tokens, path_tokens, path_nodes):
        pass


class RecyclingStatic:
    """Token Recycling on the static 80-node template's first ``nodes`` nodes (BFS order)."""

    method, batch = "tr_static", None

    def __init__(self, vocab_size: int, nodes: int):
        self.recycling = TokenRecycling(vocab_size)
        self.nodes = nodes
        self.shape = token_recycling_template().truncate(nodes)

    def draft(self, history: torch.Tensor):
        return self.recycling.draft(history[-1:], self.shape)

    def observe(self, logits, draft_tokens, path_tokens, path_nodes):
        self.recycling.update(logits, draft_tokens)


class RecyclingDynamic(RecyclingStatic):
    """Token Recycling on per-request confidence trees (:meth:`TokenRecycling.draft_best`).

    ``tr_dynamic:80``: every step the best 80-node tree (the same node budget as the static
    template). ``tr_dynamic:80@32``: at most 80 nodes, as many as :class:`ConfidenceTreePolicy`
    finds worth their H100 step time in a batch of 32 requests like this one (the loop runs one).
    """

    method = "tr_dynamic"

    def __init__(self, vocab_size: int, nodes: int, batch: int | None = None):
        super().__init__(vocab_size, nodes)
        self.batch = batch
        self.policy = ConfidenceTreePolicy(step_time=H100)

    def draft(self, history: torch.Tensor):
        tokens, parents, scores, self.probs = self.recycling.draft_best(history[-1:], self.nodes, self.policy.accept_prob)
        keep = torch.ones_like(scores, dtype=torch.bool) if self.batch is None else self.policy.choose(scores.expand(self.batch, -1))[:1]
        index, self.parents, self.cu_nodes = select_subtree(parents.flatten(), keep.flatten())
        self.probs = self.probs.flatten()[index]
        return tokens.flatten()[index], self.parents, self.cu_nodes

    def observe(self, logits, draft_tokens, path_tokens, path_nodes):
        self.policy.update(self.probs, self.parents, self.cu_nodes, path_nodes[None], torch.tensor([path_nodes.numel()]))
        super().observe(logits, draft_tokens, path_tokens, path_nodes)


def make_drafter(spec: str, vocab_size: int):
    name, _, nodes = spec.partition(":")
    nodes, _, batch = nodes.partition("@")
    if name == "pld" and not batch:
        return PromptLookup(int(nodes) - 1) if nodes else PromptLookup()
    if name == "tr_static" and nodes.isdigit() and not batch:
        return RecyclingStatic(vocab_size, int(nodes))
    if name == "tr_dynamic" and nodes.isdigit() and (batch.isdigit() or not batch):
        return RecyclingDynamic(vocab_size, int(nodes), int(batch) if batch else None)
    raise ValueError(f"--methods: unknown method {spec!r} (pld[:nodes], tr_static:N, tr_dynamic:N[@batch])")


# --- decoding loops -------------------------------------------------------------------------


@torch.no_grad()
def prefill(model, prompt: torch.Tensor):
    """The prompt's forward, shared by every decoding of one question: (KV cache, first token)."""
    out = model(input_ids=prompt[None], use_cache=True)
    return out.past_key_values, int(out.logits[0, -1].float().argmax())


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
    """Greedy speculative decoding; returns (tokens, accepted tokens, every verify step's tree nodes)."""
    from tkernels.spec.verify import verify_greedy, verify_greedy_reference

    cache, first = copy.deepcopy(prefilled[0]), prefilled[1]
    tokens = [first]
    history = torch.cat([prompt, torch.tensor(tokens)])
    accepted, step_nodes = 0, []
    while len(tokens) < max_new_tokens and tokens[-1] not in eos:
        draft_tokens, parents, cu_nodes = drafter.draft(history)
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
        committed = path_tokens[1:].tolist()
        accepted += len(committed)
        step_nodes.append(n)
        for token in committed:
            if len(tokens) < max_new_tokens and tokens[-1] not in eos:
                tokens.append(token)
        history = torch.cat([history, path_tokens[1:]])
    return tokens, accepted, step_nodes


# --- workload and report --------------------------------------------------------------------


def load_questions(path: Path, per_category: int | None) -> list[tuple[str, str]]:
    """(category, first turn), at most ``per_category`` per category, round-robin over categories
    (file order within each), so a run cut short still covers every category."""
    return [(q.category, q.prompt) for q in specbench_dev(per_category=per_category, round_robin=True, path=path)]


def encode_prompt(tokenizer, question: str) -> torch.Tensor:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
        return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    return torch.tensor(tokenizer(question)["input_ids"])


def run(model, tokenizer, questions, methods: list[str], max_new_tokens: int, log=print, on_question=None) -> list[dict]:
    """MAT and equality per (method, category) and overall, as result records.

    Questions run in order, each prefilled once for greedy decoding and every method; each
    method's drafter keeps its state across questions. ``on_question(records)`` is called with
    the records so far after every question (for partial results on long runs).
    """
    step_us = H100.step_time
    eos = {model.config.eos_token_id} if isinstance(model.config.eos_token_id, int) else set(model.config.eos_token_id or [])
    drafters = [make_drafter(spec, model.config.vocab_size) for spec in methods]
    # per drafter and category: verify steps, accepted tokens, tree nodes, all equal, questions,
    # and per batch size the predicted H100 time of those steps (every request drafting like this one)
    totals = [defaultdict(lambda: {"steps": 0, "accepted": 0, "nodes": 0, "equal": True, "questions": 0,
                                   "us": dict.fromkeys(PREDICTED_BATCHES, 0.0)}) for _ in drafters]
    records = []
    for index, (category, question) in enumerate(questions):
        start = time.perf_counter()
        prompt = encode_prompt(tokenizer, question)
        prefilled = prefill(model, prompt)
        reference = greedy_decode(model, prefilled, max_new_tokens, eos)
        for drafter, per_cat in zip(drafters, totals):
            tokens, accepted, step_nodes = speculative_decode(model, prompt, prefilled, max_new_tokens, eos, drafter)
            for key in (category, "overall"):
                acc = per_cat[key]
                acc["steps"] += len(step_nodes)
                acc["accepted"] += accepted
                acc["nodes"] += sum(step_nodes)
                acc["equal"] &= tokens == reference
                acc["questions"] += 1
                for b in PREDICTED_BATCHES:
                    acc["us"][b] += sum(step_us(b * n) for n in step_nodes)
        records = [
            {
                "method": drafter.method, "nodes": drafter.nodes, "batch": drafter.batch, "category": cat,
                "questions": acc["questions"], "mat": acc["accepted"] / max(acc["steps"], 1), "equal": bool(acc["equal"]),
                "mean_tree_nodes": acc["nodes"] / max(acc["steps"], 1),
                "predicted_tokens_per_s": {str(b): 1e6 * acc["accepted"] / us for b, us in acc["us"].items()},
            }
            for drafter, per_cat in zip(drafters, totals)
            for cat, acc in per_cat.items()
        ]
        mats = " ".join(f"{r['mat']:.2f}" for r in records if r["category"] == "overall")
        log(f"[{index + 1}/{len(questions)}] {category}: {prompt.numel()} prompt tokens, {time.perf_counter() - start:.0f} s; overall MAT {mats}")
        if on_question:
            on_question(records)
    return records


def format_table(records: list[dict]) -> str:
    """MAT per category, then the overall predicted H100 tokens/s (per request) per batch size."""
    categories = list(dict.fromkeys(r["category"] for r in records if r["category"] != "overall")) + ["overall"]
    rows = defaultdict(dict)
    for r in records:
        rows[(r["method"], f"{r['nodes']}" + (f"@{r['batch']}" if r["batch"] else ""))][r["category"]] = r
    lines = [f"{'method':<12}{'nodes':>7}{'used':>6}  " + "".join(f"{c[:11]:>12}" for c in categories) + "   equal"]
    for (method, nodes), by_cat in rows.items():
        cells = "".join(f"{by_cat[c]['mat']:>12.3f}" if c in by_cat else f"{'-':>12}" for c in categories)
        lines.append(f"{method:<12}{nodes:>7}{by_cat['overall']['mean_tree_nodes']:>6.1f}  {cells}   {all(r['equal'] for r in by_cat.values())}")
    lines.append(f"\npredicted H100 tokens/s per request (Llama-3-8B step-time model)\n{'method':<12}{'nodes':>7}"
                 + "".join(f"{'batch ' + str(b):>12}" for b in PREDICTED_BATCHES))
    for (method, nodes), by_cat in rows.items():
        predicted = by_cat["overall"]["predicted_tokens_per_s"]
        lines.append(f"{method:<12}{nodes:>7}" + "".join(f"{predicted[str(b)]:>12.0f}" for b in PREDICTED_BATCHES))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model-dir", type=Path, default=None, help="HF folder (default: tkernels.models.smollm2_dir())")
    parser.add_argument("--questions-per-category", type=int, default=None, help="default: all")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"--data: {args.data} not found (the Spec-Bench dev questions ship as {SPECBENCH_DEV})")
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model_dir is None:
        from tkernels.models import smollm2_dir

        args.model_dir = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    questions = load_questions(args.data, args.questions_per_category)
    print(f"{len(questions)} questions, {args.max_new_tokens} new tokens, model {args.model_dir.name}")
    meta = {"model": "SmolLM2-135M-Instruct" if "smollm2" in str(args.model_dir).lower() else args.model_dir.name,
            "max_new_tokens": args.max_new_tokens, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(records):
        args.out.write_text(json.dumps({**meta, "records": records}, indent=1) + "\n")

    records = run(model, tokenizer, questions, args.methods.split(","), args.max_new_tokens, on_question=save)
    print(format_table(records))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
