"""The one list of tkernels' Triton kernels and the launches they really compile, for the
GPU-target compile check.

Each kernel module decorates its kernels with :func:`gpu_compile_check`, giving the signature
and, through ``launches``, every configuration its launcher compiles by default (per supported
head size and dtype: the constexprs, argument dtypes, ``num_warps`` and ``num_stages`` the
launcher passes; :class:`Launch`); autotune adds every candidate it can try
(:data:`CANDIDATES_MODULE`); :data:`KERNEL_MODULES` names the modules to import to see them all.

``python -m tkernels.registry [--candidates] [--targets=cuda:90,cuda:80] [--representative=hip:gfx942]
[--jobs=N] [--fail-fast] [MODULE | MODULE:KERNEL ...]`` compiles each launch for each of
``--targets`` (no GPU needed: codegen up to PTX/cubin and AMDGCN/HSACO runs on the CPU), prints a table (kernel, launch, target, registers, spill bytes,
shared bytes) and exits non-zero when a compile fails, a default launch spills registers on a
CUDA target (except the kernels in :data:`SPILL_ALLOWLIST`, each with its reason; empty at
present), or any launch needs more shared memory than the target has (:data:`SHARED_LIMITS`). Registers and spills come from ptxas's own
report of the compile (``-v``, which Triton passes), shared memory from the compiled metadata.
It must run without ``TRITON_INTERPRET`` so that ``@triton.jit`` yields compilable functions:
the tests call it in a subprocess. Without ``--candidates`` only the default launches compile.
``--representative`` targets compile one default launch per kernel only (by default gfx942:
AMD machines are not lent, so it guards codegen, not resources).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

# Modules holding @triton.jit kernels. Add a module here when it defines a kernel; a test
# checks that every `*_kernel` function under tkernels/ is registered.
KERNEL_MODULES: tuple[str, ...] = (
    "tkernels.attention.kernels",
    "tkernels.spec.verify.kernels",
    "tkernels.spec.kv_compaction",
    "tkernels.continuous.acceptance",
)

# (backend, arch, warp size) as accepted by triton.backends.compiler.GPUTarget.
TARGETS: tuple[tuple[str, Any, int], ...] = (("cuda", 80, 32), ("cuda", 90, 32), ("hip", "gfx942", 64))

# Shared memory one block may use (opt-in maximum), bytes: H100/H200 (sm_90), A100 (sm_80),
# MI300X (gfx942, LDS).
SHARED_LIMITS: dict[Any, int] = {90: 232_448, 80: 166_912, "gfx942": 65_536}

# Kernels whose default launches may spill for now, each with the reason; the table still
# shows their spills. An entry is removed by the change that fixes the kernel.
SPILL_ALLOWLIST: dict[str, str] = {}


@dataclass(frozen=True)
class Launch:
    """One compile a launcher really makes.

    ``constexprs``: every ``tl.constexpr`` argument; ``types``: signature entries that differ
    from the registered signature (the tensors' dtypes, e.g. ``{"q_ptr": "*bf16"}``);
    ``options``: compile options the launcher passes (``num_warps``, ``num_stages``);
    ``candidate``: an autotune candidate rather than a default (its spills are reported, not
    failed); ``shared_bound``: the bytes of shared memory autotune's pruning estimate allows
    (checked to be at least what the compiler allocates).
    """

    label: str
    constexprs: dict[str, Any]
    types: dict[str, str] = field(default_factory=dict)
    options: dict[str, int] = field(default_factory=dict)
    candidate: bool = False
    shared_bound: int | None = None


# launches(shared_limit) -> the kernel's launches; candidates the estimate prunes for a target
# with ``shared_limit`` bytes (None: no limit) are left out, as autotune leaves them out.
LaunchList = Callable[[int | None], Iterable[Launch]]


@dataclass(frozen=True)
class KernelEntry:
    module: str
    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    fn: Any
    launches: LaunchList | None = None

    def all_launches(self, shared_limit: int | None = None, candidates: bool = True) -> list[Launch]:
        """The launches to compile: the kernel's list (else the registered representative), then
        autotune's candidates if asked (registered by :data:`CANDIDATES_MODULE`, imported by
        :func:`load_all` with ``candidates=True``)."""
        found = list(self.launches(shared_limit)) if self.launches else [Launch("registered", self.constexprs)]
        if candidates and f"{self.module}:{self.name}" in CANDIDATES:
            found += CANDIDATES[f"{self.module}:{self.name}"](shared_limit)
        return [launch for launch in found if candidates or not launch.candidate]


REGISTRY: dict[str, KernelEntry] = {}

# Autotune's candidate launches per kernel key (``module:kernel``), added by the module named
# here when it is imported: the candidate lists belong to autotune (what it tries), the kernels
# only own their search spaces, so kernel modules never import autotune.
CANDIDATES_MODULE = "tkernels.autotune.candidates"
CANDIDATES: dict[str, LaunchList] = {}


def add_candidates(key: str, launches: LaunchList) -> None:
    """Register autotune's candidate launches of kernel ``key`` (``module:kernel``)."""
    CANDIDATES[key] = launches


def gpu_compile_check(signature: dict[str, str], launches: LaunchList | None = None, **constexprs: Any) -> Callable:
    """Register a ``@triton.jit`` kernel (apply above ``@triton.jit``).

    ``signature`` maps every non-constexpr argument to a Triton type (``"*fp16"``, ``"i32"``,
    ``"fp32"``); ``constexprs`` gives each ``tl.constexpr`` argument a representative value;
    ``launches`` (called at check time) lists what the launcher really compiles by default;
    autotune's candidates are added on its side (:func:`add_candidates`).
    """

    def register(kernel: Any) -> Any:
        fn = getattr(kernel, "fn", kernel)
        key = f"{fn.__module__}:{fn.__name__}"
        sig = dict(signature)
        sig.update({name: "constexpr" for name in constexprs})
        REGISTRY[key] = KernelEntry(fn.__module__, fn.__name__, sig, dict(constexprs), kernel, launches)
        return kernel

    return register


def load_all(modules: tuple[str, ...] = KERNEL_MODULES, candidates: bool = False) -> dict[str, KernelEntry]:
    """The kernels registered by ``modules`` (imported here), with autotune's candidate launches
    if ``candidates`` (:data:`CANDIDATES_MODULE`, imported by name: the compile check is the one
    place that joins the kernels and the autotune command)."""
    for module in modules:
        importlib.import_module(module)
    if candidates:
        importlib.import_module(CANDIDATES_MODULE)
    return {key: entry for key, entry in REGISTRY.items() if entry.module in modules}


@dataclass
class Compiled:
    """What one compile used: registers and spill bytes (CUDA targets; None elsewhere) and
    shared memory bytes."""

    registers: int | None
    spill_bytes: int | None
    shared_bytes: int
    seconds: float


_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_entry(entry: KernelEntry, target: tuple[str, Any, int], launch: Launch | None = None) -> Compiled:
    """Compile ``launch`` (default: the registered representative) of ``entry`` for ``target``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(entry.fn, JITFunction):
        raise RuntimeError("compile check needs TRITON_INTERPRET unset (kernels are interpreted)")
    launch = launch or Launch("registered", entry.constexprs)
    signature = {**entry.signature, **launch.types}
    signature.update({name: "constexpr" for name in launch.constexprs})
    src = triton.compiler.ASTSource(fn=entry.fn, signature=signature, constexprs=launch.constexprs)
    # ptxas's report (-v) is printed by Triton only when it runs ptxas: compile every time.
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True
    log = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=GPUTarget(*target), options=dict(launch.options))
    report = log.getvalue()
    registers = _REGISTERS.findall(report)
    spills = _SPILLS.findall(report)
    return Compiled(
        registers=int(registers[-1]) if registers else None,
        spill_bytes=max(int(s) for s in spills[-1]) if spills else None,
        shared_bytes=int(kernel.metadata.shared),
        seconds=time.monotonic() - start,
    )


@dataclass
class Row:
    key: str
    launch: Launch
    target: tuple[str, Any, int]
    compiled: Compiled | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)


def check(row: Row) -> Row:
    """Compile ``row``'s launch and list what fails the check."""
    entry = REGISTRY[row.key]
    try:
        row.compiled = compile_entry(entry, row.target, row.launch)
    except Exception as err:  # report every failure, not just the first
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        row.error = f"{type(err).__name__}: {first_line}"
        row.problems.append("compile failed")
        return row
    c, launch, arch = row.compiled, row.launch, row.target[1]
    limit = SHARED_LIMITS.get(arch)
    if limit is not None and c.shared_bytes > limit:
        row.problems.append(f"shared {c.shared_bytes} B > {limit} B")
    if launch.shared_bound is not None and c.shared_bytes > launch.shared_bound:
        row.problems.append(f"shared {c.shared_bytes} B > autotune's estimate {launch.shared_bound} B")
    if c.spill_bytes and not launch.candidate and row.key not in SPILL_ALLOWLIST:
        row.problems.append(f"default launch spills {c.spill_bytes} B")
    return row


def _target_arg(text: str) -> tuple[str, Any, int]:
    for target in TARGETS:
        if text == f"{target[0]}:{target[1]}":
            return target
    raise SystemExit(f"--targets: unknown target {text!r} (known: {', '.join(f'{b}:{a}' for b, a, _ in TARGETS)})")


def plan(entries: dict[str, KernelEntry], targets, representative, candidates: bool) -> list[Row]:
    """Every launch (candidates too if asked) for ``targets``, the first default launch only
    for ``representative`` targets."""
    rows = []
    for key, entry in sorted(entries.items()):
        for target in targets:
            rows += [Row(key, launch, target) for launch in entry.all_launches(SHARED_LIMITS.get(target[1]), candidates)]
        rows += [Row(key, entry.all_launches(SHARED_LIMITS.get(target[1]), candidates=False)[0], target)
                 for target in representative]
    return rows


def _run_in_worker(index_and_row):
    index, row = index_and_row
    return index, check(row)


def _print_row(row: Row) -> None:
    c = row.compiled
    regs = "-" if c is None or c.registers is None else str(c.registers)
    spill = "-" if c is None or c.spill_bytes is None else str(c.spill_bytes)
    shared = "-" if c is None else str(c.shared_bytes)
    status = "FAIL" if row.problems else "ok"
    kind = "candidate" if row.launch.candidate else "default"
    note = "; ".join(row.problems) + (f" ({row.error})" if row.error else "")
    if not row.problems and c and c.spill_bytes and not row.launch.candidate:
        note = f"allowed: {SPILL_ALLOWLIST[row.key]}"
    print(f"{status:<5} {row.key.split(':')[1]:<30} {row.launch.label:<44} {kind:<9} {row.target[0]}:{row.target[1]:<7} "
          f"{regs:>4} {spill:>6} {shared:>7}  {note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options = {a.split("=", 1)[0]: (a.split("=", 1)[1] if "=" in a else "") for a in argv if a.startswith("--")}
    # MODULE or MODULE:KERNEL arguments select what to compile (default: every kernel).
    selected = [a for a in argv if not a.startswith("--")]
    modules = tuple(dict.fromkeys(a.split(":")[0] for a in selected)) or KERNEL_MODULES
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile check: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    entries = {key: entry for key, entry in load_all(modules, "--candidates" in options).items()
               if not selected or entry.module in selected or key in selected}
    targets = [_target_arg(t) for t in options.get("--targets", "cuda:90,cuda:80").split(",") if t]
    representative = [_target_arg(t) for t in options.get("--representative", "hip:gfx942").split(",") if t]
    rows = plan(entries, targets, representative, "--candidates" in options)
    jobs = int(options.get("--jobs") or 1)
    print(f"{'':<5} {'kernel':<30} {'launch':<44} {'kind':<9} {'target':<12} {'regs':>4} {'spill':>6} {'shared':>7}")
    failures = 0
    started = time.monotonic()
    if jobs > 1:
        import multiprocessing

        # Workers fork after the modules are imported: REGISTRY is theirs too. Rows print in
        # completion order; the summary counts them all.
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for _, row in pool.imap_unordered(_run_in_worker, enumerate(rows)):
                _print_row(row)
                failures += bool(row.problems)
                if row.problems and "--fail-fast" in options:
                    pool.terminate()
                    return 1
    else:
        for row in rows:
            check(row)
            _print_row(row)
            failures += bool(row.problems)
            if row.problems and "--fail-fast" in options:
                return 1
    print(f"compiled {len(rows)} launches of {len(entries)} kernels for {len({r.target for r in rows})} targets in "
          f"{time.monotonic() - started:.0f}s, {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    # Run the imported module's main: kernel modules register into `tkernels.registry`, not
    # into this `__main__` copy of it.
    from tkernels.registry import main as registry_main

    sys.exit(registry_main())
