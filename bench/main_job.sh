#!/usr/bin/env bash
# The project's main job: builds the main environment (once per machine), prints what tkernels
# sees (versions, device, per-GPU config), generates with vLLM + the tkernels plugin on the
# embedded SmolLM2-135M-Instruct (or the model given with --model DIR), then compares plain
# decoding, vLLM's ngram speculation and tkernels' tree proposer (static Token Recycling
# template and hybrid drafter) on one Spec-Bench dev question per category: MAT (tokens per
# target step), output equality, predicted GPU tokens/s and the CPU's wall-clock tokens/s.
# Arguments go to both `tkernels demo` and the speculation comparison (--model, --questions, --max-tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
main=$(bash tests/envs/ensure.sh main)
"$main/bin/tkernels" info
"$main/bin/tkernels" demo "$@"
# One question per Spec-Bench category, vLLM ngram vs tkernels' trees (TR static, hybrid) at
# K = 32: MAT, equality, predicted GPU and measured CPU tokens/s (the command's defaults).
"$main/bin/tkernels" speculation-bench --require-equal "$@"
