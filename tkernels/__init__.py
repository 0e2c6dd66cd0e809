"""tkernels: autotuned Triton kernels and the vLLM/SGLang plugins around them.

The core is this package; ``plugins/`` and ``autotune/`` sit beside it at the top of the
repository and install as ``tkernels.plugins`` and ``tkernels.autotune`` (pyproject's
``package-dir``), so nothing squats the generic top-level names. An editable install maps those
two names to the *installed* checkout's folders with a finder that Python consults after
``sys.path``; with two checkouts and one environment, ``PYTHONPATH=<other checkout>`` then ran
the other checkout's core with the installed checkout's plugins. In a source checkout (this
file's folder has a ``pyproject.toml`` and both folders beside it) the finder below, ahead of
every other, resolves the two names next to the ``tkernels`` that was actually imported, so the
code that runs is one checkout's (tests/test_layout.py, tests/standalone.sh). An installed wheel
holds ``tkernels/plugins`` itself and the finder is not installed.
"""

from __future__ import annotations

import sys
from importlib.util import spec_from_file_location
from pathlib import Path


class _CheckoutFolders:
    """A meta path finder for ``tkernels.plugins`` / ``tkernels.autotune`` of one checkout."""

    def __init__(self, root: Path):
        self.root = root
        self.folders = {f"{__name__}.{name}": root / name for name in ("plugins", "autotune")}

    def find_spec(self, fullname, path=None, target=None):
        folder = self.folders.get(fullname)
        if folder is None:
            return None  # their submodules follow the package's __path__, i.e. this checkout
        return spec_from_file_location(fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])


def _install_checkout_finder() -> None:
    here = Path(__file__).resolve().parent
    root = here.parent
    if (here / "plugins").is_dir() or not (root / "pyproject.toml").is_file() \
            or not all((root / name / "__init__.py").is_file() for name in ("plugins", "autotune")):
        return  # an installed package (or an unusual layout): the ordinary import system applies
    for finder in sys.meta_path:  # a re-import of this module: one finder per process
        if isinstance(getattr(finder, "root", None), Path) and type(finder).__name__ == "_CheckoutFolders":
            sys.meta_path.remove(finder)
            break
    sys.meta_path.insert(0, _CheckoutFolders(root))


_install_checkout_finder()
