"""Rehearsal of the GPU window: ``bench/device.sh`` in its dry mode (``TKERNELS_DEVICE_DRY=1``).

Runs in the device-twin environment (the GPU machine's Triton; ``tests/run.sh`` sets
``TKERNELS_DEVICE_TWIN=1``): every stage of call 1 and call 2 runs, a stage is cut mid-way
by its budget, a cut autotune returns its state and a partial config, the second call resumes,
a kill of the whole script (the device tool's own time limit) still leaves the results and
logs, and what comes back stays within the device tool's limits (8 files, 2 folders deep).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(os.environ.get("TKERNELS_DEVICE_TWIN") != "1",
                                reason="runs in the device-twin environment (tests/run.sh)")


def _env(out: Path, tune_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(OUT=str(out), TKERNELS_AUTOTUNE_DIR=str(tune_dir), TKERNELS_DEVICE_DRY="1",
               TKERNELS_DEVICE_PYTHON=sys.executable, **extra)
    return env


def _device(what: str, out: Path, tune_dir: Path, **extra: str) -> subprocess.Popen:
    """Start ``bash bench/device.sh WHAT`` in its dry mode, with $OUT emptied as the device tool does."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return subprocess.Popen(["bash", "bench/device.sh", what], cwd=ROOT, env=_env(out, tune_dir, **extra),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Call 1 (its bench cut by a 30 s cap) beside call 2 cut after 5 measurements, then call 2
    again on the same (warm) autotune folder: two cores, so the calls overlap."""
    root = tmp_path_factory.mktemp("device")
    call_1 = _device("bench", root / "out1", root / "tune1", TKERNELS_DEVICE_CAPS="bench=30")
    try:
        cut = _device("autotune", root / "out2", root / "tune2", TKERNELS_AUTOTUNE_ARGS="--max-measurements 5")
        cut.wait(timeout=600)
        shutil.copytree(root / "out2", root / "out2-cut")
        _device("autotune", root / "out2", root / "tune2").wait(timeout=600)
        call_1.wait(timeout=600)
    finally:
        if call_1.poll() is None:
            os.killpg(call_1.pid, signal.SIGKILL)
    return {"call 1": root / "out1", "call 2 cut": root / "out2-cut", "call 2 resumed": root / "out2"}


def _returned(out: Path) -> list[str]:
    """The files the device tool would bring back, checked against its limits."""
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    assert len(files) <= 8, files
    for name in files:
        assert name.count("/") <= 2 and all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in name.split("/")), name
    return files


def _summary(out: Path) -> str:
    return (out / "summary.txt").read_text()


def _records(out: Path) -> list[dict]:
    [path] = (out / "results").glob("*.json")
    return json.loads(path.read_text())["records"]


def test_call_1_runs_every_stage_and_a_cut_bench_keeps_what_it_measured(rehearsal):
    out = rehearsal["call 1"]
    summary = _summary(out)
    print(summary)
    log = (out / "log.txt").read_text()
    for stage in ("bench", "gpu-tests", "compile"):
        assert re.search(rf"== {stage}: rc=0 ", summary), f"{stage} did not pass:\n{summary}\n{log[-3000:]}"
    assert "using a copy with metadata" in summary
    assert "deadline:" in log, "the bench was not cut by its deadline"
    records = _records(out)
    assert records and all(r["us"] > 0 for r in records)
    assert json.loads((out / "benchmark.json").read_text())["benchmarks"]
    assert re.search(r"compiled \d+ launches .* 0 failures", log)  # the compile stage's table
    files = _returned(out)
    assert {"summary.txt", "log.txt", "benchmark.json"} <= set(files)


def test_call_2_cut_returns_state_and_partial_config_and_the_next_call_resumes(rehearsal):
    out = rehearsal["call 2 cut"]
    summary = _summary(out)
    assert "== autotune: rc=3 " in summary, summary + (out / "log.txt").read_text()[-3000:]
    files = _returned(out)
    assert "configs/.cpu-dry-run.autotune-state.json" in files
    partial = json.loads((out / "configs" / "cpu-dry-run.json").read_text())
    assert partial["autotune"]["partial"]["measurements"].startswith("5 of ")
    assert partial["latency_model"] == {}  # not measured yet: readers use their defaults

    out = rehearsal["call 2 resumed"]  # the warm machine: same autotune folder, $OUT emptied
    summary = _summary(out)
    assert "== autotune: rc=0 " in summary, summary + (out / "log.txt").read_text()[-3000:]
    assert "resuming: 5 of " in (out / "log.txt").read_text()
    done = json.loads((out / "configs" / "cpu-dry-run.json").read_text())
    assert "partial" not in done["autotune"] and done["latency_model"]["points"] > 0
    assert done["versions"]["tkernels"] != "unknown"  # the copy's metadata is found
    assert set(_returned(out)) >= {"configs/cpu-dry-run.json", "configs/cpu-dry-run.png"}
    assert not (out / "configs" / ".cpu-dry-run.autotune-state.json").exists()


def test_a_killed_call_leaves_logs_and_every_finished_record(tmp_path):
    out = tmp_path / "out"
    proc = _device("bench", out, tmp_path / "tune")
    try:
        deadline = time.monotonic() + 300
        while not list((out / "results").glob("*.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "no bench record appeared"
            time.sleep(0.5)
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # what the device tool's time limit does
        proc.wait()
    assert _records(out)
    assert "===== bench" in (out / "log.txt").read_text()
    assert "== bench/device.sh bench" in _summary(out)
    _returned(out)
