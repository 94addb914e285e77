"""CreateArchive: a directory as a reproducible tar.gz, streamed in chunks with backpressure.

The same tree gives the same bytes: members in sorted order, owner 0:0 with no names, whole-second
mtimes, and a gzip header without a timestamp or file name.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

import pathspec

from agent.config import AgentConfig
from agent.errors import InvalidArgument, LimitExceeded, PreconditionFailed
from agent.fs.channel import ByteChannel, run_in_own_thread
from agent.fs.paths import WorkspaceRoot
from agent.fs.staging import STAGING_DIR_NAME
from common.constants import DEFAULT_EXCLUDES
from common.tarball import TarGzWriter

# Chunks queued between the producing thread and the stream; the producer waits past this.
QUEUED_CHUNKS = 4
# zlib's default level: close to level 9's size at several times its speed.
COMPRESS_LEVEL = 6


@dataclass(frozen=True)
class ArchiveSummary:
    sha256: str
    size: int
    files: int
    directories: int
    symlinks: int


@dataclass(frozen=True)
class _Entry:
    name: str  # the member name, relative to the archived directory
    path: str
    status: os.stat_result


class ArchiveStream:
    """Iterating it yields the archive of a directory in chunks of at most `config.max_chunk_size`;
    `summary` is set once the last chunk has been yielded.

    Errors (raised while iterating, before any chunk for all but the last): InvalidPath,
    PathEscapesRoot, NotFound, InvalidArgument (not a directory, or the staging area),
    LimitExceeded (more entries than `config.max_archive_files`), PreconditionFailed (a file changed,
    vanished or became a link while it was being read).
    """

    def __init__(
        self,
        root: WorkspaceRoot,
        config: AgentConfig,
        path: str,
        *,
        excludes: Iterable[str] = (),
        default_excludes: bool = True,
    ) -> None:
        self._root = root
        self._config = config
        self._path = path
        self._patterns = [*(DEFAULT_EXCLUDES if default_excludes else ()), *excludes]
        self.summary: ArchiveSummary | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        # Everything below the directory is opened from it with no link followed, so a directory swapped for
        # a symlink cannot pull outside files into the archive.
        directory = PurePosixPath(self._root.directory(self._path, f"{self._path or '.'} is not a directory"))
        if self._root.is_agent_path(directory):
            raise InvalidArgument(f"{self._path!r} is the agent's staging area, which is never archived")
        plan = _ArchivePlan(self._root, self._patterns, skip_staging=directory == PurePosixPath("."))
        chunk_size = self._config.max_chunk_size
        channel = ByteChannel(QUEUED_CHUNKS * chunk_size)
        producer = run_in_own_thread(
            lambda: _write_archive(
                self._root,
                directory,
                plan,
                self._config.max_archive_files,
                _ChunkSink(channel, chunk_size),
            ),
            "create-archive",
        )
        producer.add_done_callback(lambda _: channel.close())
        # Its error is raised from `await producer`, or moot when the client has gone.
        producer.add_done_callback(lambda done: done.cancelled() or done.exception())
        try:
            while (chunk := await channel.get()) is not None:
                yield chunk
            self.summary = await producer
        finally:
            # The client went away (or a chunk failed to send): stop the producer, which is blocked
            # on a full channel or will be at its next chunk.
            channel.abort()


class _ArchivePlan:
    """Which entries of a directory go into its archive."""

    def __init__(self, root: WorkspaceRoot, patterns: list[str], *, skip_staging: bool) -> None:
        """Raises InvalidArgument for a pattern gitignore would not accept."""
        try:
            self._excluded = pathspec.GitIgnoreSpec.from_lines(patterns)
        except ValueError as error:
            raise InvalidArgument(f"bad exclude pattern: {error}") from None
        self._skip_staging = skip_staging
        self._root = root

    def entries(self, directory: PurePosixPath, limit: int) -> list[_Entry]:
        """Every entry to archive, depth-first in name order; raises LimitExceeded past `limit`.

        Collected before the first byte is written, so a tree over the limit is refused before any
        chunk is sent, while memory stays bounded by the limit.
        """
        entries: list[_Entry] = []
        pending = self._children(directory, "")
        while pending:
            name, status = pending.pop()
            is_directory = stat.S_ISDIR(status.st_mode)
            if self._excluded.match_file(name + "/" if is_directory else name):
                continue
            if not (stat.S_ISREG(status.st_mode) or is_directory or stat.S_ISLNK(status.st_mode)):
                continue  # sockets, FIFOs and devices have no place in a workspace archive
            path = directory / name
            entries.append(_Entry(name, str(path), status))
            if len(entries) > limit:
                raise LimitExceeded(f"more than {limit} entries to archive (the file count limit); exclude some")
            if is_directory:
                pending += self._children(path, name + "/")
        return entries

    def _children(self, path: PurePosixPath, prefix: str) -> list[tuple[str, os.stat_result]]:
        try:
            fd = self._root.os_open(path, os.O_RDONLY | os.O_DIRECTORY, follow=False)
        except OSError as error:
            raise PreconditionFailed(
                f"{prefix or '.'} changed or became unreadable while being archived ({_reason(error)}); try again"
            ) from None
        try:
            with os.scandir(fd) as scan:
                children = [
                    (prefix + entry.name, entry.stat(follow_symlinks=False))
                    for entry in scan
                    if not (self._skip_staging and not prefix and entry.name == STAGING_DIR_NAME)
                ]
        finally:
            os.close(fd)
        # Reversed, so that popping from the end visits them in name order.
        children.sort(key=lambda child: child[0], reverse=True)
        return children


class _ChunkSink:
    """A write-only file for gzip: hashes and counts the bytes and cuts them into channel chunks."""

    def __init__(self, channel: ByteChannel, chunk_size: int) -> None:
        self._channel = channel
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._buffer += data
        while len(self._buffer) >= self._chunk_size:
            self._send(bytes(self._buffer[: self._chunk_size]))
            del self._buffer[: self._chunk_size]
        return len(data)

    def finish(self) -> None:
        if self._buffer:
            self._send(bytes(self._buffer))
            self._buffer.clear()

    def _send(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)
        self._channel.put_blocking(chunk)


def _reason(error: OSError) -> str:
    # strerror only: the error's file name would be a path of the agent's own.
    return os.strerror(error.errno) if error.errno else "the file changed size"


def _write_archive(
    root: WorkspaceRoot, directory: PurePosixPath, plan: _ArchivePlan, limit: int, sink: _ChunkSink
) -> ArchiveSummary:
    entries = plan.entries(directory, limit)
    counts = {"files": 0, "directories": 0, "symlinks": 0}
    with TarGzWriter(sink, compresslevel=COMPRESS_LEVEL, stream=True) as tar:  # type: ignore[arg-type]
        for entry in entries:
            mode, mtime = entry.status.st_mode, entry.status.st_mtime
            try:
                if stat.S_ISDIR(mode):
                    tar.add_directory(entry.name, mode, mtime)
                    counts["directories"] += 1
                elif stat.S_ISLNK(mode):
                    parent, name = root.os_open_parent(PurePosixPath(entry.path), follow=False)
                    try:
                        target = os.readlink(name, dir_fd=parent)  # stored as a link, never followed
                    finally:
                        os.close(parent)
                    tar.add_symlink(entry.name, target, mode, mtime)
                    counts["symlinks"] += 1
                else:
                    # A file swapped for a link since the walk must not pull in what the link points to.
                    fd = root.os_open(
                        PurePosixPath(entry.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, follow=False
                    )
                    with os.fdopen(fd, "rb") as content:
                        tar.add_file(entry.name, mode, mtime, entry.status.st_size, content)
                    counts["files"] += 1
            except OSError as error:
                raise PreconditionFailed(
                    f"{entry.name} changed or became unreadable while being archived ({_reason(error)}); try again"
                ) from None
    sink.finish()
    return ArchiveSummary(
        sha256=sink.hash.hexdigest(),
        size=sink.size,
        files=counts["files"],
        directories=counts["directories"],
        symlinks=counts["symlinks"],
    )
