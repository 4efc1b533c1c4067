"""DESIGN.md's one-way flow, checked on the source: functions -> repositories
-> database.sql() -> asyncpg. Only database/ imports asyncpg; a function
never writes SQL (it reaches the database through a repository, or through
database's own helpers such as ping()); a repository never reads HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTTP_MODULES = ("starlette", "mangum", "functions")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name an import statement in the file names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def under(names: set[str], top: str) -> set[str]:
    return {name for name in names if name == top or name.startswith(top + ".")}


@pytest.mark.parametrize("package", ["functions", "repositories"])
def test_only_database_imports_asyncpg(package: str) -> None:
    offenders = [str(path.relative_to(ROOT)) for path in modules(package) if under(imported(path), "asyncpg")]
    assert offenders == []


def test_functions_never_send_sql_themselves() -> None:
    """No function module takes sql(), a transaction or an executor from database/."""
    sending = {"database.sql", "database.transaction", "database.run_in_transaction", "database.executor"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported(path) & sending)
        for path in modules("functions")
        if imported(path) & sending
    }
    assert offenders == {}


def test_repositories_never_read_http() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(found)
        for path in modules("repositories")
        if (found := set().union(*(under(imported(path), top) for top in HTTP_MODULES)))
    }
    assert offenders == {}
