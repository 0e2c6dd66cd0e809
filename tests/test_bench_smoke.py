"""The GPU benchmark suite still runs: tiny shapes under the interpreter (nothing is written).

GPU time is scarce; a benchmark broken by a change should fail here, not on a lent GPU.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_suite_runs_on_tiny_shapes():
    env = {**os.environ, "TKERNELS_BENCH_TINY": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "bench", "-q", "-x", "-p", "no:cacheprovider"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert not list((ROOT / "bench" / "results").glob("cpu*.json"))
