"""bench/serve.py --quick: the real vLLM server driven by vLLM's own benchmark client.

Asserts only that the records are complete and sane (no timing assertion: the machine is
shared): every (configuration, rate) point, every request completed, the latency fields
positive and ordered (p50 <= p99), the latency model's online fit recorded for the tkernels
scheduler, and the JSON and PNG written.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1500  # two server starts on a loaded 2-core machine; --quick itself is meant for < 5 min


def test_quick_serving_benchmark(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the test harness's CPU default, not the server's
    out = tmp_path / "serving.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--workdir", str(tmp_path / "work"),
                    "--out", str(out)], env=env, check=True, timeout=TIMEOUT_S, cwd=ROOT)
    data = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    configs, rates = data["configurations"], data["rates"]
    assert len(configs) == 2 and len(rates) == 2 and "decode_maximal" in configs
    points = {(r["configuration"], r["rate"]) for r in data["records"]}
    assert points == {(c, r) for c in configs for r in rates}
    for rec in data["records"]:
        assert rec["failed"] == 0 and rec["completed"] == rec["num_prompts"] > 0
        for name in ("ttft", "itl", "tpot", "e2el"):
            p50, p99 = rec[f"{name}_p50_ms"], rec[f"{name}_p99_ms"]
            assert 0 < p50 <= p99 and math.isfinite(p99), (name, rec)
        assert rec["output_tokens_per_s"] > 0 and rec["duration_s"] > 0
        assert 0 <= rec["goodput_req_per_s"] <= rec["request_throughput"] + 1e-9
        assert rec["output_tokens_mean"] == data["workload"]["output_len"]
        assert rec["mat"] is None  # neither quick configuration speculates
    fit = data["latency_model"]["decode_maximal"]
    assert fit["refits"] >= 1 and fit["steps"] >= fit["window_steps"] > 0 and "default" in fit["source"]
    assert fit["samples"] and all(s["measured_ms"] > 0 and s["predicted_ms"] > 0 for s in fit["samples"])
    assert set(data["summary"]["capacity_req_per_s_under_slo"]) == set(configs)
