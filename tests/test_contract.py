"""The contract: buf lint is clean and the committed stubs match the .proto files."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def _buf() -> str:
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("the buf CLI is missing: pip install -e '.[dev]' installs it (buf-bin)")
    return buf


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "nothing was generated"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, REPO / "protos" / p, shallow=False)]
    assert not stale, f"stale generated code, run `python protos/generate.py`: {stale}"
