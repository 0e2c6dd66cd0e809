"""The code that runs is the checkout's own (issue 22 item 5).

``plugins/`` and ``autotune/`` install as ``tkernels.plugins`` / ``tkernels.autotune``; the
editable install maps them to the installed checkout's folders. A second copy of the repository
run with ``PYTHONPATH=<copy>`` must import its own plugins and autotune, not the installed ones.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the modules whose files must all come from the copy (tests/provenance.py checks them)
MODULES = ("tkernels.autotune.fit", "tkernels.plugins.vllm.settings", "tkernels.plugins.sglang", "tkernels.spec")


def test_a_second_checkout_on_pythonpath_runs_its_own_plugins_and_autotune(tmp_path):
    copy = tmp_path / "copy"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if name.split("/")[0] in ("tkernels", "plugins", "autotune") or name == "pyproject.toml":
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes((ROOT / name).read_bytes())
    env = dict(os.environ, PYTHONPATH=str(copy))
    out = subprocess.run([sys.executable, "-P", str(ROOT / "tests" / "provenance.py"), str(copy), *MODULES], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) > 10  # the core, the plugins and autotune all came from the copy


def test_this_checkout_resolves_its_own_folders():
    import tkernels.autotune
    import tkernels.plugins

    assert Path(tkernels.plugins.__file__).resolve() == ROOT / "plugins" / "__init__.py"
    assert Path(tkernels.autotune.__file__).resolve() == ROOT / "autotune" / "__init__.py"
