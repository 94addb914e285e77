"""The archive store: saved and uploaded workspaces as tar.gz blobs (orchestrator.blobs: data-dir/archives or
an S3 bucket), their records in the Store.

A blob becomes visible only complete: written to a temp file, fsynced, checksummed and checked, published
(never over another), then recorded. A failure anywhere leaves the earlier archives as they were and no
partial one behind; a read hands out no byte of a blob that does not match its record's sha256."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from common.durable import flush_to_disk
from common.errors import ArchiveRefused, ArchiveTooLarge
from common.tarball import check_tar_gz
from orchestrator.blobs import TEMP_PREFIX, Blobs, LocalBlobs
from orchestrator.errors import ArchiveNotFound, ChecksumMismatch, InvalidArgument, LimitExceeded, NotFound
from orchestrator.store import Store
from workspace.orchestrator.v1 import orchestrator_pb2 as pb


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
    """Archive blobs plus their records in the Store; every write is atomic and checksummed. `blobs` is where
    the bytes go; a directory means local blobs in it."""

    def __init__(self, blobs: Blobs | Path, store: Store, max_bytes: int) -> None:
        self.blobs = LocalBlobs(blobs) if isinstance(blobs, Path) else blobs
        self._store = store
        self._max_bytes = max_bytes
        self._sweep()

    def _sweep(self) -> None:
        """Removes leftovers of a crash: temp files, and blobs whose record was never written."""
        if self.blobs.shared or self._store.shared:
            # Only abandoned uploads go (in S3, or wherever replicas share one database): an unrecorded blob may
            # be another replica's archive on its way to the record, or one recorded in a database this
            # orchestrator does not see. A crash between upload and record leaves one behind, never a lost archive.
            self.blobs.sweep(lambda name, _: True)
            return
        recorded = {_blob_name(archive_id) for archive_id in self._store.archive_ids()}
        self.blobs.sweep(lambda name, _: name in recorded)

    def path(self, archive_id: str) -> Path:
        """The archive's file, for local blobs."""
        assert isinstance(self.blobs, LocalBlobs), "only local archives have a path"
        return self.blobs.path(_blob_name(archive_id))

    async def get(self, archive_id: str) -> pb.Archive:
        """The archive's record. Raises ArchiveNotFound."""
        archive = await self._store.get_archive(archive_id)
        if archive is None:
            raise ArchiveNotFound(f"no archive {archive_id!r}: ListArchives shows the stored ones")
        return archive

    async def list(self, session_id: str = "") -> list[pb.Archive]:
        return await self._store.list_archives(session_id)

    async def delete(self, archive_id: str) -> None:
        """Removes the record, then the blob (a crash between the two leaves a blob the next start
        sweeps away). Raises ArchiveNotFound."""
        if not await self._store.delete_archive(archive_id):
            raise ArchiveNotFound(f"no archive {archive_id!r}: ListArchives shows the stored ones")
        await self.blobs.delete(_blob_name(archive_id))

    async def read(self, archive_id: str) -> AsyncIterator[bytes]:
        """The archive's bytes in chunks, verified against its record: a blob changed or replaced since it was
        written raises ChecksumMismatch before its last chunk. Raises ArchiveNotFound (also when the record is
        there but its blob is gone), ArchiveStoreUnavailable."""
        archive = await self.get(archive_id)
        try:
            async for chunk in self.blobs.read(_blob_name(archive_id), archive.sha256, archive.size):
                yield chunk
        except NotFound as error:
            raise ArchiveNotFound(f"archive {archive_id!r} is recorded but its bytes are gone: {error}") from None

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
        temp = self.blobs.spool / f"{TEMP_PREFIX}{archive_id}"
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
            # Conditional: a blob of this name (a clash of random ids, or another replica's) is never replaced.
            await self.blobs.put(temp, _blob_name(archive_id), sha256)
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
            await self.blobs.delete(_blob_name(archive_id))
            raise
        return archive


def _blob_name(archive_id: str) -> str:
    return f"{archive_id}.tar.gz"


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
