"""The archive store over both kinds of blobs, the data dir and a real S3 server (SeaweedFS): round trips,
deletes, refused corrupt blobs, one winner of two writers, multipart uploads that leave nothing behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.archives import ArchiveStore, Expected
from orchestrator.blobs import MIN_PART_SIZE, MULTIPART_THRESHOLD, PART_SIZE, Blobs, LocalBlobs, S3Blobs, open_blobs
from orchestrator.errors import (
    AlreadyExists,
    ArchiveNotFound,
    ArchiveStoreUnavailable,
    ChecksumMismatch,
    InvalidArgument,
)
from orchestrator.store import Store
from tests.orchestrator.test_archives import UPLOAD, chunked, tar_gz
from tests.s3_server import S3Bucket

KINDS = ["local", "s3"]


def make_blobs(
    kind: str,
    request: pytest.FixtureRequest,
    spool: Path,
    part_size: int = PART_SIZE,
    threshold: int = MULTIPART_THRESHOLD,
) -> Blobs:
    """Blobs of `kind`; two calls with one spool are two writers (two replicas) on the same store."""
    if kind == "local":
        return LocalBlobs(spool.parent / "shared")
    bucket: S3Bucket = request.getfixturevalue("s3")
    return S3Blobs(
        bucket.name, "ws/archives", spool, multipart_threshold=threshold, part_size=part_size
    )  # the client from the AWS_* variables


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "state.sqlite3")
    yield store
    store.close()


async def collect(chunks: AsyncIterator[bytes]) -> tuple[bytes, BaseException | None]:
    """The bytes a reader got, and the error that ended the reading, if any."""
    got = []
    try:
        async for chunk in chunks:
            got.append(chunk)
    except Exception as error:  # noqa: BLE001 - returned for the test to look at
        return b"".join(got), error
    return b"".join(got), None


@pytest.mark.parametrize("kind", KINDS)
async def test_written_archives_are_read_listed_and_deleted(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, store: Store
) -> None:
    archives = ArchiveStore(make_blobs(kind, request, tmp_path / "spool"), store, max_bytes=1 << 20)
    data = tar_gz([("package.json", b"{}"), ("src/index.js", b"console.log(1)\n")])
    archive = await archives.write(UPLOAD, chunked(data), expected=Expected(hashlib.sha256(data).hexdigest()))

    assert b"".join([chunk async for chunk in archives.read(archive.id)]) == data
    assert [a.id for a in await archives.list()] == [archive.id]
    assert [blob.name for blob in await archives.blobs.entries()] == [f"{archive.id}.tar.gz"]

    await archives.delete(archive.id)
    assert await archives.list() == [] and await archives.blobs.entries() == []
    with pytest.raises(ArchiveNotFound):
        [chunk async for chunk in archives.read(archive.id)]


@pytest.mark.parametrize("kind", KINDS)
async def test_a_changed_blob_is_refused_and_never_handed_out_whole(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, store: Store
) -> None:
    archives = ArchiveStore(make_blobs(kind, request, tmp_path / "spool"), store, max_bytes=8 << 20)
    # Several chunks, of incompressible content.
    data = tar_gz([("blob.bin", os.urandom(3 << 20))])
    archive = await archives.write(UPLOAD, chunked(data, 1 << 20))
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0xFF  # same size: only the checksum tells
    if isinstance(archives.blobs, LocalBlobs):
        archives.blobs.path(f"{archive.id}.tar.gz").write_bytes(corrupted)
    else:  # replaced behind the store's back, by a writer that does not ask first
        bucket: S3Bucket = request.getfixturevalue("s3")
        bucket.client.put_object(Bucket=bucket.name, Key=f"ws/archives/{archive.id}.tar.gz", Body=bytes(corrupted))

    got, error = await collect(archives.read(archive.id))
    assert isinstance(error, ChecksumMismatch), error
    assert "not the recorded" in str(error) and archive.sha256 in str(error)
    assert len(got) < len(data)


# Rounds of the race below: one round lost it now and then (SeaweedFS let both multipart completes through).
RACE_ROUNDS = 16


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1000, MIN_PART_SIZE + 1000], ids=["single", "multipart"])
async def test_of_two_writers_of_one_name_exactly_one_wins(
    kind: str, size: int, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    writers = [make_blobs(kind, request, tmp_path / f"spool{n}", MIN_PART_SIZE, MIN_PART_SIZE) for n in (1, 2)]
    names = [f"ar-same-{round}.tar.gz" for round in range(RACE_ROUNDS)]
    for name in names:
        contents = [os.urandom(size), os.urandom(size)]
        sources = []
        for n, (blobs, content) in enumerate(zip(writers, contents, strict=True)):
            blobs.spool.mkdir(parents=True, exist_ok=True)
            source = blobs.spool / f".incoming-{n}"
            source.write_bytes(content)
            sources.append(source)

        results = await asyncio.gather(
            *(blobs.put(source, name, hashlib.sha256(content).hexdigest())
              for blobs, source, content in zip(writers, sources, contents, strict=True)),
            return_exceptions=True,
        )  # fmt: skip
        assert sorted(type(result).__name__ for result in results) == ["AlreadyExists", "NoneType"], name
        (lost,) = [result for result in results if isinstance(result, AlreadyExists)]
        assert "exists already" in str(lost) and "not replaced" in str(lost)
        # What is stored is the winner's: the loser neither replaced it nor left half of itself.
        winner = contents[results.index(None)]
        assert await writers[1].read_bytes(name) == winner
        assert not any(source.exists() for source in sources)  # both temp files consumed
    assert sorted(blob.name for blob in await writers[0].entries()) == sorted(names)
    if kind == "s3":
        # Nothing else is left: the loser's multipart upload (if it got to one) aborted, no claims.
        bucket: S3Bucket = request.getfixturevalue("s3")
        assert bucket.uploads() == [] and bucket.keys() == sorted(f"ws/archives/{name}" for name in names)


async def test_a_name_being_written_is_refused_until_its_writer_is_overdue(tmp_path: Path, s3: S3Bucket) -> None:
    """A claim is another writer at work, or what a crashed one left: then, once old, it blocks no more."""
    content = os.urandom(1000)
    sha256 = hashlib.sha256(content).hexdigest()
    working = S3Blobs(s3.name, "ws/archives", tmp_path / "spool")
    s3.client.put_object(Bucket=s3.name, Key=working.claim_key("ar-cut.tar.gz"), Body=b"another writer")
    source = tmp_path / "spool" / ".incoming-x"
    source.write_bytes(content)
    with pytest.raises(AlreadyExists, match="another writer is storing it"):
        await working.put(source, "ar-cut.tar.gz", sha256)
    assert s3.keys() == [working.claim_key("ar-cut.tar.gz")]  # neither written nor its claim taken

    overdue = S3Blobs(s3.name, "ws/archives", tmp_path / "spool", orphan_grace_s=0)
    source.write_bytes(content)
    await overdue.put(source, "ar-cut.tar.gz", sha256)
    assert await overdue.read_bytes("ar-cut.tar.gz") == content
    assert s3.keys() == ["ws/archives/ar-cut.tar.gz"]


async def test_a_large_archive_goes_up_in_parts(tmp_path: Path, store: Store, s3: S3Bucket) -> None:
    blobs = S3Blobs(
        s3.name, "ws/archives", tmp_path / "spool", multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE
    )
    archives = ArchiveStore(blobs, store, max_bytes=64 << 20)
    data = tar_gz([("big.bin", os.urandom(12 << 20))])
    archive = await archives.write(UPLOAD, chunked(data, 1 << 20))

    head = s3.client.head_object(Bucket=s3.name, Key=f"ws/archives/{archive.id}.tar.gz", PartNumber=1)
    assert head["PartsCount"] == 3 and head["ContentLength"] == MIN_PART_SIZE
    assert s3.uploads() == []
    assert b"".join([chunk async for chunk in archives.read(archive.id)]) == data
    assert list((tmp_path / "spool").iterdir()) == []  # nothing spooled is left


async def test_a_failed_upload_is_aborted_and_leaves_no_parts(tmp_path: Path, store: Store, s3: S3Bucket) -> None:
    blobs = S3Blobs(
        s3.name, "ws/archives", tmp_path / "spool", multipart_threshold=MIN_PART_SIZE, part_size=MIN_PART_SIZE
    )
    source = tmp_path / "spool" / ".incoming-x"
    source.write_bytes(os.urandom(11 << 20))
    # The object appears while the parts go up: the completion is refused, the upload must be aborted.
    s3.client.put_object(Bucket=s3.name, Key="ws/archives/taken.tar.gz", Body=b"first")
    with pytest.raises(AlreadyExists):
        await blobs.put(source, "taken.tar.gz", "")
    assert s3.uploads() == []
    assert s3.client.get_object(Bucket=s3.name, Key="ws/archives/taken.tar.gz")["Body"].read() == b"first"


async def test_an_unreachable_store_says_so(tmp_path: Path, s3: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard: nothing listens
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    blobs = open_blobs(f"s3://{s3.name}/ws", "archives", tmp_path / "spool")
    assert isinstance(blobs, S3Blobs) and blobs.location == f"s3://{s3.name}/ws/archives"
    with pytest.raises(ArchiveStoreUnavailable, match=f"s3://{s3.name}/ws/archives is unreachable"):
        blobs.check()


def test_an_archive_store_url_is_s3_or_nothing(tmp_path: Path) -> None:
    assert isinstance(open_blobs("", "archives", tmp_path), LocalBlobs)
    for url in ("file:///tmp/x", "s3://", "https://bucket/x"):
        with pytest.raises(InvalidArgument, match="expected s3://BUCKET"):
            open_blobs(url, "archives", tmp_path)


async def test_a_start_aborts_abandoned_uploads_and_keeps_unrecorded_archives(
    tmp_path: Path, store: Store, s3: S3Bucket
) -> None:
    # What a crashed replica leaves: parts of an upload never completed (and its claim), an archive never recorded.
    upload = s3.client.create_multipart_upload(Bucket=s3.name, Key="ws/archives/ar-cut.tar.gz")["UploadId"]
    s3.client.upload_part(
        Bucket=s3.name, Key="ws/archives/ar-cut.tar.gz", UploadId=upload, PartNumber=1, Body=b"x" * MIN_PART_SIZE
    )
    s3.client.put_object(Bucket=s3.name, Key="ws/archives/ar-unrecorded.tar.gz", Body=b"another replica's")
    s3.client.put_object(Bucket=s3.name, Key="ws/archives/.claims/ar-cut.tar.gz", Body=b"a crashed writer's claim")

    ArchiveStore(S3Blobs(s3.name, "ws/archives", tmp_path / "spool", orphan_grace_s=0), store, max_bytes=1 << 20)
    assert s3.uploads() == []
    # It may be another replica's archive on its way to the record: never removed on a guess.
    assert s3.keys() == ["ws/archives/ar-unrecorded.tar.gz"]


async def test_a_repeated_write_of_the_same_bytes_is_no_conflict(tmp_path: Path, s3: S3Bucket) -> None:
    """What a retried request sees when its first attempt was stored: its own bytes under the name."""
    blobs = S3Blobs(s3.name, "ws/archives", tmp_path / "spool")
    content = os.urandom(1000)
    for attempt in ("first", "retried"):
        source = tmp_path / "spool" / f".incoming-{attempt}"
        source.write_bytes(content)
        await blobs.put(source, "ar-once.tar.gz", hashlib.sha256(content).hexdigest())
    assert s3.keys() == ["ws/archives/ar-once.tar.gz"]
    assert await blobs.read_bytes("ar-once.tar.gz") == content
