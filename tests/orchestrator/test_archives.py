"""The archive store: complete, checksummed archives appear; partial, corrupt or unsafe ones never do."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from orchestrator.archives import ArchiveOrigin, ArchiveStore, Expected
from orchestrator.errors import ArchiveNotFound, ChecksumMismatch, InvalidArgument, LimitExceeded
from orchestrator.store import Store
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

UPLOAD = ArchiveOrigin(name="imported", source=pb.ARCHIVE_SOURCE_UPLOADED, template="node-basic")


def tar_gz(members: Iterable[tarfile.TarInfo | tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                archive.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    # No time in the gzip header: the same members give the same bytes whenever they are packed.
    return gzip.compress(buffer.getvalue(), mtime=0)


async def chunked(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.fixture
def archives(tmp_path: Path):
    store = Store(tmp_path / "state.sqlite3")
    yield ArchiveStore(tmp_path / "archives", store, max_bytes=64 * 1024)
    store.close()


def visible_files(archives: ArchiveStore, tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "archives").iterdir())


async def test_a_written_archive_is_stored_byte_for_byte(archives: ArchiveStore) -> None:
    data = tar_gz([("package.json", b"{}"), ("src/index.js", b"console.log(1)\n")])
    archive = await archives.write(UPLOAD, chunked(data), expected=Expected(hashlib.sha256(data).hexdigest()))

    assert (archive.name, archive.template, archive.size, archive.files) == ("imported", "node-basic", len(data), 2)
    assert archive.sha256 == hashlib.sha256(data).hexdigest()
    assert archives.path(archive.id).read_bytes() == data
    assert b"".join([chunk async for chunk in archives.read(archive.id)]) == data
    assert [a.id for a in (await archives.list())] == [archive.id]


async def test_a_checksum_mismatch_stores_nothing(archives: ArchiveStore, tmp_path: Path) -> None:
    kept = await archives.write(UPLOAD, chunked(tar_gz([("a", b"1")])))
    with pytest.raises(ChecksumMismatch):
        await archives.write(UPLOAD, chunked(tar_gz([("b", b"2")])), expected=Expected("0" * 64))
    assert [a.id for a in (await archives.list())] == [kept.id]
    assert visible_files(archives, tmp_path) == [f"{kept.id}.tar.gz"]


async def test_a_source_failing_midway_leaves_earlier_archives_and_no_partial_file(
    archives: ArchiveStore, tmp_path: Path
) -> None:
    kept = await archives.write(UPLOAD, chunked(tar_gz([("a", b"1")])))

    async def broken() -> AsyncIterator[bytes]:
        yield b"\x1f\x8b partial"
        raise ConnectionError("agent went away")

    with pytest.raises(ConnectionError):
        await archives.write(UPLOAD, broken(), expected=lambda: Expected(files=1))
    assert [a.id for a in (await archives.list())] == [kept.id]
    assert visible_files(archives, tmp_path) == [f"{kept.id}.tar.gz"]
    assert archives.path(kept.id).read_bytes() == tar_gz([("a", b"1")])


async def test_over_the_size_limit_is_refused(archives: ArchiveStore, tmp_path: Path) -> None:
    with pytest.raises(LimitExceeded):
        await archives.write(UPLOAD, chunked(b"x" * (64 * 1024 + 1), size=8192))
    assert (await archives.list()) == [] and visible_files(archives, tmp_path) == []


def unsafe(name: str, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    for key, value in fields.items():
        setattr(info, key, value)
    return info


@pytest.mark.parametrize(
    "data",
    [
        b"not a tar.gz at all",
        tar_gz([("a", b"1" * 5000)])[:-100],  # truncated
        tar_gz([("../escape", b"x")]),
        tar_gz([("/etc/passwd", b"x")]),
        tar_gz([unsafe("link", type=tarfile.SYMTYPE, linkname="../../outside")]),
        tar_gz([unsafe("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)]),
        tar_gz([unsafe("suid", mode=0o4755)]),
    ],
    ids=["garbage", "truncated", "dotdot", "absolute", "symlink-out", "device", "setuid"],
)
async def test_unreadable_or_unsafe_uploads_are_invalid_and_not_stored(
    archives: ArchiveStore, tmp_path: Path, data: bytes
) -> None:
    with pytest.raises(InvalidArgument):
        await archives.write(UPLOAD, chunked(data))
    assert (await archives.list()) == [] and visible_files(archives, tmp_path) == []


async def test_delete_removes_record_and_file(archives: ArchiveStore, tmp_path: Path) -> None:
    archive = await archives.write(UPLOAD, chunked(tar_gz([("a", b"1")])))
    await archives.delete(archive.id)
    assert (await archives.list()) == [] and visible_files(archives, tmp_path) == []
    with pytest.raises(ArchiveNotFound):
        await archives.delete(archive.id)
    with pytest.raises(ArchiveNotFound):
        await archives.get(archive.id)


async def test_restart_sweeps_leftovers_of_a_crash(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    first = ArchiveStore(tmp_path / "archives", store, max_bytes=1 << 20)
    kept = await first.write(UPLOAD, chunked(tar_gz([("a", b"1")])))
    (tmp_path / "archives" / ".incoming-ar-dead").write_bytes(b"half")
    (tmp_path / "archives" / "ar-unrecorded.tar.gz").write_bytes(b"renamed, never recorded")

    ArchiveStore(tmp_path / "archives", store, max_bytes=1 << 20)
    assert sorted(p.name for p in (tmp_path / "archives").iterdir()) == [f"{kept.id}.tar.gz"]
    store.close()
