"""The project's own modules as syntax trees, for the tests that check its structure."""

from __future__ import annotations

import ast
from pathlib import Path

ATTEMPTS = 3


def syntax_tree(path: Path) -> ast.Module:
    """The module at `path`, parsed. CPython 3.11 before 3.11.7 (Debian 12 ships 3.11.2) can fail a parse
    with a spurious `SystemError: AST constructor recursion depth mismatch` (python/cpython#106905: a failed
    step of building the tree leaves its depth count behind); such a parse is tried again, from scratch."""
    source = path.read_text()
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return ast.parse(source, filename=str(path))
        except SystemError:
            if attempt == ATTEMPTS:
                raise
    raise AssertionError("unreachable")
