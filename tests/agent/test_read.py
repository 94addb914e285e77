"""Read through the gRPC API: metadata, chunking, byte and line ranges, and every refusal."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from common.constants import MiB
from tests.agent.helpers import collect, status_of_stream
from tests.conftest import AgentTarget, start_inprocess_agent
from workspace.agent.v1 import agent_pb2 as pb


@pytest.fixture(params=["whole-file", "streamed"])
async def either_agent(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentTarget]:
    """An agent with the default hashing limit (small files are read whole, in memory), then one
    whose limit is tiny, so that every file takes the large-file path (no sha256, content read in
    blocks by a worker thread)."""
    root = tmp_path / "app"
    root.mkdir()
    overrides = {"hash_limit": 16} if request.param == "streamed" else {}
    server, target = await start_inprocess_agent(root, **overrides)
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


async def read(agent: AgentTarget, **request) -> tuple[pb.FileInfo, list[pb.ReadChunk]]:
    responses = await collect(agent.stub.Read(pb.ReadRequest(**request), metadata=agent.metadata))
    assert responses[0].WhichOneof("event") == "info"
    assert all(r.WhichOneof("event") == "chunk" for r in responses[1:])
    return responses[0].info, [r.chunk for r in responses[1:]]


def joined(chunks: list[pb.ReadChunk]) -> bytes:
    """The chunks' bytes, checking that each chunk's offset follows the one before."""
    for before, after in itertools.pairwise(chunks):
        assert after.offset == before.offset + len(before.data)
    return b"".join(c.data for c in chunks)


async def test_small_file_metadata_then_content(agent: AgentTarget) -> None:
    content = b"hello\nworld\n"
    path = agent.root / "src" / "a.txt"
    path.parent.mkdir()
    path.write_bytes(content)
    path.chmod(0o755)
    os.utime(path, (1_700_000_000, 1_700_000_000.5))

    info, chunks = await read(agent, path="src/a.txt")

    assert info.path == "src/a.txt"
    assert info.size == len(content)
    assert info.mode == 0o755
    assert info.modified.seconds == 1_700_000_000 and info.modified.nanos == 500_000_000
    assert info.sha256 == hashlib.sha256(content).hexdigest()
    assert not info.binary
    assert [(c.offset, c.data) for c in chunks] == [(0, content)]


async def test_binary_content_comes_back_byte_for_byte(agent: AgentTarget) -> None:
    content = bytes(range(256)) * 40
    (agent.root / "blob.bin").write_bytes(content)
    info, chunks = await read(agent, path="blob.bin")
    assert info.binary
    assert joined(chunks) == content


async def test_empty_file_has_info_and_no_chunks(agent: AgentTarget) -> None:
    (agent.root / "empty").write_bytes(b"")
    info, chunks = await read(agent, path="empty")
    assert info.size == 0 and info.sha256 == hashlib.sha256(b"").hexdigest()
    assert chunks == []


async def test_chunk_size_is_honoured_and_capped_at_one_mib(agent: AgentTarget) -> None:
    content = os.urandom(2 * MiB + 100)
    (agent.root / "big.bin").write_bytes(content)

    _, small = await read(agent, path="big.bin", chunk_size=700_000)
    assert [len(c.data) for c in small] == [700_000, 700_000, len(content) - 1_400_000]
    assert joined(small) == content

    _, capped = await read(agent, path="big.bin", chunk_size=8 * MiB)
    assert [len(c.data) for c in capped] == [MiB, MiB, 100]
    assert joined(capped) == content


async def test_file_over_hash_limit_streams_without_sha256(tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    server, agent = await start_inprocess_agent(root, hash_limit=MiB)
    content = os.urandom(3 * MiB) + b"\0"
    (root / "large.bin").write_bytes(content)
    try:
        info, chunks = await read(agent, path="large.bin")
    finally:
        await agent.channel.close()
        await server.stop(None)
    assert info.size == len(content)
    assert info.sha256 == ""
    assert max(len(c.data) for c in chunks) == MiB
    assert joined(chunks) == content


async def test_byte_ranges(either_agent: AgentTarget) -> None:
    agent = either_agent
    content = bytes(range(256)) * 4
    (agent.root / "f.bin").write_bytes(content)
    for offset, length, expected in [
        (0, 10, content[:10]),
        (100, 50, content[100:150]),
        (1000, 0, content[1000:]),  # length 0: to the end
        (1000, 500, content[1000:]),  # past the end: cut there
        (len(content), 5, b""),  # at the end: nothing
    ]:
        info, chunks = await read(agent, path="f.bin", bytes=pb.ByteRange(offset=offset, length=length), chunk_size=64)
        assert info.size == len(content)  # the info always describes the whole file
        assert joined(chunks) == expected
        assert not chunks or chunks[0].offset == offset


@pytest.mark.parametrize(
    "content",
    [b"one\ntwo\r\nthree\n\nfive", b"one\ntwo\nthree\n", b"\n\n\n", b"single line"],
    ids=["no-final-newline", "final-newline", "blank-lines", "one-line"],
)
async def test_line_ranges_keep_terminators(content: bytes, either_agent: AgentTarget) -> None:
    agent = either_agent
    (agent.root / "lines.txt").write_bytes(content)
    lines = content.splitlines(keepends=True)
    for start in range(1, len(lines) + 1):
        for end in [0, *range(start, len(lines) + 3)]:
            _, chunks = await read(agent, path="lines.txt", lines=pb.LineRange(start=start, end=end), chunk_size=3)
            expected = b"".join(lines[start - 1 : end or None])
            assert joined(chunks) == expected, (start, end)
            assert chunks[0].offset == len(b"".join(lines[: start - 1]))


async def test_bad_ranges_are_invalid_argument(either_agent: AgentTarget) -> None:
    agent = either_agent
    (agent.root / "three.txt").write_bytes(b"a\nb\nc\n")
    cases = {
        "past the end of the file": pb.ReadRequest(path="three.txt", bytes=pb.ByteRange(offset=7)),
        "at least 1": pb.ReadRequest(path="three.txt", lines=pb.LineRange(start=0, end=2)),
        "before its start": pb.ReadRequest(path="three.txt", lines=pb.LineRange(start=3, end=2)),
        "the file has 3 lines": pb.ReadRequest(path="three.txt", lines=pb.LineRange(start=4)),
    }
    for message, bad in cases.items():
        code, details = await status_of_stream(agent.stub.Read(bad, metadata=agent.metadata))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message in details


async def test_refusals(agent: AgentTarget, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret")
    (agent.root / "dir").mkdir()
    (agent.root / "escape").symlink_to(tmp_path / "outside.txt")
    os.mkfifo(agent.root / "fifo")
    cases = {
        "missing.txt": (grpc.StatusCode.NOT_FOUND, "no such file"),
        "dir": (grpc.StatusCode.INVALID_ARGUMENT, "is a directory"),
        "": (grpc.StatusCode.INVALID_ARGUMENT, "is a directory"),
        "fifo": (grpc.StatusCode.INVALID_ARGUMENT, "not a regular file"),
        "/etc/passwd": (grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        "../outside.txt": (grpc.StatusCode.INVALID_ARGUMENT, "'..'"),
        "dir/\x00x": (grpc.StatusCode.INVALID_ARGUMENT, "NUL"),
        "escape": (grpc.StatusCode.PERMISSION_DENIED, "outside the workspace root"),
    }
    for path, (code, message) in cases.items():
        got, details = await status_of_stream(agent.stub.Read(pb.ReadRequest(path=path), metadata=agent.metadata))
        assert (got, message in details) == (code, True), (path, got, details)


async def test_symlink_inside_the_root_is_followed(agent: AgentTarget) -> None:
    (agent.root / "target.txt").write_bytes(b"through the link\n")
    (agent.root / "link.txt").symlink_to("target.txt")
    info, chunks = await read(agent, path="link.txt")
    assert info.path == "link.txt"
    assert joined(chunks) == b"through the link\n"
