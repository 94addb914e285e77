"""`--archive-store s3://…` through the real gRPC server, against a real S3 server (SeaweedFS): saves,
restores, uploads and deletes go to the bucket, a replaced object is refused, and replicas share the
install cache."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from common.startup import StartupError
from orchestrator.blobs import CLAIMS
from orchestrator.config import OrchestratorConfig
from orchestrator.server import create_server
from tests.conftest import status_of
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    derive_template,
    http_get,
    start_orchestrator,
    stop_all_workspaces,
    watch_until_settled,
)
from tests.orchestrator.test_install_cache import INSTALL_SCRIPT, TEMPLATE, install_note, runs
from tests.orchestrator.test_sessions import BOTH_RUNTIMES, create_ready, write_file
from tests.s3_server import S3Bucket
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

PREFIX = "team/ws"


@pytest.fixture
def orchestrator_config(orchestrator_config: OrchestratorConfig, s3: S3Bucket) -> OrchestratorConfig:
    return dataclasses.replace(orchestrator_config, archive_store=f"s3://{s3.name}/{PREFIX}")


def archive_key(archive: pb.Archive) -> str:
    return f"{PREFIX}/archives/{archive.id}.tar.gz"


@BOTH_RUNTIMES
async def test_a_save_goes_to_the_bucket_and_restores_from_it(
    orchestrator: OrchestratorUnderTest, s3: S3Bucket
) -> None:
    stub = orchestrator.stub
    session = await create_ready(orchestrator, template="node-basic")
    await write_file(session, "src/index.html", b"<h1>kept in S3</h1>")
    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id, name="in s3"))).archive

    assert s3.keys(f"{PREFIX}/archives/") == [archive_key(saved)]
    stored = s3.client.get_object(Bucket=s3.name, Key=archive_key(saved))
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == saved.sha256 == stored["Metadata"]["sha256"]
    # Nothing of it stays in the data dir (the spool directory is empty).
    assert list(orchestrator.config.archives_dir.iterdir()) == []

    await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    restored = await create_ready(orchestrator, archive_id=saved.id)
    assert await http_get(restored.preview_url) == (200, "<h1>kept in S3</h1>")


async def test_a_replaced_object_is_refused_on_restore(orchestrator: OrchestratorUnderTest, s3: S3Bucket) -> None:
    stub = orchestrator.stub
    session = await create_ready(orchestrator, template="node-basic")
    saved = (await stub.SaveSession(pb.SaveSessionRequest(id=session.id))).archive
    await stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    # Another archive, valid and of another workspace, put in its place by a writer that does not ask first.
    other = tar_gz_of({"src/index.html": b"<h1>not what was saved</h1>"})
    s3.client.put_object(Bucket=s3.name, Key=archive_key(saved), Body=other, Metadata={"sha256": saved.sha256})

    created = await stub.CreateSession(pb.CreateSessionRequest(archive_id=saved.id))
    failed = (await watch_until_settled(stub, created.session.id))[-1].session
    assert failed.state == pb.SESSION_STATE_FAILED
    assert failed.failure.phase == pb.PHASE_ARCHIVE_INJECTED
    # Refused by the orchestrator before the agent got all of it (its size, then its sha256, differ from the record).
    assert f"{archive_key(saved)} is {len(other)} bytes, not the recorded {saved.size}" in failed.failure.reason


async def test_uploads_are_listed_and_deleted_in_the_bucket(orchestrator: OrchestratorUnderTest, s3: S3Bucket) -> None:
    data = tar_gz_of({"package.json": b"{}", "src/index.js": b"console.log(1)\n"})

    async def requests() -> AsyncIterator[pb.UploadArchiveRequest]:
        yield pb.UploadArchiveRequest(spec=pb.UploadArchiveSpec(name="imported", template="node-basic"))
        yield pb.UploadArchiveRequest(chunk=data)

    uploaded = (await orchestrator.stub.UploadArchive(requests())).archive
    assert (uploaded.size, uploaded.files) == (len(data), 2)
    assert s3.keys() == [archive_key(uploaded)]
    listed = await orchestrator.stub.ListArchives(pb.ListArchivesRequest())
    assert [a.id for a in listed.archives] == [uploaded.id]

    await orchestrator.stub.DeleteArchive(pb.DeleteArchiveRequest(id=uploaded.id))
    assert s3.keys() == []
    with pytest.raises(aio.AioRpcError) as error:
        await orchestrator.stub.DeleteArchive(pb.DeleteArchiveRequest(id=uploaded.id))
    assert status_of(error.value) == grpc.StatusCode.NOT_FOUND


@pytest.fixture
def install_log(templates: Path, tmp_path: Path) -> Path:
    """The template of tests/orchestrator/test_install_cache.py: its install records "hit" or "miss"."""
    log = tmp_path / "installs.log"
    derive_template(templates, TEMPLATE, install_command="sh install.sh", env={"INSTALL_LOG": str(log)})
    (templates / TEMPLATE / "install.sh").write_text(INSTALL_SCRIPT)
    (templates / TEMPLATE / "package-lock.json").write_text(json.dumps({"lockfileVersion": 3, "packages": {}}))
    return log


async def test_a_second_replica_starts_from_the_first_ones_install_cache_entry(
    orchestrator: OrchestratorUnderTest, s3: S3Bucket, install_log: Path, tmp_path: Path
) -> None:
    first = await create_ready(orchestrator, template=TEMPLATE)
    assert install_note(first).startswith("install cache miss")
    (entry,) = await bucket_entries(s3)
    key = entry.rsplit("/", 1)[1].removesuffix(".tar.gz")
    # Only in the bucket: the spooled copy goes once the upload returns (just after the object appears).
    async with asyncio.timeout(30):
        while list(orchestrator.config.install_cache_dir.iterdir()):
            await asyncio.sleep(0.05)

    # Another orchestrator, with a data dir of its own: only the bucket is shared.
    other_config = dataclasses.replace(
        orchestrator.config, data_dir=tmp_path / "replica-2", instance_id="test-replica-2"
    )
    other = await start_orchestrator(other_config)
    try:
        second = await create_ready(other, template=TEMPLATE)
        assert install_note(second).startswith(f"install cache hit {key[:12]}")
        assert runs(install_log) == ["miss", "hit"]
    finally:
        await other.close()
        await stop_all_workspaces(other_config)


async def test_a_replaced_install_cache_entry_is_discarded_and_written_anew(
    orchestrator: OrchestratorUnderTest, s3: S3Bucket, install_log: Path
) -> None:
    await create_ready(orchestrator, template=TEMPLATE)
    (entry,) = await bucket_entries(s3)
    recorded = s3.client.head_object(Bucket=s3.name, Key=entry)["Metadata"]["sha256"]
    # A valid entry of other content, with the metadata of the one it replaces.
    forged = tar_gz_of({"left-pad/index.js": b'module.exports = "forged";\n'})
    s3.client.put_object(Bucket=s3.name, Key=entry, Body=forged, Metadata={"sha256": recorded})

    session = await create_ready(orchestrator, template=TEMPLATE)
    assert "unusable and is discarded" in install_note(session)
    assert runs(install_log) == ["miss", "miss"]
    # The session's own install is the entry again (its files' times differ), stored with its own checksum.
    await bucket_entries(s3)
    stored = s3.client.get_object(Bucket=s3.name, Key=entry)
    content = stored["Body"].read()
    assert content != forged and hashlib.sha256(content).hexdigest() == stored["Metadata"]["sha256"]


async def bucket_entries(s3: S3Bucket) -> list[str]:
    """The install-cache entries in the bucket, once there is one (they are written in the background, each under
    a claim object of its name until it is complete: those are not entries)."""
    async with asyncio.timeout(30):
        while not (entries := [k for k in s3.keys(f"{PREFIX}/install-cache/") if f"/{CLAIMS}/" not in k]):
            await asyncio.sleep(0.1)
    return entries


async def test_a_missing_bucket_stops_the_start_in_one_line(orchestrator_config: OrchestratorConfig) -> None:
    config = dataclasses.replace(orchestrator_config, archive_store="s3://no-such-bucket-here/x")
    with pytest.raises(StartupError, match=r"s3://no-such-bucket-here/x/archives: bucket .* does not exist"):
        await create_server(config)


def tar_gz_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, content in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return buffer.getvalue()
