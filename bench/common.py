"""Setup shared by every benchmark module: device, interpreter fallback, timing, result file.

Import it before any kernel module: without a GPU it turns on Triton's interpreter, where the
benchmarks only run with ``TKERNELS_BENCH_TINY=1`` (tiny shapes; nothing is written unless
``TKERNELS_BENCH_RESULTS_DIR`` names a folder, as ``bench/device.sh``'s dry run does).
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
TINY = os.environ.get("TKERNELS_BENCH_TINY") == "1"
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import pytest  # noqa: E402
import triton  # noqa: E402

from tkernels.autotune.state import write_atomic  # noqa: E402
from tkernels.config import device_file_name  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
COMMITTED_DIR = Path(__file__).resolve().parent / "results"
# bench/device.sh points this at $OUT/results, so every record is in the returned folder the
# moment it is measured, whatever cuts the call afterwards.
RESULTS_DIR = Path(os.environ.get("TKERNELS_BENCH_RESULTS_DIR") or COMMITTED_DIR)
WRITES_RESULTS = HAS_CUDA or bool(os.environ.get("TKERNELS_BENCH_RESULTS_DIR"))
requires_gpu = pytest.mark.skipif(not HAS_CUDA and not TINY, reason="GPU benchmark (TKERNELS_BENCH_TINY=1 runs tiny shapes)")


def device_name() -> str:
    return torch.cuda.get_device_name() if HAS_CUDA else "cpu-interpreter"


def median_us(fn) -> float:
    """Median time of ``fn``: ``triton.testing.do_bench`` (CUDA events) on a GPU, a few
    wall-clock calls under the interpreter."""
    if HAS_CUDA:
        return triton.testing.do_bench(fn, return_mode="median") * 1e3
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def results_path() -> Path:
    return RESULTS_DIR / f"{device_file_name(device_name())}.json"


def merge_records(records: list[dict]) -> Path:
    """Merge into ``<results dir>/<device file name>.json`` (docs/design.md "Result files"): a
    (workload, impl) pair measured now replaces the one measured before (in a results folder of
    its own, the committed ``bench/results`` file is the starting point). The file is replaced
    atomically, so a run killed at any moment leaves the previous or the new version."""
    path = results_path()
    source = path if path.is_file() else COMMITTED_DIR / path.name  # a new results folder starts from the committed file
    data = json.loads(source.read_text()) if source.is_file() else {"records": []}
    fresh = {(r["workload"], r["impl"]) for r in records}
    data.update(device=device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    data["records"] = [r for r in data["records"] if (r.get("workload"), r.get("impl")) not in fresh] + records
    write_atomic(path, json.dumps(data, indent=1) + "\n")
    return path


class Records(list):
    """The ``records`` fixture: each appended record is merged into the result file at once
    (where results are written), so a cut run keeps every workload it finished."""

    def append(self, record: dict) -> None:
        super().append(record)
        if WRITES_RESULTS:
            merge_records([record])
