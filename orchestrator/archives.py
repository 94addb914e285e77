"""The archive store: saved and uploaded workspaces as tar.gz files under data-dir/archives.

A file becomes visible only complete: written to a temp file, fsynced, checksummed, renamed, then
recorded. A failure anywhere leaves the earlier archives as they were and no partial one behind."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from common.durable import file_chunks, flush_to_disk, publish
from common.errors import ArchiveRefused, ArchiveTooLarge
from common.tarball import check_tar_gz
from orchestrator.errors import ArchiveNotFound, ChecksumMismatch, InvalidArgument, LimitExceeded
from orchestrator.store import Store
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

TEMP_PREFIX = ".incoming-"


@dataclass(frozen=True)
class ArchiveOrigin:
    """What an archive is and where it came from, as the caller names it."""

    name: str
    source: pb.ArchiveSource.ValueType
    template: str
    session_id: str = ""


@dataclass(frozen=True)
class Expected:
    """What the bytes must be: their sha256 ("" = not announced) and, when the producer counted
    them, the regular files (then the archive is not read back to count and check its members)."""

    sha256: str = ""
    files: int | None = None


class ArchiveStore:
    """Archive files plus their records in the Store; every write is atomic and checksummed."""

    def __init__(self, directory: Path, store: Store, max_bytes: int) -> None:
        self._dir = directory
        self._store = store
        self._max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Removes leftovers of a crash: temp files, and files whose record was never written."""
        recorded = {f"{archive_id}.tar.gz" for archive_id in self._store.archive_ids()}
        for path in self._dir.iterdir():
            if path.name.startswith(TEMP_PREFIX) or path.name not in recorded:
                path.unlink(missing_ok=True)

    def path(self, archive_id: str) -> Path:
        return self._dir / f"{archive_id}.tar.gz"

    async def get(self, archive_id: str) -> pb.Archive:
        """The archive's record. Raises ArchiveNotFound."""
        archive = await self._store.get_archive(archive_id)
        if archive is None:
            raise ArchiveNotFound(f"no archive {archive_id!r}: ListArchives shows the stored ones")
        return archive

    async def list(self, session_id: str = "") -> list[pb.Archive]:
        return await self._store.list_archives(session_id)

    async def delete(self, archive_id: str) -> None:
        """Removes the record, then the file (a crash between the two leaves a file the next start
        sweeps away). Raises ArchiveNotFound."""
        if not await self._store.delete_archive(archive_id):
            raise ArchiveNotFound(f"no archive {archive_id!r}: ListArchives shows the stored ones")
        await asyncio.to_thread(self.path(archive_id).unlink, True)

    async def read(self, archive_id: str) -> AsyncIterator[bytes]:
        """The archive's bytes in chunks. Raises ArchiveNotFound."""
        await self.get(archive_id)
        async for chunk in file_chunks(self.path(archive_id)):
            yield chunk

    async def write(
        self,
        origin: ArchiveOrigin,
        chunks: AsyncIterable[bytes],
        expected: Expected | Callable[[], Expected] = Expected(),
    ) -> pb.Archive:
        """Stores the bytes of `chunks` as a new archive and records it.

        `expected` may be a callable, asked once the chunks are consumed: the agent announces the
        checksum of CreateArchive after the last chunk. Without a trusted file count the archive is
        read back and checked: a readable tar.gz whose members are all safe to extract. Raises LimitExceeded (over the size limit), ChecksumMismatch (the bytes do
        not hash to `expected_sha256`), InvalidArgument (not a readable, safe tar.gz)."""
        archive_id = f"ar-{secrets.token_hex(5)}"
        temp = self._dir / f"{TEMP_PREFIX}{archive_id}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temp, "xb") as file:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise LimitExceeded(f"archive is larger than the limit of {self._max_bytes} bytes")
                    digest.update(chunk)
                    await asyncio.to_thread(file.write, chunk)
                await asyncio.to_thread(flush_to_disk, file)
            sha256 = digest.hexdigest()
            if callable(expected):
                expected = expected()
            if expected.sha256 and expected.sha256.lower() != sha256:
                raise ChecksumMismatch(
                    f"archive bytes hash to sha256 {sha256}, not the announced {expected.sha256}; nothing stored"
                )
            files = expected.files
            if files is None:
                files = await asyncio.to_thread(count_safe_members, temp)
            final = self.path(archive_id)
            await asyncio.to_thread(publish, temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        created_at = Timestamp()
        created_at.GetCurrentTime()
        archive = pb.Archive(
            id=archive_id,
            name=origin.name or archive_id,
            source=origin.source,
            template=origin.template,
            session_id=origin.session_id,
            sha256=sha256,
            size=size,
            files=files,
            created_at=created_at,
        )
        try:
            await self._store.put_archive(archive)
        except BaseException:
            final.unlink(missing_ok=True)
            raise
        return archive


def count_safe_members(path: Path) -> int:
    """The number of regular files in the tar.gz at `path`. Raises InvalidArgument when it is not a
    readable tar.gz or a member is refused by the tar policy the agent extracts with (common.tarball),
    LimitExceeded past the default extraction limits."""
    try:
        return check_tar_gz(path).regular_files
    except ArchiveTooLarge as error:
        raise LimitExceeded(str(error)) from None
    except ArchiveRefused as error:
        raise InvalidArgument(str(error)) from None
    except OSError as error:
        raise InvalidArgument(f"not a readable tar.gz: {error}") from None
