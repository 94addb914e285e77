"""ExtractArchive: stream a tar.gz upload into a staging area, check every member, then swap it in.

The event loop only moves chunks into a bounded channel; a worker thread hashes, inflates, parses,
checks and writes, so neither memory nor the loop is held up by big archives.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import hashlib
import os
import posixpath
import re
import stat
import logging
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.config import AgentConfig
from agent.errors import ChecksumMismatch, InvalidArgument, InvalidPath, LimitExceeded
from agent.fs.channel import ByteChannel, run_in_own_thread
from agent.fs.paths import NAME_MAX, PATH_MAX, WorkspaceRoot, os_error
from agent.fs.staging import STAGING_DIR_NAME, StagingArea, Swap, is_staging_path
from agent.fs.tarstream import REGULAR_TYPES, TarMember, TarReader

# Uploaded bytes buffered between the loop and the worker; the client is slowed down past this.
UPLOAD_BUFFER_BYTES = 8 * 1024 * 1024
# Inflated bytes produced per step (the most the worker holds at once, beyond one header).
INFLATE_STEP = 256 * 1024
# Tar headers, padding and pax records allowed per member on top of the content-size limit, so a
# "bomb" of metadata (a huge pax header) is stopped like one of content.
METADATA_ALLOWANCE_PER_MEMBER = 4096
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX
log = logging.getLogger(__name__)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ExtractMode(enum.Enum):
    REPLACE = "replace"  # the destination ends with exactly the archive's content
    MERGE = "merge"  # the archive's entries are added or overwrite; others stay


@dataclass(frozen=True)
class ExtractionReport:
    files: int
    directories: int
    symlinks: int
    bytes_extracted: int
    sha256: str
    stripped_special_bits: int


async def extract_archive(
    root: WorkspaceRoot,
    config: AgentConfig,
    destination: str,
    chunks: AsyncIterator[bytes],
    *,
    mode: ExtractMode,
    expected_sha256: str = "",
) -> ExtractionReport:
    """Extracts the tar.gz arriving as `chunks` into `destination` (root-relative, created if missing).

    The destination changes only if the whole stream arrived, its sha256 matched and every member was
    accepted; otherwise it is left as it was and the staging area is removed. Raises InvalidPath,
    PathEscapesRoot, InvalidArgument (unsafe member, corrupt or truncated data), ChecksumMismatch,
    LimitExceeded, Cancelled (the upload stopped midway), PreconditionFailed (the swap failed part-way
    and was rolled back, or the staging directory's name is taken).
    """
    expected = expected_sha256.strip().lower()
    if expected and not _SHA256_HEX.fullmatch(expected):
        raise InvalidArgument(f"expected_sha256 {expected_sha256!r} is not 64 hex digits")
    target = root.resolve(destination)
    if is_staging_path(root, target):
        raise InvalidArgument(f"destination {destination!r} is inside the agent's staging area {STAGING_DIR_NAME}/")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise InvalidArgument(f"destination {destination!r} exists and is not a directory")
    if len(os.fsencode(root.relative(target))) >= PATH_MAX - NAME_MAX:
        raise InvalidPath(f"destination {destination!r} is too long to hold any member (the filesystem's {PATH_MAX}-byte path limit)")

    channel = ByteChannel(UPLOAD_BUFFER_BYTES)
    extraction = _Extraction(root, target, mode, expected, config, channel)
    worker = run_in_own_thread(extraction.run, "extract-archive")
    # A worker that fails early (a refused member) stops reading: stop feeding it too.
    worker.add_done_callback(lambda _: channel.abort())
    # Its error is raised to the caller, or superseded by the caller's own (a cancellation).
    worker.add_done_callback(lambda done: done.cancelled() or done.exception())
    try:
        async for chunk in chunks:
            if not await channel.put(chunk):
                break
        else:
            channel.close()
    except BaseException:
        # The client cancelled or its stream broke: the worker stops and removes its staging area,
        # and the call ends only once that is done.
        channel.abort()
        await asyncio.wait([worker])
        raise
    return await worker


class _Extraction:
    """One extraction, run in a worker thread: read, check, write to staging, verify, swap."""

    def __init__(
        self,
        root: WorkspaceRoot,
        destination: Path,
        mode: ExtractMode,
        expected_sha256: str,
        config: AgentConfig,
        channel: ByteChannel,
    ) -> None:
        self._root = root
        self._destination = destination
        self._is_root = destination == root.path
        self._mode = mode
        self._expected = expected_sha256
        self._config = config
        self._channel = channel

    def run(self) -> ExtractionReport:
        staging = StagingArea(self._root)
        try:
            upload = _GzipUpload(
                self._channel,
                max_inflated=self._config.max_archive_bytes
                + self._config.max_archive_files * METADATA_ALLOWANCE_PER_MEMBER,
            )
            writer = _MemberWriter(
                staging.tree, self._config, reserve_staging_name=self._is_root,
                room=PATH_MAX - 1 - len(os.fsencode(self._root.relative(self._destination))),
            )  # fmt: skip
            try:
                writer.write_all(TarReader(upload))
                writer.finish()
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise LimitExceeded("the workspace's disk is full; nothing was changed") from None
                # In workspace terms: the member, never the staging directory's host path.
                translated = os_error(error, f"member {writer.current!r}")
                raise type(translated)(f"{translated}; nothing was changed") from None
            sha256 = upload.sha256
            if self._expected and sha256 != self._expected:
                raise ChecksumMismatch(
                    f"archive sha256 is {sha256} but {self._expected} was expected: "
                    "the upload is corrupt or incomplete; nothing was changed"
                )
            swap = Swap(staging)
            # The destination by its parent's fd, opened beneath the root with no link followed: a
            # directory on the way swapped for a symlink cannot send the files outside.
            relative = PurePosixPath(self._root.relative(self._destination))
            shown = str(relative)
            made: list[PurePosixPath] = []
            parent = -1
            try:
                if self._is_root:
                    parent = self._root.os_open(ROOT, os.O_PATH | os.O_DIRECTORY, follow=False)
                    destination = Path(f"/proc/self/fd/{parent}")
                else:
                    parent, name = _open_parent_making_directories(self._root, relative, made)
                    destination = Path(f"/proc/self/fd/{parent}") / name
                if self._mode is ExtractMode.REPLACE:
                    swap.replace(destination, is_root=self._is_root)
                else:
                    swap.merge(destination)
            except BaseException as error:
                swap.roll_back()  # by the same /proc/self/fd paths: the fd stays open until it is done
                _remove_directories(self._root, made)
                if isinstance(error, OSError):
                    translated = os_error(error, shown)
                    raise type(translated)(
                        f"cannot move the extracted files into place ({translated}); the destination was restored"
                    ) from None
                raise
            finally:
                if parent >= 0:
                    os.close(parent)
            return writer.report(sha256)
        finally:
            staging.remove()


class _GzipUpload:
    """The uploaded bytes as inflated tar data, for TarReader (a `TarSource`).

    It hashes the raw bytes as they pass and counts what they inflate to, refusing past `max_inflated`
    before inflating further, so a gzip bomb is stopped after at most one step beyond the limit.
    """

    def __init__(self, channel: ByteChannel, max_inflated: int) -> None:
        self._channel = channel
        self._max_inflated = max_inflated
        self._hash = hashlib.sha256()
        self._inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        self._input = b""
        self._inflated = 0
        self._output = b""
        self._view = memoryview(self._output)
        self._position = 0
        self._received = 0

    def read_exact(self, size: int) -> bytes | None:
        end = self._position + size
        if end <= len(self._output):
            data = self._output[self._position : end]
            self._position = end
            return data
        parts = []
        missing = size
        while missing:
            if self._position >= len(self._output) and not self._inflate_more():
                if missing == size:
                    return None
                raise InvalidArgument("archive is truncated: the tar data ends inside a header")
            part = self._output[self._position : self._position + missing]
            self._position += len(part)
            missing -= len(part)
            parts.append(part)
        return b"".join(parts)

    def pieces(self, size: int) -> Iterator[memoryview]:
        while size:
            if self._position >= len(self._output) and not self._inflate_more():
                raise InvalidArgument("archive is truncated: the tar data ends inside a member's content")
            end = min(self._position + size, len(self._output))
            yield self._view[self._position : end]
            size -= end - self._position
            self._position = end

    def remainder(self) -> Iterator[memoryview]:
        while self._position < len(self._output) or self._inflate_more():
            yield self._view[self._position :]
            self._position = len(self._output)

    @property
    def sha256(self) -> str:
        """Hex sha256 of the upload; complete once TarReader is done, as it reads to the end of the data
        (past the end marker, which only zero padding may follow)."""
        return self._hash.hexdigest()

    def _inflate_more(self) -> bool:
        while True:
            if not self._input:
                raw = self._channel.get_blocking()
                if raw is None:
                    if not self._received:
                        raise InvalidArgument("archive is empty: no bytes arrived after the spec")
                    if not self._inflater.eof:
                        raise InvalidArgument("archive is truncated: the gzip stream ends before its end marker")
                    return False
                self._received += len(raw)
                self._hash.update(raw)
                self._input = raw
            if self._inflater.eof:
                # Concatenated gzip members (what `cat a.gz b.gz` makes) are one stream.
                self._inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            try:
                output = self._inflater.decompress(self._input, INFLATE_STEP)
            except zlib.error as error:
                raise InvalidArgument(f"archive is not valid gzip data: {error}") from None
            self._input = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
            if output:
                self._inflated += len(output)
                if self._inflated > self._max_inflated:
                    raise LimitExceeded(
                        f"archive inflates to more than {self._max_inflated} bytes of tar data "
                        "(the archive size limit plus header allowance)"
                    )
                self._output = output
                self._view = memoryview(output)
                self._position = 0
                return True


ROOT = PurePosixPath(".")


def _open_parent_making_directories(root: WorkspaceRoot, relative: PurePosixPath, made: list[PurePosixPath]) -> tuple[int, str]:
    """An O_PATH fd of the destination's parent (created where missing, each directory added to
    `made` for a roll back), walked from the root's fd with no link followed; and the last name."""
    current = root.os_open(ROOT, os.O_PATH | os.O_DIRECTORY, follow=False)
    try:
        for depth, part in enumerate(relative.parts[:-1], 1):
            try:
                os.mkdir(part, dir_fd=current)
                made.append(PurePosixPath(*relative.parts[:depth]))
            except FileExistsError:
                pass
            try:
                following = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            except NotADirectoryError:
                if stat.S_ISLNK(os.stat(part, dir_fd=current, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP)) from None  # a link there is never followed
                raise
            os.close(current)
            current = following
    except BaseException:
        os.close(current)
        raise
    return current, relative.name


def _remove_directories(root: WorkspaceRoot, made: list[PurePosixPath]) -> None:
    for directory in reversed(made):
        try:
            parent, name = root.os_open_parent(directory, follow=False)
            try:
                os.rmdir(name, dir_fd=parent)
            finally:
                os.close(parent)
        except OSError:
            log.exception("could not remove a directory an aborted extraction made", extra={"path": str(directory)})


class _Kind(enum.Enum):
    DIRECTORY = "directory"
    FILE = "file"
    SYMLINK = "symlink"


_HARDLINK = b"1"
_KINDS = {
    **{regular: _Kind.FILE for regular in REGULAR_TYPES},
    _HARDLINK: _Kind.FILE,
    b"2": _Kind.SYMLINK,
    b"5": _Kind.DIRECTORY,
}
_REFUSED_TYPES = {
    b"3": "is a device node, which archives may not contain",
    b"4": "is a device node, which archives may not contain",
    b"6": "is a FIFO, which archives may not contain",
}


class _MemberWriter:
    """Checks each member and writes it under the staging tree with plain os calls.

    Accepted: regular files, directories, symlinks whose target stays inside the destination, and
    hardlinks to a regular file earlier in the archive. Refused (InvalidArgument, naming the member):
    absolute or `..` paths, device nodes, FIFOs, sparse files, and entries below a symlink or a file.
    setuid, setgid and sticky bits are stripped and counted. Ownership is not restored.
    """

    def __init__(self, tree: Path, config: AgentConfig, *, reserve_staging_name: bool, room: int = PATH_MAX - 1) -> None:
        self._tree = str(tree)
        self._room = room  # bytes a member path may have, the destination's own path taken off
        self.current = ""  # the member being written, for error messages
        self._prefix = self._tree + os.sep
        self._max_files = config.max_archive_files
        self._max_bytes = config.max_archive_bytes
        self._reserve_staging_name = reserve_staging_name
        self._kinds: dict[str, _Kind] = {}
        # Directory modes and mtimes are set last, as tar does: a read-only directory must still
        # receive its entries, and writing entries would change its mtime.
        self._directory_attributes: dict[str, tuple[int, float | None]] = {"": (0o755, None)}
        self._symlinks: dict[str, str] = {}
        self._members = 0
        self._bytes = 0
        self._stripped = 0

    def write_all(self, tar: TarReader) -> None:
        for member in tar:
            self._write(tar, member)

    def finish(self) -> None:
        """Checks links against the complete tree, then sets directory modes and mtimes."""
        tree_real = os.path.realpath(self._tree)
        for name, target in self._symlinks.items():
            # Resolved on disk now that every member is in place, a chain of links that only
            # escapes together (`a -> b/..`, `b -> ..`) is caught too.
            resolved = os.path.realpath(self._prefix + name)
            if resolved != tree_real and not resolved.startswith(tree_real + os.sep):
                raise InvalidArgument(f"symlink member {name!r} -> {target!r} leads out of the destination")
        for name in sorted(self._directory_attributes, key=lambda n: n.count("/"), reverse=True):
            mode, mtime = self._directory_attributes[name]
            path = self._prefix + name if name else self._tree
            os.chmod(path, mode)
            if mtime is not None:
                os.utime(path, (mtime, mtime))

    def report(self, sha256: str) -> ExtractionReport:
        kinds = list(self._kinds.values())
        return ExtractionReport(
            files=kinds.count(_Kind.FILE),
            directories=kinds.count(_Kind.DIRECTORY),
            symlinks=kinds.count(_Kind.SYMLINK),
            bytes_extracted=self._bytes,
            sha256=sha256,
            stripped_special_bits=self._stripped,
        )

    def _write(self, tar: TarReader, member: TarMember) -> None:
        self._members += 1
        if self._members > self._max_files:
            raise LimitExceeded(f"archive has more than {self._max_files} members (the file count limit)")
        self.current = member.name
        name = self._member_path(member.name, member.name)
        if member.mode & SPECIAL_BITS:
            self._stripped += 1
        mode = member.mode & 0o777

        if member.sparse:
            raise InvalidArgument(f"member {member.name!r} is a sparse file, which is not supported")
        kind = _KINDS.get(member.type)
        if kind is None:
            refusal = _REFUSED_TYPES.get(member.type, f"has unsupported tar type {member.type!r}")
            raise InvalidArgument(f"member {member.name!r} {refusal}")
        if not name:  # the archive's own top directory, `./`
            if kind is not _Kind.DIRECTORY:
                raise InvalidArgument(f"member {member.name!r} has an empty path")
            self._directory_attributes[""] = (mode, member.mtime)
            return

        self._make_parents(name, member.name)
        path = self._prefix + name
        previous = self._kinds.get(name)
        if previous is not None:
            # A later member of the same path wins, as with tar; a directory is never swapped for a non-directory.
            if (previous is _Kind.DIRECTORY) != (kind is _Kind.DIRECTORY):
                raise InvalidArgument(f"member {member.name!r} is both a {previous.value} and a {kind.value}")
            if kind is not _Kind.DIRECTORY:
                os.unlink(path)
                self._symlinks.pop(name, None)

        if kind is _Kind.DIRECTORY:
            if previous is None:
                os.mkdir(path, 0o700)
            self._directory_attributes[name] = (mode, member.mtime)
        elif member.type == _HARDLINK:
            source = self._member_path(member.linkname, member.name, link=True)
            if self._kinds.get(source) is not _Kind.FILE:
                raise InvalidArgument(
                    f"hardlink member {member.name!r} points to {member.linkname!r}, "
                    "which is not a regular file earlier in the archive"
                )
            os.link(self._prefix + source, path)
        elif kind is _Kind.FILE:
            self._bytes += member.size
            if self._bytes > self._max_bytes:
                raise LimitExceeded(
                    f"archive content exceeds {self._max_bytes} bytes (the archive size limit) at member {member.name!r}"
                )
            self._write_file(tar, member, path, mode)
        else:
            self._check_symlink_target(name, member.linkname)
            os.symlink(member.linkname, path)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
            self._symlinks[name] = member.linkname
        self._kinds[name] = kind

    def _member_path(self, raw: str, member_name: str, *, link: bool = False) -> str:
        """The normalized relative path of a member (or a hardlink's target); refuses unsafe ones."""
        what = f"hardlink member {member_name!r} points to {raw!r}, which" if link else f"member {raw!r}"
        if raw.startswith("/"):
            raise InvalidArgument(f"{what} is an absolute path; archive paths must be relative")
        if "\0" in raw:
            raise InvalidArgument(f"{what} contains a NUL byte")
        parts = [part for part in raw.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise InvalidArgument(f"{what} contains '..', which could lead out of the destination")
        if any(len(os.fsencode(part)) > NAME_MAX for part in parts) or len(os.fsencode("/".join(parts))) > self._room:
            shown = raw if len(raw) <= 80 else raw[:60] + "..."
            raise InvalidPath(
                f"{'hardlink target' if link else 'member'} {shown!r} is longer than the filesystem allows in this destination "
                f"({NAME_MAX} bytes a name, {PATH_MAX} a path)"
            )
        if self._reserve_staging_name and parts and parts[0] == STAGING_DIR_NAME:
            raise InvalidArgument(f"{what} is inside {STAGING_DIR_NAME}/, the agent's reserved staging directory")
        return "/".join(parts)

    def _check_symlink_target(self, name: str, target: str) -> None:
        if not target or "\0" in target:
            raise InvalidArgument(f"symlink member {name!r} has an empty target or one with a NUL byte")
        if target.startswith("/"):
            raise InvalidArgument(f"symlink member {name!r} -> {target!r} points to an absolute path, outside the destination")
        if posixpath.normpath(posixpath.join(posixpath.dirname(name), target)).split("/")[0] == "..":
            raise InvalidArgument(f"symlink member {name!r} -> {target!r} leads out of the destination")

    def _make_parents(self, name: str, member_name: str) -> None:
        parent = name.rpartition("/")[0]
        if not parent or self._kinds.get(parent) is _Kind.DIRECTORY:
            return
        prefix = ""
        for part in parent.split("/"):
            prefix = f"{prefix}/{part}" if prefix else part
            kind = self._kinds.get(prefix)
            if kind is None:
                # A directory the archive implies but does not list, made as tar makes it.
                os.mkdir(self._prefix + prefix, 0o700)
                self._kinds[prefix] = _Kind.DIRECTORY
                self._directory_attributes[prefix] = (0o755, None)
            elif kind is not _Kind.DIRECTORY:
                # Writing through a link could land outside the destination: never follow one.
                raise InvalidArgument(f"member {member_name!r} is below {prefix!r}, which is a {kind.value}, not a directory")

    def _write_file(self, tar: TarReader, member: TarMember, path: str, mode: int) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            for view in tar.content(member):
                while view:
                    view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            os.utime(fd, (member.mtime, member.mtime))
        finally:
            os.close(fd)
