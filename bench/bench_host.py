"""Host drafting cost H1: per-request time of one :meth:`TreeDrafter.draft_batch` of the batch (the
tree proposer's call), every method, beside vLLM's ``ngram`` proposer (its own numba path and thread
setting) in the same run.

Workload: D1's (:mod:`bench_drafters`: vocabulary 49152, every adjacency row written, 600-token
histories that follow a row's best candidate 70% of the time), at batch 1 / 8 / 32 / 64 x 9 /
32 / 80 / 256 nodes. Histories reach the drafters as the vLLM tree proposer passes them: views
``token_ids_cpu[i, :n]`` of vLLM's int32 token array, built inside the timed call; vLLM's
``NgramProposer.propose`` gets the array itself (prompt lookup of 1..3 tokens, as the project's
vLLM comparisons run it) and proposes ``K`` = 8 tokens (the issue's reference) and
``nodes - 1``. Each drafter has seen one verify step of every request before timing.
One host thread (torch's and numba's). ``us`` in each record: the median of 7 calls over the batch (the table and ``--draft-cost``
read pytest-benchmark's median instead, over more calls); ``x_ngram``: that over vLLM's ``ngram``
at K = 8 and the same batch (measured in the same run, earlier in it).

``pytest bench/bench_host.py --benchmark-enable --benchmark-json=bench/results/host_cpu_vm.json``
(a few minutes on the project's 2-core VM); ``python bench/bench_host.py <that json>`` prints the
table of docs/speculation.md. Without ``--benchmark-enable`` (the tiny bench smoke test) each
case runs once, on batch 1 / 8 x 9 / 32 nodes under ``TKERNELS_BENCH_TINY=1``.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

import numpy as np
import pytest
import torch
from bench_drafters import BATCH, VOCAB, K, workload
from common import TINY, WRITES_RESULTS

from tkernels.spec.drafters import METHODS, TreeDrafter

BATCHES = (1, 8) if TINY else (1, 8, 32, 64)
NODES = (9, 32) if TINY else (9, 32, 80, 256)
# one workload for every batch (its first n histories), shared with bench_drafters.py where the
# batches fit: D1's adjacency takes seconds to build (half a minute on a loaded VM)
WORKLOAD_BATCH = max(*BATCHES, BATCH)
NGRAM_K = 8  # the reference: vLLM's ngram at K = 8
NGRAM_MIN, NGRAM_MAX = 1, 3  # tkernels/cli/speculation_bench.py's
MAX_MODEL_LEN = 1024
NOTE = os.environ.get("TKERNELS_BENCH_NOTE", "")  # e.g. "shared machine, loaded": goes into every record
_ngram_us: dict[int, float] = {}  # batch -> vLLM ngram at K = 8, µs per request


@functools.cache
def token_ids(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's ``token_ids_cpu`` int32 [batch, MAX_MODEL_LEN] and ``num_tokens_no_spec`` [batch]."""
    histories = workload(WORKLOAD_BATCH)[2][:batch]
    ids = np.zeros((batch, MAX_MODEL_LEN), np.int32)
    for i, h in enumerate(histories):
        ids[i, :len(h)] = h
    return ids, np.array([len(h) for h in histories], np.int32)


@functools.cache
def drafter(method: str, batch: int, nodes: int) -> TreeDrafter:
    ids, probs, _ = workload(WORKLOAD_BATCH)
    d = TreeDrafter(VOCAB, method, K)
    if d.recycling is not None:
        d.recycle(torch.arange(VOCAB), ids, probs)
    tokens, lengths = token_ids(batch)
    trees = d.draft(list(range(batch)), [tokens[i, :n] for i, n in enumerate(lengths.tolist())], nodes)
    if d.recycling is not None:  # one verify step: own rows, calibrations
        rows = torch.cat([t.tokens for t in trees])
        d.observe(trees, ids[rows], probs[rows], [[0] for _ in trees])
    return d


def ngram_proposer(k: int, batch: int):
    """vLLM's ``NgramProposer`` without a ``VllmConfig``: its ``__init__``'s attributes, set as
    it sets them (one numba thread below 8192 batch tokens, which this workload stays under)."""
    from vllm.v1.spec_decode.ngram_proposer import NgramProposer

    proposer = NgramProposer.__new__(NgramProposer)
    proposer.min_n, proposer.max_n, proposer.k, proposer.max_model_len = NGRAM_MIN, NGRAM_MAX, k, MAX_MODEL_LEN
    proposer.valid_ngram_draft = np.zeros((batch, k), np.int32)
    proposer.valid_ngram_num_drafts = np.zeros(batch, np.int32)
    proposer.num_tokens_threshold = 8192
    proposer.num_numba_thread_available = 1
    return proposer


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One host thread for every drafter, as for vLLM's ngram (``tr``'s beam and the reference
    drafters' tensor calls would otherwise spread over torch's intra-op pool, whose spinning
    threads fight the other jobs of a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _median_us(fn, batch: int, calls: int = 7) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / batch * 1e6


def _record(benchmark, records, record: dict) -> None:
    if NOTE:
        record["note"] = NOTE
    benchmark.extra_info.update(record)
    if WRITES_RESULTS:
        records.append(record)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("k", sorted({NGRAM_K, *(n - 1 for n in NODES)}))
def test_vllm_ngram(benchmark, records, k, batch):
    pytest.importorskip("vllm")
    tokens, lengths = token_ids(batch)
    proposer = ngram_proposer(k, batch)
    sampled = [[0]] * batch  # every request decoded a token: every one gets a proposal

    def step():
        return proposer.propose(k, sampled, lengths, tokens)

    step()  # numba compiles on the first call (vLLM's own warm-up does the same)
    drafts = benchmark(step)
    assert len(drafts) == batch and all(len(d) <= k for d in drafts)
    us = _median_us(step, batch)
    if k == NGRAM_K:
        _ngram_us[batch] = us
    _record(benchmark, records, {"workload": f"H1-ngram-k{k}-b{batch}", "impl": "vllm-ngram", "k": k,
                                 "nodes": k + 1, "batch": batch, "us": us, "check": "proposal sizes"})


@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("method", METHODS)
def test_draft(benchmark, records, method, batch, nodes):
    d = drafter(method, batch, nodes)
    tokens, lengths = token_ids(batch)
    keys, sizes = list(range(batch)), lengths.tolist()

    def step():  # as the tree proposer (plugins/vllm/tree_proposer.py) calls it: the batch's trees as one DraftBatch
        return d.draft_batch(keys, [tokens[i, :n] for i, n in enumerate(sizes)], nodes)

    trees = benchmark(step)
    assert len(trees) == batch and 1 <= trees.sizes.min() and trees.sizes.max() <= nodes
    us = _median_us(step, batch)
    record = {"workload": f"H1-draft-{method}-b{batch}-n{nodes}", "impl": method, "nodes": nodes, "batch": batch,
              "us": us, "compiled": d.compiled is not None, "check": "tree sizes"}
    if batch in _ngram_us:
        record["x_ngram"] = us / _ngram_us[batch]
    _record(benchmark, records, record)


# --- H2: the tree proposer's whole host work per step, beside vLLM's ngram + rejection sampler --

STEP_BATCH, STEP_NODES = (8, 9) if TINY else (64, 32)
# Every method with its own step path: the proposer's default (hybrid), the static template and
# prompt lookup.
STEP_DRAFTERS = ("hybrid", "tr_static", "pld")
STEP_LOGITS_VOCAB = 128  # logits columns: the device's own work per row kept negligible on both sides
STEP_ROUNDS = 5 if TINY else 30
# Drafts each row accepts per step: every tree's whole first-child path (~18 drafts for the
# hybrid, 3 for the template, 1 for prompt lookup: the most the automata and the learning take
# per step), and at most 2 (a mean acceptance length of 3, above the tree proposer's 2.1-2.6 in
# every serving run of docs/serving.md).
STEP_ACCEPTS = (None, 2)
# The step's context: room for the warm-up and timed steps' accepted tokens after D1's 600-token
# histories (a step commits up to a whole first-child path; the proposer drafts within the context).
STEP_MAX_MODEL_LEN = 2048
_step_ms: dict[int, float] = {}  # vLLM ngram + rejection sampler per step, by K


class _NoLaunch:
    """A Triton kernel's launch that does nothing (the kernels are not host work); the argmax
    pass leaves every node's row maximum finite and the walk writes the known greedy outputs."""

    def __init__(self, fill=None):
        self.fill = fill

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        if self.fill is not None:
            self.fill(args, kwargs)


def _stub_kernels(monkeypatch, outputs: list) -> None:
    from tkernels.spec import kv_compaction
    from tkernels.spec.verify import kernels as VK
    from tkernels.spec.verify import launch as VL

    def node_pass(args, kwargs):
        if kwargs.get("MODE") == VK.ARGMAX:
            args[8].zero_()  # row_max

    def walk(args, kwargs):
        for out, known in zip(args[5:8], outputs[0]):
            out.copy_(known)

    monkeypatch.setattr(VL, "_node_pass_kernel", _NoLaunch(node_pass))
    monkeypatch.setattr(VL, "_path_walk_kernel", _NoLaunch(walk))
    monkeypatch.setattr(kv_compaction, "_compact_kv_kernel", _NoLaunch())


@pytest.mark.parametrize("k", sorted({NGRAM_K, STEP_NODES - 1}))
def test_vllm_ngram_rejection_step(benchmark, records, monkeypatch, k):
    """vLLM's host work per step for ``ngram``: ``NgramProposer.propose`` (numba, its thread
    setting), the ``SpecDecodeMetadata`` of the drafts (``make_dummy``: the runner's own builder
    does a little more) and ``RejectionSampler.forward`` on CPU tensors, greedy (the bonus
    token's sampler, the target logits' gather and argmax; its Triton kernel stubbed, as ours)."""
    pytest.importorskip("vllm")
    from vllm.v1.sample import rejection_sampler as rs
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    batch = STEP_BATCH
    tokens, lengths = token_ids(batch)
    proposer = ngram_proposer(k, batch)
    sampled = [[0]] * batch
    proposer.propose(k, sampled, lengths, tokens)  # numba compiles on the first call
    sampler = rs.RejectionSampler(Sampler())
    monkeypatch.setattr(rs, "_rejection_greedy_sample", lambda *args, **kwargs: None)  # its kernel
    empty = torch.tensor([])
    sampling = SamplingMetadata(
        temperature=None, all_greedy=True, all_random=False, top_p=None, top_k=None, generators={},
        max_num_logprobs=None, no_penalties=True, prompt_token_ids=None, frequency_penalties=empty,
        presence_penalties=empty, repetition_penalties=empty, output_token_ids=[[] for _ in range(batch)],
        allowed_token_ids_mask=None, bad_words_token_ids={}, logitsprocs=LogitsProcessors(),
    )
    cpu = torch.device("cpu")
    rows = []

    def step():
        start = time.perf_counter()
        drafts = proposer.propose(k, sampled, lengths, tokens)
        drafts = [list(d) for d in drafts]
        metadata = SpecDecodeMetadata.make_dummy(drafts, cpu)
        logits = torch.zeros(sum(map(len, drafts)) + batch, STEP_LOGITS_VOCAB)
        out = sampler(metadata, None, logits, sampling)
        rows.append((time.perf_counter() - start, sum(map(len, drafts))))
        return out

    for _ in range(3):
        step()
    rows.clear()
    benchmark.pedantic(step, rounds=STEP_ROUNDS, iterations=1)
    ms = statistics.median(r[0] for r in rows) * 1e3
    _step_ms[k] = ms
    _record(benchmark, records, {"workload": f"H2-step-ngram-k{k}-b{batch}", "impl": "vllm-ngram+rejection", "k": k,
                                 "nodes": k + 1, "batch": batch, "ms": ms,
                                 "mean_drafts": statistics.mean(r[1] for r in rows) / batch,
                                 "check": "rejection sampler output shape"})


@pytest.mark.parametrize("accept", STEP_ACCEPTS, ids=lambda a: "path" if a is None else f"a{a}")
@pytest.mark.parametrize("method", STEP_DRAFTERS)
def test_tree_step(benchmark, records, monkeypatch, method, accept):
    """The tree proposer's host work per step at STEP_BATCH x STEP_NODES (``bench/tree_step.py``:
    the plugin's own code on a stand-in runner): ``begin_step`` (the step's trees, checked once;
    positions), the attention builder's plan, ``TreeBatch.verify`` (verification and compaction
    bookkeeping; the kernels stubbed, :class:`_NoLaunch`) and the proposer's ``propose``
    (recycling the verified top-k, drafting the next trees). Histories: D1's, 600 tokens; each
    row accepts its tree's first-child path, or its first ``accept`` drafts."""
    pytest.importorskip("vllm")
    from tree_step import TreeServingStep

    for name in ("TKERNELS_VLLM_CPU_ATTENTION", "TKERNELS_VLLM_CPU_TEST_BACKEND"):
        monkeypatch.delenv(name, raising=False)  # the kernels' launchers (stubbed), not the references
    outputs: list = [None]
    _stub_kernels(monkeypatch, outputs)
    top_ids, top_probs, histories = workload(WORKLOAD_BATCH)
    step = TreeServingStep(histories[:STEP_BATCH], VOCAB, STEP_NODES, method, logits_vocab=STEP_LOGITS_VOCAB,
                           capture=lambda ids: (top_ids[ids], top_probs[ids]), max_model_len=STEP_MAX_MODEL_LEN)
    if step.proposer.tree_drafter.recycling is not None:
        step.proposer.tree_drafter.recycle(torch.arange(VOCAB), top_ids, top_probs)
    parts = {"begin_step": [], "plan": [], "verify": [], "propose": []}
    nodes, accepted = [], []

    def setup():
        step.schedule()
        outputs[0] = step.greedy_outputs(accept)
        step.proposer._captured = [step.capture(step.runner.input_ids.gpu)]  # the target's top-k (a kernel)
        return (torch.zeros(int(step.scheduled.sum()), STEP_LOGITS_VOCAB),), {}

    def run(logits):
        t0 = time.perf_counter()
        step.begin()
        t1 = time.perf_counter()
        step.plan()
        t2 = time.perf_counter()
        out = step.tree_batch.verify(step.runner, logits, step.spec)
        t3 = time.perf_counter()
        sampled = step.commit(out)  # vLLM's read of the sampled tokens (every method pays it)
        t4 = time.perf_counter()
        step.propose(sampled)
        t5 = time.perf_counter()
        for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t5 - t4)):
            parts[part].append(seconds)
        nodes.append(sum(step.last_tree_sizes))
        accepted.append(int(outputs[0][2].sum()) - STEP_BATCH)  # drafts: the roots are not

    for _ in range(3):  # drafts for every row, own rows written, numba loaded
        run(*setup()[0])
    # ... and the proposer's step model fitted once: its first fit runs in a helper thread from
    # the 16th measured step and holds the GIL against the steps while it runs; later refits
    # come 2 s apart (30 s after the first minute), never within the ~0.1 s of timed steps.
    calibration = step.proposer.step_model.calibration
    for _ in range(64):
        if calibration is None or calibration.refits or calibration.failures:
            break
        run(*setup()[0])
    for values in parts.values():
        values.clear()
    nodes.clear()
    accepted.clear()
    benchmark.pedantic(run, setup=setup, rounds=STEP_ROUNDS, iterations=1)
    total = [sum(p) for p in zip(*parts.values())]
    ms = statistics.median(total) * 1e3
    suffix = "" if accept is None else f"-a{accept}"
    record = {"workload": f"H2-step-{method}-b{STEP_BATCH}-n{STEP_NODES}{suffix}", "impl": f"tree-{method}",
              "nodes": STEP_NODES, "batch": STEP_BATCH, "accept": accept, "ms": ms,
              "parts_ms": {p: statistics.median(v) * 1e3 for p, v in parts.items()},
              "mean_tree_nodes": statistics.mean(nodes) / STEP_BATCH,
              "mean_accepted": statistics.mean(accepted) / STEP_BATCH, "check": "accepted paths committed"}
    for k, contender in _step_ms.items():
        record[f"x_ngram_k{k}"] = ms / contender
    _record(benchmark, records, record)


def table(path: str) -> str:
    """The markdown table of a run's pytest-benchmark JSON: µs per request (pytest-benchmark's
    median call over the batch, what ``bench/spec_mat.py --draft-cost`` reads) and x vLLM ngram
    (K = 8, the same batch)."""
    benches = json.loads(open(path).read())["benchmarks"]
    rows = [{**b["extra_info"], "us": 1e6 * b["stats"]["median"] / b["extra_info"]["batch"]}
            for b in benches if "impl" in b.get("extra_info", {}) and not b["extra_info"]["workload"].startswith("H2-")]
    ngram = {r["batch"]: r["us"] for r in rows if r["impl"] == "vllm-ngram" and r["k"] == NGRAM_K}
    batches = sorted({r["batch"] for r in rows})
    lines = ["| drafter | nodes | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    cells: dict[tuple[str, int], dict[int, str]] = {}
    for r in rows:
        name = "vLLM `ngram`" if r["impl"] == "vllm-ngram" else f"`{r['impl']}`"
        ratio = f" (×{r['us'] / ngram[r['batch']]:.1f})" if r["batch"] in ngram and r["impl"] != "vllm-ngram" else ""
        cells.setdefault((name, r["nodes"]), {})[r["batch"]] = f"{r['us']:.1f}{ratio}"
    for (name, nodes), by_batch in cells.items():
        lines.append(f"| {name} | {nodes} | " + " | ".join(by_batch.get(b, "") for b in batches) + " |")
    steps = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("workload", "").startswith("H2-")]
    if steps:
        contenders = sorted(r["k"] for r in steps if "k" in r)
        lines += ["", "| per step (host) | batch x nodes | drafts accepted per request | ms | "
                  "begin_step / plan / verify / propose ms | "
                  + " | ".join(f"x ngram + rejection K = {k}" for k in contenders) + " |",
                  "|---|---|---|---|---|" + "---|" * len(contenders)]
        for r in steps:
            if "k" in r:
                name, parts = f"vLLM `ngram` K = {r['k']} + rejection sampler", f"{r['mean_drafts']:.1f} drafts per request"
                accepted = ""
            else:
                name = f"tree proposer, `{r['impl'].removeprefix('tree-')}`"
                parts = " / ".join(f"{v:.2f}" for v in r["parts_ms"].values())
                # records before the accept cases accepted whole paths and did not count them
                how = "path" if r.get("accept") is None else f"<= {r['accept']}"
                accepted = f"{how}: {r['mean_accepted']:.1f}" if "mean_accepted" in r else how
            ratios = " | ".join(f"{r[f'x_ngram_k{k}']:.1f}" if f"x_ngram_k{k}" in r else "" for k in contenders)
            lines.append(f"| {name} | {r['batch']} x {r['nodes']} | {accepted} | {r['ms']:.2f} | {parts} | {ratios} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
