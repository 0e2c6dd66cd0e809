"""`tkernels autotune --dry-run`: the whole flow on tiny shapes under the interpreter."""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from tkernels import autotune, config
from tkernels.autotune import profile


def run_autotune(out, *extra):
    parser = argparse.ArgumentParser()
    autotune.add_arguments(parser)
    return autotune.run(parser.parse_args(["--dry-run", "--out", str(out), *extra]))


@pytest.fixture(scope="module")
def dry_run_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("autotune")
    assert run_autotune(out) == 0
    return out


def test_dry_run_writes_a_valid_cpu_config_and_plot(dry_run_output):
    path = dry_run_output / "cpu-dry-run.json"
    data = config.load(path)
    assert data["is_gpu"] is False
    (bucket,) = data["kernels"]["mixed_attention"]["buckets"]
    assert bucket["key"] == {"head_dim": 32, "group": 2, "block_size": 16}
    (bucket,) = data["kernels"]["verify"]["buckets"]
    assert bucket["key"] == {"vocab": 512} and bucket["measured"]["workload"] == "V1-chain4"
    assert set(bucket["config"]) <= set(profile.verify.DEFAULT_CONFIG)
    assert data["kernels"]["kv_compaction"]["buckets"][0]["key"] == {"kv_dim": 32}
    assert data["kernels"]["trajectory_log_ratio"]["buckets"][0]["key"] == {"elements": 20}
    assert all(b["measured"]["default_us"] for k in data["kernels"].values() for b in k["buckets"])
    assert set(data["latency_model"]) >= {"overhead_us", "weight_gbps", "matmul_tflops", "kv_gbps", "attn_tflops"}
    assert data["budgets"]["default_tokens"] >= 1
    assert all(n >= 1 for n in data["tree_budgets"]["nodes_per_request"].values())
    assert (dry_run_output / "cpu-dry-run.png").stat().st_size > 1000
    assert not list(dry_run_output.glob(".*")), "state or temporary files left behind"


def test_malformed_existing_config_is_a_clear_error_and_left_untouched(tmp_path):
    path = tmp_path / "cpu-dry-run.json"
    path.write_text('{"schema_version": 1')
    with pytest.raises(config.ConfigError, match="cpu-dry-run.json: not valid JSON"):
        run_autotune(tmp_path)
    assert path.read_text() == '{"schema_version": 1'


def test_wrong_schema_version_is_a_clear_error(tmp_path, dry_run_output):
    data = json.loads((dry_run_output / "cpu-dry-run.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "cpu-dry-run.json").write_text(json.dumps(data))
    with pytest.raises(config.ConfigError, match="field 'schema_version' is 99"):
        run_autotune(tmp_path)


def test_interrupted_run_resumes_without_remeasuring(tmp_path, monkeypatch):
    real_profile_step = profile.profile_step
    calls = []

    def counting(*args, interrupt_at=None):
        calls.append(args[1].id)
        if len(calls) == interrupt_at:
            raise RuntimeError("interrupted")
        return real_profile_step(*args)

    monkeypatch.setattr(profile, "profile_step", lambda *a: counting(*a, interrupt_at=2))
    with pytest.raises(RuntimeError, match="interrupted"):
        run_autotune(tmp_path)
    assert not (tmp_path / "cpu-dry-run.json").exists(), "no output from an interrupted run"
    assert (tmp_path / ".cpu-dry-run.autotune-state.json").exists()

    calls.clear()
    monkeypatch.setattr(profile, "profile_step", counting)
    new_jobs = []
    real_get = autotune.state.Measurements.get

    def spy(self, job, measure):
        if job not in self.results:
            new_jobs.append(job)
        return real_get(self, job, measure)

    monkeypatch.setattr(autotune.state.Measurements, "get", spy)
    assert run_autotune(tmp_path) == 0
    # The first step point was measured before the interrupt: the rerun skips it and every kernel job.
    assert len(calls) == len(profile.step_points(True, False)) - 1
    assert new_jobs and all(job.startswith("step/") for job in new_jobs)
    config.load(tmp_path / "cpu-dry-run.json")


def test_dry_run_from_a_plain_shell_picks_the_interpreter_itself(tmp_path):
    """`tkernels autotune --dry-run` on a CPU machine with TRITON_INTERPRET unset: the CLI sets it
    before any kernel module is imported, says so in one line, and the run completes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "tkernels.cli", "autotune", "--dry-run", "--quick", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("TRITON_INTERPRET=1") == 1
    assert config.load(tmp_path / "cpu-dry-run.json")["is_gpu"] is False


def test_dry_run_after_compiled_kernels_were_imported_is_a_clear_error(monkeypatch):
    import tkernels.spec.verify  # noqa: F401  (imported: the interpreter can no longer be chosen)

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(SystemExit, match="^--dry-run: needs Triton's interpreter"):
        autotune._use_interpreter()


def test_an_interrupt_writes_a_partial_config_and_the_rerun_completes_it(tmp_path, monkeypatch):
    real_profile_step = profile.profile_step
    calls = []

    def interrupted(*args):
        calls.append(args[1].id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C, SIGINT from `timeout`, or SIGTERM (turned into this)
        return real_profile_step(*args)

    monkeypatch.setattr(profile, "profile_step", interrupted)
    assert run_autotune(tmp_path) == 3
    partial = config.load(tmp_path / "cpu-dry-run.json")
    assert set(partial["kernels"]) == {"mixed_attention", "verify", "kv_compaction", "trajectory_log_ratio"}
    assert partial["latency_model"] == partial["budgets"] == partial["tree_budgets"] == {}
    total = profile.kernel_jobs(True, False) + len(profile.step_points(True, False))
    assert partial["autotune"]["partial"]["measurements"] == f"{total - len(profile.step_points(True, False)) + 1} of {total}"
    assert (tmp_path / ".cpu-dry-run.autotune-state.json").exists()

    monkeypatch.setattr(profile, "profile_step", real_profile_step)
    assert run_autotune(tmp_path) == 0
    done = config.load(tmp_path / "cpu-dry-run.json")
    assert "partial" not in done["autotune"] and done["budgets"]["default_tokens"] >= 1
    assert done["kernels"] == partial["kernels"]
    assert not (tmp_path / ".cpu-dry-run.autotune-state.json").exists()


def test_a_spent_time_budget_stops_before_measuring(tmp_path, monkeypatch):
    monkeypatch.setenv("TKERNELS_DEADLINE", str(time.time() + 1))  # less than any measurement's reserve
    assert run_autotune(tmp_path) == 3
    partial = config.load(tmp_path / "cpu-dry-run.json")
    assert partial["kernels"] == {} and partial["autotune"]["partial"]["measurements"].startswith("0 of ")
    monkeypatch.setenv("TKERNELS_DEADLINE", "soon")
    with pytest.raises(ValueError, match="^TKERNELS_DEADLINE: must be a Unix time"):
        run_autotune(tmp_path)


def test_max_measurements_stops_like_a_time_budget(tmp_path):
    assert run_autotune(tmp_path, "--max-measurements", "3") == 3
    assert config.load(tmp_path / "cpu-dry-run.json")["autotune"]["partial"]["measurements"].startswith("3 of ")
    with pytest.raises(ValueError, match="^--max-measurements: must be >= 0"):
        run_autotune(tmp_path, "--max-measurements", "-1")


def test_candidates_over_the_shared_memory_limit_are_never_run(monkeypatch):
    from tkernels.sched.latency_model import ModelShape

    ran = []
    monkeypatch.setattr(profile, "_attention_runner", lambda *a: lambda cfg, on_gpu: ran.append(cfg) or 1.0)

    class Measure:
        def get(self, job, measure):
            return measure()

    shape = ModelShape(2, 64, 2, 1, 32, 128, 512, 2)
    profile.tune_attention(shape, None, "cpu", Measure(), dry_run=True, quick=False, shared_limit=1)
    assert ran == [{}, {}]  # only the defaults' and the (default) best's timing
    ran.clear()
    profile.tune_attention(shape, None, "cpu", Measure(), dry_run=True, quick=False, shared_limit=None)
    assert len(ran) == sum(map(len, profile.attention_search_space(True, False).values())) + 2
    assert profile.fits_shared_memory({}, 128, 232_448) and not profile.fits_shared_memory({}, 128, 16_384)
