"""AgentClient against a real in-process agent: health, commands and their output lines, named processes,
archives both ways, and the agent's errors as the orchestrator's domain errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import socket
import tarfile
import time
from collections.abc import AsyncIterator

import pytest

from orchestrator.agent_client import MAX_LINE_BYTES, AgentClient, _LineSplitter
from orchestrator.errors import ChecksumMismatch, FailedPrecondition, InvalidArgument, LimitExceeded, NotFound
from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb


@pytest.fixture
async def client(agent: AgentTarget) -> AsyncIterator[AgentClient]:
    client = AgentClient(agent.address, agent.token)
    yield client
    await client.close()


def make_tar_gz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


class Lines:
    def __init__(self) -> None:
        self.stdout: list[str] = []
        self.stderr: list[str] = []

    def __call__(self, text: str, is_stderr: bool) -> None:
        (self.stderr if is_stderr else self.stdout).append(text)


async def test_wait_healthy_returns_for_a_serving_agent(client: AgentClient) -> None:
    await client.wait_healthy(timeout=5)


async def test_wait_healthy_gives_up_on_a_port_nobody_listens_on() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    client = AgentClient(address, "token")
    started = time.monotonic()
    with pytest.raises(FailedPrecondition, match="not healthy within 1 s"):
        await client.wait_healthy(timeout=1)
    assert time.monotonic() - started < 3
    await client.close()


async def test_a_wrong_token_is_a_failed_precondition(agent: AgentTarget) -> None:
    client = AgentClient(agent.address, "not-the-token")
    with pytest.raises(FailedPrecondition, match="UNAUTHENTICATED"):
        await client.activity()
    await client.close()


async def test_run_reports_lines_per_stream_and_the_exit_code(client: AgentClient) -> None:
    lines = Lines()
    code = await client.run("printf 'one\\ntwo\\n'; echo oops >&2; printf 'no newline'; exit 3", on_line=lines)
    assert code == 3
    assert lines.stdout == ["one", "two", "no newline"]
    assert lines.stderr == ["oops"]


async def test_run_passes_env_and_cwd(client: AgentClient, agent: AgentTarget) -> None:
    (agent.root / "sub").mkdir()
    lines = Lines()
    assert (
        await client.run('echo "$GREETING from $(basename "$PWD")"', env={"GREETING": "hi"}, cwd="sub", on_line=lines)
        == 0
    )
    assert lines.stdout == ["hi from sub"]


async def test_run_past_its_timeout_raises_limit_exceeded(client: AgentClient) -> None:
    with pytest.raises(LimitExceeded, match="timeout"):
        await client.run("sleep 30", timeout=0.5, on_line=Lines())


async def test_run_in_a_missing_directory_is_refused(client: AgentClient) -> None:
    with pytest.raises((InvalidArgument, NotFound)):
        await client.run("true", cwd="no/such/dir", on_line=Lines())


async def test_named_process_runs_on_after_start_and_is_followed_and_stopped(client: AgentClient) -> None:
    pid = await client.start_process("dev", "echo ready; exec sleep 30")
    assert pid > 0
    lines = Lines()
    following = asyncio.create_task(client.process_lines("dev", lines))
    while lines.stdout != ["ready"]:
        await asyncio.sleep(0.02)
    stopped = await client.stop_process("dev", grace=1)
    assert stopped == -1  # killed by SIGTERM, not exited by itself
    assert await asyncio.wait_for(following, 5) == stopped
    # Attaching after the exit replays the buffered output and the exit.
    replayed = Lines()
    assert await client.process_lines("dev", replayed) == stopped
    assert replayed.stdout == ["ready"]


async def test_unknown_named_process_is_not_found(client: AgentClient) -> None:
    with pytest.raises(NotFound):
        await client.stop_process("nope")


async def test_extract_archive_puts_the_files_on_disk(client: AgentClient, agent: AgentTarget) -> None:
    archive = make_tar_gz({"package.json": b"{}\n", "src/index.js": b"console.log(1)\n"})
    result = await client.extract_archive(chunked(archive, 7), hashlib.sha256(archive).hexdigest())
    assert result.files == 2
    assert (agent.root / "src" / "index.js").read_bytes() == b"console.log(1)\n"


async def test_extract_archive_with_a_wrong_checksum_changes_nothing(client: AgentClient, agent: AgentTarget) -> None:
    (agent.root / "keep.txt").write_text("kept")
    archive = make_tar_gz({"new.txt": b"new"})
    with pytest.raises(ChecksumMismatch):
        await client.extract_archive(chunked(archive, 1024), "0" * 64)
    assert sorted(p.name for p in agent.root.iterdir()) == ["keep.txt"]


async def test_create_archive_streams_the_workspace_and_checks_the_summary(
    client: AgentClient, agent: AgentTarget
) -> None:
    (agent.root / "src").mkdir()
    (agent.root / "src" / "app.js").write_bytes(b"app")
    (agent.root / "node_modules").mkdir()
    (agent.root / "node_modules" / "dep.js").write_bytes(b"dep")
    (agent.root / "debug.log").write_bytes(b"log")

    stream = await client.create_archive(["*.log"])
    data = b"".join([chunk async for chunk in stream])

    assert stream.summary is not None
    assert stream.summary.sha256 == hashlib.sha256(data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        names = {name.removeprefix("./") for name in tar.getnames()}
    assert "src/app.js" in names
    assert not {"node_modules/dep.js", "debug.log"} & names


async def test_activity_reports_when_the_agent_started(client: AgentClient) -> None:
    activity = await client.activity()
    assert 0 < time.time() - activity.started_at.seconds < 600


def split(chunks: list[bytes]) -> list[str]:
    lines: list[str] = []
    splitter = _LineSplitter(lines.append)
    for chunk in chunks:
        splitter.feed(chunk)
    splitter.close()
    return lines


def test_lines_are_joined_across_chunks_and_decoded_with_replacement() -> None:
    euro = "€".encode()
    assert split([b"ab", b"c\nd", euro[:1], euro[1:] + b"\r\n", b"\xff\n"]) == ["abc", "d€", "\ufffd"]


def test_an_overlong_line_is_cut_and_the_next_line_is_whole() -> None:
    lines = split([b"x" * (MAX_LINE_BYTES - 1), "é".encode() * 10, b"\nnext\n"])
    assert lines[0] == "x" * (MAX_LINE_BYTES - 1) + "…"
    assert lines[1] == "next"


async def test_exec_events_stream_a_commands_output_and_its_exit(client: AgentClient) -> None:
    events = [event async for event in client.exec_events(["sh", "-c", "echo out; echo err >&2; kill -TERM $$"])]

    output = {(e.output.stream, e.output.data) for e in events if e.HasField("output")}
    assert output == {(pb.OUTPUT_STREAM_STDOUT, b"out\n"), (pb.OUTPUT_STREAM_STDERR, b"err\n")}
    assert events[-1].exited.signal == 15


async def test_edit_read_and_search_a_file(client: AgentClient, agent: AgentTarget) -> None:
    write = pb.EditOperation(write=pb.WriteFile(path="notes.txt", content=b"one\ntwo\n"))
    await client.edit([write])
    replace = pb.EditOperation(
        replace=pb.ReplaceText(path="notes.txt", old_text="two", new_text="three", expected_occurrences=1)
    )

    dry = await client.edit([replace], dry_run=True)
    assert "-two\n+three\n" in dry.diff and (agent.root / "notes.txt").read_bytes() == b"one\ntwo\n"
    await client.edit([replace])
    assert b"".join([chunk async for chunk in client.read("notes.txt")]) == b"one\nthree\n"
    with pytest.raises(FailedPrecondition):
        await client.edit([replace])  # "two" is gone
    responses = [r async for r in client.search(pb.SearchRequest(pattern="three"))]
    matches = [(hit.match.path, hit.match.line_number) for r in responses for hit in r.hits]
    assert matches == [("notes.txt", 2)] and responses[-1].summary.results == 1


async def test_attach_follows_a_process_until_the_caller_stops(client: AgentClient) -> None:
    await client.start_process("ticker", "echo first; exec sleep 30")
    async with contextlib.aclosing(client.attach("ticker")) as events:
        async for event in events:
            if event.HasField("output"):
                assert event.output.data == b"first\n"
                break

    # Following stopped; the process did not.
    async with contextlib.aclosing(client.attach("ticker")) as events:
        attached = (await anext(events)).attached
    assert attached.process.running
    assert await client.stop_process("ticker", grace=0.1) == -1
