#!/usr/bin/env bash
# Independence check (run by tests/run.sh): the tracked files alone, copied into an empty
# temporary folder with nothing beside it, run the main job's speculation comparison on one
# question and 16 tokens. It fails on a file the project reads from outside itself or forgot to
# track. The main environment's editable install points at the copy during the run and back
# at this checkout afterwards; every tkernels module the run loads must come from the copy
# (tests/provenance.py, the check tests/test_layout.py runs too).
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
# Every tkernels module loaded (the core, the plugins, autotune) comes from the copy, not from
# the calling checkout: run here with the copy installed, and again with the calling checkout
# installed and the copy on PYTHONPATH (two checkouts, one environment).
modules="tkernels.data tkernels.autotune tkernels.plugins.vllm tkernels.cli.speculation_bench"
"$main/bin/python" -P "$copy/tests/provenance.py" "$copy" $modules >/dev/null
bash "$root/tests/envs/ensure.sh" main >/dev/null
(cd "$work" && PYTHONPATH="$copy" "$main/bin/python" -P "$copy/tests/provenance.py" "$copy" $modules >/dev/null)
bash "$copy/tests/envs/ensure.sh" main >/dev/null
echo "[standalone] speculation comparison in $copy (tracked files only)" >&2
"$main/bin/tkernels" speculation-bench --questions 1 --max-tokens 16 --require-equal  # the main job's methods, one question
