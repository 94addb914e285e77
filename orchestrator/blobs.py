"""Where archive and install-cache bytes live: a local directory or an S3 bucket (`--archive-store`).

Either way an object appears whole or not at all, never replaces another one of its name, and is read
back verified against its sha256; the records about it (the Store, the cache's keys) are the callers'."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol
from urllib.parse import urlsplit

from common.constants import MiB
from common.durable import CHUNK_SIZE, fsync_directory
from orchestrator.errors import (
    AlreadyExists,
    ArchiveStoreUnavailable,
    ChecksumMismatch,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

if TYPE_CHECKING:
    from types_boto3_s3 import S3Client
    from types_boto3_s3.type_defs import CompletedPartTypeDef

# The object metadata carrying an object's sha256 (x-amz-meta-sha256): what a read of a blob without an
# outside record of its checksum (an install-cache entry) verifies against.
SHA256_METADATA = "sha256"
# Objects at most this large go up in one PutObject; larger ones in parts of PART_SIZE, so no request carries
# more than a part and a failed part is retried alone. S3's parts are 5 MiB at least (the last excepted).
MULTIPART_THRESHOLD = 64 * MiB
PART_SIZE = 16 * MiB
MIN_PART_SIZE = 5 * MiB
# A sweep leaves younger orphans alone: another replica may be between uploading an object and recording it.
ORPHAN_GRACE_S = 3600.0
# Temp files of a write in progress (in the spool directory); what a crash leaves of them is swept.
TEMP_PREFIX = ".incoming-"
# S3: the folder (under the prefix) of the claims writers take on a name before writing it; not a blob name,
# as blob names have no "/". The metadata of a claim names its writer.
CLAIMS = ".claims"
CLAIM_METADATA = "writer"
# S3: how often a writer tries for a claim that keeps changing hands before it gives the name up.
CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class BlobInfo:
    name: str
    size: int
    modified: float  # seconds since the epoch: the last write (local: also the last touch)


class Blobs(Protocol):
    """Named immutable blobs. `spool` is a local directory for the caller's temp files: a blob is written
    there complete (and checked) before `put` makes it visible."""

    location: str
    spool: Path
    # Whether other orchestrators write here too: then what looks orphaned may be another's write in progress.
    shared: bool

    async def put(self, source: Path, name: str, sha256: str) -> None:
        """Publishes the complete file `source` as `name` (consuming `source`). Raises AlreadyExists when
        `name` exists (also when another writer published it first), ArchiveStoreUnavailable."""

    def read(self, name: str, sha256: str = "", size: int | None = None) -> AsyncIterator[bytes]:
        """The bytes of `name` in chunks, verified against `sha256` (or, when "", the one recorded with the
        object, if any) and `size`: a blob that does not match raises ChecksumMismatch before its last chunk,
        so no reader ever gets a whole wrong blob. Raises NotFound, ArchiveStoreUnavailable."""
        ...

    async def read_bytes(self, name: str, sha256: str = "") -> bytes:
        """The whole (small) blob `name`, verified as `read` does."""
        ...

    async def touch(self, name: str) -> bool:
        """Whether `name` exists; marks it used where the store can (local: its mtime)."""
        ...

    async def delete(self, name: str) -> None:
        """Removes `name` if it exists."""

    async def entries(self) -> list[BlobInfo]: ...

    def sweep(self, keep: Callable[[str, set[str]], bool]) -> None:
        """Removes what a crash left: temp files, partial uploads and the blobs `keep(name, all names)`
        refuses (in S3 only those older than ORPHAN_GRACE_S: another replica may be about to record its own)."""


def open_blobs(url: str, area: str, spool: Path) -> Blobs:
    """The blobs of `area` ("archives", "install-cache") in the store `url`: "" for the local directory
    `spool` itself, `s3://bucket/prefix` for objects under `prefix/area/` in that bucket (endpoint and
    credentials from the standard AWS variables). Raises InvalidArgument for another URL."""
    if not url:
        return LocalBlobs(spool)
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise InvalidArgument(f"--archive-store {url!r}: expected s3://BUCKET[/PREFIX] (or nothing: the data dir)")
    prefix = "/".join(p for p in (*parts.path.split("/"), area) if p)
    return S3Blobs(parts.netloc, prefix, spool)


class LocalBlobs:
    """Files `directory/<name>`; temp files (`.incoming-*`) beside them, so publishing is a link."""

    shared = False

    def __init__(self, directory: Path) -> None:
        self.spool = directory
        self.location = str(directory)
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.spool / name

    async def put(self, source: Path, name: str, sha256: str) -> None:
        await asyncio.to_thread(self._link, source, self.path(name))

    @staticmethod
    def _link(source: Path, final: Path) -> None:
        # A hard link publishes the whole file or fails when the name exists (a rename would replace it).
        try:
            os.link(source, final)
        except FileExistsError:
            raise AlreadyExists(f"{final} exists already: not replaced") from None
        finally:
            source.unlink(missing_ok=True)
        fsync_directory(final.parent)

    async def read(self, name: str, sha256: str = "", size: int | None = None) -> AsyncIterator[bytes]:
        try:
            file = await asyncio.to_thread(open, self.path(name), "rb")
        except FileNotFoundError:
            raise NotFound(f"{self.path(name)} is missing") from None
        with file:
            async for chunk in _verified(_file_chunks(file), f"{self.path(name)}", sha256, size):
                yield chunk

    async def read_bytes(self, name: str, sha256: str = "") -> bytes:
        return b"".join([chunk async for chunk in self.read(name, sha256)])

    async def touch(self, name: str) -> bool:
        try:
            await asyncio.to_thread(os.utime, self.path(name))
        except FileNotFoundError:
            return False
        return True

    async def delete(self, name: str) -> None:
        await asyncio.to_thread(self.path(name).unlink, True)

    async def entries(self) -> list[BlobInfo]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[BlobInfo]:
        found = []
        for path in self.spool.iterdir():
            if path.name.startswith(TEMP_PREFIX):
                continue
            with contextlib.suppress(FileNotFoundError):  # another writer's eviction took it
                stat = path.stat()
                found.append(BlobInfo(path.name, stat.st_size, stat.st_mtime))
        return found

    def sweep(self, keep: Callable[[str, set[str]], bool]) -> None:
        names = {path.name for path in self.spool.iterdir()}
        for name in names:
            if name.startswith(TEMP_PREFIX) or not keep(name, names):
                self.path(name).unlink(missing_ok=True)


class S3Blobs:
    """Objects `prefix/<name>` in an S3 bucket, through boto3 (in threads: its client is thread-safe).

    Of two writers of one name exactly one succeeds, the other gets AlreadyExists. Only PutObject's
    `If-None-Match: *` is relied on to be atomic: some servers check it on CompleteMultipartUpload apart from
    the write (SeaweedFS 4.x does, and two concurrent completes of one key may both succeed). So a writer first
    claims the name, with a conditional PutObject of a small object `prefix/.claims/<name>` naming it, and
    only the claim's holder writes the object (itself conditional, so a name already stored is never
    replaced), then removes the claim: claims exist only while a write is in progress. A claim older than
    `orphan_grace_s` is a crashed writer's (the time a write is assumed to end within, as for the uploads the
    sweep aborts): a writer takes it over (a PutObject `If-Match` its ETag, so one of two does) and the sweep
    removes it, so no name stays blocked. The loser of a claim gets AlreadyExists at once, though the holder
    may yet fail: the name is then free again, not written. Each object carries its sha256 as metadata. A
    multipart upload that fails is aborted, so no parts are left behind."""

    shared = True

    def __init__(
        self,
        bucket: str,
        prefix: str,
        spool: Path,
        *,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        orphan_grace_s: float = ORPHAN_GRACE_S,
        client: S3Client | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 parts are {MIN_PART_SIZE} bytes at least, not {part_size}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}"
        self.spool = spool
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.orphan_grace_s = orphan_grace_s
        spool.mkdir(parents=True, exist_ok=True)
        if client is None:
            import boto3  # only when an S3 store is asked for

            # Endpoint, region and credentials as the AWS tools read them (AWS_ENDPOINT_URL_S3, AWS_REGION, ...).
            client = boto3.client("s3")
        self._client = client

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def claim_key(self, name: str) -> str:
        """The key of the claim a writer of `name` holds while it writes."""
        return self.key(f"{CLAIMS}/{name}")

    def check(self) -> None:
        """Raises ArchiveStoreUnavailable or FailedPrecondition when the bucket cannot be used."""
        try:
            self._call("HeadBucket", self._client.head_bucket, Bucket=self.bucket)
        except NotFound:
            raise FailedPrecondition(
                f"the archive store {self.location}: bucket {self.bucket!r} does not exist"
            ) from None

    async def put(self, source: Path, name: str, sha256: str) -> None:
        try:
            # The whole upload in one thread: a cancelled caller cannot cut it between a failed part and
            # the abort that must follow.
            await asyncio.to_thread(self._upload, source, name, sha256)
        finally:
            source.unlink(missing_ok=True)

    def _upload(self, source: Path, name: str, sha256: str) -> None:
        key = self.key(name)
        try:
            with self._claimed(name):
                self._upload_once(source, key, sha256)
        except AlreadyExists:
            # A retried request (botocore retries on a dropped connection) finds its own first attempt
            # stored: the same bytes under the name are no conflict.
            if not sha256 or self._stored_sha256(key) != sha256:
                raise

    def _stored_sha256(self, key: str) -> str:
        try:
            head = self._call("HeadObject", self._client.head_object, what=key, Bucket=self.bucket, Key=key)
        except NotFound:
            return ""
        return str(head.get("Metadata", {}).get(SHA256_METADATA, ""))

    @contextlib.contextmanager
    def _claimed(self, name: str) -> Iterator[None]:
        """Holds the claim on `name` for the block, or raises AlreadyExists when another writer holds it."""
        key = self.claim_key(name)
        writer = secrets.token_hex(16)  # also the claim's body: its ETag tells one claim from another
        self._claim(name, writer)
        try:
            yield
        finally:
            # Best effort: a claim left behind is taken over, and swept, once older than orphan_grace_s.
            with contextlib.suppress(Exception):
                self._client.delete_object(Bucket=self.bucket, Key=key)

    def _claim(self, name: str, writer: str) -> None:
        key = self.claim_key(name)

        def put(**condition: str) -> None:
            self._call(
                "PutObject", self._client.put_object, what=key,
                Bucket=self.bucket, Key=key, Body=writer.encode(), Metadata={CLAIM_METADATA: writer}, **condition,
            )  # fmt: skip

        for _ in range(CLAIM_ATTEMPTS):
            try:
                put(IfNoneMatch="*")
                return
            except AlreadyExists:
                pass
            try:
                head = self._call("HeadObject", self._client.head_object, what=key, Bucket=self.bucket, Key=key)
            except NotFound:
                continue  # its holder is done with it: try again
            if head.get("Metadata", {}).get(CLAIM_METADATA) == writer:
                return  # our own claim: botocore retried a request whose answer was lost
            if head["LastModified"].timestamp() >= time.time() - self.orphan_grace_s:
                break
            # A crashed writer's: of two writers taking it over, the If-Match of one fails.
            with contextlib.suppress(AlreadyExists, NotFound):
                put(IfMatch=head["ETag"])
                return
        raise AlreadyExists(
            f"s3://{self.bucket}/{self.key(name)} exists already (or another writer is storing it): not replaced"
        )

    def _upload_once(self, source: Path, key: str, sha256: str) -> None:
        metadata = {SHA256_METADATA: sha256} if sha256 else {}
        size = source.stat().st_size
        with open(source, "rb") as file:
            if size <= self.multipart_threshold:
                self._call(
                    "PutObject", self._client.put_object, what=key,
                    Bucket=self.bucket, Key=key, Body=file, Metadata=metadata, IfNoneMatch="*",
                )  # fmt: skip
                return
            upload = self._call(
                "CreateMultipartUpload", self._client.create_multipart_upload,
                Bucket=self.bucket, Key=key, Metadata=metadata,
            )["UploadId"]  # fmt: skip
            try:
                parts: list[CompletedPartTypeDef] = []
                # One part in memory at a time, whatever the archive's size.
                while part := file.read(self.part_size):
                    number = len(parts) + 1
                    answer = self._call(
                        "UploadPart", self._client.upload_part,
                        Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number, Body=part,
                    )  # fmt: skip
                    parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                self._call(
                    "CompleteMultipartUpload", self._client.complete_multipart_upload, what=key,
                    Bucket=self.bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}, IfNoneMatch="*",
                )  # fmt: skip
            except BaseException:
                # Best effort: should the abort fail too, the next sweep aborts the upload.
                with contextlib.suppress(Exception):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
                raise

    async def read(self, name: str, sha256: str = "", size: int | None = None) -> AsyncIterator[bytes]:
        key = self.key(name)
        answer = await asyncio.to_thread(
            self._call, "GetObject", self._client.get_object, what=key, Bucket=self.bucket, Key=key
        )
        body = answer["Body"]
        try:
            recorded = answer.get("Metadata", {}).get(SHA256_METADATA, "")
            if sha256 and recorded and recorded != sha256:
                raise ChecksumMismatch(
                    f"{self.location}/{name} carries sha256 {recorded}, not the recorded {sha256}: refused"
                )
            if size is not None and answer["ContentLength"] != size:
                raise ChecksumMismatch(
                    f"{self.location}/{name} is {answer['ContentLength']} bytes, not the recorded {size}: refused"
                )
            chunks = _thread_chunks(lambda: body.read(CHUNK_SIZE), f"reading {self.location}/{name}")
            async for chunk in _verified(chunks, f"{self.location}/{name}", sha256 or recorded, size):
                yield chunk
        finally:
            body.close()

    async def read_bytes(self, name: str, sha256: str = "") -> bytes:
        return b"".join([chunk async for chunk in self.read(name, sha256)])

    async def touch(self, name: str) -> bool:
        # S3 has no cheap way to mark an object used (a copy onto itself rewrites it): eviction there goes
        # by when an entry was written.
        key = self.key(name)
        try:
            await asyncio.to_thread(
                self._call, "HeadObject", self._client.head_object, what=key, Bucket=self.bucket, Key=key
            )
        except NotFound:
            return False
        return True

    async def delete(self, name: str) -> None:
        key = self.key(name)
        await asyncio.to_thread(self._call, "DeleteObject", self._client.delete_object, Bucket=self.bucket, Key=key)

    async def entries(self) -> list[BlobInfo]:
        return await asyncio.to_thread(self._list)

    def _list(self) -> list[BlobInfo]:
        found = []
        paginator = self._client.get_paginator("list_objects_v2")

        def pages() -> list[Any]:
            return list(paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/"))

        for page in self._call("ListObjectsV2", pages):
            for item in page.get("Contents", []):
                name = item["Key"].removeprefix(f"{self.prefix}/")
                if "/" not in name:
                    found.append(BlobInfo(name, item["Size"], item["LastModified"].timestamp()))
        return found

    def _claims(self) -> list[tuple[str, str, float]]:
        """The claims under the prefix: (key, ETag, written)."""
        paginator = self._client.get_paginator("list_objects_v2")

        def pages() -> list[Any]:
            return list(paginator.paginate(Bucket=self.bucket, Prefix=self.claim_key("")))

        return [
            (item["Key"], item["ETag"], item["LastModified"].timestamp())
            for page in self._call("ListObjectsV2", pages)
            for item in page.get("Contents", [])
        ]

    def uploads(self) -> list[tuple[str, str, float]]:
        """The multipart uploads in progress under the prefix: (name, upload id, started)."""
        answer = self._call(
            "ListMultipartUploads", self._client.list_multipart_uploads, Bucket=self.bucket, Prefix=f"{self.prefix}/"
        )
        return [
            (u["Key"].removeprefix(f"{self.prefix}/"), u["UploadId"], u["Initiated"].timestamp())
            for u in answer.get("Uploads", [])
        ]

    def sweep(self, keep: Callable[[str, set[str]], bool]) -> None:
        for path in self.spool.glob(f"{TEMP_PREFIX}*"):
            path.unlink(missing_ok=True)
        cutoff = time.time() - self.orphan_grace_s
        for name, upload, started in self.uploads():
            if started < cutoff:
                with contextlib.suppress(NotFound):
                    self._client.abort_multipart_upload(Bucket=self.bucket, Key=self.key(name), UploadId=upload)
        for claim, etag, modified in self._claims():
            if modified < cutoff:  # If-Match: not one a writer has just taken over
                with contextlib.suppress(AlreadyExists, NotFound):
                    self._call("DeleteObject", self._client.delete_object, Bucket=self.bucket, Key=claim, IfMatch=etag)
        blobs = self._list()
        names = {blob.name for blob in blobs}
        for blob in blobs:
            if blob.modified < cutoff and not keep(blob.name, names):
                self._call("DeleteObject", self._client.delete_object, Bucket=self.bucket, Key=self.key(blob.name))

    def _call(self, operation: str, function: Callable[..., Any], /, what: str = "", **kwargs: Any) -> Any:
        """`function(**kwargs)`, its failures as domain errors naming the store."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"s3://{self.bucket}/{what}" if what else self.location
        try:
            return function(**kwargs)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            # 409 ConditionalRequestConflict (AWS): another conditional write of the key was in flight.
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status == 412:
                raise AlreadyExists(f"{where} exists already (written by another writer): not replaced") from None
            if code in ("NoSuchKey", "NoSuchUpload", "404") or (status == 404 and code != "NoSuchBucket"):
                raise NotFound(f"{where} is missing") from None
            if code in ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise FailedPrecondition(f"the archive store {self.location} refused {operation}: {code}") from None
            raise ArchiveStoreUnavailable(f"the archive store {self.location} failed {operation}: {error}") from None
        except NoCredentialsError:
            raise FailedPrecondition(
                f"the archive store {self.location} needs credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except BotoCoreError as error:  # the endpoint is unreachable, a connection dropped
            raise ArchiveStoreUnavailable(f"the archive store {self.location} is unreachable: {error}") from None


async def _verified(chunks: AsyncIterator[bytes], where: str, sha256: str, size: int | None) -> AsyncIterator[bytes]:
    """`chunks`, each held back until the next arrives: the last one is given only once the whole
    matches `sha256` and `size` (when given), else ChecksumMismatch is raised in its place."""
    digest = hashlib.sha256()
    total = 0
    held: bytes | None = None
    async for chunk in chunks:
        digest.update(chunk)
        total += len(chunk)
        if held is not None:
            yield held
        held = chunk
    if size is not None and total != size:
        raise ChecksumMismatch(f"{where} is {total} bytes, not the recorded {size}: refused")
    if sha256 and digest.hexdigest() != sha256.lower():
        raise ChecksumMismatch(f"{where} hashes to sha256 {digest.hexdigest()}, not the recorded {sha256}: refused")
    if held is not None:
        yield held


async def _file_chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    while chunk := await asyncio.to_thread(file.read, CHUNK_SIZE):
        yield chunk


async def _thread_chunks(read: Callable[[], bytes], doing: str) -> AsyncIterator[bytes]:
    """What `read()` returns, called in a thread, until it returns b""; a dropped connection raises
    ArchiveStoreUnavailable."""
    from botocore.exceptions import BotoCoreError

    while True:
        try:
            chunk = await asyncio.to_thread(read)
        except (BotoCoreError, OSError) as error:
            raise ArchiveStoreUnavailable(f"{doing}: {error}") from None
        if not chunk:
            return
        yield chunk
