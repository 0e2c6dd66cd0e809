"""Host drafting cost H1: per-request time of one :meth:`TreeDrafter.draft` of the batch, every
method, beside vLLM's ``ngram`` proposer (its own numba path and thread setting) in the same run.

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

    def step():  # as plugins/vllm/proposer.py calls it
        return d.draft(keys, [tokens[i, :n] for i, n in enumerate(sizes)], nodes)

    trees = benchmark(step)
    assert len(trees) == batch and all(1 <= len(t) <= nodes for t in trees)
    us = _median_us(step, batch)
    record = {"workload": f"H1-draft-{method}-b{batch}-n{nodes}", "impl": method, "nodes": nodes, "batch": batch,
              "us": us, "compiled": d.compiled is not None, "check": "tree sizes"}
    if batch in _ngram_us:
        record["x_ngram"] = us / _ngram_us[batch]
    _record(benchmark, records, record)


def table(path: str) -> str:
    """The markdown table of a run's pytest-benchmark JSON: µs per request (pytest-benchmark's
    median call over the batch, what ``bench/spec_mat.py --draft-cost`` reads) and x vLLM ngram
    (K = 8, the same batch)."""
    rows = [{**b["extra_info"], "us": 1e6 * b["stats"]["median"] / b["extra_info"]["batch"]}
            for b in json.loads(open(path).read())["benchmarks"] if "impl" in b.get("extra_info", {})]
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
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
