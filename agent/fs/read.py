"""Reading workspace files: metadata first, then the content (whole, a byte range or a line range) in chunks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass

from agent.errors import InvalidArgument
from agent.fs.paths import WorkspaceRoot

# Files up to this size are read, hashed and sent straight from the event loop: one read(2)
# of a page-cached file costs less than the hop to a worker thread.
INLINE_READ_LIMIT = 256 * 1024
# Larger reads go to a thread in blocks of this size, sliced into chunks on the way out.
THREAD_READ_BLOCK = 8 * 1024 * 1024
# FileInfo.binary looks for a NUL byte in this many leading bytes.
BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True, slots=True)
class FileInfo:
    path: str
    size: int
    mode: int
    modified: float
    sha256: str
    binary: bool


@dataclass(frozen=True, slots=True)
class ByteRange:
    offset: int
    length: int  # 0: to the end of the file


@dataclass(frozen=True, slots=True)
class LineRange:
    start: int  # 1-based, inclusive
    end: int  # inclusive; 0: to the end of the file


@dataclass(frozen=True, slots=True)
class Chunk:
    offset: int
    data: bytes


class FileReader:
    """Reads regular files inside a workspace root.

    `read` yields one FileInfo, then Chunks of at most `chunk_size` bytes covering the requested
    range in order (none for an empty range). Raises InvalidPath, PathEscapesRoot, NotFound, and
    InvalidArgument for a directory or other non-regular file and for a bad range.
    """

    def __init__(self, root: WorkspaceRoot, *, max_chunk_size: int, hash_limit: int) -> None:
        self.root = root
        self.max_chunk_size = max_chunk_size
        self.hash_limit = hash_limit

    async def read(
        self, path: str, range_: ByteRange | LineRange | None = None, chunk_size: int = 0
    ) -> AsyncIterator[FileInfo | Chunk]:
        chunk_size = min(chunk_size or self.max_chunk_size, self.max_chunk_size)
        if isinstance(range_, LineRange):
            _check_lines(range_)
        # O_NONBLOCK so that a FIFO is refused below instead of hanging the open; opened beneath the
        # root in one step, so no symlink swapped in meanwhile can lead the read outside.
        fd = self.root.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidArgument(f"{path}: is a directory; Read takes a regular file")
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{path}: is not a regular file")
            size = st.st_size
            if size <= self.hash_limit:
                # Whole file in memory: the hash needs all of it anyway, and ranges are then slices.
                data = (
                    _read_all(fd, size) if size <= INLINE_READ_LIMIT else await asyncio.to_thread(_read_all, fd, size)
                )
                info = self._info(path, st, len(data), hashlib.sha256(data).hexdigest(), data)
                start, stop = (
                    _line_span((data,), range_) if isinstance(range_, LineRange) else _byte_span(range_, len(data))
                )
                yield info
                for offset in range(start, stop, chunk_size):
                    yield Chunk(offset, data[offset : min(offset + chunk_size, stop)])
                return
            head = os.pread(fd, BINARY_SNIFF_BYTES, 0)
            info = self._info(path, st, size, "", head)
            if isinstance(range_, LineRange):
                start, stop = await asyncio.to_thread(_line_span_of_file, fd, range_)
            else:
                start, stop = _byte_span(range_, size)
            yield info
            for block_offset in range(start, stop, THREAD_READ_BLOCK):
                block = await asyncio.to_thread(os.pread, fd, min(THREAD_READ_BLOCK, stop - block_offset), block_offset)
                if not block:
                    return  # the file shrank while being read
                for i in range(0, len(block), chunk_size):
                    yield Chunk(block_offset + i, block[i : i + chunk_size])
        finally:
            os.close(fd)

    @staticmethod
    def _info(path: str, st: os.stat_result, size: int, sha256: str, head: bytes) -> FileInfo:
        return FileInfo(
            path=WorkspaceRoot.check(path).as_posix(),
            size=size,
            mode=stat.S_IMODE(st.st_mode),
            modified=st.st_mtime,
            sha256=sha256,
            binary=b"\0" in head[:BINARY_SNIFF_BYTES],
        )


def _read_all(fd: int, size: int) -> bytes:
    """Reads to the end of the file: `size` bytes in one read(2) unless it grew meanwhile."""
    parts = []
    while chunk := os.read(fd, max(size, 1 << 16)):
        parts.append(chunk)
    return b"".join(parts)


def _byte_span(range_: ByteRange | None, size: int) -> tuple[int, int]:
    """The [start, stop) span a byte range (or the whole file) selects; raises InvalidArgument."""
    if range_ is None:
        return 0, size
    if range_.offset > size:
        raise InvalidArgument(f"byte range offset {range_.offset} is past the end of the file ({size} bytes)")
    stop = size if range_.length == 0 else min(size, range_.offset + range_.length)
    return range_.offset, stop


def _check_lines(range_: LineRange) -> None:
    if range_.start < 1:
        raise InvalidArgument("line range start must be at least 1 (lines are 1-based)")
    if range_.end and range_.end < range_.start:
        raise InvalidArgument(f"line range end {range_.end} is before its start {range_.start}")


def _line_span_of_file(fd: int, range_: LineRange) -> tuple[int, int]:
    def blocks() -> Iterator[bytes]:
        offset = 0
        while block := os.pread(fd, THREAD_READ_BLOCK, offset):
            offset += len(block)
            yield block

    return _line_span(blocks(), range_)


def _line_span(blocks: Iterable[bytes], range_: LineRange) -> tuple[int, int]:
    """The [start, stop) byte span of lines start..end (inclusive, terminators kept) in the
    concatenated blocks; an end past the last line is cut there. Raises InvalidArgument when the
    content has fewer than `start` lines (a last line without a newline counts)."""
    # Line n begins after the (n-1)-th newline; the range stops after the end-th newline.
    start: int | None = 0 if range_.start == 1 else None
    newlines = size = 0
    last_byte = b""
    for block in blocks:
        count = block.count(b"\n")
        if start is None and newlines + count >= range_.start - 1:
            start = size + _nth_newline(block, range_.start - 1 - newlines) + 1
        if range_.end and newlines + count >= range_.end:
            # start <= the end line's start < this newline: the span is never empty.
            return start, size + _nth_newline(block, range_.end - newlines) + 1  # type: ignore[return-value]
        newlines += count
        size += len(block)
        last_byte = block[-1:] or last_byte
    if start is None or start >= size:
        lines = newlines + (1 if last_byte not in (b"", b"\n") else 0)
        raise InvalidArgument(f"line range starts at line {range_.start} but the file has {lines} lines")
    return start, size


def _nth_newline(block: bytes, n: int) -> int:
    """Index of the n-th (1-based) newline in block; the caller knows there are at least n."""
    index = -1
    for _ in range(n):
        index = block.index(b"\n", index + 1)
    return index
