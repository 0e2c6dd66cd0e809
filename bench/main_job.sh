#!/usr/bin/env bash
# The project's main job: builds the main environment (once per machine), prints what tkernels
# sees (versions, device, per-GPU config), generates with vLLM + the tkernels plugin on the
# embedded SmolLM2-135M-Instruct (or the model given with --model DIR), then compares plain
# decoding, vLLM's ngram speculation and tkernels' Token Recycling proposer on Spec-Bench dev
# questions: tokens/s, MAT (tokens per target step) and output equality.
# Arguments go to both `tkernels demo` and the speculation comparison (--model, --questions, --max-tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
main=$(bash tests/envs/ensure.sh main)
"$main/bin/tkernels" info
"$main/bin/tkernels" demo "$@"
"$main/bin/tkernels" speculation-bench --questions 3 --max-tokens 64 --require-equal "$@"
