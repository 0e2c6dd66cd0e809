"""Test harness: Triton's interpreter on CPU-only machines, markers, shared fixtures."""

import os

import torch

# Must happen before any @triton.jit runs (tkernels or vLLM kernels are imported by tests
# after this file): on a machine with no CUDA device, kernels run under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _importable(name: str) -> bool:
    # tests/ is on sys.path, so the folders tests/vllm and tests/sglang are namespace packages
    # with those names; a real package has an origin file, a namespace folder has none.
    spec = importlib.util.find_spec(name)
    return spec is not None and spec.origin is not None


HAS_CUDA = torch.cuda.is_available()
HAS_VLLM = _importable("vllm")
HAS_SGLANG = _importable("sglang")


def pytest_collection_modifyitems(config, items):
    # tests/run.sh sets TKERNELS_REQUIRE=vllm (main env) or sglang (sglang env): there a missing
    # server is a broken environment, not a reason to skip.
    required = set(filter(None, os.environ.get("TKERNELS_REQUIRE", "").split(",")))
    for name, available in (("vllm", HAS_VLLM), ("sglang", HAS_SGLANG)):
        if name in required and not available:
            raise pytest.UsageError(f"TKERNELS_REQUIRE={name} but {name} is not importable in {os.sys.executable}")
    skips = {
        "gpu": (HAS_CUDA, "needs a CUDA device"),
        "vllm": (HAS_VLLM, "vLLM is not installed in this environment"),
        "sglang": (HAS_SGLANG, "SGLang is not installed in this environment"),
    }
    for item in items:
        for marker, (available, why) in skips.items():
            if item.get_closest_marker(marker) and not available:
                item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture
def rng():
    """A fresh, logged seed per test: random inputs differ run to run but failures replay."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def bench_script():
    """Load a script of bench/ (a folder of scripts, not a package) by name: ``bench_script("spec_mat")``."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
