"""Operating-system errors reach the caller as precise statuses in workspace terms: names too long for the
filesystem, symlink loops, too many links, out-of-range timestamps and very deep paths, through every call
that takes a path; never INTERNAL, never one of the agent's own absolute paths."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import grpc
import pytest
from grpc import aio

from agent.fs.staging import remove_tree
from tests.agent.helpers import snapshot
from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

LONG_NAME = "n" * 300  # past NAME_MAX (255)


async def _status(agent: AgentTarget, call: str, path: str) -> tuple[grpc.StatusCode, str]:
    """What a call on `path` fails with (it must fail), the workspace left unchanged."""
    before = snapshot(agent.root)
    m = agent.metadata
    with pytest.raises(aio.AioRpcError) as error:
        if call == "read":
            [r async for r in agent.stub.Read(pb.ReadRequest(path=path), metadata=m)]
        elif call == "write":
            await agent.stub.Edit(
                pb.EditRequest(operations=[pb.EditOperation(write=pb.WriteFile(path=path, content=b"x"))]), metadata=m
            )
        elif call == "delete":
            await agent.stub.Edit(
                pb.EditRequest(operations=[pb.EditOperation(delete=pb.DeletePath(path=path, recursive=True))]),
                metadata=m,
            )
        elif call == "search":
            [r async for r in agent.stub.Search(pb.SearchRequest(path=path, pattern="x"), metadata=m)]
        elif call == "archive":
            [r async for r in agent.stub.CreateArchive(pb.CreateArchiveRequest(path=path), metadata=m)]
        elif call == "exec":
            [
                r
                async for r in agent.stub.Exec(
                    iter([pb.ExecRequest(start=pb.ExecStart(argv=["true"], cwd=path))]), metadata=m
                )
            ]
        else:
            await agent.stub.ExtractArchive(iter([
                pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination=path)),
                pb.ExtractArchiveRequest(chunk=_targz(tarfile.TarInfo("f"))),
            ]), metadata=m)  # fmt: skip
    assert snapshot(agent.root) == before
    details = error.value.details() or ""
    assert str(agent.root) not in details and agent.root_in_agent + "/" not in details, details
    return error.value.code(), details


def _targz(*infos: tarfile.TarInfo, format: int = tarfile.PAX_FORMAT) -> bytes:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz", format=format) as tar:
        for info in infos:
            tar.addfile(info, io.BytesIO(b"") if info.isreg() else None)
    return data.getvalue()


CALLS = ("read", "write", "delete", "search", "archive", "exec", "extract")


@pytest.mark.parametrize("call", CALLS)
async def test_a_name_longer_than_the_filesystem_allows_is_an_invalid_argument(agent: AgentTarget, call: str) -> None:
    for path in (LONG_NAME, f"src/{LONG_NAME}/x", "d/" * 2100):
        code, details = await _status(agent, call, path)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "longer than the filesystem allows" in details


@pytest.mark.parametrize("call", CALLS)
async def test_a_symlink_loop_is_a_failed_precondition(agent: AgentTarget, call: str) -> None:
    os.symlink("two", agent.root / "one")
    os.symlink("one", agent.root / "two")
    path = "one" if call in ("read", "search", "archive", "exec") else "one/inside"
    code, details = await _status(agent, call, path)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "symbolic link" in details


async def test_out_of_range_archive_timestamps_are_invalid_arguments(agent: AgentTarget) -> None:
    pax = tarfile.TarInfo("pax.txt")
    pax.pax_headers = {"mtime": "1e300"}
    gnu = tarfile.TarInfo("gnu.txt")
    gnu.mtime = 1 << 80  # base-256 in a GNU header
    for data in (_targz(pax), _targz(gnu, format=tarfile.GNU_FORMAT)):
        with pytest.raises(aio.AioRpcError) as error:
            await agent.stub.ExtractArchive(iter([
                pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination="")),
                pb.ExtractArchiveRequest(chunk=data),
            ]), metadata=agent.metadata)  # fmt: skip
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert "modification time out of range" in (error.value.details() or "")
    assert os.listdir(agent.root) == []


def _filesystem(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


async def test_too_many_hard_links_to_one_file_is_a_failed_precondition(agent: AgentTarget) -> None:
    if _filesystem(agent.root) not in ("ext2/ext3", "ext4"):
        pytest.skip(f"the link limit tested is ext4's 65,000; this is {_filesystem(agent.root)}")
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz", format=tarfile.GNU_FORMAT, compresslevel=1) as tar:
        first = tarfile.TarInfo("f")
        tar.addfile(first, io.BytesIO(b""))
        for i in range(65_001):
            link = tarfile.TarInfo(f"l{i}")
            link.type = tarfile.LNKTYPE
            link.linkname = "f"
            tar.addfile(link)
    with pytest.raises(aio.AioRpcError) as error:
        await agent.stub.ExtractArchive(iter([
            pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination="links")),
            *(pb.ExtractArchiveRequest(chunk=data.getvalue()[i : i + (1 << 20)]) for i in range(0, len(data.getvalue()), 1 << 20)),
        ]), metadata=agent.metadata)  # fmt: skip
    details = error.value.details() or ""
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, details
    assert "too many links" in details and "member 'l" in details
    assert str(agent.root) not in details and "/app/" not in details
    assert os.listdir(agent.root) == []


async def test_a_path_deeper_than_the_recursion_limit_works_through_every_call(agent: AgentTarget) -> None:
    deep = "d/" * 1500 + "f.txt"  # 3,005 bytes: within PATH_MAX, 1,500 directories deep
    # A plain channel: the container target's hand-over walks the tree with os.walk, which recurses.
    channel = aio.insecure_channel(agent.address)
    stub, m = agent_pb2_grpc.AgentServiceStub(channel), agent.metadata
    try:
        await stub.Edit(
            pb.EditRequest(operations=[pb.EditOperation(write=pb.WriteFile(path=deep, content=b"deep\n"))]), metadata=m
        )
        chunks = [r.chunk.data async for r in stub.Read(pb.ReadRequest(path=deep), metadata=m) if r.HasField("chunk")]
        assert b"".join(chunks) == b"deep\n"
        hits = [
            h.match.path
            async for r in stub.Search(pb.SearchRequest(path="", pattern="deep"), metadata=m)
            for h in r.hits
        ]
        assert hits == [deep]
        summaries = [
            r.summary
            async for r in stub.CreateArchive(pb.CreateArchiveRequest(path=""), metadata=m)
            if r.HasField("summary")
        ]
        assert (summaries[0].files, summaries[0].directories) == (1, 1500)
        await stub.Edit(
            pb.EditRequest(operations=[pb.EditOperation(delete=pb.DeletePath(path="d", recursive=True))]), metadata=m
        )
        assert os.listdir(agent.root) == []
    finally:
        await channel.close()
        remove_tree(agent.root / "d")  # if left: too deep for pytest's own (recursive) cleanup
