#!/usr/bin/env bash
# The project's main job: builds the main environment (once per machine), prints what tkernels
# sees (versions, device, per-GPU config) and generates with vLLM + the tkernels plugin on the
# embedded SmolLM2-135M-Instruct (or the model given with --model DIR). Arguments go to
# `tkernels demo` (see `tkernels demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
main=$(bash tests/envs/ensure.sh main)
"$main/bin/tkernels" info
"$main/bin/tkernels" demo "$@"
