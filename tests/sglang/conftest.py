"""SGLang tests: skip them without SGLang; a stand-in for ``sgl_kernel`` (CUDA-only) without it."""

import importlib.util
import sys
import types
from importlib.metadata import PackageNotFoundError, version
from unittest.mock import MagicMock

import pytest


def _installed(distribution: str) -> bool:
    # Not importlib.util.find_spec("sglang"): with tests/ on sys.path, this folder is itself a
    # namespace package named `sglang`, so find_spec finds it where SGLang is not installed.
    try:
        version(distribution)
    except PackageNotFoundError:
        return False
    return True


HAS_SGLANG = _installed("sglang")


def pytest_collection_modifyitems(config, items):
    # tests/conftest.py skips `sglang` tests by find_spec, which this folder fools (see above).
    for item in items:
        if item.get_closest_marker("sglang") and not HAS_SGLANG:
            item.add_marker(pytest.mark.skip(reason="SGLang is not installed in this environment"))


def _stub_sgl_kernel() -> None:
    """``speculative.ngram_worker`` imports ``sgl_kernel.speculative`` on non-CUDA platforms.

    Like SGLang's ``sglang.test.test_utils.maybe_stub_sgl_kernel`` (which imports SGLang's whole
    benchmark stack to get there): every attribute of the stub is a MagicMock, so the modules
    import; nothing here may run a kernel from it.
    """
    if importlib.util.find_spec("sgl_kernel") is not None:
        return
    parent = types.ModuleType("sgl_kernel")
    parent.__path__ = []
    speculative = types.ModuleType("sgl_kernel.speculative")
    for module in (parent, speculative):
        module.__getattr__ = lambda name, module=module.__name__: MagicMock(name=f"{module}.{name}")
        sys.modules[module.__name__] = module
    parent.speculative = speculative


if HAS_SGLANG:
    _stub_sgl_kernel()
