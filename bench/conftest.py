"""Fixtures of the benchmark suite (``pytest bench --benchmark-enable`` on a GPU)."""

# isort: off
from common import HAS_CUDA, merge_records  # first: it picks the interpreter before Triton loads

import pytest
import torch
import triton
# isort: on


@pytest.fixture(scope="session")
def records():
    """Collects result records; on a GPU merges them into bench/results/<device>.json at the end."""
    collected: list[dict] = []
    yield collected
    if HAS_CUDA and collected:
        merge_records(collected)


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
