"""The template catalog: valid and invalid templates with reasons, reproducible cached archives, and
templates whose dev servers really answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

if sys.version_info >= (3, 11, 4):
    import tarfile
else:  # extraction filters arrived in 3.11.4 (Debian 12's python3 is 3.11.2): the backport has them
    from backports import tarfile

import pytest
from grpc import StatusCode, aio

from orchestrator import templates
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import InvalidArgument, InvalidTemplate, TemplateNotFound
from orchestrator.templates import ARCHIVE_MTIME, TemplateCatalog
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    start_orchestrator,
    stop_all_workspaces,
    watch_until_settled,
)
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

REPO_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
NODE_BASIC = REPO_TEMPLATES / "node-basic"


def write_template(folder: Path, metadata: object | str, files: dict[str, str] | None = None) -> Path:
    folder.mkdir(parents=True)
    text = metadata if isinstance(metadata, str) else json.dumps(metadata)
    (folder / "template.json").write_text(text)
    for relative, content in (files or {}).items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_text(content)
    return folder


def metadata(name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "title": name.title(), "dev_command": "npm run dev", **fields}


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "templates"
    directory.mkdir()
    return directory


@pytest.fixture
def catalog(catalog_dir: Path, tmp_path: Path) -> TemplateCatalog:
    return TemplateCatalog(catalog_dir, tmp_path / "cache")


def members(archive_path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive_path, "r:gz") as tar:
        return tar.getmembers()


# ---------------------------------------------------------------- listing and validation


def test_repository_templates_are_valid() -> None:
    listed = TemplateCatalog(REPO_TEMPLATES, Path("/nonexistent-cache")).list()

    assert [(t.name, t.valid, t.invalid_reason) for t in listed] == [
        ("astro-basic", True, ""),
        ("node-basic", True, ""),
        ("vite-react", True, ""),
    ]
    node_basic = listed[1]
    assert node_basic.install_command == ""
    assert node_basic.dev_command == "node --watch-path=server.js server.js"
    assert node_basic.dev_port == 4321


def test_lists_valid_and_invalid_templates_with_reasons(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    write_template(catalog_dir / "good", metadata("good"))
    write_template(catalog_dir / "bad-json", '{"name": "bad-json",')
    (catalog_dir / "no-metadata").mkdir()
    write_template(catalog_dir / "renamed", metadata("original"))
    write_template(catalog_dir / ".hidden", metadata("hidden"))

    listed = {t.name: t for t in catalog.list()}

    assert list(listed) == ["bad-json", "good", "no-metadata", "renamed"]
    assert listed["good"].valid and listed["good"].invalid_reason == ""
    assert not listed["bad-json"].valid
    assert "template.json is not valid JSON" in listed["bad-json"].invalid_reason
    assert "line 1" in listed["bad-json"].invalid_reason
    assert listed["no-metadata"].invalid_reason == "template.json is missing"
    assert listed["renamed"].invalid_reason == (
        "template.json: $.name: 'original' does not match the folder name 'renamed'"
    )


def test_schema_violations_are_all_reported_with_their_json_paths(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    write_template(
        catalog_dir / "broken",
        {
            "name": "broken",
            "dev_port": 80,
            "readiness": {"path": "health", "timeout_seconds": 0},
            "env": {"GOOD": "1", "BAD-NAME": "x", "NUMBER": 3},
            "resources": {"memory_mb": "lots"},
            "install_on_cache_hit": "sometimes",
            "colour": "blue",
        },
    )

    (broken,) = catalog.list()

    assert not broken.valid
    reason = broken.invalid_reason
    for expected in (
        "$: 'title' is a required property",
        "$: 'dev_command' is a required property",
        "$: Additional properties are not allowed ('colour' was unexpected)",
        "$.dev_port: 4321 was expected",
        "$.readiness.path: 'health' does not match",
        "$.readiness.timeout_seconds: 0 is less than or equal to the minimum of 0",
        "$.env: 'BAD-NAME' does not match",
        "$.env.NUMBER: 3 is not of type 'string'",
        "$.resources.memory_mb: 'lots' is not of type 'integer'",
        "$.install_on_cache_hit: 'sometimes' is not one of ['verify', 'skip']",
    ):
        assert expected in reason, (expected, reason)


def test_defaults_apply_to_omitted_fields(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    write_template(catalog_dir / "minimal", metadata("minimal"))

    spec = catalog.get("minimal")

    assert spec.install_command == "npm install"
    assert spec.install_on_cache_hit == "verify"
    assert (spec.dev_port, spec.readiness_path, spec.readiness_timeout_s) == (4321, "/", 120.0)
    assert spec.env == {} and spec.archive_excludes == ()
    assert (spec.resources.memory_mb, spec.resources.cpus, spec.resources.pids) == (1024, 1.0, 512)


async def test_unknown_invalid_and_malformed_names_are_refused(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    write_template(catalog_dir / "renamed", metadata("original"))

    with pytest.raises(TemplateNotFound, match="no template 'missing'"):
        catalog.get("missing")
    with pytest.raises(InvalidTemplate, match="does not match the folder name"):
        catalog.get("renamed")
    with pytest.raises(InvalidTemplate):
        await catalog.archive("renamed")
    for name in ("", "../templates", "a/b", "UPPER"):
        with pytest.raises(InvalidArgument):
            catalog.get(name)


def test_a_new_template_shows_up_without_a_new_catalog(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    assert catalog.list() == []
    write_template(catalog_dir / "late", metadata("late"))

    assert [t.name for t in catalog.list()] == ["late"]


# ---------------------------------------------------------------- archives


async def test_archive_members_are_sorted_and_headers_normalized(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    folder = write_template(
        catalog_dir / "app",
        metadata("app"),
        {"b.txt": "b", "a/z.txt": "z", "a/b/c.txt": "c", "run.sh": "#!/bin/sh\n", "a-b.txt": "-"},
    )
    (folder / "run.sh").chmod(0o700)
    (folder / "b.txt").chmod(0o600)

    archive = await catalog.archive("app")

    listed = members(archive.path)
    assert [m.name for m in listed] == [
        "a", "a/b", "a/b/c.txt", "a/z.txt", "a-b.txt", "b.txt", "run.sh",
    ]  # fmt: skip
    modes = {m.name: m.mode for m in listed}
    assert modes == {
        "a": 0o755, "a/b": 0o755, "a/b/c.txt": 0o644, "a/z.txt": 0o644,
        "a-b.txt": 0o644, "b.txt": 0o644, "run.sh": 0o755,
    }  # fmt: skip
    for member in listed:
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == ARCHIVE_MTIME
        assert member.pax_headers == {}
    raw = archive.path.read_bytes()
    assert raw[3] & 0x08 == 0, "gzip header carries a file name"
    assert raw[4:8] == b"\0\0\0\0", "gzip header carries a timestamp"
    assert archive.size == len(raw)
    assert archive.sha256 == hashlib.sha256(raw).hexdigest()
    assert archive.files == 5


async def test_archives_are_reproducible_across_copies_mtimes_and_permissions(tmp_path: Path) -> None:
    first_dir, second_dir = tmp_path / "one", tmp_path / "two"
    shutil.copytree(NODE_BASIC, first_dir / "node-basic")
    shutil.copytree(NODE_BASIC, second_dir / "node-basic")
    for path in (second_dir / "node-basic").rglob("*"):
        os.utime(path, (1_000_000_000, 1_234_567_890))
        if path.is_file():
            path.chmod(0o600)

    first = await TemplateCatalog(first_dir, tmp_path / "cache-one").archive("node-basic")
    again = await TemplateCatalog(first_dir, tmp_path / "cache-again").archive("node-basic")
    second = await TemplateCatalog(second_dir, tmp_path / "cache-two").archive("node-basic")

    assert first.path.read_bytes() == again.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256


async def test_unchanged_template_is_not_rebuilt_and_an_edit_is_picked_up(
    catalog: TemplateCatalog, catalog_dir: Path, tmp_path: Path
) -> None:
    folder = write_template(catalog_dir / "app", metadata("app"), {"src/message.txt": "hello"})

    built = await catalog.archive("app")
    written = built.path.stat()
    cached = await catalog.archive("app")

    assert cached == built
    assert (built.path.stat().st_ino, built.path.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)

    (folder / "src/message.txt").write_text("hello, edited")
    edited = await catalog.archive("app")

    assert edited.sha256 != built.sha256
    with tarfile.open(edited.path) as tar:
        assert tar.extractfile("src/message.txt").read() == b"hello, edited"
    # A fresh catalog (a restarted orchestrator) finds the cached file instead of writing it again.
    restarted = await TemplateCatalog(catalog_dir, tmp_path / "cache").archive("app")
    assert restarted == edited
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([built.path.name, edited.path.name])


async def test_concurrent_requests_build_once(
    catalog: TemplateCatalog, catalog_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_template(catalog_dir / "app", metadata("app"), {"index.html": "<h1>hi</h1>"})
    builds = []
    real_tar_gz = templates._tar_gz
    monkeypatch.setattr(templates, "_tar_gz", lambda members: builds.append(1) or real_tar_gz(members))

    results = await asyncio.gather(*(catalog.archive("app") for _ in range(8)))

    assert len(builds) == 1
    assert len({r.sha256 for r in results}) == 1


async def test_node_modules_and_exclusions_stay_out(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    write_template(
        catalog_dir / "app",
        metadata("app", archive_excludes=["dist/", "*.log", "template.json"]),
        {
            "src/app.js": "x",
            "node_modules/left-pad/index.js": "y",
            "src/node_modules/nested.js": "z",
            "dist/bundle.js": "w",
            "debug.log": "v",
        },
    )

    archive = await catalog.archive("app")

    assert [m.name for m in members(archive.path)] == ["src", "src/app.js"]


async def test_template_json_goes_into_the_archive_only_when_its_author_asks(
    catalog: TemplateCatalog, catalog_dir: Path
) -> None:
    write_template(catalog_dir / "plain", metadata("plain"), {"index.js": "x"})
    # Opting in keeps it even when an exclusion pattern would match it.
    write_template(
        catalog_dir / "kept",
        metadata("kept", archive_template_json=True, archive_excludes=["*.json"]),
        {"index.js": "x"},
    )

    assert [m.name for m in members((await catalog.archive("plain")).path)] == ["index.js"]
    kept = await catalog.archive("kept")
    assert [m.name for m in members(kept.path)] == ["index.js", "template.json"]
    assert json.loads(tarfile.open(kept.path).extractfile("template.json").read())["name"] == "kept"


async def test_symlinks_in_a_template_are_refused(catalog: TemplateCatalog, catalog_dir: Path) -> None:
    folder = write_template(catalog_dir / "app", metadata("app"))
    (folder / "passwd").symlink_to("/etc/passwd")

    with pytest.raises(InvalidTemplate, match="passwd is not a regular file"):
        await catalog.archive("app")


# ---------------------------------------------------------------- dev servers, run for real


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str, timeout_s: float) -> str:
    """The body of the first 200 answer from `url` within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return response.read().decode()
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer 200 within {timeout_s}s")
        time.sleep(0.2)


async def extracted(catalog: TemplateCatalog, name: str, destination: Path) -> Path:
    archive = await catalog.archive(name)
    with tarfile.open(archive.path) as tar:
        tar.extractall(destination, filter="data")
    return destination


class DevServer:
    """A template's dev command running in a directory, in its own process group so it all stops together."""

    def __init__(self, workdir: Path, command: str, env: dict[str, str]) -> None:
        self.log = workdir.parent / f"{workdir.name}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                ["sh", "-c", command], cwd=workdir, env=env, stdout=log, stderr=log, start_new_session=True
            )

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        self.process.wait(timeout=10)


@pytest.fixture
def dev_servers() -> Iterator[list[DevServer]]:
    started: list[DevServer] = []
    yield started
    for server in started:
        server.stop()


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js on PATH")
async def test_node_basic_dev_server_answers_on_port_and_shows_edits(
    tmp_path: Path, dev_servers: list[DevServer]
) -> None:
    catalog = TemplateCatalog(REPO_TEMPLATES, tmp_path / "cache")
    spec = catalog.get("node-basic")
    workdir = await extracted(catalog, "node-basic", tmp_path / "app")
    port = free_port()
    dev_servers.append(DevServer(workdir, spec.dev_command, {**os.environ, **spec.env, "PORT": str(port)}))
    url = f"http://127.0.0.1:{port}{spec.readiness_path}"

    page = await asyncio.to_thread(http_get, url, spec.readiness_timeout_s)
    assert "Hello from node-basic" in page

    index = workdir / "src/index.html"
    index.write_text(index.read_text().replace("Hello from node-basic", "Edited in the workspace"))
    # The server reads src/ on every request (no restart): the page shows the new text at once.
    deadline = time.monotonic() + 15
    while "Edited in the workspace" not in (page := await asyncio.to_thread(http_get, url, 15)):
        assert time.monotonic() < deadline, page
        await asyncio.sleep(0.2)


@pytest.mark.docker
@pytest.mark.npm
@pytest.mark.skipif(os.environ.get("WORKSPACE_TEST_NPM") != "1", reason="opt-in: WORKSPACE_TEST_NPM=1")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["vite-react", "astro-basic"])
async def test_npm_template_installs_and_serves_in_the_core_image(name: str, core_image: str, tmp_path: Path) -> None:
    """The template as workspaces run it: in the core image (its Node and npm, the hardening, the template's
    limits), its real `npm install`, then its dev command answering on the preview URL."""
    templates_dir = tmp_path / "templates"
    shutil.copytree(REPO_TEMPLATES / name, templates_dir / name, ignore=shutil.ignore_patterns("node_modules"))
    bundle = os.environ.get("WORKSPACE_TEST_CA_BUNDLE")
    config = OrchestratorConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        templates_dir=templates_dir,
        runtime="docker",
        image=core_image,
        instance_id=f"test-{secrets.token_hex(4)}",
        reap_interval_s=3600,
        warm_pool=0,
        extra_ca_bundle=Path(bundle) if bundle else None,
    )
    orchestrator = await start_orchestrator(config)
    try:
        created = await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template=name))
        session = (await watch_until_settled(orchestrator.stub, created.session.id, timeout=540))[-1].session
        assert session.state == pb.SESSION_STATE_READY, session.failure
        install = next(p for p in session.phases if p.phase == pb.PHASE_INSTALL)
        assert install.outcome == pb.PHASE_OUTCOME_SUCCEEDED, install  # a real install: nothing was cached yet
        page = await asyncio.to_thread(http_get, session.preview_url, 60)
        assert "<html" in page.lower()
    finally:
        await orchestrator.close()
        await stop_all_workspaces(config)


# ---------------------------------------------------------------- over gRPC


async def test_list_templates_and_get_template_archive_over_grpc(orchestrator: OrchestratorUnderTest) -> None:
    listed = {t.name: t for t in (await orchestrator.stub.ListTemplates(pb.ListTemplatesRequest())).templates}
    assert not listed["invalid"].valid and "$.dev_port" in listed["invalid"].invalid_reason
    node_basic = listed["node-basic"]

    events = [e async for e in orchestrator.stub.GetTemplateArchive(pb.GetTemplateArchiveRequest(name="node-basic"))]

    info, chunks = events[0].info, b"".join(e.chunk for e in events[1:])
    assert (info.sha256, info.files) == (node_basic.archive_sha256, node_basic.files)
    assert hashlib.sha256(chunks).hexdigest() == info.sha256 and len(chunks) == info.size
    local = await TemplateCatalog(REPO_TEMPLATES, orchestrator.config.data_dir / "other-cache").archive("node-basic")
    assert local.sha256 == info.sha256
    for name, code in (("missing", StatusCode.NOT_FOUND), ("invalid", StatusCode.FAILED_PRECONDITION)):
        with pytest.raises(aio.AioRpcError) as raised:
            async for _ in orchestrator.stub.GetTemplateArchive(pb.GetTemplateArchiveRequest(name=name)):
                pass
        assert raised.value.code() == code, raised.value
