"""One tar policy: every hostile or broken upload is refused by the orchestrator's upload check and by
the agent's extraction alike, with the same words; and what one accepts, the other accepts."""

from __future__ import annotations

import gzip
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from agent import errors as agent_errors
from agent.config import AgentConfig
from agent.fs.extract import ExtractMode, extract_archive
from agent.fs.paths import WorkspaceRoot
from orchestrator import errors as orchestrator_errors
from orchestrator.archives import ArchiveOrigin, ArchiveStore
from orchestrator.store import Store
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

UPLOAD = ArchiveOrigin(name="upload", source=pb.ARCHIVE_SOURCE_UPLOADED, template="node-basic")


def entry(
    name: str,
    content: bytes | None = b"data",
    *,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
    mode: int = 0o644,
    size: int | None = None,
) -> bytes:
    """One member's header and padded content, however unsafe."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, 1_700_000_000
    data = content if kind == tarfile.REGTYPE and content is not None else b""
    info.size = len(data) if size is None else size
    return info.tobuf(tarfile.USTAR_FORMAT) + data + bytes(-len(data) % 512)


def pax(records: bytes) -> bytes:
    """A pax extended header carrying exactly `records`, well-formed or not."""
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + bytes(-len(records) % 512)


def record(key: str, value: str) -> bytes:
    """A well-formed pax record: its length counts itself."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def tgz(*parts: bytes) -> bytes:
    return gzip.compress(b"".join(parts) + bytes(1024), mtime=0)


GOOD = entry("good.txt", b"fine")

HOSTILE: dict[str, Callable[[], bytes]] = {
    "pax length past its end": lambda: tgz(GOOD, pax(b"99 path=evil\n"), entry("x")),
    "pax length past the header, ending in a newline": lambda: tgz(GOOD, pax(b"30 path=a\n"), entry("x")),
    "pax length not a number": lambda: tgz(GOOD, pax(b"1x path=evil\n"), entry("x")),
    "pax length with a sign": lambda: tgz(GOOD, pax(b"+13 path=evil\n"), entry("x")),
    "pax record without '='": lambda: tgz(GOOD, pax(b"10 pathxx\n"), entry("x")),
    "pax size not a number": lambda: tgz(GOOD, pax(record("size", "0x4")), entry("x")),
    "pax path absolute": lambda: tgz(GOOD, pax(record("path", "/etc/evil")), entry("x")),
    "absolute member": lambda: tgz(GOOD, entry("/etc/evil")),
    "dotdot member": lambda: tgz(GOOD, entry("a/../../evil")),
    "symlink out": lambda: tgz(GOOD, entry("out", kind=tarfile.SYMTYPE, link="../../outside")),
    "absolute symlink": lambda: tgz(GOOD, entry("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")),
    "write through a symlink": lambda: tgz(GOOD, entry("l", kind=tarfile.SYMTYPE, link="."), entry("l/x")),
    "hardlink out": lambda: tgz(GOOD, entry("h", kind=tarfile.LNKTYPE, link="../../etc/passwd")),
    "hardlink to a non-member": lambda: tgz(GOOD, entry("h", kind=tarfile.LNKTYPE, link="etc/passwd")),
    "character device": lambda: tgz(GOOD, entry("null", kind=tarfile.CHRTYPE)),
    "block device": lambda: tgz(GOOD, entry("sda", kind=tarfile.BLKTYPE)),
    "fifo": lambda: tgz(GOOD, entry("pipe", kind=tarfile.FIFOTYPE)),
    "setuid": lambda: tgz(GOOD, entry("tool", mode=0o4755)),
    "setgid": lambda: tgz(GOOD, entry("shared/", kind=tarfile.DIRTYPE, mode=0o2775)),
    "huge size claimed": lambda: tgz(GOOD, entry("big", size=8**11 - 1)),
    "huge size in pax": lambda: tgz(GOOD, pax(record("size", str(10**30))), entry("big")),
    "truncated gzip": lambda: tgz(GOOD, entry("x", bytes(range(256)) * 80))[:-300],
    "trailing garbage": lambda: tgz(GOOD) + b"trailing garbage",
    "not gzip": lambda: b"this is plain text, not an archive",
    "gzip of nothing": lambda: gzip.compress(b"", mtime=0),
    "data after the end marker": lambda: tgz(GOOD, bytes(512), entry("hidden")),
}


async def chunked(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 1000):
        yield data[start : start + 1000]


async def orchestrator_verdict(data: bytes, tmp_path: Path) -> str | None:
    store = Store(tmp_path / "state.sqlite3")
    try:
        await ArchiveStore(tmp_path / "archives", store, max_bytes=1 << 30).write(UPLOAD, chunked(data))
    except (orchestrator_errors.InvalidArgument, orchestrator_errors.LimitExceeded) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        store.close()
    return None


async def agent_verdict(data: bytes, tmp_path: Path) -> str | None:
    root = tmp_path / "workspace"
    root.mkdir(parents=True)
    try:
        await extract_archive(WorkspaceRoot(root), AgentConfig(root=root), "", chunked(data), mode=ExtractMode.REPLACE)
    except (agent_errors.InvalidArgument, agent_errors.LimitExceeded) as error:
        return f"{type(error).__name__}: {error}"
    return None


@pytest.mark.parametrize("case", HOSTILE)
async def test_both_sides_refuse_the_same_hostile_archive_with_the_same_words(case: str, tmp_path: Path) -> None:
    data = HOSTILE[case]()
    orchestrator = await orchestrator_verdict(data, tmp_path / "orchestrator")
    agent = await agent_verdict(data, tmp_path / "agent")
    assert orchestrator is not None, "the orchestrator stored it"
    assert agent is not None, "the agent extracted it"
    assert orchestrator == agent


@pytest.mark.parametrize(
    "data",
    [
        lambda: tgz(
            entry("dir/", kind=tarfile.DIRTYPE, mode=0o755),
            entry("dir/a.txt"),
            entry("link", kind=tarfile.SYMTYPE, link="dir/a.txt"),
        ),
        lambda: tgz(
            entry("shared/", kind=tarfile.DIRTYPE, mode=0o1777), entry("a"), entry("h", kind=tarfile.LNKTYPE, link="a")
        ),
        lambda: tgz(pax(record("path", "p/q.txt")), entry("ignored")),
    ],
    ids=["files, directories and an inner link", "sticky bit and a hardlink", "pax path"],
)
async def test_both_sides_accept_the_same_safe_archive(data: Callable[[], bytes], tmp_path: Path) -> None:
    archive = data()
    assert await orchestrator_verdict(archive, tmp_path / "orchestrator") is None
    assert await agent_verdict(archive, tmp_path / "agent") is None
