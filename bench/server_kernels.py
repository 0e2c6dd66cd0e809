"""vLLM's and SGLang's pure-Triton attention kernels, usable where the servers are not installed.

GPU machines for benchmarks may lack vLLM/SGLang and the network. :func:`prepare` (run
beforehand, where PyPI is reachable) fetches the servers' wheels with ``pip download --no-deps``
and extracts only the kernel files, plus the helper modules they import from their own folder,
into ``bench/.server_kernels/`` (gitignored; small enough to carry to the GPU machine). In the
copies the server's top package is renamed in import lines (``vllm`` -> ``_sk_vllm``) so they
never clash with an installed server, and every other server module they import becomes a shim:
real ``triton``/``tl``, logging, CUDA platform probes, and for anything else a falsy placeholder
(env flags, capability checks, enum members compare by identity). :func:`load` imports one.

    python bench/server_kernels.py prepare     # or prepare(source=site-packages folder)
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

DEST = Path(__file__).resolve().parent / ".server_kernels"
VERSIONS = {"vllm": "0.33.0", "sglang": "0.5.23"}
# name -> (package, kernel file inside the wheel, function)
KERNELS = {
    "vllm_unified_attention": ("vllm", "vllm/v1/attention/ops/triton_unified_attention.py", "unified_attention"),
    "sglang_extend_attention": ("sglang", "sglang/kernels/ops/attention/extend_attention.py", "extend_attention_fwd"),
    "sglang_decode_attention": ("sglang", "sglang/kernels/ops/attention/decode_attention.py", "decode_attention_fwd"),
}

_SHIM_SUPPORT = '''"""Stand-ins for server modules the extracted kernels import (written by server_kernels.py)."""
import logging

import torch
import triton
import triton.language as tl


class Placeholder:
    """Falsy, callable, attribute-producing; the same attribute is always the same object."""

    def __init__(self, name):
        self._name = name
        self._children = {}

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return self._children.setdefault(attr, Placeholder(f"{self._name}.{attr}"))

    def __call__(self, *args, **kwargs):
        return self._children.setdefault("()", Placeholder(f"{self._name}()"))

    def __bool__(self):
        return False

    def __repr__(self):
        return f"<placeholder {self._name}>"


class CurrentPlatform:
    """vLLM's ``current_platform`` as far as its kernels ask (CUDA or ROCm by torch's build)."""

    def is_rocm(self):
        return torch.version.hip is not None

    def is_cuda(self):
        return torch.cuda.is_available() and torch.version.hip is None

    def is_cuda_alike(self):
        return True

    def fp8_dtype(self):
        return torch.float8_e4m3fnuz if self.is_rocm() else torch.float8_e4m3fn

    def get_device_capability(self, device_id=0):
        return torch.cuda.get_device_capability(device_id) if torch.cuda.is_available() else None

    def is_device_capability_family(self, capability, device_id=0):
        major = self.get_device_capability(device_id)
        return major is not None and major[0] == capability // 10

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder(f"current_platform.{attr}")


def _libdevice():
    import triton.language.extra.libdevice as libdevice
    return libdevice


KNOWN = {
    "triton": lambda: triton,
    "tl": lambda: tl,
    "tldevice": _libdevice,
    "HAS_TRITON": lambda: True,
    "LOG2E": lambda: 1.4426950408889634,
    "LOGE2": lambda: 0.6931471805599453,
    "init_logger": lambda: logging.getLogger,
    "current_platform": CurrentPlatform,
    "cdiv": lambda: triton.cdiv,
    "next_power_of_2": lambda: triton.next_power_of_2,
    "is_cuda": lambda: (lambda: torch.cuda.is_available() and torch.version.hip is None),
    "is_hip": lambda: (lambda: torch.version.hip is not None),
    "get_device_core_count": lambda: (lambda device_id=0: torch.cuda.get_device_properties(device_id).multi_processor_count),
}


def module_getattr(module):
    cache = {}

    def getattr_(name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name not in cache:
            cache[name] = KNOWN[name]() if name in KNOWN else Placeholder(f"{module}.{name}")
        return cache[name]

    return getattr_
'''


def _alias(package: str) -> str:
    return f"_sk_{package}"


def _rename_imports(source: str, package: str) -> str:
    """``from vllm.x import y`` / ``import vllm.x as z`` -> the aliased package, import lines only."""
    pattern = re.compile(rf"^(\s*)(from|import)\s+{package}(?=[.\s])", re.MULTILINE)
    return pattern.sub(lambda m: f"{m.group(1)}{m.group(2)} {_alias(package)}", source)


def _server_imports(source: str, package: str) -> dict[str, set[str]]:
    """Modules of ``package`` that ``source`` imports (lazy imports included) -> names taken."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == package or node.module.startswith(package + "."):
                found.setdefault(node.module, set()).update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == package or a.name.startswith(package + "."):
                    found.setdefault(a.name, set())
    return found


def _enum_classes(source: str | None, names: set[str]) -> list[str]:
    """Source of the ``names`` that ``source`` defines as plain enums (kernels pass their
    members as integers, so a placeholder will not do)."""
    if source is None:
        return []
    classes = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name in names and any(
            getattr(base, "id", getattr(base, "attr", "")) in ("Enum", "IntEnum", "IntFlag") for base in node.bases
        ):
            classes.append(ast.get_source_segment(source, node))
    return classes


def _module_file(module: str) -> str:
    return module.replace(".", "/") + ".py"


def _extract(package: str, kernel_path: str, read, dest: Path) -> None:
    """Copy the kernel and its same-folder helpers; shim every other server module it imports."""
    folder = kernel_path.rsplit("/", 1)[0]
    pending, copied, shimmed = [kernel_path], set(), {}
    while pending:
        path = pending.pop()
        if path in copied:
            continue
        source = read(path)
        copied.add(path)
        out = dest / _alias(package) / Path(path).relative_to(package)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_rename_imports(source, package))
        for module, names in _server_imports(source, package).items():
            if _module_file(module).rsplit("/", 1)[0] == folder and read(_module_file(module), missing_ok=True) is not None:
                pending.append(_module_file(module))
            else:
                shimmed.setdefault(module, set()).update(names)
    # Every package level on the way, and every shimmed module, answers attribute lookups.
    modules = set(shimmed)
    for dotted in set(shimmed) | {path[:-3].replace("/", ".") for path in copied}:
        parts = dotted.split(".")
        modules |= {".".join(parts[:i]) for i in range(1, len(parts))}
    for module in sorted(modules):
        parts = module.split(".")
        parts[0] = _alias(package)
        is_package = any(m.startswith(module + ".") for m in modules) or any(p.startswith(module.replace(".", "/") + "/") for p in copied)
        target = dest.joinpath(*parts, "__init__.py") if is_package else dest.joinpath(*parts[:-1], parts[-1] + ".py")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        server_file = module.replace(".", "/") + ("/__init__.py" if is_package else ".py")
        enums = _enum_classes(read(server_file, missing_ok=True), shimmed.get(module, set()))
        header = "from enum import Enum, IntEnum, IntFlag  # noqa: F401\n\n" if enums else ""
        target.write_text(header + "".join(e + "\n\n\n" for e in enums)
                          + f"import _sk_shim\n__getattr__ = _sk_shim.module_getattr({module!r})\n")


def prepare(dest: Path = DEST, source: Path | None = None, versions: dict[str, str] = VERSIONS) -> Path:
    """Fill ``dest`` with the kernels of :data:`KERNELS`.

    ``source`` is a folder holding the server packages (e.g. a site-packages); without it the
    wheels of ``versions`` are downloaded with ``pip download --no-deps``.
    """
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "_sk_shim.py").write_text(_SHIM_SUPPORT)
    with tempfile.TemporaryDirectory() as tmp:
        for package in sorted({p for p, _, _ in KERNELS.values()}):
            if source is not None:
                def read(path, missing_ok=False, _root=Path(source)):
                    file = _root / path
                    if missing_ok and not file.is_file():
                        return None
                    return file.read_text()
            else:
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                f"{package}=={versions[package]}", "-d", tmp], check=True)
                wheel = zipfile.ZipFile(next(Path(tmp).glob(f"{package.replace('-', '_')}-*.whl")))
                names = set(wheel.namelist())

                def read(path, missing_ok=False, _wheel=wheel, _names=names):
                    if missing_ok and path not in _names:
                        return None
                    return _wheel.read(path).decode()
            for pkg, kernel_path, _ in KERNELS.values():
                if pkg == package:
                    _extract(package, kernel_path, read, dest)
    return dest


def load(name: str, dest: Path = DEST):
    """The kernel function ``name`` (a key of :data:`KERNELS`) from a prepared ``dest``."""
    package, kernel_path, function = KERNELS[name]
    module_file = dest / _alias(package) / Path(kernel_path).relative_to(package)
    if not module_file.is_file():
        raise FileNotFoundError(f"{module_file} is missing: run `python bench/server_kernels.py prepare` first")
    if str(dest) not in sys.path:
        sys.path.insert(0, str(dest))
    module = ".".join([_alias(package), *Path(kernel_path).relative_to(package).with_suffix("").parts])
    return getattr(importlib.import_module(module), function)


if __name__ == "__main__":
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python bench/server_kernels.py prepare")
    print(prepare())
