"""Dependencies point one way (docs/design.md): a static walk of every import in the package,
lazy ones inside functions included, finds no import cycle, and nothing in the core
(``tkernels.*`` less ``tkernels.plugins``, ``tkernels.autotune`` and the console script
``tkernels.cli`` above them all) imports a plugin or the autotune command.

The walk reads the source (no import runs): modules are the files under ``tkernels/``,
``plugins/`` (installed as ``tkernels.plugins``) and ``autotune/`` (``tkernels.autotune``).
An edge goes to the module an import names: ``from P import name`` to ``P.name`` when that
is a module, else to ``P``. The parent packages Python imports on the way are not edges: a
submodule always runs its package's ``__init__`` first, so only what a file names counts.
One edge is allowed: :data:`tkernels.registry.CANDIDATES_MODULE`, which the compile check
imports by name (a string, not an import statement) to add autotune's candidate launches.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"tkernels": ROOT / "tkernels", "tkernels.plugins": ROOT / "plugins", "tkernels.autotune": ROOT / "autotune"}
OUTER = ("tkernels.plugins", "tkernels.autotune")
# The console script sits above everything: its subcommands are the autotune command and the
# plugins' demos, so it is neither core nor imported by anything.
ENTRY_POINTS = ("tkernels.cli",)  # the package and its subcommands' modules


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((package, *parts))
            if package == "tkernels" and name.startswith(OUTER):
                continue
            found[name] = path
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                       for alias in node.names]
        else:
            continue
        edges.update(t for t in targets if t in modules and t != name)
    return edges


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _edges(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_walk_sees_the_packages_and_their_imports():
    graph = _graph()
    assert {"tkernels.spec.tree", "tkernels.plugins.vllm.proposer", "tkernels.autotune.profile"} <= set(graph)
    assert "tkernels.spec.tree" in graph["tkernels.autotune.fit"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_core_imports_no_plugin_and_not_the_autotune_command():
    graph = _graph()
    assert not [name for name, targets in graph.items() if not name.startswith(ENTRY_POINTS)
                and any(t.startswith(ENTRY_POINTS) for t in targets)], "the CLI is imported"
    wrong = [f"{name} -> {target}" for name, targets in graph.items()
             if not name.startswith(OUTER + ENTRY_POINTS)
             for target in sorted(targets) if target.startswith(OUTER)]
    assert not wrong, "core modules importing plugins/autotune: " + ", ".join(wrong)
