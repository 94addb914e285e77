"""Finds the command-line tools the project installs into its own environment (rg, buf, grpcurl, protoc plugins),
whether or not that environment's bin directory is on PATH."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# The running interpreter's scripts directory: .venv/bin for `.venv/bin/python`, even when the venv was never
# activated. Not resolved: a venv's python is a symlink to the base interpreter, whose directory is not the venv's.
ENV_BIN = Path(sys.executable).parent


def find_tool(name: str) -> str | None:
    """The path of the executable `name`: the one installed beside this interpreter first (the project's
    pinned copy), else the first on PATH; None when neither exists."""
    return shutil.which(name, path=str(ENV_BIN)) or shutil.which(name)


def path_with_tools(path: str | None = None) -> str:
    """`path` (default $PATH) with this environment's bin directory first: for child processes that look
    tools up themselves (protoc its plugins, a shell running the README's lines)."""
    path = os.environ.get("PATH", os.defpath) if path is None else path
    return f"{ENV_BIN}{os.pathsep}{path}" if path else str(ENV_BIN)
