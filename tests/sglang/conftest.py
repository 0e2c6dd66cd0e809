"""SGLang tests: tkernels' CPU stand-in for ``sgl_kernel`` where SGLang is installed without it."""

import importlib.util

_sglang = importlib.util.find_spec("sglang")
if _sglang is not None and _sglang.origin is not None:  # installed, not this namespace folder
    from tkernels.plugins.sglang.cpu import install_stand_in

    # SGLang's speculative modules import sgl_kernel ops on every non-CUDA platform; the stand-in
    # implements the ones its CPU engine calls and raises NotImplementedError for the others.
    install_stand_in(cpu_only=False)
