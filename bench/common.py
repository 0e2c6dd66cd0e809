"""Setup shared by every benchmark module: device, interpreter fallback, timing, result file.

Import it before any kernel module: without a GPU it turns on Triton's interpreter, where the
benchmarks only run with ``TKERNELS_BENCH_TINY=1`` (tiny shapes; nothing is written).
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

from tkernels.config import device_file_name  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
requires_gpu = pytest.mark.skipif(not HAS_CUDA and not TINY, reason="GPU benchmark (TKERNELS_BENCH_TINY=1 runs tiny shapes)")


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


def merge_records(records: list[dict]) -> Path:
    """Merge into ``bench/results/<device file name>.json`` (docs/design.md "Result files"): a
    (workload, impl) pair measured now replaces the one measured before."""
    path = RESULTS_DIR / f"{device_file_name(torch.cuda.get_device_name())}.json"
    data = json.loads(path.read_text()) if path.is_file() else {"records": []}
    fresh = {(r["workload"], r["impl"]) for r in records}
    data.update(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                date=datetime.date.today().isoformat())
    data["records"] = [r for r in data["records"] if (r.get("workload"), r.get("impl")) not in fresh] + records
    RESULTS_DIR.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path
