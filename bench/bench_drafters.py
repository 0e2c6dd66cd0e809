"""Drafting cost D1: host time of one :meth:`TreeDrafter.draft` call per request.

The verify step's time is the GPU's (the step-latency model prices it); drafting is host work
every step before it, and the tree drafters differ a lot there: ``tr_static`` fills one template
with a gather per level, while ``tr`` (a batched beam) and ``hybrid`` (a per-request heap over
both sources' candidates) grow each request's own tree. This bench times a batch of
:data:`BATCH` requests at 9, 32, 80 and 256 nodes, ``us`` per request.

Workload (the same for every method): vocabulary 49152 (SmolLM2's), an adjacency whose every
row is written (8 candidates each, probabilities from a softmax of scaled Gaussians, best
first), and 600-token histories that follow a row's best candidate 70% of the time and a random
token otherwise, so retrieval finds earlier matches as in real text. Each drafter has seen one
verify step of every request (its own rows, calibrations) before timing.

It times :class:`TreeDrafter`'s default path: the compiled drafters since issue 23
(``TKERNELS_DRAFTERS=reference`` times the Python reference, which is what the committed
``bench/results/drafters_cpu_vm.json`` measured); ``bench/bench_host.py`` (H1) times them per
batch size beside vLLM's ``ngram``.

Runs anywhere (host work only): ``pytest bench/bench_drafters.py --benchmark-enable``. On a GPU
machine (``bench/device.sh``) the records go to ``bench/results/<device file name>.json``
(``{"workload": "D1-draft-hybrid-80", "impl": "hybrid", "us": ...}``, the host CPU of that
machine); elsewhere nothing is written.
"""

from __future__ import annotations

import functools
import statistics
import time

import pytest
import torch
from common import WRITES_RESULTS

from tkernels.spec.drafters import TreeDrafter

VOCAB, K, BATCH, HISTORY = 49152, 8, 32, 600
NODES = (9, 32, 80, 256)
METHODS = ("pld", "tr_static", "tr", "hybrid")


@functools.cache
def workload(batch: int = BATCH):
    """``(ids, probs, histories)``: the adjacency's rows and ``batch`` histories (the first
    ``n`` of a larger batch are the histories of batch ``n``)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(VOCAB, generator=g)[:K] for _ in range(VOCAB // 16)])
    ids = ids.repeat(16, 1)[torch.randperm(VOCAB, generator=g)]  # [VOCAB, K]
    probs = torch.softmax(torch.randn(VOCAB, K, generator=g) * 2, dim=-1).sort(dim=-1, descending=True).values
    histories = []
    for _ in range(batch):
        tokens = [int(torch.randint(VOCAB, (1,), generator=g))]
        follow = torch.rand(HISTORY, generator=g) < 0.7
        jumps = torch.randint(VOCAB, (HISTORY,), generator=g).tolist()
        for i in range(HISTORY - 1):
            tokens.append(int(ids[tokens[-1], 0]) if follow[i] else jumps[i])
        histories.append(tokens)
    return ids, probs, histories


@functools.cache
def drafter(method: str, nodes: int) -> TreeDrafter:
    ids, probs, histories = workload(BATCH)
    d = TreeDrafter(VOCAB, method, K)
    if d.recycling is not None:
        d.recycle(torch.arange(VOCAB), ids, probs)
    keys = list(range(BATCH))
    trees = d.draft(keys, histories, nodes)  # one verify step: own rows, calibrations, contexts
    if d.recycling is not None:
        rows = torch.cat([t.tokens for t in trees])
        d.observe(trees, ids[rows], probs[rows], [[0] for _ in trees])
    return d


def median_draft_us(d: TreeDrafter, histories, nodes: int, calls: int = 5) -> float:
    """Median wall time of ``calls`` draft calls of the whole batch, per request."""
    keys, times = list(range(BATCH)), []
    for _ in range(calls):
        start = time.perf_counter()
        d.draft(keys, histories, nodes)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / BATCH * 1e6


@pytest.mark.parametrize("nodes", NODES)
@pytest.mark.parametrize("method", METHODS)
def test_draft_cost(benchmark, records, method, nodes):
    d, (_, _, histories) = drafter(method, nodes), workload(BATCH)
    trees = benchmark(d.draft, list(range(BATCH)), histories, nodes)
    assert len(trees) == BATCH and all(1 <= len(t) <= nodes for t in trees)
    record = {"workload": f"D1-draft-{method}-{nodes}", "impl": method, "nodes": nodes, "batch": BATCH,
              "us": median_draft_us(d, histories, nodes), "check": "tree sizes"}
    benchmark.extra_info.update(record)
    if WRITES_RESULTS:
        records.append(record)
