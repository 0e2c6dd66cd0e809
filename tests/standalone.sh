#!/usr/bin/env bash
# Independence check (run by tests/run.sh): the tracked files alone, copied into an empty
# temporary folder with nothing beside it, run the main job's speculation comparison on one
# question and 16 tokens. It fails on a file the project reads from outside itself or forgot to
# track. The main environment's editable install points at the copy during the run and back
# at this checkout afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
work=$(mktemp -d)
copy="$work/tkernels"  # the only entry of $work: no sibling folders
trap 'bash "$root/tests/envs/ensure.sh" main >/dev/null; rm -rf "$work"' EXIT
mkdir "$copy"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$copy"
main=$(bash "$copy/tests/envs/ensure.sh" main)
cd "$copy"
"$main/bin/python" - "$copy" <<'PY'
import sys
import tkernels.data
import tkernels.cli.speculation_bench as bench

for module in (tkernels.data, bench):  # imported from the copy, not from the calling checkout
    assert module.__file__.startswith(sys.argv[1]), f"{module.__name__} imported from {module.__file__}"
PY
echo "[standalone] speculation comparison in $copy (tracked files only)" >&2
"$main/bin/tkernels" speculation-bench --questions 1 --max-tokens 16 --require-equal  # the main job's methods, one question
