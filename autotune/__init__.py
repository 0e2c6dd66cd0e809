"""``tkernels autotune``: per-GPU kernel configs, step-latency model, token and tree budgets.

Steps: 1. detect the GPU; 2. tune the kernels' launch configs (mixed-batch attention for the
model's head/GQA shape, tree verification for its vocabulary, KV compaction for its KV rows, the
continuous log-ratio on C1), checking each candidate against its reference (:mod:`tkernels.autotune.profile`); 3. profile
full decoder steps of the model's shape with random weights over prefill-chunk tokens x decodes
x context x tree tokens; 4. fit the step-latency model (:mod:`tkernels.sched.latency_model`);
5. derive token budgets per TBT SLO and tree node budgets per batch size
(:mod:`tkernels.autotune.fit`); 6. write ``<out>/<device file name>.json`` atomically (merged
into an existing valid file: buckets of other models are kept) and a PNG of the fit.

Measurements are saved as they are taken; rerunning the same command after an interruption
resumes. An interrupted run (Ctrl-C, SIGTERM, or the ``TKERNELS_DEADLINE`` time budget of
:mod:`tkernels.autotune.state`) still writes the config: the kernels tuned so far, every other
section as it was (empty in a new file: readers use their defaults), marked
``"autotune": {"partial": ...}``, and exits with status 3; the state file stays for the resume.
Candidates that need more shared memory than the GPU has are never compiled
(:func:`tkernels.autotune.profile.fits_shared_memory`). An existing output that is malformed or of another schema version stops the run with
the config module's error before anything is measured (``--force`` replaces it).
``--dry-run`` runs the whole flow on tiny shapes on the CPU under Triton's interpreter and
writes a valid file marked ``"is_gpu": false``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import signal
import sys
import time
from pathlib import Path

DEFAULT_SLOS_MS = (25.0, 50.0, 100.0, 200.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3-8b",
                        help="built-in name (llama-3-8b, llama-3-70b, qwen2.5-7b, smollm2-135m) or a config.json path")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel degree the model is served with")
    parser.add_argument("--tbt-slo-ms", type=float, nargs="+", default=list(DEFAULT_SLOS_MS),
                        help="TBT SLOs to derive token budgets for")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: $TKERNELS_CONFIG_DIR, else ./tkernels-configs)")
    parser.add_argument("--quick", action="store_true", help="smaller search and profile (about 5 minutes on an H100)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (interpreter): tests the flow")
    parser.add_argument("--force", action="store_true", help="replace an existing output file that cannot be read")
    parser.add_argument("--max-measurements", type=int, default=None, metavar="N",
                        help="stop after N new measurements, as when out of time (a partial config; rerun to resume)")


def run(args: argparse.Namespace) -> int:
    if args.dry_run:
        _use_interpreter()
    import torch

    from tkernels import config
    from tkernels.autotune import fit, profile
    from tkernels.autotune.shapes import model_shape
    from tkernels.autotune.state import Measurements, OutOfTime, write_atomic

    device = config.detect_device()
    if not device.is_gpu and not args.dry_run:
        print("tkernels autotune: no CUDA device found; use --dry-run to exercise the flow on the CPU", file=sys.stderr)
        return 2
    model_name, shape = model_shape("tiny" if args.dry_run else args.model, args.tp)
    out_dir = args.out or Path(os.environ.get(config.ENV_CONFIG_DIR) or "tkernels-configs")
    device_name = "cpu (dry run)" if args.dry_run else device.name
    out = out_dir / f"{config.device_file_name(device_name if device.is_gpu else 'cpu-dry-run')}.json"
    existing = _existing(out, args.force, config)

    torch_device = "cuda" if device.is_gpu and not args.dry_run else "cpu"
    dtype = torch.bfloat16 if torch_device == "cuda" else torch.float32
    points = profile.step_points(args.dry_run, args.quick)
    total = profile.kernel_jobs(args.dry_run, args.quick) + len(points)
    run_key = {"model": model_name, "quick": args.quick, "dry_run": args.dry_run, "device": device_name,
               "versions": _versions()}
    if args.max_measurements is not None and args.max_measurements < 0:
        raise ValueError(f"--max-measurements: must be >= 0, got {args.max_measurements}")
    measure = Measurements(out_dir / f".{out.stem}.autotune-state.json", run_key, total, max_new=args.max_measurements)
    started = time.monotonic()

    tuned: dict = {}  # filled kernel by kernel, so an interruption keeps the finished ones
    limit = profile.shared_memory_limit(torch_device)
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and job runners send TERM
    except ValueError:  # not the main thread (tests)
        previous = None
    try:
        profile.tune_kernels(shape, dtype, torch_device, measure, args.dry_run, args.quick, into=tuned,
                             shared_limit=limit)
        decoder = profile.RandomDecoder(shape, dtype, torch_device)
        measured = [measure.get(f"step/{model_name}/{p.id}", lambda p=p: profile.profile_step(decoder, p, dtype, torch_device))
                    for p in points]
    except (KeyboardInterrupt, OutOfTime) as stop:
        # A partial config: the kernels tuned so far, every other section as before (or empty:
        # readers fall back to their defaults). The state file stays: the same command resumes.
        why = str(stop) or "interrupted"
        data = _config_data(existing, tuned, {}, device, device_name, torch_device, model_name, args.quick, started,
                            partial={"why": why, "measurements": f"{measure.taken} of {total}"})
        config.validate(data, out)
        write_atomic(out, json.dumps(data, indent=1) + "\n")
        print(f"tkernels autotune: stopped ({why}); wrote a partial {out} ({len(tuned)} kernels tuned, "
              f"{measure.taken} of {total} measurements); run the same command again to resume", file=sys.stderr)
        return 3
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sections, predicted = fit.derive(shape, [p.cost() for p in points], measured, args.tbt_slo_ms)
    data = _config_data(existing, tuned, sections, device, device_name, torch_device, model_name, args.quick, started)
    config.validate(data, out)
    write_atomic(out, json.dumps(data, indent=1) + "\n")
    measure.done()
    plot_path = out.with_suffix(".png")
    fit.plot(plot_path, points, measured, predicted, sections["budgets"], f"{device_name} · {model_name}")
    _report(out, plot_path, tuned, sections)
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _config_data(existing: dict | None, tuned: dict, sections: dict, device, device_name: str, torch_device: str,
                 model_name: str, quick: bool, started: float, partial: dict | None = None) -> dict:
    """The config file's content: ``existing`` (buckets of other shapes kept) updated with the
    ``tuned`` buckets and the fitted ``sections``; a ``partial`` run keeps the existing sections."""
    from tkernels import config

    data = dict(existing or {})
    kernels = data.get("kernels", {})
    for kernel, bucket in tuned.items():
        buckets = [b for b in kernels.get(kernel, {}).get("buckets", []) if b["key"] != bucket["key"]]
        kernels[kernel] = {"buckets": buckets + [bucket]}
    for section in ("latency_model", "budgets", "tree_budgets"):
        data.setdefault(section, {})
    data.update({
        "schema_version": config.SCHEMA_VERSION,
        "device": device_name,
        "is_gpu": torch_device == "cuda",
        "sm_count": device.sm_count,
        "total_memory_gb": round(device.total_memory_gb, 1),
        "versions": _versions(),
        "date": datetime.date.today().isoformat(),
        "kernels": kernels,
        **sections,
        "autotune": {"model": model_name, "quick": quick, "seconds": round(time.monotonic() - started, 1),
                     **({"partial": partial} if partial else {})},
    })
    return data


def _use_interpreter() -> None:
    """A dry run executes the kernels on the CPU under Triton's interpreter, which ``@triton.jit``
    picks when a kernel module is imported: set TRITON_INTERPRET=1 now, or refuse clearly if some
    kernel module was already imported compiled (``tkernels autotune`` itself arranges it before
    importing any, see :func:`tkernels.cli.main`)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    from tkernels.registry import KERNEL_MODULES

    imported = [m for m in KERNEL_MODULES if m in sys.modules]
    if imported:
        raise SystemExit(f"--dry-run: needs Triton's interpreter, but {imported[0]} was imported without it; "
                         "set TRITON_INTERPRET=1 before importing tkernels' kernels")
    os.environ["TRITON_INTERPRET"] = "1"


def _existing(out: Path, force: bool, config) -> dict | None:
    """The valid config already at ``out`` (merged into), None if absent; a bad one raises."""
    if not out.is_file():
        return None
    try:
        return config.load(out)
    except config.ConfigError:
        if force:
            return None
        raise


def _versions() -> dict[str, str]:
    return {name: _version(name) for name in ("tkernels", "torch", "triton")}


def _version(dist: str) -> str:
    # A copy of the tree on PYTHONPATH without metadata (an install by hand) still runs.
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _report(out: Path, plot_path: Path, tuned: dict, sections: dict) -> None:
    print(f"wrote {out} and {plot_path.name}")
    for kernel, bucket in tuned.items():
        m = bucket["measured"]
        print(f"{kernel} {bucket['key']}: {bucket['config']}  ({m['workload']}: default {m['default_us']:.1f} us"
              f" -> tuned {m['tuned_us']:.1f} us)" if m["default_us"] and m["tuned_us"] else
              f"{kernel} {bucket['key']}: {bucket['config']}")
    lm = sections["latency_model"]
    print(f"latency model: {lm['points']} points, median error {lm['fit_median_rel_error']:.1%}, "
          f"max {lm['fit_max_rel_error']:.1%}")
    print("token budget per TBT SLO (ms):", sections["budgets"]["per_slo_ms"])
    print("tree nodes per request by batch size:", sections["tree_budgets"]["nodes_per_request"])
