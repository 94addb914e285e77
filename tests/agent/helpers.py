"""Test helpers shared by the agent tests: byte-exact snapshots of a workspace tree, and stream collection."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc import aio


def snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str | None]]:
    """Every entry under `root` (the root itself left out): kind, permission bits, and the
    content of files or the target of symlinks. Two equal snapshots mean an unchanged tree."""
    tree: dict[str, tuple[str, int, bytes | str | None]] = {}
    for directory, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(directory, name)
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            relative = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                tree[relative] = ("link", mode, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                tree[relative] = ("dir", mode, None)
            else:
                tree[relative] = ("file", mode, path.read_bytes())
    return tree


async def collect(call: AsyncIterable[Any]) -> list[Any]:
    """All responses of a server-streaming call."""
    return [response async for response in call]


async def status_of_stream(call: AsyncIterable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status code and details a streaming call fails with (the test fails if it succeeds)."""
    with pytest.raises(aio.AioRpcError) as error:
        async for _ in call:
            pass
    return error.value.code(), error.value.details() or ""
