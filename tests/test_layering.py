"""The services' dependencies go one way: the agent and the orchestrator both stand on `common/`, neither on the
other, and `common/` on neither (the generated `workspace.*` stubs are the contract, open to all)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.syntax import syntax_tree

# Each package, and the top-level packages its modules must not import.
FORBIDDEN = {
    "orchestrator": {"agent"},
    "agent": {"orchestrator"},
    "common": {"agent", "orchestrator"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) for every import statement in the module at `path`, nested ones included."""
    found = []
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.partition(".")[0]))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_nothing_of_its_peer(package: str) -> None:
    modules = sorted((REPO / package).rglob("*.py"))
    assert modules, f"no modules found under {package}/"
    offending = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in modules
        for line, name in imported_packages(path)
        if name in FORBIDDEN[package]
    ]
    assert not offending, "\n".join(offending)


def test_the_check_sees_an_import_of_the_peer(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from agent.fs import paths\n    import orchestrator.cli as cli\n")
    assert imported_packages(module) == [(1, "os"), (4, "agent"), (5, "orchestrator")]
