"""The one list of tkernels' Triton kernels, for the GPU-target compile check.

Each kernel module decorates its kernels with :func:`gpu_compile_check`, giving a representative
signature and constexprs; :data:`KERNEL_MODULES` names the modules to import to see them all.
``python -m tkernels.registry [--fail-fast] [MODULE ...]`` compiles every registered kernel (or
only those of the named modules) for the targets
in :data:`TARGETS` (no GPU needed: codegen up to PTX/cubin and AMDGCN/HSACO runs on the CPU)
and exits non-zero on any failure. It must run without ``TRITON_INTERPRET`` so that
``@triton.jit`` yields compilable functions: the tests call it in a subprocess.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Modules holding @triton.jit kernels. Add a module here when it defines a kernel; a test
# checks that every `*_kernel` function under tkernels/ is registered.
KERNEL_MODULES: tuple[str, ...] = (
    "tkernels.attention.mixed_attention",
    "tkernels.spec.verify",
    "tkernels.spec.kv_compaction",
    "tkernels.continuous.acceptance",
)

# (backend, arch, warp size) as accepted by triton.backends.compiler.GPUTarget.
TARGETS: tuple[tuple[str, Any, int], ...] = (("cuda", 80, 32), ("cuda", 90, 32), ("hip", "gfx942", 64))


@dataclass(frozen=True)
class KernelEntry:
    module: str
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    fn: Any


REGISTRY: dict[str, KernelEntry] = {}


def gpu_compile_check(signature: dict[str, str], **constexprs: Any) -> Callable:
    """Register a ``@triton.jit`` kernel (apply above ``@triton.jit``).

    ``signature`` maps every non-constexpr argument to a Triton type (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` gives each ``tl.constexpr`` argument a representative value.
    """

    def register(kernel: Any) -> Any:
        fn = getattr(kernel, "fn", kernel)
        key = f"{fn.__module__}:{fn.__name__}"
        sig = dict(signature)
        sig.update({name: "constexpr" for name in constexprs})
        REGISTRY[key] = KernelEntry(fn.__module__, fn.__name__, sig, dict(constexprs), kernel)
        return kernel

    return register


def load_all(modules: tuple[str, ...] = KERNEL_MODULES) -> dict[str, KernelEntry]:
    for module in modules:
        importlib.import_module(module)
    return REGISTRY


def compile_entry(entry: KernelEntry, target: tuple[str, Any, int]) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(entry.fn, JITFunction):
        raise RuntimeError("compile check needs TRITON_INTERPRET unset (kernels are interpreted)")
    src = triton.compiler.ASTSource(fn=entry.fn, signature=entry.signature, constexprs=entry.constexprs)
    triton.compile(src, target=GPUTarget(*target))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    modules = tuple(a for a in argv if not a.startswith("--")) or KERNEL_MODULES
    entries = load_all(modules)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    failures = 0
    for key, entry in sorted(entries.items()):
        for target in TARGETS:
            try:
                compile_entry(entry, target)
                print(f"ok    {key} {target[0]}:{target[1]}")
            except Exception as err:  # report every failure, not just the first
                failures += 1
                first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                print(f"FAIL  {key} {target[0]}:{target[1]}: {type(err).__name__}: {first_line}")
                if "--fail-fast" in argv:
                    return 1
    print(f"compiled {len(entries)} kernels for {len(TARGETS)} targets, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    # Run the imported module's main: kernel modules register into `tkernels.registry`, not
    # into this `__main__` copy of it.
    from tkernels.registry import main as registry_main

    sys.exit(registry_main())
