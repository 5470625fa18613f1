"""The import graph, read from the source (AST): imports run one way and nothing hides a cycle.

Floors of the library, lowest first: ``symmetry -> nn -> models -> (policy, compat) -> (checkpoint, data) -> (train,
tasks) -> apps``. A module may import its own floor or lower ones, never a higher one. The client SDK imports nothing of
the project, the daemon only the client SDK; only ``streamtx.apps`` (the top wing) brings the library together with
them. First-party imports sit at module level (no import inside a function that could hide a cycle), and nothing is
imported by a name string (``importlib.import_module``, ``__import__``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "streamtx": ROOT / "streamtx",
    "streamtx_server": ROOT / "server" / "streamtx_server",
    "streamtx_client": ROOT / "clients" / "python" / "streamtx_client",
}
FLOORS = {
    "streamtx.symmetry": 0,
    "streamtx.nn": 1,
    "streamtx.models": 2,
    "streamtx.policy": 3,
    "streamtx.compat": 3,
    "streamtx.checkpoint": 4,
    "streamtx.data": 4,
    "streamtx.train": 5,
    "streamtx.tasks": 5,
    "streamtx.apps": 6,
}
"""Floor of each part of the library; siblings on one floor must not import each other."""
ALLOWED_OUTSIDE = {
    "streamtx_client": set(),
    "streamtx_server": {"streamtx_client"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every first-party import of ``module``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level: set[int] = set()
    pending: list[ast.stmt] = list(tree.body)
    while pending:  # imports under a module-level `if` / `try` still count as module level, function bodies do not
        n = pending.pop()
        top_level.add(id(n))
        if isinstance(n, ast.If):
            pending += n.body + n.orelse
        elif isinstance(n, ast.Try):
            pending += n.body + n.orelse + n.finalbody + [s for h in n.handlers for s in h.body]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path, node)
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
        for name in names:
            if name.split(".")[0] in PACKAGES:
                out.append((name, node.lineno, id(node) in top_level))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "streamtx":
        return parts[0]
    return ".".join(parts[:2]) if len(parts) > 1 else "streamtx"


def test_every_package_part_has_a_floor():
    parts = {_part(m) for m in MODULES if m.startswith("streamtx.")}
    parts.discard("streamtx.__main__")
    assert parts <= set(FLOORS), f"parts without a floor in this test: {sorted(parts - set(FLOORS))}"


def upward_edges(module: str, imports: list[tuple[str, int, bool]]) -> list[str]:
    """The imports of ``module`` that break the floors, as readable lines."""
    src, bad = _part(module), []
    for target, line, _ in imports:
        dst = _part(target)
        where = f"line {line}: {module} imports {target}"
        if src in ALLOWED_OUTSIDE:
            if dst != src and dst not in ALLOWED_OUTSIDE[src]:
                bad.append(where)
        elif dst in ALLOWED_OUTSIDE:
            if src not in ("streamtx.apps", "streamtx.__main__"):
                bad.append(f"{where}: only streamtx.apps may use {dst}")
        elif src in FLOORS and dst in FLOORS and src != dst and FLOORS[dst] >= FLOORS[src]:
            bad.append(f"{where}: {src} (floor {FLOORS[src]}) -> {dst} (floor {FLOORS[dst]})")
    return bad


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_one_way(module):
    assert upward_edges(module, _imports(module, MODULES[module])) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_first_party_imports_are_at_module_level_and_never_by_name(module):
    path = MODULES[module]
    for target, line, top in _imports(module, path):
        assert top, f"{path.relative_to(ROOT)}:{line}: function-local import of {target}"
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            assert name not in ("import_module", "__import__"), (
                f"{path.relative_to(ROOT)}:{node.lineno}: import by name"
            )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> imported modules), or None."""
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t) :] + [t]
            if t not in state and (cycle := visit(t, stack + [t])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [m])):
            return cycle
    return None


def test_no_cycles_between_modules():
    graph = {m: {t for t, _, _ in _imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    graph = {
        m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
        for m, ts in graph.items()
    }
    assert find_cycle(graph) is None


def test_the_checker_sees_a_violation(tmp_path):
    """The AST reading finds relative, absolute and function-local first-party imports (guards this file)."""
    path = tmp_path / "mod.py"
    path.write_text("from ..apps import cli\nimport streamtx_server\n\ndef f():\n    from ..policy import streaming\n")
    found = _imports("streamtx.nn.mod", path)
    assert ("streamtx.apps.cli", 1, True) in found
    assert ("streamtx_server", 2, True) in found
    assert ("streamtx.policy.streaming", 5, False) in found
    path.write_text("if True:\n    def g():\n        from ..train import trainer\n")
    assert _imports("streamtx.nn.mod", path) == [("streamtx.train.trainer", 3, False)]


def test_the_floor_and_cycle_checks_see_violations():
    assert upward_edges("streamtx.nn.linear", [("streamtx.policy.streaming", 3, True)])
    assert upward_edges("streamtx.train.trainer", [("streamtx.tasks.reacher", 4, True)])  # siblings
    assert upward_edges("streamtx.policy.streaming", [("streamtx_client.core", 5, True)])
    assert upward_edges("streamtx_server.daemon", [("streamtx.checkpoint", 6, True)])
    assert not upward_edges("streamtx.apps.serve", [("streamtx_server.cli", 7, True), ("streamtx.policy", 8, True)])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
