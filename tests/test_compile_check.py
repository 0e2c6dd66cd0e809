"""Every Triton kernel compiles for real GPU targets (what the CPU interpreter forgives)."""

import ast
import os
import subprocess
import sys
from pathlib import Path

from tkernels import registry

ROOT = Path(__file__).resolve().parents[1]


def _compile_check(*modules: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    # A subprocess without TRITON_INTERPRET: under the interpreter @triton.jit gives functions
    # that cannot be compiled.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "tkernels.registry", *modules],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def test_every_registered_kernel_compiles_for_sm80_sm90_gfx942():
    result = _compile_check()
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert " 0 failures" in result.stdout


def test_compile_check_fails_on_a_kernel_broken_for_sm90():
    result = _compile_check("broken_kernel", cwd=ROOT / "tests" / "data")
    assert result.returncode == 1
    assert "FAIL  broken_kernel:small_k_dot_kernel cuda:90" in result.stdout


def _jit_kernels(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                names.append(node.name)
    return names


def test_every_kernel_under_tkernels_is_registered():
    registered = {key for key in registry.load_all()}
    source_root = ROOT / "tkernels"
    missing = []
    for path in source_root.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        missing += [f"{module}:{name}" for name in _jit_kernels(path) if f"{module}:{name}" not in registered]
    assert not missing, f"kernels missing @gpu_compile_check or KERNEL_MODULES entry: {missing}"
