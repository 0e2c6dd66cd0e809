"""Fixtures and hooks of the benchmark suite (``pytest bench --benchmark-enable`` on a GPU).

A time budget: with ``TKERNELS_DEADLINE`` (Unix time, set by ``bench/device.sh``) a test is
skipped instead of started when the time left is less than the longest test so far took, so
the session ends by itself, writes its files, and nothing depends on where a signal lands.
"""

# isort: off
from common import HAS_CUDA, Records  # first: it picks the interpreter before Triton loads

import os
import time

import numpy
import pytest
import torch
import triton

from tkernels.autotune.state import seconds_left
# isort: on

def pytest_configure(config):
    # Triton 3.6's interpreter converts scalars with int(array), which NumPy >= 2.4 refuses for
    # 1-element arrays: every kernel fails with "only 0-dimensional arrays can be converted".
    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    if os.environ.get("TRITON_INTERPRET") == "1" and numpy_version >= (2, 4) and _interpreter_needs_old_numpy():
        raise pytest.UsageError(f"triton {triton.__version__}'s interpreter needs numpy < 2.4 (have "
                                f"{numpy.__version__}): pin numpy==2.3.5 to run the benchmarks on the CPU")


def _interpreter_needs_old_numpy() -> bool:
    import inspect

    from triton.runtime import interpreter

    return "int(self.handle.data))" in inspect.getsource(interpreter)


MIN_RESERVE_S = 5.0  # a test is not started with less than this left, even if all were faster
_longest = [0.0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.monotonic()
    yield
    _longest[0] = max(_longest[0], time.monotonic() - start)


# Benchmarks of host work only (no kernel): run after the GPU workloads, so that a deadline
# cuts them rather than a GPU measurement.
HOST_ONLY_MODULES = ("bench_drafters", "bench_host")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.module.__name__ in HOST_ONLY_MODULES)  # stable: order kept otherwise


def pytest_runtest_setup(item):
    left = seconds_left()
    reserve = max(_longest[0], MIN_RESERVE_S)
    if left < reserve:
        pytest.skip(f"deadline: {left:.0f}s left of the time budget, the longest test took {_longest[0]:.0f}s")


@pytest.fixture(scope="session")
def records():
    """Result records; each is merged into the result file as soon as it is appended."""
    return Records()


@pytest.fixture(scope="session")
def roofline():
    """(copy bandwidth in bytes/s, bf16 matmul FLOP/s), measured on this GPU; None on CPU."""
    if not HAS_CUDA:
        return None
    x = torch.empty(2**28, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    bandwidth = 2 * x.nbytes / (triton.testing.do_bench(lambda: y.copy_(x), return_mode="median") * 1e-3)
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    matmul = 2 * n**3 / (triton.testing.do_bench(lambda: a @ b, return_mode="median") * 1e-3)
    return bandwidth, matmul


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Keep the committed JSON to its statistics: pytest-benchmark also writes every raw timing
    (tens of MB for the host benchmark's many fast rounds), which nothing here reads."""
    for bench in output_json.get("benchmarks", []):
        bench.get("stats", {}).pop("data", None)
