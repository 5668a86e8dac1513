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
