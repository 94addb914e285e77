"""Path confinement under races: a directory swapped for a symlink to the outside, in a loop, while calls
run. No call may read outside content, write outside the root, or run a command outside it."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc import aio

from agent.fs import paths
from tests.agent.test_edit import replace, write
from tests.conftest import AgentTarget
from tests.docker_support import hand_over_to_workspace_user
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

INSIDE = b"inside\n"
OUTSIDE = b"OUTSIDE\n"
CALLS = 150
# What a call caught mid-swap may answer: the directory missing, a link where none may be, or refused.
RACE_CODES = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.INVALID_ARGUMENT,
}


@contextmanager
def swapping(root: Path, outside: str) -> Iterator[None]:
    """Swaps `root/inside` for a symlink to `outside` and back, as fast as it can, until the block ends."""
    stop = threading.Event()
    swaps = 0

    failures: list[BaseException] = []

    def clear_then(step) -> None:
        # A call may rightly create `inside/` while it is missing (edits and extractions make
        # parents): that one is removed, as often as it takes, before the next step of the swap.
        while True:
            if os.path.isdir(root / "inside") and not os.path.islink(root / "inside"):
                shutil.rmtree(root / "inside", ignore_errors=True)
            try:
                return step()
            except (FileExistsError, OSError) as error:
                if isinstance(error, FileExistsError) or error.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue
                raise

    def loop() -> None:
        nonlocal swaps
        try:
            while not stop.is_set():
                os.rename(root / "inside", root / "inside.real")
                clear_then(lambda: os.symlink(outside, root / "inside"))
                os.unlink(root / "inside")
                clear_then(lambda: os.rename(root / "inside.real", root / "inside"))
                swaps += 1
                time.sleep(0.002)  # pacing, not a wait: leaves calls room to complete between swaps
        except BaseException as error:  # noqa: BLE001 - reported by the test
            failures.append(error)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert swaps > 0


@pytest.fixture
def race(agent: AgentTarget, tmp_path: Path) -> tuple[AgentTarget, str, Path | None]:
    """The workspace with `inside/data.txt`; the outside directory the symlink points to (a host
    directory with its own data.txt for the in-process agent; /etc in a container, where the agent
    cannot see the host), and that host directory if writes there can be checked."""
    (agent.root / "inside").mkdir()
    (agent.root / "inside" / "data.txt").write_bytes(INSIDE)
    if agent.kind == "inprocess":
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "data.txt").write_bytes(OUTSIDE)
        return agent, str(outside), outside
    hand_over_to_workspace_user(agent.root)
    return agent, "/etc", None


def plain_stub(agent: AgentTarget) -> tuple[aio.Channel, agent_pb2_grpc.AgentServiceAsyncStub]:
    # Without the container target's hand-over interceptor, which walks the tree the swap is changing.
    channel = aio.insecure_channel(agent.address)
    return channel, agent_pb2_grpc.AgentServiceStub(channel)


async def test_reads_and_edits_never_escape_through_a_swapped_directory(race) -> None:
    await _reads_and_edits_in_a_race(*race)


@pytest.mark.inprocess_only("switches the agent in this process to its fallback for kernels without openat2")
async def test_without_openat2_the_component_walk_never_escapes_either(race, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "openat2_available", False)
    await _reads_and_edits_in_a_race(*race)


async def _reads_and_edits_in_a_race(agent: AgentTarget, outside: str, host_outside: Path | None) -> None:
    channel, stub = plain_stub(agent)
    reads = writes = 0
    try:
        with swapping(agent.root, outside):
            for i in range(CALLS):
                try:
                    chunks = [
                        r.chunk.data
                        async for r in stub.Read(pb.ReadRequest(path="inside/data.txt"), metadata=agent.metadata)
                        if r.HasField("chunk")
                    ]
                    assert b"".join(chunks) == INSIDE
                    reads += 1
                except aio.AioRpcError as error:
                    assert error.code() in RACE_CODES, error.details()
                try:
                    await stub.Edit(
                        pb.EditRequest(
                            operations=[
                                write(f"inside/new-{i}.txt", b"x"),
                                replace("inside/data.txt", "inside", "inside"),
                            ]
                        ),
                        metadata=agent.metadata,
                    )
                    writes += 1
                except aio.AioRpcError as error:
                    assert error.code() in RACE_CODES, error.details()
    finally:
        await channel.close()
    assert reads and writes  # the calls did run between swaps
    assert (agent.root / "inside" / "data.txt").read_bytes() == INSIDE
    if host_outside is not None:
        assert sorted(os.listdir(host_outside)) == ["data.txt"]
        assert (host_outside / "data.txt").read_bytes() == OUTSIDE
    assert not (agent.root / ".workspace-agent").exists()


async def test_search_exec_and_archives_never_escape_through_a_swapped_directory(race) -> None:
    agent, outside, host_outside = race
    channel, stub = plain_stub(agent)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo("extracted.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"x\n"))
    ran = 0
    try:
        with swapping(agent.root, outside):
            for _ in range(CALLS // 3):
                try:
                    responses = [
                        r
                        async for r in stub.Search(
                            pb.SearchRequest(path="inside", pattern="OUTSIDE"), metadata=agent.metadata
                        )
                    ]
                    assert not [h for r in responses for h in r.hits]
                    ran += 1
                except aio.AioRpcError as error:
                    assert error.code() in RACE_CODES, error.details()
                try:
                    output = b""
                    call = stub.Exec(
                        iter([pb.ExecRequest(start=pb.ExecStart(argv=["cat", "data.txt"], cwd="inside"))]),
                        metadata=agent.metadata,
                    )
                    async for event in call:
                        if event.HasField("output"):
                            output += event.output.data
                    # Run in the directory itself, wherever the swap put it (or in an `inside/` an
                    # extraction rightly made while it was missing, which has no data.txt).
                    assert output == INSIDE or output.startswith(b"cat: data.txt: No such file"), output
                    ran += 1
                except aio.AioRpcError as error:
                    assert error.code() in RACE_CODES, error.details()
                try:
                    async for _ in stub.CreateArchive(pb.CreateArchiveRequest(path="inside"), metadata=agent.metadata):
                        pass
                    ran += 1
                except aio.AioRpcError as error:
                    assert error.code() in RACE_CODES, error.details()
                try:
                    requests = [
                        pb.ExtractArchiveRequest(
                            spec=pb.ExtractArchiveSpec(destination="inside/unpacked", mode=pb.EXTRACT_MODE_MERGE)
                        ),
                        pb.ExtractArchiveRequest(chunk=archive.getvalue()),
                    ]
                    await stub.ExtractArchive(iter(requests), metadata=agent.metadata)
                    ran += 1
                except aio.AioRpcError as error:
                    assert error.code() in RACE_CODES, error.details()
    finally:
        await channel.close()
    assert ran
    if host_outside is not None:
        assert sorted(os.listdir(host_outside)) == ["data.txt"]
