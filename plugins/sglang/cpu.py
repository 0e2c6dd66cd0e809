"""SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) with tkernels: the ``sgl_kernel`` stand-in and
NGRAM's verify-mask layout (docs/sglang.md).

**The stand-in.** SGLang's CPU paths import ``sgl_kernel`` ops at module level, and ``sgl_kernel``
has no CPU build on the package index. :func:`install_stand_in` (called by the plugin's
``register()``) makes ``import sgl_kernel`` find :mod:`tkernels.plugins.sglang.cpu_ops` through the
``cpu_stand_in/`` folder, appended LAST to ``sys.path``, and only on the CPU engine where no
``sgl_kernel`` is importable. Why a ``sys.path`` entry and not ``sys.modules``: SGLang calls
``load_plugins()`` in every process, but a scheduler process imports ``sglang.srt.managers.
scheduler`` (whose imports reach ``from sgl_kernel import ...``) BEFORE its ``load_plugins()``.
Those processes are started with multiprocessing's spawn, which gives the child the parent's
``sys.path`` before it imports anything, so the entry added in the launching process (where the
plugin registers before any ``sgl_kernel`` import: ``sglang.launch_server`` and ``Engine()`` call
``load_plugins()`` first) reaches every scheduler in time. A process that imports SGLang's CPU
modules without loading plugins first still fails with SGLang's own ``ImportError``.

**The verify-mask layout.** On the CPU engine, SGLang's NGRAM worker builds the compact ``n x n``
tree mask that SGLang's AMX attention backend reads; Triton-layout backends (SGLang's ``triton``
and tkernels', a subclass) read ``n x (prefix + n)`` blocks and would index past the compact mask
at the first verify. :func:`use_triton_verify_mask` switches the worker to the layout it builds
off CPU (its ``_is_cpu`` flag, read only for that choice).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger("tkernels")

STAND_IN_DIR = Path(__file__).with_name("cpu_stand_in")


def cpu_engine() -> bool:
    """SGLang's own test for its CPU engine (``SGLANG_USE_CPU_ENGINE=1`` on an x86-64 or arm64 host)."""
    from sglang.srt.utils.common import is_cpu

    return is_cpu()


def install_stand_in(cpu_only: bool = True) -> bool:
    """Make ``import sgl_kernel`` find tkernels' stand-in where none is importable; True if it is in use.

    ``cpu_only=False`` (the test suite) installs it off the CPU engine too, for SGLang modules that
    import ``sgl_kernel`` on any non-CUDA platform.
    """
    if cpu_only and not cpu_engine():
        return False
    module = sys.modules.get("sgl_kernel")
    if module is not None:  # imported already: the real one, or ours from a parent's sys.path
        return getattr(module, "TKERNELS_STAND_IN", False)
    if str(STAND_IN_DIR) in sys.path:
        return True
    if importlib.util.find_spec("sgl_kernel") is not None:
        return False  # a real sgl_kernel (a CPU build from source) always wins
    sys.path.append(str(STAND_IN_DIR))  # last, and inherited by spawned processes
    logger.info("tkernels: no sgl_kernel importable; SGLang's CPU engine uses tkernels' stand-in for the "
                "sgl_kernel ops it calls (tkernels.plugins.sglang.cpu_ops)")
    return True


TRITON_LAYOUT_BACKENDS = ("tkernels", "triton")  # read n x (prefix + n) verify-mask blocks
COMPACT_LAYOUT_BACKENDS = ("intel_amx",)  # reads NGRAM's compact n x n CPU mask


def use_triton_verify_mask(attention_backend: str | None) -> None:
    """On the CPU engine, make NGRAM build the verify mask ``--attention-backend`` reads, or refuse at start-up.

    Triton-layout backends get the ``n x (prefix + n)`` layout; SGLang's AMX backend reads the
    compact one NGRAM builds on CPU; any other backend (``torch_native`` treats a verify as a causal
    extend) would verify trees wrongly, so it is refused.
    """
    from sglang.srt.speculative import ngram_worker

    if attention_backend in TRITON_LAYOUT_BACKENDS:
        if ngram_worker._is_cpu:
            ngram_worker._is_cpu = False
            logger.info("tkernels: NGRAM on SGLang's CPU engine builds the n x (prefix + n) verify mask that "
                        "attention backend '%s' reads", attention_backend)
        return
    if attention_backend in COMPACT_LAYOUT_BACKENDS:
        return
    raise ValueError(f"speculation trees on SGLang's CPU engine: attention backend {attention_backend!r} does not "
                     "read tree masks; add --attention-backend tkernels")
