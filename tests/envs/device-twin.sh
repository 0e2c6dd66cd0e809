#!/usr/bin/env bash
# Create (once) and print the path of the device-twin environment: the GPU machine's Triton 3.6.0
# and the packages its runs import (tests/envs/device-twin.txt) on the local CPU torch. In it,
# tests/run.sh compiles every kernel launch and autotune candidate for sm_90 and sm_80 with the
# device's compiler and rehearses bench/device.sh (tests/test_device_script.py).
#
# Cached like ensure.sh's environments (same folder, `.complete` marker, tkernels re-installed
# editable from the calling checkout), keyed by this script and device-twin.txt. A script of its
# own rather than a case of ensure.sh: ensure.sh is part of the main and sglang keys, and
# changing it would rebuild those (about 10 GB) on every machine.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${TKERNELS_ENV_DIR:-$HOME/.cache/tkernels/envs}
key=$(cat "$here/device-twin.sh" "$here/device-twin.txt" | sha256sum | cut -c1-12)
env="$cache/device-twin-$key"
py=${TKERNELS_PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3

if [ ! -f "$env/.complete" ]; then
  rm -rf "$env"
  mkdir -p "$cache"
  echo "[envs] building device-twin environment in $env (first run on this machine: a minute or two)" >&2
  "$py" -m venv "$env"
  pip=("$env/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade pip setuptools==78.1.1 wheel >&2
  # torch first: the local CPU wheel (the main environment's); it does not require a Triton.
  "${pip[@]}" install torch==2.13.0 >&2
  "${pip[@]}" install -r "$here/device-twin.txt" >&2
  touch "$env/.complete"
  echo "[envs] device-twin environment ready" >&2
fi
"$env/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e "$root" >&2
echo "$env"
