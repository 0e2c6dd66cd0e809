#!/usr/bin/env bash
# What a lent GPU runs (README "Benchmarks on a GPU"): the window is two device calls.
#   call 1: bash bench/device.sh bench      install, bench, GPU tests, compile check (420 s budget)
#   call 2: bash bench/device.sh autotune   autotune --quick, resuming its saved state (240 s budget)
#   bash bench/device.sh all                both in one call (budget: the sum)
# Give each call timeout_s = its budget + 60 s. Before call 1, here: `python bench/server_kernels.py
# prepare`, then carry ["bench/.server_kernels"]. Every result is under $OUT the moment it exists
# (bench records one by one, logs as they are written, autotune's config and state files), so
# whatever cuts a call, what was finished comes back:
#   summary.txt         one line per stage (rc, seconds, cap) and the tails that matter
#   log.txt             every stage's output, appended as it runs
#   results/<gpu>.json  the bench records merged into the committed bench/results/<gpu>.json
#   benchmark.json      pytest-benchmark's own file (written when the bench stage ends)
#   configs/<gpu>.json, configs/<gpu>.png, configs/.<gpu>.autotune-state.json
#                       autotune's config (partial when cut: tuned kernels so far, rest default),
#                       its plot (complete runs) and its measurements for resuming
# Stages stop themselves before their cap: TKERNELS_DEADLINE makes the bench skip workloads and
# autotune stop measuring when too little time is left (a SIGINT at the cap, SIGKILL 20 s later,
# are only the backstop). autotune keeps its state in $TKERNELS_AUTOTUNE_DIR (outside $OUT, which
# is emptied before every call), so call 2 on the warm machine resumes; on a fresh machine it
# resumes from a state carried in bench/.autotune/ (copy configs/ there, carry it).
# Order inside each call: what is worth most lands first.
#
# TKERNELS_DEVICE_DRY=1 rehearses all of it on a CPU machine (tests/test_device_script.py, in the
# device-twin environment: the GPU machine's Triton): the same stages and files, with tiny bench
# shapes under the interpreter, a compile check of one module, `autotune --dry-run`, and the
# editable install replaced by the copy that the GPU machine's old setuptools falls back to.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
case "$what" in
  bench) default_budget=420 ;;
  autotune) default_budget=240 ;;
  all) default_budget=660 ;;
  *) echo "usage: bash bench/device.sh [bench|autotune|all]" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/tkernels-device}
budget=${TKERNELS_DEVICE_BUDGET_S:-$default_budget}
tune_dir=${TKERNELS_AUTOTUNE_DIR:-/tmp/tkernels-autotune}
dry=${TKERNELS_DEVICE_DRY:-0}
python=${TKERNELS_DEVICE_PYTHON:-python3}
mkdir -p "$OUT/results" "$OUT/configs" "$tune_dir"
summary=$OUT/summary.txt
log=$OUT/log.txt
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TKERNELS_BENCH_RESULTS_DIR=$OUT/results
deadline=$((SECONDS + budget))
status=0
say() { echo "$*" | tee -a "$summary"; }

# stage NAME CAP_S CMD...: runs CMD for at most min(CAP_S, time left) with TKERNELS_DEADLINE
# 10 s before that, output appended to log.txt; exit status in $last_rc (124: not started).
# TKERNELS_DEVICE_CAPS="bench=20,autotune=30" overrides caps (the dry-run tests cut stages so).
stage() {
  local name=$1 cap=$2 left=$((deadline - SECONDS)) override
  shift 2
  override=$(echo ",${TKERNELS_DEVICE_CAPS:-}," | sed -n "s/.*,$name=\([0-9]*\),.*/\1/p")
  [ -n "$override" ] && cap=$override
  if [ "$left" -lt 20 ]; then
    say "== $name: skipped, ${left}s of the ${budget}s budget left"
    status=1
    last_rc=124
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local start=$SECONDS
  echo "===== $name (cap ${cap}s): $*" >>"$log"
  last_rc=0
  TKERNELS_DEADLINE=$(($(date +%s) + cap - 10)) timeout -s INT -k 20 "$cap" "$@" >>"$log" 2>&1 || last_rc=$?
  say "== $name: rc=$last_rc in $((SECONDS - start))s (cap ${cap}s)"
  if [ "$last_rc" -ne 0 ]; then
    status=1
    tail -25 "$log"
  fi
}

# tkernels importable by $python: the editable install, or (a device's setuptools older than the
# 77 that pyproject's SPDX licence needs) a copy laid out as an install would be, with a minimal
# dist-info so importlib.metadata finds tkernels' version as after a real install.
use_copy() {
  local site version
  site=$(mktemp -d)
  version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
  cp -r tkernels "$site/" && cp -r plugins "$site/tkernels/plugins" && cp -r autotune "$site/tkernels/autotune"
  mkdir -p "$site/tkernels-$version.dist-info"
  printf 'Metadata-Version: 2.1\nName: tkernels\nVersion: %s\n' "$version" >"$site/tkernels-$version.dist-info/METADATA"
  # PYTHONSAFEPATH: the checkout's own tkernels/ (no plugins/ inside) must not shadow the copy.
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
  "$python" -c "import tkernels.autotune, tkernels.plugins" >>"$log" 2>&1
}

install() {
  if [ "$dry" = 1 ]; then
    use_copy && say "== install: dry run, using a copy with metadata (the fallback path)"
    return
  fi
  if [ "$what" = autotune ] && "$python" -c "import tkernels.autotune" 2>/dev/null; then
    say "== install: tkernels already importable (call 1's install)"
    return
  fi
  stage install 60 "$python" -m pip install -q --no-deps --no-build-isolation --no-index -e .
  if [ "$last_rc" -ne 0 ]; then
    use_copy || { say "== install: the copy does not import either"; exit 1; }
    say "== install: editable install failed, using a copy with metadata"
    status=0
  fi
}

finish() {
  say "== done: rc=$status, ${SECONDS}s of the ${budget}s budget"
  exit $status
}
trap finish TERM

: >"$summary"
say "== bench/device.sh $what: budget ${budget}s, dry run: $dry, $(date -u +%FT%TZ)"
install
if [ "$dry" = 1 ]; then
  say "== gpu: none (dry run)"
else
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv | tee -a "$summary"
fi

if [ "$what" != autotune ]; then
  if [ "$dry" = 1 ]; then
    export TKERNELS_BENCH_TINY=1 TRITON_INTERPRET=1
  fi
  # Every workload's record is merged into $OUT/results/<gpu>.json as soon as it is measured.
  stage bench 240 "$python" -m pytest bench -q -p no:cacheprovider --benchmark-enable \
    --benchmark-json="$OUT/benchmark.json"
  grep -E "passed|failed|skipped|error" "$log" | tail -3 >>"$summary"
  # bf16 correctness on the real GPU (tests marked gpu; all skip on a CPU, after collection).
  stage gpu-tests 60 "$python" -m pytest tests -m gpu -q -x -p no:cacheprovider
  unset TRITON_INTERPRET
  # Compile every launch and autotune candidate with this machine's Triton: registers, spills,
  # shared memory (CI compiles the same with the same Triton; least new information, so last).
  if [ "$dry" = 1 ]; then
    stage compile 60 "$python" -m tkernels.registry --targets=cuda:90 --representative= tkernels.continuous.acceptance:_first_rejection_kernel
  else
    stage compile 120 "$python" -m tkernels.registry --candidates --targets=cuda:90 --representative= --jobs="$(nproc)"
  fi
  grep -E "^FAIL|compiled .* launches" "$log" | tail -12 >>"$summary"
fi

if [ "$what" != bench ]; then
  # Resume from the warm machine's state, else from one carried in bench/.autotune/.
  for f in bench/.autotune/.*.autotune-state.json bench/.autotune/*.json; do
    [ -f "$f" ] && [ ! -e "$tune_dir/$(basename "$f")" ] && cp "$f" "$tune_dir/"
  done
  cp -a "$tune_dir"/. "$OUT/configs/" 2>/dev/null
  if [ "$dry" = 1 ]; then
    stage autotune 240 "$python" -m tkernels.cli autotune --dry-run --out "$OUT/configs" ${TKERNELS_AUTOTUNE_ARGS:-}
  else
    stage autotune 300 "$python" -m tkernels.cli autotune --quick --out "$OUT/configs" ${TKERNELS_AUTOTUNE_ARGS:-}
  fi
  # rc 3: stopped by the budget with a partial config; the state stays for the next call.
  tail -8 "$log" | grep -v '^\s*$' >>"$summary"
  rm -rf "${tune_dir:?}"/* "$tune_dir"/.[!.]*
  cp -a "$OUT/configs"/. "$tune_dir/"
fi
finish
