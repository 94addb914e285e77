"""Durable files: written aside and fsynced, renamed into place with the directory fsynced, read in chunks.

A reader sees the old file or the complete new one, never a part, and a crash after `publish` returns
cannot take the rename back."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from common.constants import MiB

CHUNK_SIZE = MiB


def flush_to_disk(file: BinaryIO) -> None:
    """Pushes what `file` holds through Python's and the kernel's buffers onto the disk."""
    file.flush()
    os.fsync(file.fileno())


def fsync_directory(directory: Path) -> None:
    """Makes the entries of `directory` (a rename, a new name) durable."""
    fd = os.open(directory, os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(temp: Path, final: Path) -> None:
    """Renames the complete, flushed file `temp` over `final` and makes the rename itself durable."""
    os.rename(temp, final)
    fsync_directory(final.parent)


def write_atomically(path: Path, data: bytes | str, *, mode: int | None = None) -> None:
    """Writes `data` to `path` through a temp file beside it (fsynced, then published); `mode` sets
    the permissions (default: the temp file's 0o600). On any failure the temp file is removed and
    `path` is as it was."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data.encode() if isinstance(data, str) else data)
            flush_to_disk(file)
        if mode is not None:
            os.chmod(temp, mode)
        publish(Path(temp), path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


async def file_chunks(path: Path, chunk_size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """The bytes of the file at `path` in chunks, read off the event loop."""
    with open(path, "rb") as file:
        while chunk := await asyncio.to_thread(file.read, chunk_size):
            yield chunk
