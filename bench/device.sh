#!/usr/bin/env bash
# Everything a lent GPU should run, in one call (see README "Benchmarks on a GPU").
#   bash bench/device.sh [bench|autotune|all]     (default: all)
# On this side first: `python bench/server_kernels.py prepare` (vLLM/SGLang kernel files for
# machines without those servers), then run with `carry: ["bench/.server_kernels"]`.
#
# A device call may run 600 s and a session has 900 s of device time, start included, so the
# script keeps to TKERNELS_DEVICE_BUDGET_S (default 480 s, leaving a warm machine time for a second call) in all: each stage gets its own cap,
# cut to what is left, and whatever a stage finished is kept. autotune measures into a folder
# outside $OUT (emptied before every call), so calling again on the still-warm machine resumes it.
# Returns at most 6 files under $OUT (the device tool brings back 8): benchmark.json
# (pytest-benchmark), results/<gpu>.json (the merged bench/results file), configs/<gpu>.json and
# .png (autotune's; same name as the results file, hence the folders), logs.tar.gz (every log,
# gpu.txt) and summary.txt (the table printed last).
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
OUT=${OUT:-/tmp/tkernels-device}
budget=${TKERNELS_DEVICE_BUDGET_S:-480}
tune_dir=${TKERNELS_AUTOTUNE_DIR:-/tmp/tkernels-autotune}
logs=$(mktemp -d)
mkdir -p "$OUT" "$tune_dir"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
deadline=$((SECONDS + budget))
status=0

# stage NAME CAP_S CMD...: runs CMD with a timeout of min(CAP_S, time left), log in $logs/NAME.log,
# exit status in $last_rc.
stage() {
  local name=$1 cap=$2 left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt 20 ]; then
    echo "== $name: skipped, ${left}s of the ${budget}s budget left" | tee -a "$logs/summary.txt"
    status=1
    last_rc=124
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local start=$SECONDS
  last_rc=0
  # SIGINT first: pytest then still finishes its session (result files written), autotune has
  # saved every measurement it took.
  timeout -s INT -k 20 "$cap" "$@" >"$logs/$name.log" 2>&1 || last_rc=$?
  echo "== $name: rc=$last_rc in $((SECONDS - start))s (cap ${cap}s)" | tee -a "$logs/summary.txt"
  if [ "$last_rc" -ne 0 ]; then
    status=1
    tail -25 "$logs/$name.log"
  fi
}

finish() {
  cp "$logs/summary.txt" "$OUT/" 2>/dev/null
  tar -czf "$OUT/logs.tar.gz" -C "$logs" . 2>/dev/null
  cat "$logs/summary.txt"
  exit $status
}

stage install 60 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e .
if [ "$last_rc" -ne 0 ]; then
  # pyproject's SPDX license needs setuptools >= 77; with an older one, lay the package out as
  # an install would (plugins/ and autotune/ inside tkernels/) and keep the checkout's own
  # tkernels/ off sys.path (PYTHONSAFEPATH: no current directory first).
  site=$(mktemp -d)
  cp -r tkernels "$site/" && cp -r plugins "$site/tkernels/plugins" && cp -r autotune "$site/tkernels/autotune"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  python3 -c "import tkernels.autotune, tkernels.plugins" || finish
  echo "== install: editable install failed, using a copy in $site" | tee -a "$logs/summary.txt"
  status=0
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee "$logs/gpu.txt"
touch "$logs/started"
# Triton on this machine may differ from CI's: compile every kernel for its targets first.
stage compile 60 python3 -m tkernels.registry
if [ "$what" != autotune ]; then
  # bf16 correctness on the real GPU (tests marked gpu), then all kernel comparisons.
  stage gpu-tests 90 python3 -m pytest tests -m gpu -q -x -p no:cacheprovider
  stage bench 200 python3 -m pytest bench -q -p no:cacheprovider --benchmark-enable \
    --benchmark-json="$OUT/benchmark.json"
  tail -40 "$logs/bench.log" >>"$logs/summary.txt"
  mkdir -p "$OUT/results"
  find bench/results -name '*.json' -newer "$logs/started" -exec cp {} "$OUT/results/" \;
fi
if [ "$what" != bench ]; then
  stage autotune 300 python3 -m tkernels.cli autotune --quick --out "$tune_dir"
  tail -8 "$logs/autotune.log" >>"$logs/summary.txt"
  mkdir -p "$OUT/configs"
  cp "$tune_dir"/*.json "$tune_dir"/*.png "$OUT/configs/" 2>/dev/null
fi
finish
