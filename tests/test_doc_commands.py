"""Every shell command in README.md and docs/*.md runs as written, as far as a CPU can tell
cheaply: the scripts and files they name exist, every ``tkernels`` subcommand answers ``--help``
and knows each flag given to it, every ``python -m`` module of tkernels answers ``--help`` (other
projects' modules: importable where that server is installed), and every dotted tkernels name
(``--scheduler-cls``, a proposer class in ``--speculative-config``) is defined where it says."""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PACKAGE_DIRS = {"tkernels.plugins": ROOT / "plugins", "tkernels.autotune": ROOT / "autotune", "tkernels": ROOT / "tkernels"}
SKIPPED = {"pip", "git", "cd", "export", "ruff", "cat", "sleep", "curl", "for", "do", "done", "echo", "cp", "mkdir"}


def _blocks(path: Path) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell)\n(.*?)```", path.read_text(), flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Each simple command of a block, as words, without leading VAR=value assignments and
    with ``$env/bin/`` prefixes dropped; ``X=$(command)`` gives ``command``."""
    text = re.sub(r"\\\n", " ", block)
    text = re.sub(r"\w+=\$\((.*?)\)", r"\1", text)
    found = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        command: list[str] = []
        for word in [*words, ";"]:
            if word in (";", "&&", "||", "|"):
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command:
                    found.append([re.sub(r"^\$\w+/bin/", "", command[0]), *command[1:]])
                command = []
            else:
                command.append(word)
    return found


def _all_commands() -> list[tuple[str, list[str]]]:
    return [(path.name, command) for path in DOCS for block in _blocks(path) for command in _commands(block)]


COMMANDS = _all_commands()


@functools.cache
def _help(*argv: str) -> str:
    out = subprocess.run([sys.executable, *argv, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, f"{' '.join(argv)} --help failed:\n{out.stderr[-2000:]}"
    return out.stdout


def _defined(dotted: str) -> bool:
    """Whether ``tkernels.a.b.Name`` is a module, or a name defined at the top of one (read, not imported)."""
    prefix = next(p for p in PACKAGE_DIRS if dotted == p or dotted.startswith(p + "."))
    folder = PACKAGE_DIRS[prefix]
    parts = dotted.removeprefix(prefix).strip(".").split(".") if dotted != prefix else []
    for cut in range(len(parts), -1, -1):
        base = folder.joinpath(*parts[:cut])
        module = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
        if module.is_file():
            rest = parts[cut:]
            if not rest:
                return True
            if len(rest) > 1:
                return False
            tree = ast.parse(module.read_text())
            names = {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
            names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
            names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
            return rest[0] in names
    return False


def _installed(package: str) -> bool:
    """Whether ``package`` is installed in this environment (not a folder of this repository,
    such as tests/sglang, that sys.path happens to reach)."""
    spec = importlib.util.find_spec(package)
    places = [spec.origin] if spec and spec.origin else list(spec.submodule_search_locations or []) if spec else []
    return bool(places) and not any(str(place).startswith(str(ROOT)) for place in places)


def _check(command: list[str]) -> None:
    program, args = command[0], command[1:]
    for dotted in re.findall(r"\btkernels(?:\.\w+)+", " ".join(args)):
        assert _defined(dotted), f"{dotted} is not defined in this repository"
    if program == "tkernels":
        text = _help("-m", "tkernels.cli", args[0]) if args and not args[0].startswith("-") else _help("-m", "tkernels.cli")
        for flag in (a.split("=")[0] for a in args[1:] if a.startswith("--")):
            assert flag in text, f"tkernels {args[0]}: no flag {flag}"
    elif program in ("python", "python3") and args[:1] == ["-m"]:
        module = args[1]
        if module == "pytest":
            _check(["pytest", *args[2:]])
        elif module.startswith("tkernels"):
            text = _help("-m", module)
            for flag in (a.split("=")[0] for a in args[2:] if a.startswith("--")):
                assert flag in text, f"python -m {module}: no flag {flag}"
        elif _installed(module.split(".")[0]):
            assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
    elif program in ("python", "python3", "bash"):
        script = next((a for a in args if not a.startswith("-")), None)
        assert script and (ROOT / script).is_file(), f"{program} {script}: no such file"
        if script.endswith(".py") and script.startswith("bench/plot"):
            _help(script)
    elif program == "pytest":
        for path in (a.split("::")[0] for a in args if (not a.startswith("-") and "/" in a) or a in ("bench", "tests")):
            assert (ROOT / path).exists(), f"pytest {path}: no such path"
    elif program == "vllm":
        assert args[:1] == ["serve"], f"vllm {args[:1]}: the docs only use `vllm serve`"
    else:
        assert program in SKIPPED, f"{program}: a command this test does not know how to check; add it"


def test_the_docs_hold_commands_to_check():
    programs = {command[0] for _, command in COMMANDS}
    assert {"tkernels", "vllm", "bash", "pytest", "python"} <= programs
    assert any(name == "README.md" for name, _ in COMMANDS)


def test_readme_starts_with_pip_install():
    first = next(command for name, command in COMMANDS if name == "README.md")
    assert first[:2] == ["pip", "install"]


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{n}:{' '.join(c)[:60]}" for n, c in COMMANDS])
def test_command_runs_as_written(doc, command):
    _check(command)
