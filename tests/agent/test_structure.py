"""The agent's domain code knows nothing of protobuf: conversions live in agent/converters.py only."""

from __future__ import annotations

import ast
from pathlib import Path

import agent
from tests.syntax import syntax_tree

AGENT = Path(agent.__file__).parent


def imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(syntax_tree(path)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def test_fs_and_process_import_no_protobuf() -> None:
    offenders = {
        str(path.relative_to(AGENT)): sorted(
            m
            for m in imported_modules(path)
            if m.startswith(("workspace.", "google.protobuf")) or m.endswith(("_pb2", "_pb2_grpc"))
        )
        for package in ("fs", "process")
        for path in sorted((AGENT / package).rglob("*.py"))
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}
