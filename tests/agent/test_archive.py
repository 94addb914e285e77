"""ExtractArchive and CreateArchive through the gRPC stub: round trips, modes, and every refusal leaving the workspace as it was."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from agent.fs.staging import remove_tree
from tests.agent.helpers import snapshot, status_of_stream
from tests.conftest import AgentTarget, start_container_agent, start_inprocess_agent
from tests.docker_support import WORKSPACE_UID, hand_over_to_workspace_user
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

STAGING = ".workspace-agent"
UPLOAD_CHUNK = 64 * 1024
REPLACE = pb.EXTRACT_MODE_REPLACE
MERGE = pb.EXTRACT_MODE_MERGE


@pytest.fixture
async def small_agent(tmp_path: Path) -> AsyncIterator[AgentTarget]:
    """An agent with tiny archive limits and chunk size, to reach them cheaply."""
    root = tmp_path / "small"
    root.mkdir()
    server, target = await start_inprocess_agent(
        root, max_archive_bytes=64 * 1024, max_archive_files=20, max_chunk_size=4096
    )
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


def populate(root: Path) -> None:
    """A small workspace: nested sources, an executable, a private file, a link, an empty directory."""
    (root / "src" / "lib").mkdir(parents=True)
    (root / "src" / "index.ts").write_text("export const a = 1;\n")
    (root / "src" / "lib" / "util.ts").write_bytes(b"\x00" + os.urandom(10_000))  # incompressible
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "secret.env").write_text("TOKEN=x\n")
    (root / "secret.env").chmod(0o600)
    (root / "empty").mkdir()
    os.symlink("src/index.ts", root / "main.ts")
    (root / "node_modules" / "dep").mkdir(parents=True)
    (root / "node_modules" / "dep" / "index.js").write_text("module.exports = 1;\n")


def targz(
    *members: tuple[tarfile.TarInfo, bytes | None],
    format: int = tarfile.PAX_FORMAT,
    pax_headers: dict[str, str] | None = None,
) -> bytes:
    """A tar.gz of exactly these members, however unsafe: the archives a hostile client could send."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=format, pax_headers=pax_headers) as tar:
        for info, content in members:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def member(
    name: str, content: bytes | None = b"data", *, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = mode
    info.mtime = 1_700_000_000
    return info, content if kind == tarfile.REGTYPE else None


def upload(
    data: bytes, destination: str = "", mode: int = REPLACE, expected_sha256: str = ""
) -> AsyncIterator[pb.ExtractArchiveRequest]:
    async def requests() -> AsyncIterator[pb.ExtractArchiveRequest]:
        spec = pb.ExtractArchiveSpec(destination=destination, mode=mode, expected_sha256=expected_sha256)
        yield pb.ExtractArchiveRequest(spec=spec)
        for start in range(0, len(data), UPLOAD_CHUNK):
            yield pb.ExtractArchiveRequest(chunk=data[start : start + UPLOAD_CHUNK])

    return requests()


async def extract(
    agent: AgentTarget, data: bytes, destination: str = "", mode: int = REPLACE, expected_sha256: str = ""
) -> pb.ExtractArchiveResponse:
    return await agent.stub.ExtractArchive(upload(data, destination, mode, expected_sha256), metadata=agent.metadata)


async def create(agent: AgentTarget, path: str = "", **options: object) -> tuple[bytes, pb.ArchiveSummary, list[bytes]]:
    chunks: list[bytes] = []
    summary = None
    async for response in agent.stub.CreateArchive(
        pb.CreateArchiveRequest(path=path, **options), metadata=agent.metadata
    ):
        assert summary is None, "the summary must be the last message"
        if response.WhichOneof("event") == "chunk":
            chunks.append(response.chunk)
        else:
            summary = response.summary
    assert summary is not None
    return b"".join(chunks), summary, chunks


def member_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


# ---------------------------------------------------------------- round trips


async def test_round_trip_keeps_content_modes_links_and_mtimes(agent: AgentTarget) -> None:
    populate(agent.root)
    os.utime(agent.root / "run.sh", (1_600_000_000, 1_600_000_000))
    expected = {name: entry for name, entry in snapshot(agent.root).items() if not name.startswith("node_modules")}

    data, summary, _ = await create(agent)
    assert hashlib.sha256(data).hexdigest() == summary.sha256 and summary.size == len(data)
    assert (summary.files, summary.directories, summary.symlinks) == (4, 3, 1)

    report = await extract(agent, data, "copy", expected_sha256=summary.sha256)
    assert snapshot(agent.root / "copy") == expected
    assert (agent.root / "copy" / "run.sh").stat().st_mtime == 1_600_000_000
    assert (report.files, report.directories, report.symlinks) == (4, 3, 1)
    assert report.sha256 == summary.sha256
    assert report.bytes_extracted == sum(len(entry[2]) for entry in expected.values() if entry[0] == "file")
    assert not (agent.root / STAGING).exists()


async def test_same_tree_gives_identical_archives_in_bounded_chunks(small_agent: AgentTarget) -> None:
    populate(small_agent.root)
    first, summary, chunks = await create(small_agent)
    second, again, _ = await create(small_agent)
    assert first == second and summary.sha256 == again.sha256
    assert len(chunks) > 1 and all(len(chunk) <= 4096 for chunk in chunks)
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        "empty",
        "main.ts",
        "run.sh",
        "secret.env",
        "src",
        "src/index.ts",
        "src/lib",
        "src/lib/util.ts",
    ]
    assert {(m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, "", "")}
    assert next(m for m in members if m.name == "main.ts").linkname == "src/index.ts"


async def test_empty_directory_round_trips(agent: AgentTarget) -> None:
    (agent.root / "empty").mkdir()
    data, summary, _ = await create(agent, "empty")
    report = await extract(agent, data, "restored")
    assert (summary.files, report.files) == (0, 0)
    assert (agent.root / "restored").is_dir() and not any((agent.root / "restored").iterdir())


async def test_exclusions_default_custom_and_staging(agent: AgentTarget) -> None:
    populate(agent.root)
    (agent.root / "debug.log").write_text("log")
    (agent.root / STAGING).mkdir()
    (agent.root / STAGING / "leftover").write_text("agent's own")

    default, _, _ = await create(agent)
    assert not any(name.startswith(("node_modules", STAGING)) for name in member_names(default))
    assert "debug.log" in member_names(default)

    everything, _, _ = await create(agent, no_default_excludes=True)
    assert "node_modules/dep/index.js" in member_names(everything)
    assert not any(name.startswith(STAGING) for name in member_names(everything))

    custom, _, _ = await create(agent, excludes=["*.log", "src/lib/"])
    names = member_names(custom)
    assert "debug.log" not in names and "src/lib" not in names and "src/index.ts" in names


# ---------------------------------------------------------------- modes


async def test_replace_leaves_exactly_the_archive_and_merge_keeps_the_rest(agent: AgentTarget) -> None:
    site = agent.root / "site"
    site.mkdir()
    (site / "old.txt").write_text("old")
    (site / "shared.txt").write_text("before")
    archive = targz(member("shared.txt", b"after"), member("new/page.html", b"<p>"))

    await extract(agent, archive, "site", MERGE)
    assert snapshot(site) == {
        "old.txt": ("file", 0o644, b"old"),
        "shared.txt": ("file", 0o644, b"after"),
        "new": ("dir", 0o755, None),
        "new/page.html": ("file", 0o644, b"<p>"),
    }

    await extract(agent, archive, "site", REPLACE)
    assert snapshot(site) == {
        "shared.txt": ("file", 0o644, b"after"),
        "new": ("dir", 0o755, None),
        "new/page.html": ("file", 0o644, b"<p>"),
    }


async def test_missing_destination_is_created_with_its_parents(agent: AgentTarget) -> None:
    await extract(agent, targz(member("a.txt", b"a")), "deploy/v1/site")
    assert snapshot(agent.root) == {
        "deploy": ("dir", 0o755, None),
        "deploy/v1": ("dir", 0o755, None),
        "deploy/v1/site": ("dir", 0o755, None),
        "deploy/v1/site/a.txt": ("file", 0o644, b"a"),
    }


async def test_merge_replaces_a_file_with_a_directory_of_the_same_name(agent: AgentTarget) -> None:
    (agent.root / "docs").write_text("was a file")
    (agent.root / "keep.txt").write_text("keep")
    await extract(agent, targz(member("docs/readme.md", b"# hi")), "", MERGE)
    assert snapshot(agent.root) == {
        "docs": ("dir", 0o755, None),
        "docs/readme.md": ("file", 0o644, b"# hi"),
        "keep.txt": ("file", 0o644, b"keep"),
    }


async def test_replace_of_the_root_itself(agent: AgentTarget) -> None:
    populate(agent.root)
    archive = targz(member("fresh/a.txt", b"a"), member("b.txt", b"b", mode=0o600))
    report = await extract(agent, archive)
    assert snapshot(agent.root) == {
        "fresh": ("dir", 0o755, None),
        "fresh/a.txt": ("file", 0o644, b"a"),
        "b.txt": ("file", 0o600, b"b"),
    }
    assert (report.files, report.directories) == (2, 1)


async def test_read_only_directories_are_extracted_merged_and_replaced(agent: AgentTarget) -> None:
    # As the workspace user (the container variant), moving entries into, out of, or away with a
    # read-only directory, and deleting one, each need write permission lent for the moment.
    def locked(*files: str) -> bytes:
        return targz(
            member(".", None, kind=tarfile.DIRTYPE, mode=0o555),
            member("ro", None, kind=tarfile.DIRTYPE, mode=0o555),
            *(member(f"ro/{name}", name.encode(), mode=0o444) for name in files),
        )

    await extract(agent, locked("a.txt"))
    assert snapshot(agent.root) == {"ro": ("dir", 0o555, None), "ro/a.txt": ("file", 0o444, b"a.txt")}

    await extract(agent, locked("b.txt"), mode=MERGE)
    assert snapshot(agent.root) == {
        "ro": ("dir", 0o555, None),
        "ro/a.txt": ("file", 0o444, b"a.txt"),
        "ro/b.txt": ("file", 0o444, b"b.txt"),
    }

    await extract(agent, targz(member("new.txt", b"n")))
    assert snapshot(agent.root) == {"new.txt": ("file", 0o644, b"n")}
    assert not (agent.root / STAGING).exists()


@pytest.fixture
def immutable(tmp_path: Path):
    """Makes a path immutable (`chattr +i`: not even root may rename it) until the test ends."""
    made: list[Path] = []

    def make(path: Path) -> None:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (needs root and ext4 or similar)")
        made.append(path)

    yield make
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.inprocess_only("the container harness hands files over with chown, which an immutable directory refuses")
async def test_a_swap_failing_part_way_is_rolled_back(agent: AgentTarget, immutable: Callable[[Path], None]) -> None:
    (agent.root / "a.txt").write_text("moved aside first")
    (agent.root / "z").mkdir()
    (agent.root / "z" / "kept").write_text("kept")
    immutable(agent.root / "z")
    before = snapshot(agent.root)
    # REPLACE moves `a.txt` aside, then cannot move `z`: everything must go back.
    await assert_refused(
        agent,
        upload(targz(member("new.txt", b"n"))),
        grpc.StatusCode.FAILED_PRECONDITION,
        "the destination was restored",
    )
    assert snapshot(agent.root) == before


async def test_the_sticky_bit_is_stripped_and_counted(agent: AgentTarget) -> None:
    archive = targz(member("tool", b"#!/bin/sh", mode=0o755), member("shared", None, kind=tarfile.DIRTYPE, mode=0o1777))
    report = await extract(agent, archive)
    assert report.stripped_special_bits == 1
    assert snapshot(agent.root) == {"tool": ("file", 0o755, b"#!/bin/sh"), "shared": ("dir", 0o777, None)}


async def test_gnu_and_pax_names_hardlinks_and_global_headers(agent: AgentTarget) -> None:
    deep = "/".join(["directory-with-a-long-name"] * 6) + "/file.txt"
    # GNU tar writes long names as ././@LongLink members; `git archive` starts with a pax global header.
    gnu = targz(
        member(deep, b"deep"),
        member("caf\u00e9/\u6587\u4ef6.txt", b"unicode"),
        member("same", kind=tarfile.LNKTYPE, link=deep),
        format=tarfile.GNU_FORMAT,
    )
    pax = targz(member("p" * 150 + "/x.txt", b"pax"), pax_headers={"comment": "commit"})

    await extract(agent, gnu, "gnu")
    await extract(agent, pax, "pax")
    assert (agent.root / "gnu" / deep).read_bytes() == b"deep"
    assert (agent.root / "gnu" / "same").stat().st_ino == (agent.root / "gnu" / deep).stat().st_ino
    assert (agent.root / "gnu" / "caf\u00e9" / "\u6587\u4ef6.txt").read_bytes() == b"unicode"
    assert (agent.root / "pax" / ("p" * 150) / "x.txt").read_bytes() == b"pax"


# ---------------------------------------------------------------- refusals


def gzip_of(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def corrupt_gzip() -> bytes:
    data = bytearray(targz(GOOD, member("x", b"x" * 5000)))
    data[40:80] = bytes(byte ^ 0x5A for byte in data[40:80])
    return bytes(data)


def truncated_gzip() -> bytes:
    data = targz(GOOD, member("x", os.urandom(20000)))
    return data[: len(data) // 2]


def tar_cut_inside_a_member() -> bytes:
    return gzip_of(gzip.decompress(targz(GOOD, member("x", os.urandom(20000))))[:8000])


def damaged_second_header(replacement: bytes) -> bytes:
    raw = bytearray(gzip.decompress(targz(member("a.txt", b"a"), member("b.txt", b"b"), member("c.txt", b"c"))))
    assert raw[1024:1029] == b"b.txt"
    raw[1024:1536] = replacement
    return gzip_of(bytes(raw))


def with_pax(entry: tuple[tarfile.TarInfo, bytes | None], **records: str) -> tuple[tarfile.TarInfo, bytes | None]:
    entry[0].pax_headers = records
    return entry


GOOD = member("good.txt", b"accepted before the bad member")

REFUSALS: dict[str, tuple[Callable[[], bytes], str, grpc.StatusCode, str]] = {
    "absolute member": (
        lambda: targz(GOOD, member("/etc/evil")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'/etc/evil' is an absolute path",
    ),
    "dotdot member": (
        lambda: targz(GOOD, member("a/../../evil")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'a/../../evil' contains '..'",
    ),
    "absolute symlink": (
        lambda: targz(GOOD, member("passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'passwd' -> '/etc/passwd' points to an absolute path",
    ),
    "symlink up and out": (
        lambda: targz(GOOD, member("a/up", kind=tarfile.SYMTYPE, link="../../..")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'a/up' -> '../../..' leads out",
    ),
    "symlink out of the destination but inside the root": (
        lambda: targz(GOOD, member("sibling", kind=tarfile.SYMTYPE, link="../other")),
        "sub",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'sibling' -> '../other' leads out of the destination",
    ),
    "symlink chain that escapes only together": (
        lambda: targz(
            GOOD,
            member("t", kind=tarfile.SYMTYPE, link="deep/s/.."),
            member("deep", None, kind=tarfile.DIRTYPE, mode=0o755),
            member("deep/s", kind=tarfile.SYMTYPE, link=".."),
        ),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'t' -> 'deep/s/..' leads out",
    ),
    "write through a symlink": (
        lambda: targz(GOOD, member("l", kind=tarfile.SYMTYPE, link="."), member("l/x.txt")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'l/x.txt' is below 'l', which is a symlink",
    ),
    "hardlink out": (
        lambda: targz(GOOD, member("h", kind=tarfile.LNKTYPE, link="../../etc/passwd")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "hardlink member 'h' points to '../../etc/passwd', which contains '..'",
    ),
    "hardlink to a non-member": (
        lambda: targz(GOOD, member("h", kind=tarfile.LNKTYPE, link="etc/passwd")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'etc/passwd', which is not a regular file earlier in the archive",
    ),
    "character device": (
        lambda: targz(GOOD, member("null", kind=tarfile.CHRTYPE)),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'null' is a device node",
    ),
    "block device": (
        lambda: targz(GOOD, member("sda", kind=tarfile.BLKTYPE)),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'sda' is a device node",
    ),
    "setuid file": (
        lambda: targz(GOOD, member("tool", b"#!/bin/sh", mode=0o4755)),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'tool' has setuid/setgid bits",
    ),
    "setgid directory": (
        lambda: targz(GOOD, member("shared", None, kind=tarfile.DIRTYPE, mode=0o2775)),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'shared/' has setuid/setgid bits",
    ),
    "fifo": (
        lambda: targz(GOOD, member("pipe", kind=tarfile.FIFOTYPE)),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'pipe' is a FIFO",
    ),
    "staging directory member": (
        lambda: targz(GOOD, member(f"{STAGING}/x")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "reserved staging directory",
    ),
    "NUL byte in a pax path": (
        lambda: targz(GOOD, with_pax(member("x"), path="a\0b")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "'a\\x00b' contains a NUL byte",
    ),
    "negative pax size": (
        lambda: targz(GOOD, with_pax(member("x"), size="-5")),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "bad size or mtime in the pax header of 'x'",
    ),
    "not gzip": (
        lambda: b"this is plain text, not an archive",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid gzip data",
    ),
    "corrupt gzip": (corrupt_gzip, "", grpc.StatusCode.INVALID_ARGUMENT, "not valid gzip data"),
    "truncated gzip": (truncated_gzip, "", grpc.StatusCode.INVALID_ARGUMENT, "truncated"),
    "tar cut inside a member": (
        tar_cut_inside_a_member,
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "ends inside a member's content",
    ),
    "corrupt tar header": (
        lambda: damaged_second_header(b"\xee" * 512),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "header at offset 1024 of the tar data has a bad checksum",
    ),
    "zeroed tar header": (
        lambda: damaged_second_header(bytes(512)),
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty header at offset 1024 of the tar data is followed by more data",
    ),
    "garbage after the gzip stream": (
        lambda: targz(GOOD) + b"trailing garbage",
        "",
        grpc.StatusCode.INVALID_ARGUMENT,
        "not valid gzip data",
    ),
    "gzip of nothing": (lambda: gzip_of(b""), "", grpc.StatusCode.INVALID_ARGUMENT, "holds no tar data"),
    "empty upload": (lambda: b"", "", grpc.StatusCode.INVALID_ARGUMENT, "archive is empty"),
}


async def assert_refused(
    agent: AgentTarget, requests: AsyncIterator[pb.ExtractArchiveRequest], code: grpc.StatusCode, fragment: str
) -> None:
    before = snapshot(agent.root)
    with pytest.raises(aio.AioRpcError) as error:
        await agent.stub.ExtractArchive(requests, metadata=agent.metadata)
    assert error.value.code() == code, error.value.details()
    assert fragment in error.value.details()
    assert snapshot(agent.root) == before, "a refused archive changed the workspace"
    assert not (agent.root / STAGING).exists(), "staging leftovers"


@pytest.mark.parametrize("case", REFUSALS)
async def test_unsafe_or_broken_archives_are_refused_and_change_nothing(agent: AgentTarget, case: str) -> None:
    build, destination, code, fragment = REFUSALS[case]
    populate(agent.root)
    (agent.root / "sub").mkdir()
    (agent.root / "sub" / "kept.txt").write_text("kept")
    await assert_refused(agent, upload(build(), destination), code, fragment)


async def test_a_link_planted_as_the_staging_directory_is_not_followed(agent: AgentTarget, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, agent.root / STAGING)
    with pytest.raises(aio.AioRpcError) as error:
        await extract(agent, targz(member("a.txt", b"a")))
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"{STAGING} in the workspace root is not a directory" in error.value.details()
    assert list(outside.iterdir()) == [] and not (agent.root / "a.txt").exists()


async def test_checksum_mismatch_is_data_loss(agent: AgentTarget) -> None:
    populate(agent.root)
    archive = targz(member("a.txt", b"a"))
    await assert_refused(
        agent,
        upload(archive, expected_sha256="0" * 64),
        grpc.StatusCode.DATA_LOSS,
        f"archive sha256 is {hashlib.sha256(archive).hexdigest()}",
    )


def metadata_bomb(size: int = 1_000_000) -> bytes:
    """A member whose pax header is far larger than its content, or any real header."""
    info, content = member("a", b"a")
    info.pax_headers = {"comment": "x" * size}
    return targz((info, content))


async def test_oversized_extended_header_is_resource_exhausted(agent: AgentTarget) -> None:
    # Within the default limits' inflate allowance, but no real pax header is a few MiB.
    await assert_refused(
        agent, upload(metadata_bomb(3_000_000)), grpc.StatusCode.RESOURCE_EXHAUSTED, "-byte extended header at offset 0"
    )


@pytest.mark.parametrize(
    ("archive", "fragment"),
    [
        (lambda: targz(*(member(f"f{i}", b"x") for i in range(21))), "more than 20 members"),
        (
            lambda: targz(member("a", b"a" * 40_000), member("b", b"b" * 40_000)),
            "exceeds 65536 bytes (the archive size limit) at member 'b'",
        ),
        (metadata_bomb, "archive inflates to more than 147456 bytes"),
    ],
    ids=["file count", "content size", "metadata size"],
)
async def test_archives_over_the_limits_are_resource_exhausted(
    small_agent: AgentTarget, archive: Callable[[], bytes], fragment: str
) -> None:
    (small_agent.root / "app.js").write_text("original")
    await assert_refused(small_agent, upload(archive()), grpc.StatusCode.RESOURCE_EXHAUSTED, fragment)


async def test_gzip_bomb_stops_before_inflating_it_all(small_agent: AgentTarget) -> None:
    # One member claiming 1 GiB of zeros: refused at its header, long before 1 GiB is inflated.
    info = tarfile.TarInfo("zeros")
    info.size = 1 << 30
    header = info.tobuf(tarfile.PAX_FORMAT)
    bomb = gzip.compress(header + b"\x00" * (8 << 20), compresslevel=1)
    await assert_refused(small_agent, upload(bomb), grpc.StatusCode.RESOURCE_EXHAUSTED, "archive size limit")


@pytest.mark.parametrize(
    ("requests", "fragment"),
    [
        ([pb.ExtractArchiveRequest(chunk=b"x")], "first ExtractArchiveRequest must carry the spec"),
        ([pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination="../out"))], "contains '..'"),
        ([pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination=f"{STAGING}/x"))], "staging area"),
        ([pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination="run.sh"))], "is not a directory"),
        ([pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(expected_sha256="abc"))], "not 64 hex digits"),
        (
            [
                pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec()),
                pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec()),
            ],
            "only the first",
        ),
    ],
    ids=["no spec", "dotdot destination", "staging destination", "file destination", "bad sha256", "second spec"],
)
async def test_bad_specs_are_invalid_argument(
    agent: AgentTarget, requests: list[pb.ExtractArchiveRequest], fragment: str
) -> None:
    populate(agent.root)

    async def stream() -> AsyncIterator[pb.ExtractArchiveRequest]:
        for request in requests:
            yield request

    await assert_refused(agent, stream(), grpc.StatusCode.INVALID_ARGUMENT, fragment)


async def test_cancelled_upload_leaves_nothing_behind(agent: AgentTarget) -> None:
    populate(agent.root)
    before = snapshot(agent.root)
    archive = targz(*(member(f"f{i}.bin", os.urandom(4096)) for i in range(64)))
    hold = asyncio.Event()

    async def half_then_wait() -> AsyncIterator[pb.ExtractArchiveRequest]:
        yield pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec())
        yield pb.ExtractArchiveRequest(chunk=archive[: len(archive) // 2])
        await hold.wait()

    call = agent.stub.ExtractArchive(half_then_wait(), metadata=agent.metadata)
    await wait_until(lambda: (agent.root / STAGING).exists())
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_until(lambda: not (agent.root / STAGING).exists())
    assert snapshot(agent.root) == before


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------- CreateArchive refusals and cancellation


async def test_client_leaving_a_create_midway_stops_the_producer(small_agent: AgentTarget) -> None:
    for i in range(10):
        (small_agent.root / f"blob{i}").write_bytes(os.urandom(100_000))
    call = small_agent.stub.CreateArchive(pb.CreateArchiveRequest(), metadata=small_agent.metadata)
    first = await call.read()
    assert len(first.chunk) == 4096
    call.cancel()
    # The producer was held back by the full channel (4 chunks, far less than the 1 MB archive);
    # once the client leaves it must stop rather than wait forever.
    await wait_until(lambda: not any(thread.name == "create-archive" for thread in threading.enumerate()))
    data, summary, _ = await create(small_agent)
    assert summary.size == len(data) > 1_000_000


async def test_create_over_the_file_limit_is_resource_exhausted_before_any_chunk(small_agent: AgentTarget) -> None:
    for i in range(25):
        (small_agent.root / f"f{i}").write_text("x")
    responses = []

    async def consume() -> None:
        async for response in small_agent.stub.CreateArchive(pb.CreateArchiveRequest(), metadata=small_agent.metadata):
            responses.append(response)

    with pytest.raises(aio.AioRpcError) as error:
        await consume()
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 20 entries" in error.value.details()
    assert responses == []


@pytest.mark.parametrize(
    ("request_", "code", "fragment"),
    [
        (pb.CreateArchiveRequest(path="missing"), grpc.StatusCode.NOT_FOUND, "missing: no such file or directory"),
        (pb.CreateArchiveRequest(path="run.sh"), grpc.StatusCode.INVALID_ARGUMENT, "run.sh is not a directory"),
        (pb.CreateArchiveRequest(path="../elsewhere"), grpc.StatusCode.INVALID_ARGUMENT, "contains '..'"),
        (pb.CreateArchiveRequest(path=STAGING), grpc.StatusCode.INVALID_ARGUMENT, "the agent's staging area"),
        (
            pb.CreateArchiveRequest(excludes=["!"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "bad exclude pattern: Invalid git pattern: '!'",
        ),
    ],
    ids=["missing", "file", "dotdot", "staging", "bad pattern"],
)
async def test_create_of_a_bad_path_or_pattern(
    agent: AgentTarget, request_: pb.CreateArchiveRequest, code: grpc.StatusCode, fragment: str
) -> None:
    populate(agent.root)
    (agent.root / STAGING).mkdir()
    got, details = await status_of_stream(agent.stub.CreateArchive(request_, metadata=agent.metadata))
    assert got == code and fragment in details


async def test_archives_taken_while_edits_run_never_hold_the_agents_working_files(agent: AgentTarget) -> None:
    (agent.root / "src").mkdir()
    for i in range(5):
        (agent.root / "src" / f"f{i}.txt").write_text("v0\n")
    # Handed over once, then a plain channel: the container target's hand-over walks the tree before
    # each call, racing the edits' own working files.
    hand_over_to_workspace_user(agent.root)
    channel = aio.insecure_channel(agent.address)
    agent = dataclasses.replace(agent, channel=channel, stub=agent_pb2_grpc.AgentServiceStub(channel))

    async def edits() -> None:
        for round_ in range(40):
            await agent.stub.Edit(
                pb.EditRequest(operations=[
                    pb.EditOperation(write=pb.WriteFile(path=f"src/f{i}.txt", content=f"v{round_}\n".encode()))
                    for i in range(5)
                ]),
                metadata=agent.metadata,
            )  # fmt: skip

    editing = asyncio.ensure_future(edits())
    archives = 0
    while not editing.done() or archives < 3:
        data, summary, _ = await create(agent, "")
        names = member_names(data)
        assert not [n for n in names if ".agent-edit" in n or ".workspace-agent" in n]
        assert summary.files == 5
        archives += 1
    await editing
    await channel.close()


async def test_a_very_deep_member_path_is_extracted_or_refused_and_leaves_no_staging(agent: AgentTarget) -> None:
    # Up to 6,000 bytes of path in 600 components (a test's own os.walk stays within the recursion limit).
    extracted = 0
    for depth in (100, 390, 400, 600):
        name = "component/" * depth + "leaf.txt"
        try:
            await extract(agent, targz(member(name, b"deep")), destination="deep", mode=MERGE)
            extracted += 1
        except aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "longer than the filesystem allows" in error.details()
            assert str(agent.root) not in error.details() and "/app" not in error.details()
        assert not (agent.root / ".workspace-agent").exists()
    # What was extracted is archived and deleted like any tree, however deep.
    _data, summary, _ = await create(agent, "deep")
    assert (
        1 <= extracted < 4 and summary.files == extracted
    )  # 600 components never fit; how many fit depends on the root's own path
    await agent.stub.Edit(
        pb.EditRequest(operations=[pb.EditOperation(delete=pb.DeletePath(path="deep", recursive=True))]),
        metadata=agent.metadata,
    )
    assert os.listdir(agent.root) == []


def _leave_crash_remains(root: Path, depth: int = 1500) -> None:
    """What a kill -9 mid-edit and mid-extraction leaves: journals and staging trees, one very deep."""
    deep = root / ".workspace-agent" / "extract-dead" / "tree"
    deep.mkdir(parents=True)
    (root / ".workspace-agent" / "edit-dead").mkdir()
    (root / ".workspace-agent" / "edit-dead" / "1").write_text("backup")
    (root / "kept.txt").write_text("kept\n")
    hand_over_to_workspace_user(root)  # as the agent's user made them
    owner = (WORKSPACE_UID, WORKSPACE_UID) if os.geteuid() == 0 else None
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):  # by default deeper than Python's recursion limit, longer than PATH_MAX
            os.mkdir("d", dir_fd=fd)
            if owner:
                os.chown("d", *owner, dir_fd=fd)
            following = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = following
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=fd), "w") as file:
            file.write("x")
        os.fchmod(fd, 0o500)  # as an archive can leave a directory
    finally:
        os.close(fd)


async def test_what_a_killed_agent_left_is_removed_when_the_agent_starts(tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    _leave_crash_remains(root)
    try:
        server, target = await start_inprocess_agent(root)
        try:
            assert os.listdir(root) == ["kept.txt"]
            data, _summary, _ = await create(target, "")
            assert member_names(data) == ["kept.txt"]
        finally:
            await target.channel.close()
            await server.stop(None)
    finally:
        remove_tree(root / ".workspace-agent")  # if left: too deep for pytest's own (recursive) cleanup


@pytest.mark.docker
async def test_what_a_killed_agent_left_is_removed_when_the_agent_starts_in_a_container(
    tmp_path: Path, docker_client, core_image
) -> None:
    root = tmp_path / "app"
    root.mkdir()
    # Within the recursion limit here: starting the container hands the tree over with os.walk, which recurses.
    _leave_crash_remains(root, depth=900)
    try:
        container, target = await start_container_agent(docker_client, core_image, root)
        try:
            assert os.listdir(root) == ["kept.txt"]
        finally:
            await target.channel.close()
            container.remove(force=True)
    finally:
        remove_tree(root / ".workspace-agent")  # if left: too deep for pytest's own (recursive) cleanup
