"""Every Triton kernel compiles, as its launchers really launch it, for real GPU targets (what the
CPU interpreter forgives): no default launch spills registers, no launch needs more shared memory
than the target has, and autotune's shared-memory estimate covers every candidate it keeps.

In the main environment (Triton 3.9) the default launches compile for sm_90 (sm_80 and gfx942:
one default launch per kernel); in the device-twin environment (``TKERNELS_DEVICE_TWIN=1``,
the GPU machine's Triton 3.6) every default launch and every autotune candidate, for sm_90
and sm_80. The table printed is the record of registers, spills and shared memory.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tkernels import registry

ROOT = Path(__file__).resolve().parents[1]
DEVICE_TWIN = os.environ.get("TKERNELS_DEVICE_TWIN") == "1"


def _compile_check(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # A subprocess without TRITON_INTERPRET: under the interpreter @triton.jit gives functions
    # that cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the launchers' setting; Triton 3.9 warns without it
    return subprocess.run(
        [sys.executable, "-m", "tkernels.registry", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=3000,
    )


@pytest.mark.slow  # minutes: every launch compiles through ptxas
def test_every_launch_compiles_without_default_spills_within_shared_memory():
    # Main environment: the defaults for sm_90 with Triton 3.9 (sm_80 and gfx942: the first
    # default launch of each kernel); the device-twin environment: everything, both NVIDIA targets.
    args = ["--candidates"] if DEVICE_TWIN else ["--targets=cuda:90", "--representative=cuda:80,hip:gfx942"]
    result = _compile_check(*args, f"--jobs={os.cpu_count() or 1}")
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " 0 failures" in result.stdout
    cuda_rows = [line.split() for line in result.stdout.splitlines() if " cuda:" in line and line.startswith("ok")]
    assert cuda_rows and all(row[-3].isdigit() for row in cuda_rows if "allowed:" not in row), "ptxas report not read"
    if DEVICE_TWIN:
        assert " candidate " in result.stdout


def test_compile_check_fails_on_a_kernel_broken_for_sm90():
    result = _compile_check("broken_kernel", cwd=ROOT / "tests" / "data")
    assert result.returncode == 1
    assert any(line.startswith("FAIL  small_k_dot_kernel") and "cuda:90" in line for line in result.stdout.splitlines())


def test_compile_check_fails_on_a_default_launch_that_spills():
    result = _compile_check("resource_kernels", "--targets=cuda:90", "--representative=", cwd=ROOT / "tests" / "data")
    assert result.returncode == 1, result.stdout + result.stderr[-2000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("FAIL  spilling_kernel")]
    assert "default launch spills" in row and " 255 " in row


@pytest.mark.parametrize(("candidate", "allowlisted", "spills", "shared", "bound", "arch", "problem"), [
    (False, False, 0, 1000, None, 90, None),
    (False, False, 16, 1000, None, 90, "default launch spills 16 B"),
    (True, False, 16, 1000, None, 90, None),  # a candidate's spills are reported, not failed
    (False, True, 16, 1000, None, 90, None),  # the allowlist, with its reason in the table
    (True, False, 0, 232_449, None, 90, "shared 232449 B > 232448 B"),
    (True, False, 0, 166_913, None, 80, "shared 166913 B > 166912 B"),
    (True, False, 0, 70_000, 65_536, 90, "autotune's estimate 65536 B"),
])
def test_what_fails_the_check(monkeypatch, candidate, allowlisted, spills, shared, bound, arch, problem):
    key = "tkernels.spec.verify.kernels:_node_pass_kernel"
    registry.load_all()
    if allowlisted:
        monkeypatch.setitem(registry.SPILL_ALLOWLIST, key, "being fixed elsewhere")
    launch = registry.Launch("x", {}, candidate=candidate, shared_bound=bound)
    compiled = registry.Compiled(128, spills, shared, 0.0)
    monkeypatch.setattr(registry, "compile_entry", lambda entry, target, launch: compiled)
    row = registry.check(registry.Row(key, launch, ("cuda", arch, 32)))
    if problem is None:
        assert not row.problems
    else:
        assert any(problem in p for p in row.problems), row.problems


def test_every_allowlisted_spill_names_its_reason_and_a_registered_kernel():
    kernels = registry.load_all()
    for key, why in registry.SPILL_ALLOWLIST.items():
        assert key in kernels and why.strip()


def test_every_autotune_candidate_kept_for_a_gpu_fits_it_by_the_estimate():
    from tkernels.autotune.candidates import attention_candidate_launches

    for limit in (registry.SHARED_LIMITS[90], registry.SHARED_LIMITS[80]):
        launches = list(attention_candidate_launches(limit))
        assert launches and all(launch.candidate and launch.shared_bound <= limit for launch in launches)
    # Nothing is kept that could not launch on a GPU with little shared memory.
    assert not list(attention_candidate_launches(16_384))


def _jit_kernels(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.append(node.name)
    return names


def test_every_kernel_under_tkernels_is_registered_with_its_launches():
    entries = registry.load_all()
    source_root = ROOT / "tkernels"
    missing = []
    for path in source_root.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        missing += [f"{module}:{name}" for name in _jit_kernels(path) if f"{module}:{name}" not in entries]
    assert not missing, f"kernels missing @gpu_compile_check or KERNEL_MODULES entry: {missing}"
    without = [key for key, entry in entries.items() if entry.launches is None]
    assert not without, f"kernels registered without the launches their launchers compile: {without}"
