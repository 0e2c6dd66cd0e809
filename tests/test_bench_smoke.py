"""The GPU benchmark suite still runs: tiny shapes under the interpreter (nothing is written).

GPU time is scarce; a benchmark broken by a change should fail here, not on a lent GPU.
"""

import json
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


def test_cpu_attention_side_by_side_runs(tmp_path, bench_script):
    """bench/attention_cpu.py on a small case: every contender's output checked against the
    reference (tkernels' paths) and timed in the same rounds."""
    attention_cpu = bench_script("attention_cpu")
    out = tmp_path / "att.json"
    assert attention_cpu.main(["--batches", "2", "--dtypes", "float32", "--cases", "decode,tree9", "--repeats", "1",
                               "--out", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    impls = {r["impl"] for r in records}
    assert {"tkernels_torch", "tkernels_compiled", "tkernels_reference"} <= impls
    for r in records:
        assert r["layer_ms"] > 0
        if r["impl"] in ("tkernels_torch", "tkernels_compiled"):
            assert r["max_abs_err"] < 1e-4


def test_step_profile_rounds_summary(bench_script):
    """bench/profile_step.py's summary over rounds: medians per method, per-round ratios."""
    profile_step = bench_script("profile_step")

    def record(round_, method, step, kernel, tps):
        return {"round": round_, "method": method, "tokens_per_s": tps,
                "verify_steps": {"ms_per_step": {"step": step, "attention_kernel": kernel}},
                "decode_steps": {"steps": 10, "ms_per_step": {"step": step}}}

    records = [record(0, "ngram", 200.0, 60.0, 20.0), record(0, "tree", 300.0, 100.0, 18.0),
               record(1, "ngram", 100.0, 30.0, 30.0), record(1, "tree", 120.0, 40.0, 35.0),
               record(2, "ngram", 150.0, 50.0, 25.0), record(2, "tree", 150.0, 70.0, 26.0)]
    summary = profile_step._rounds_summary(records)
    assert summary["ngram"] == {"verify_step_ms": 150.0, "verify_attention_kernel_ms": 50.0, "tokens_per_s": 25.0,
                                "decode_s": 1.5}
    assert summary["decode_speedup_per_round"]["tree/ngram"] == pytest.approx([2 / 3, 1 / 1.2, 1.0])
    older = [{k: v for k, v in r.items() if k != "decode_steps"} for r in records]  # files before the decode phase
    assert profile_step._rounds_summary(older)["ngram"]["decode_s"] is None
    assert summary["tree"]["verify_step_ms"] == 150.0
    assert summary["verify_step_ratio_per_round"] == {"tree/ngram": [1.5, 1.2, 1.0]}
