"""Import rules between the project's rooms, read from the source with ``ast`` (nothing is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports: import statements and literal ``import_module`` calls."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def importers_of(package: str, room: str) -> list[str]:
    """Files under ``room`` that import ``package`` or one of its modules."""
    return sorted(
        path.relative_to(REPO).as_posix()
        for path in (REPO / room).rglob("*.py")
        if any(m == package or m.startswith(package + ".") for m in imported_modules(path))
    )


def test_backend_imports_toyworld_in_one_place():
    # The embedded default's replay data and gate evaluation are wired in one module; the rest of
    # the backend serves and fine-tunes any model.
    assert importers_of("toyworld", "backend") == ["backend/finetune/sources.py"]


ROOMS = ("model", "toyworld", "backend", "tools")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    """Every module of the rooms by dotted name (packages by their ``__init__``)."""
    return {module_name(p): p for room in ROOMS for p in sorted((REPO / room).rglob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its body (functions included).

    ``from a.b import c`` is an edge to ``a.b.c`` when that is a module, else to ``a.b``; the
    parent packages Python loads on the way are not edges (each would be a trivial cycle)."""
    modules = project_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        candidates = set(imported_modules(path))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                candidates.update(f"{node.module}.{alias.name}" for alias in node.names)
        targets = set()
        for cand in candidates:
            parts = cand.split(".")
            for end in range(len(parts), 0, -1):  # the longest prefix that is a project module
                if ".".join(parts[:end]) in modules:
                    targets.add(".".join(parts[:end]))
                    break
        graph[name] = targets - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_rooms_import_only_downwards():
    graph = import_graph()

    def offenders(room: str, forbidden: tuple[str, ...]) -> list[str]:
        return sorted(
            f"{name} -> {target}"
            for name, targets in graph.items()
            if name.split(".")[0] == room
            for target in targets
            if target.split(".")[0] in forbidden
        )

    # The library serves any model: it knows neither the synthetic world, the server nor the harness.
    assert offenders("model", ("toyworld", "backend", "tools")) == []
    assert offenders("toyworld", ("backend",)) == []


def test_every_library_module_declares_all():
    def declares_all(path: Path) -> bool:
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = [t for n in tree.body if isinstance(n, ast.Assign) for t in n.targets]
        targets += [n.target for n in tree.body if isinstance(n, ast.AnnAssign)]
        return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)

    # A package's __main__ is what ``python -m`` runs, never imported by name: it has no API to declare.
    library = {
        name: path
        for name, path in project_modules().items()
        if name.split(".")[0] == "model" and path.name != "__main__.py"
    }
    assert [name for name, path in library.items() if not declares_all(path)] == []


def test_no_private_name_imported_from_another_module():
    modules = project_modules()
    found = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                found += [f"{name}: from {node.module} import {p}" for p in private]
    assert found == []
