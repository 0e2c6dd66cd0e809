"""Which checkout's code runs: ``python tests/provenance.py COPY MODULE...`` imports the modules
and fails unless every loaded tkernels module (the core, the plugins, autotune) lives under
COPY; it prints their number. Used by ``tests/test_layout.py`` and ``tests/standalone.sh``, run
with ``python -P`` (this folder, which holds ``sglang/`` and ``vllm/`` test folders, stays off
``sys.path``)."""

import importlib
import os
import sys


def main(copy: str, modules: list[str]) -> int:
    for name in modules:
        importlib.import_module(name)
    copy = os.path.realpath(copy)
    loaded = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
              if name == "tkernels" or name.startswith("tkernels.")}
    outside = {name: path for name, path in loaded.items()
               if path is None or not os.path.realpath(path).startswith(copy + "/")}
    assert not outside, f"tkernels modules loaded from outside {copy}: {outside}"
    print(len(loaded))
    print(f"[provenance] {len(loaded)} tkernels modules, all from {copy}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
