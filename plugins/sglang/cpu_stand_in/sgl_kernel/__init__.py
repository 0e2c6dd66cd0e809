"""tkernels' CPU stand-in for ``sgl_kernel``: :mod:`tkernels.plugins.sglang.cpu_ops` under SGLang's name.

This folder's parent is put on ``sys.path`` (last) by :func:`tkernels.plugins.sglang.cpu.install_stand_in`
only where SGLang runs its CPU engine and no real ``sgl_kernel`` is importable.
"""

from tkernels.plugins.sglang.cpu_ops import *  # noqa: F403
from tkernels.plugins.sglang.cpu_ops import __all__  # noqa: F401
