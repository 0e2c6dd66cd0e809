#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (see README "Benchmarks on a GPU").
#   bash bench/device.sh [bench|autotune|all]     (default: all)
# On this side first: `python bench/server_kernels.py prepare` (vLLM/SGLang kernel files for
# machines without those servers), then run with `carry: ["bench/.server_kernels"]`.
# Writes under $OUT: compile.log, gpu-tests.log, benchmark.json (pytest-benchmark), the merged
# bench/results/<gpu>.json, and autotune's <gpu>.json + .png; prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/tkernels-device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 \
  || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
status=0
# Triton on this machine may differ from CI's: compile every kernel for its targets first.
timeout 300 python3 -m tkernels.registry >"$OUT/compile.log" 2>&1 || { status=1; tail -20 "$OUT/compile.log"; }
if [ "$what" != autotune ]; then
  # bf16 correctness on the real GPU (tests marked gpu), then all kernel comparisons.
  timeout 240 python3 -m pytest tests -m gpu -q -x -p no:cacheprovider >"$OUT/gpu-tests.log" 2>&1 \
    || { status=1; tail -30 "$OUT/gpu-tests.log"; }
  timeout 420 python3 -m pytest bench -q -p no:cacheprovider --benchmark-enable \
    --benchmark-json="$OUT/benchmark.json" 2>&1 | tee "$OUT/bench.log" | tail -40 || status=1
  cp bench/results/*.json "$OUT/" 2>/dev/null
fi
if [ "$what" != bench ]; then
  timeout 420 python3 -m tkernels.cli autotune --quick --out "$OUT/configs" 2>&1 | tee "$OUT/autotune.log" | tail -8 \
    || status=1
fi
exit $status
