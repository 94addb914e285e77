"""Tar archives both services make and take: the one reproducible tar.gz writer, and the one safety
policy every uploaded or extracted member is judged by (the orchestrator's upload check and the
agent's extraction run the same code, with the same strict parser in common.tarstream)."""

from __future__ import annotations

import enum
import gzip
import hashlib
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from common.constants import MAX_CONTENT_BYTES, MAX_MEMBERS
from common.errors import ArchiveRefused, ArchiveTooLarge
from common.tarstream import REGULAR_TYPES, TarMember, TarReader

# ---------------------------------------------------------------------------------------------------
# Writing


class TarGzWriter:
    """A tar.gz that is the same bytes for the same members: pax format, owner 0:0 without user or
    group names, whole-second mtimes, and a gzip header without a file name or timestamp. Members go
    in the order they are added; callers add them in a sorted order of their own."""

    def __init__(self, out: BinaryIO, *, compresslevel: int = 9, stream: bool = False) -> None:
        self._gzip = gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=compresslevel, mtime=0)
        # Stream mode ("w|") writes forward only, for a sink that cannot seek.
        self._tar = tarfile.open(  # noqa: SIM115 - closed by __exit__, this class is the context manager
            fileobj=self._gzip, mode="w|" if stream else "w", format=tarfile.PAX_FORMAT
        )

    def __enter__(self) -> TarGzWriter:
        return self

    def __exit__(self, *failure: Any) -> None:
        # As nested `with` blocks would: after a failure tarfile writes no end marker.
        try:
            self._tar.__exit__(*failure)
        finally:
            self._gzip.close()

    def add_directory(self, name: str, mode: int, mtime: float) -> None:
        self._tar.addfile(_info(name, tarfile.DIRTYPE, mode, mtime))

    def add_file(self, name: str, mode: int, mtime: float, size: int, content: BinaryIO) -> None:
        info = _info(name, tarfile.REGTYPE, mode, mtime)
        info.size = size
        self._tar.addfile(info, content)

    def add_symlink(self, name: str, target: str, mode: int, mtime: float) -> None:
        info = _info(name, tarfile.SYMTYPE, mode, mtime)
        info.linkname = target
        self._tar.addfile(info)


def _info(name: str, kind: bytes, mode: int, mtime: float) -> tarfile.TarInfo:
    # A fresh TarInfo already has uid/gid 0 and empty user and group names.
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(mode)
    info.mtime = int(mtime)
    return info


# ---------------------------------------------------------------------------------------------------
# The safety policy


class Kind(enum.Enum):
    DIRECTORY = "directory"
    FILE = "file"
    SYMLINK = "symlink"


HARDLINK = b"1"
_KINDS = {
    **dict.fromkeys(REGULAR_TYPES, Kind.FILE),
    HARDLINK: Kind.FILE,
    b"2": Kind.SYMLINK,
    b"5": Kind.DIRECTORY,
}
_REFUSED_TYPES = {
    b"3": "is a device node, which archives may not contain",
    b"4": "is a device node, which archives may not contain",
    b"6": "is a FIFO, which archives may not contain",
}
# The sticky bit is harmless in a workspace and stripped; setuid and setgid are refused outright.
STRIPPED_BITS = stat.S_ISVTX
REFUSED_BITS = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class Verdict:
    """What an accepted member is: its normalized relative path ("" for the archive's own top
    directory), kind, permission bits to give it, and what the extractor must do around it."""

    path: str
    kind: Kind
    mode: int
    stripped: bool  # the sticky bit was taken off
    previous: Kind | None  # an earlier member of the same path (a later one wins, as with tar)
    implied: tuple[str, ...]  # parent directories the archive implies but has not listed, outermost first
    link_source: str | None = None  # a hardlink's normalized target, an earlier regular file


@dataclass
class MemberPolicy:
    """Judges the members of one archive in order. Accepted: regular files, directories, symlinks
    whose target stays inside the destination, and hardlinks to a regular file earlier in the
    archive. Refused (ArchiveRefused, naming the member): absolute or `..` paths, NUL bytes, device
    nodes, FIFOs, sparse files, setuid/setgid bits, entries below a symlink or a file, a path that is
    both a directory and not; past `max_members` or `max_bytes` of content, ArchiveTooLarge."""

    max_members: int | None = MAX_MEMBERS
    max_bytes: int | None = MAX_CONTENT_BYTES
    reserved_top_name: str | None = None  # a first path component the destination keeps for itself
    kinds: dict[str, Kind] = field(default_factory=dict)
    members: int = 0
    bytes: int = 0
    regular_files: int = 0  # regular-file members (not hardlinks), as an archive's file count

    def check(self, member: TarMember) -> Verdict:
        self.members += 1
        if self.max_members is not None and self.members > self.max_members:
            raise ArchiveTooLarge(f"archive has more than {self.max_members} members (the file count limit)")
        path = self.path(member.name, member.name)
        if member.mode & REFUSED_BITS:
            raise ArchiveRefused(f"member {member.name!r} has setuid/setgid bits, which archives may not carry")
        if member.sparse:
            raise ArchiveRefused(f"member {member.name!r} is a sparse file, which is not supported")
        kind = _KINDS.get(member.type)
        if kind is None:
            refusal = _REFUSED_TYPES.get(member.type, f"has unsupported tar type {member.type!r}")
            raise ArchiveRefused(f"member {member.name!r} {refusal}")
        mode = member.mode & 0o777
        stripped = bool(member.mode & STRIPPED_BITS)
        if not path:  # the archive's own top directory, `./`
            if kind is not Kind.DIRECTORY:
                raise ArchiveRefused(f"member {member.name!r} has an empty path")
            return Verdict("", kind, mode, stripped, None, ())

        implied = self._parents(path, member.name)
        previous = self.kinds.get(path)
        if previous is not None and (previous is Kind.DIRECTORY) != (kind is Kind.DIRECTORY):
            # A directory is never swapped for a non-directory, nor the other way round.
            raise ArchiveRefused(f"member {member.name!r} is both a {previous.value} and a {kind.value}")
        link_source = None
        if member.type == HARDLINK:
            link_source = self.path(member.linkname, member.name, link=True)
            if self.kinds.get(link_source) is not Kind.FILE:
                raise ArchiveRefused(
                    f"hardlink member {member.name!r} points to {member.linkname!r}, "
                    "which is not a regular file earlier in the archive"
                )
        elif kind is Kind.FILE:
            self.bytes += member.size
            if self.max_bytes is not None and self.bytes > self.max_bytes:
                raise ArchiveTooLarge(
                    f"archive content exceeds {self.max_bytes} bytes (the archive size limit) at member {member.name!r}"
                )
            self.regular_files += 1
        elif kind is Kind.SYMLINK:
            _check_symlink_target(path, member.linkname)
        self.kinds[path] = kind
        return Verdict(path, kind, mode, stripped, previous, implied, link_source)

    def path(self, raw: str, member_name: str, *, link: bool = False) -> str:
        """The normalized relative path of a member (or a hardlink's target); refuses unsafe ones."""
        what = f"hardlink member {member_name!r} points to {raw!r}, which" if link else f"member {raw!r}"
        if raw.startswith("/"):
            raise ArchiveRefused(f"{what} is an absolute path; archive paths must be relative")
        if "\0" in raw:
            raise ArchiveRefused(f"{what} contains a NUL byte")
        parts = [part for part in raw.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ArchiveRefused(f"{what} contains '..', which could lead out of the destination")
        if self.reserved_top_name is not None and parts and parts[0] == self.reserved_top_name:
            raise ArchiveRefused(f"{what} is inside {self.reserved_top_name}/, the agent's reserved staging directory")
        return "/".join(parts)

    def _parents(self, path: str, member_name: str) -> tuple[str, ...]:
        parent = path.rpartition("/")[0]
        if not parent or self.kinds.get(parent) is Kind.DIRECTORY:
            return ()
        implied = []
        prefix = ""
        for part in parent.split("/"):
            prefix = f"{prefix}/{part}" if prefix else part
            kind = self.kinds.get(prefix)
            if kind is None:
                self.kinds[prefix] = Kind.DIRECTORY
                implied.append(prefix)
            elif kind is not Kind.DIRECTORY:
                # Writing through a link could land outside the destination: never follow one.
                raise ArchiveRefused(
                    f"member {member_name!r} is below {prefix!r}, which is a {kind.value}, not a directory"
                )
        return tuple(implied)


def _check_symlink_target(name: str, target: str) -> None:
    if not target or "\0" in target:
        raise ArchiveRefused(f"symlink member {name!r} has an empty target or one with a NUL byte")
    if target.startswith("/"):
        raise ArchiveRefused(
            f"symlink member {name!r} -> {target!r} points to an absolute path, outside the destination"
        )
    if posixpath.normpath(posixpath.join(posixpath.dirname(name), target)).split("/")[0] == "..":
        raise ArchiveRefused(f"symlink member {name!r} -> {target!r} leads out of the destination")


# ---------------------------------------------------------------------------------------------------
# Checking a stored tar.gz


def check_tar_gz(path: Path, policy: MemberPolicy | None = None) -> MemberPolicy:
    """Reads the tar.gz at `path` with the strict parser and judges every member by `policy` (a
    fresh one by default), which it returns with the counts. Raises ArchiveRefused, ArchiveTooLarge."""
    policy = policy or MemberPolicy()
    with open(path, "rb") as file:
        for member in TarReader(GzipTarSource(lambda: file.read(INFLATE_STEP) or None)):
            policy.check(member)
    return policy


# Inflated bytes produced per step (the most held at once, beyond one header).
INFLATE_STEP = 256 * 1024


class GzipTarSource:
    """Gzip bytes, as `read_raw` hands them over (None at the end), as inflated tar data for
    TarReader (a `TarSource`). Concatenated gzip members (what `cat a.gz b.gz` makes) are one stream.

    It hashes the raw bytes as they pass and counts what they inflate to, refusing past `max_inflated`
    before inflating further, so a gzip bomb is stopped after at most one step beyond the limit.
    """

    def __init__(self, read_raw: Callable[[], bytes | None], max_inflated: int | None = None) -> None:
        self._read_raw = read_raw
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
                raise ArchiveRefused("archive is truncated: the tar data ends inside a header")
            part = self._output[self._position : self._position + missing]
            self._position += len(part)
            missing -= len(part)
            parts.append(part)
        return b"".join(parts)

    def pieces(self, size: int) -> Iterator[memoryview]:
        while size:
            if self._position >= len(self._output) and not self._inflate_more():
                raise ArchiveRefused("archive is truncated: the tar data ends inside a member's content")
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
        """Hex sha256 of the raw bytes; complete once TarReader is done, as it reads to the end of the
        data (past the end marker, which only zero padding may follow)."""
        return self._hash.hexdigest()

    def _inflate_more(self) -> bool:
        while True:
            if not self._input:
                raw = self._read_raw()
                if raw is None:
                    if not self._received:
                        raise ArchiveRefused("archive is empty: no bytes arrived")
                    if not self._inflater.eof:
                        raise ArchiveRefused("archive is truncated: the gzip stream ends before its end marker")
                    return False
                self._received += len(raw)
                self._hash.update(raw)
                self._input = raw
            if self._inflater.eof:
                self._inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
            try:
                output = self._inflater.decompress(self._input, INFLATE_STEP)
            except zlib.error as error:
                raise ArchiveRefused(f"archive is not valid gzip data: {error}") from None
            self._input = self._inflater.unused_data if self._inflater.eof else self._inflater.unconsumed_tail
            if output:
                self._inflated += len(output)
                if self._max_inflated is not None and self._inflated > self._max_inflated:
                    raise ArchiveTooLarge(
                        f"archive inflates to more than {self._max_inflated} bytes of tar data "
                        "(the archive size limit plus header allowance)"
                    )
                self._output = output
                self._view = memoryview(output)
                self._position = 0
                return True
