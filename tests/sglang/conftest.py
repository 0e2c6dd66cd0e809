"""SGLang tests: a stand-in for ``sgl_kernel`` (CUDA-only) where SGLang is installed without it."""

import importlib.util
import sys
import types
from unittest.mock import MagicMock


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


_sglang = importlib.util.find_spec("sglang")
if _sglang is not None and _sglang.origin is not None:  # installed, not this namespace folder
    _stub_sgl_kernel()
