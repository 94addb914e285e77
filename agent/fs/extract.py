"""ExtractArchive: stream a tar.gz upload into a staging area, check every member, then swap it in.

The event loop only moves chunks into a bounded channel; a worker thread hashes, inflates, parses,
checks and writes, so neither memory nor the loop is held up by big archives.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.config import AgentConfig
from agent.errors import ChecksumMismatch, InvalidArgument, InvalidPath, LimitExceeded
from agent.fs.channel import ByteChannel, run_in_own_thread
from agent.fs.paths import NAME_MAX, PATH_MAX, WorkspaceRoot, os_error
from agent.fs.staging import STAGING_DIR_NAME, StagingArea, Swap, is_staging_path
from common.errors import ArchiveRefused, ArchiveTooLarge
from common.tarball import GzipTarSource, Kind, MemberPolicy
from common.tarstream import TarMember, TarReader

# Uploaded bytes buffered between the loop and the worker; the client is slowed down past this.
UPLOAD_BUFFER_BYTES = 8 * 1024 * 1024
# Tar headers, padding and pax records allowed per member on top of the content-size limit, so a
# "bomb" of metadata (a huge pax header) is stopped like one of content.
METADATA_ALLOWANCE_PER_MEMBER = 4096
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
        raise InvalidPath(
            f"destination {destination!r} is too long to hold any member (the filesystem's {PATH_MAX}-byte path limit)"
        )

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
            upload = GzipTarSource(
                self._channel.get_blocking,
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
            except ArchiveTooLarge as error:
                raise LimitExceeded(str(error)) from None
            except ArchiveRefused as error:
                raise InvalidArgument(str(error)) from None
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


ROOT = PurePosixPath(".")


def _open_parent_making_directories(
    root: WorkspaceRoot, relative: PurePosixPath, made: list[PurePosixPath]
) -> tuple[int, str]:
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


class _MemberWriter:
    """Writes each member the shared tar policy (common.tarball.MemberPolicy) accepts under the
    staging tree with plain os calls, and refuses paths too long for this destination. setuid and
    setgid bits are refused by the policy, the sticky bit stripped and counted. Ownership is not restored.
    """

    def __init__(
        self, tree: Path, config: AgentConfig, *, reserve_staging_name: bool, room: int = PATH_MAX - 1
    ) -> None:
        self._tree = str(tree)
        self._room = room  # bytes a member path may have, the destination's own path taken off
        self.current = ""  # the member being written, for error messages
        self._prefix = self._tree + os.sep
        self._policy = MemberPolicy(
            max_members=config.max_archive_files,
            max_bytes=config.max_archive_bytes,
            reserved_top_name=STAGING_DIR_NAME if reserve_staging_name else None,
        )
        # Directory modes and mtimes are set last, as tar does: a read-only directory must still
        # receive its entries, and writing entries would change its mtime.
        self._directory_attributes: dict[str, tuple[int, float | None]] = {"": (0o755, None)}
        self._symlinks: dict[str, str] = {}
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
        kinds = list(self._policy.kinds.values())
        return ExtractionReport(
            files=kinds.count(Kind.FILE),
            directories=kinds.count(Kind.DIRECTORY),
            symlinks=kinds.count(Kind.SYMLINK),
            bytes_extracted=self._policy.bytes,
            sha256=sha256,
            stripped_special_bits=self._stripped,
        )

    def _write(self, tar: TarReader, member: TarMember) -> None:
        self.current = member.name
        verdict = self._policy.check(member)
        self._check_length(verdict.path, member.name)
        if verdict.link_source is not None:
            self._check_length(verdict.link_source, member.linkname, link=True)
        self._stripped += verdict.stripped
        name, kind = verdict.path, verdict.kind
        if not name:
            self._directory_attributes[""] = (verdict.mode, member.mtime)
            return
        for directory in verdict.implied:
            # A directory the archive implies but does not list, made as tar makes it.
            os.mkdir(self._prefix + directory, 0o700)
            self._directory_attributes[directory] = (0o755, None)
        path = self._prefix + name
        if verdict.previous is not None and kind is not Kind.DIRECTORY:
            os.unlink(path)
            self._symlinks.pop(name, None)

        if kind is Kind.DIRECTORY:
            if verdict.previous is None:
                os.mkdir(path, 0o700)
            self._directory_attributes[name] = (verdict.mode, member.mtime)
        elif verdict.link_source is not None:
            os.link(self._prefix + verdict.link_source, path)
        elif kind is Kind.FILE:
            self._write_file(tar, member, path, verdict.mode)
        else:
            os.symlink(member.linkname, path)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
            self._symlinks[name] = member.linkname

    def _check_length(self, path: str, raw: str, *, link: bool = False) -> None:
        if any(len(os.fsencode(part)) > NAME_MAX for part in path.split("/")) or len(os.fsencode(path)) > self._room:
            shown = raw if len(raw) <= 80 else raw[:60] + "..."
            raise InvalidPath(
                f"{'hardlink target' if link else 'member'} {shown!r} is longer than the filesystem allows in this destination "
                f"({NAME_MAX} bytes a name, {PATH_MAX} a path)"
            )

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
