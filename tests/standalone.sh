#!/usr/bin/env bash
# Independence check (run by tests/run.sh): the tracked files alone, copied into an empty
# temporary folder with nothing beside it, run the main job's speculation comparison on one
# question and 16 tokens. It fails on a file the project reads from outside itself or forgot to
# track. The main environment's editable install points at the copy during the run and back
# at this checkout afterwards; every tkernels module the run loads must come from the copy.
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
check_loaded='
import os
import sys

copy = os.path.realpath(sys.argv[1])
loaded = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
          if name == "tkernels" or name.startswith("tkernels.")}
outside = {name: path for name, path in loaded.items()
           if path is None or not os.path.realpath(path).startswith(copy + "/")}
assert not outside, f"tkernels modules loaded from outside the copy {copy}: {outside}"
print(f"[standalone] {len(loaded)} tkernels modules, all from {copy}", file=sys.stderr)
'
# Every tkernels module loaded (the core, the plugins, autotune) comes from the copy, not from
# the calling checkout: run here with the copy installed, and again with the calling checkout
# installed and the copy on PYTHONPATH (two checkouts, one environment).
"$main/bin/python" -c "import tkernels.data, tkernels.autotune, tkernels.plugins.vllm, tkernels.cli.speculation_bench
$check_loaded" "$copy"
bash "$root/tests/envs/ensure.sh" main >/dev/null
(cd "$work" && PYTHONPATH="$copy" "$main/bin/python" -c "import tkernels.data, tkernels.autotune, tkernels.plugins.vllm, tkernels.cli.speculation_bench
$check_loaded" "$copy")
bash "$copy/tests/envs/ensure.sh" main >/dev/null
echo "[standalone] speculation comparison in $copy (tracked files only)" >&2
"$main/bin/tkernels" speculation-bench --questions 1 --max-tokens 16 --require-equal  # the main job's methods, one question
