"""clients/node for the tests that drive it: its dependencies installed from the committed package-lock.json
(`npm ci`, again only when the lockfile changed), and Node's tools run from it."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

CLIENT = REPO / "clients" / "node"
# Written after a successful `npm ci`: the sha256 of the package-lock.json it installed.
_STAMP = CLIENT / "node_modules" / ".installed-lock-sha256"


def node_client() -> Path:
    """clients/node with node_modules matching package-lock.json; skips (fails in CI) without node and npm."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the Node.js client tests")
        pytest.skip("Node.js and npm are not installed")
    lock = hashlib.sha256((CLIENT / "package-lock.json").read_bytes()).hexdigest()
    if not _STAMP.is_file() or _STAMP.read_text() != lock:
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=300)
        _STAMP.write_text(lock)
    return CLIENT


def tsc(*args: str) -> subprocess.CompletedProcess[str]:
    """The TypeScript compiler of clients/node's devDependencies, run in clients/node."""
    return subprocess.run(
        ["node", "node_modules/typescript/bin/tsc", *args], cwd=CLIENT, capture_output=True, text=True, timeout=180
    )
