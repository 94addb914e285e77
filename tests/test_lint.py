"""The code stays linted, formatted and type-checked: the checks of `make lint` (settings in pyproject.toml), with
the environment's own ruff and mypy."""

from __future__ import annotations

import subprocess

import pytest

from common.tools import find_tool
from tests.conftest import REPO

CHECKS = {
    "ruff check": ["ruff", "check", "--no-cache", "."],
    "ruff format": ["ruff", "format", "--check", "--no-cache", "."],
    "mypy": ["mypy"],
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_the_code_passes(check: str) -> None:
    tool, *args = CHECKS[check]
    executable = find_tool(tool)
    assert executable, f"{tool} is not installed: pip install -e '.[dev]'"
    result = subprocess.run([executable, *args], cwd=REPO, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, f"`{check}` failed:\n{result.stdout}{result.stderr}"
