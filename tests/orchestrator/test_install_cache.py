"""The install cache through the real gRPC server with the local runtime: a template whose install is a
script that records whether node_modules was already in place, so no npm registry is needed."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from orchestrator.agent_client import AgentClient
from orchestrator.config import OrchestratorConfig
from orchestrator.install_cache import InstallCache
from tests.conftest import start_inprocess_agent
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    derive_template,
    http_get,
    start_orchestrator,
    stop_all_workspaces,
    watch_until_settled,
)
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

TEMPLATE = "cached-install"
# Records "hit" when the package is in place before the install ran, "miss" when the install had to make it.
INSTALL_SCRIPT = """\
if [ -f node_modules/left-pad/index.js ]; then echo hit >> "$INSTALL_LOG"; else echo miss >> "$INSTALL_LOG"; fi
mkdir -p node_modules/left-pad && echo 'module.exports = "padded";' > node_modules/left-pad/index.js
"""


@pytest.fixture
def install_log(templates: Path, tmp_path: Path) -> Path:
    """The record of the template's install runs, one "hit" or "miss" a line."""
    log = tmp_path / "installs.log"
    derive_template(templates, TEMPLATE, install_command="sh install.sh", env={"INSTALL_LOG": str(log)})
    (templates / TEMPLATE / "install.sh").write_text(INSTALL_SCRIPT)
    (templates / TEMPLATE / "package-lock.json").write_text(json.dumps({"lockfileVersion": 3, "packages": {}}))
    return log


def runs(install_log: Path) -> list[str]:
    return install_log.read_text().split()


async def create_ready(o: OrchestratorUnderTest) -> pb.Session:
    created = await o.stub.CreateSession(pb.CreateSessionRequest(template=TEMPLATE))
    session = (await watch_until_settled(o.stub, created.session.id))[-1].session
    assert session.state == pb.SESSION_STATE_READY, session.failure
    return session


def install_note(session: pb.Session) -> str:
    (install,) = [phase for phase in session.phases if phase.phase == pb.PHASE_INSTALL]
    assert install.outcome == pb.PHASE_OUTCOME_SUCCEEDED
    return install.detail


async def cache_entries(o: OrchestratorUnderTest, count: int = 1, timeout: float = 10) -> list[Path]:
    """The cache's entries once there are `count` of them (they are written in the background after READY)."""
    async with asyncio.timeout(timeout):
        while len(entries := sorted(o.config.install_cache_dir.glob("*.tar.gz"))) < count:
            await asyncio.sleep(0.05)
    return entries


def members(entry: Path) -> dict[str, bytes]:
    with tarfile.open(entry, "r:gz") as archive:
        return {member.name: archive.extractfile(member).read() for member in archive if member.isfile()}


async def test_a_second_session_starts_from_the_first_ones_node_modules(
    orchestrator: OrchestratorUnderTest, install_log: Path
) -> None:
    first = await create_ready(orchestrator)
    assert install_note(first).startswith("install cache miss")
    (entry,) = await cache_entries(orchestrator)
    assert members(entry) == {"left-pad/index.js": b'module.exports = "padded";\n'}

    second = await create_ready(orchestrator)
    key = entry.name.removesuffix(".tar.gz")
    assert install_note(second).startswith(f"install cache hit {key[:12]}")
    # The install still ran, and found the package in place.
    assert runs(install_log) == ["miss", "hit"]


async def test_a_corrupt_entry_is_discarded_and_the_install_runs_as_usual(
    orchestrator: OrchestratorUnderTest, install_log: Path
) -> None:
    await create_ready(orchestrator)
    (entry,) = await cache_entries(orchestrator)
    entry.write_bytes(b"\x1f\x8b not really gzip")

    session = await create_ready(orchestrator)
    assert "unusable and is discarded" in install_note(session)
    assert runs(install_log) == ["miss", "miss"]
    # The session's own install becomes the entry again.
    (rewritten,) = await cache_entries(orchestrator)
    assert members(rewritten) == {"left-pad/index.js": b'module.exports = "padded";\n'}


async def test_a_changed_lockfile_misses(
    orchestrator: OrchestratorUnderTest, install_log: Path, templates: Path
) -> None:
    await create_ready(orchestrator)
    await cache_entries(orchestrator)
    lockfile = templates / TEMPLATE / "package-lock.json"
    lockfile.write_text(json.dumps({"lockfileVersion": 3, "packages": {"node_modules/left-pad": {"version": "1.3.0"}}}))

    session = await create_ready(orchestrator)
    assert install_note(session).startswith("install cache miss")
    assert runs(install_log) == ["miss", "miss"]
    assert len(await cache_entries(orchestrator, count=2)) == 2


# Like `npm install` without a lockfile: writes one, and records whether it found one already in place.
UNLOCKED_INSTALL_SCRIPT = (
    INSTALL_SCRIPT
    + """\
if [ -f package-lock.json ]; then echo locked >> "$INSTALL_LOG"; else echo '{"lockfileVersion": 3}' > package-lock.json; fi
"""
)


@pytest.fixture
def unlocked(templates: Path, install_log: Path) -> Path:
    """The template without a lockfile, its install writing one."""
    (templates / TEMPLATE / "package-lock.json").unlink()
    (templates / TEMPLATE / "install.sh").write_text(UNLOCKED_INSTALL_SCRIPT)
    return install_log


async def test_without_a_lockfile_the_second_session_gets_node_modules_and_the_first_ones_lockfile(
    orchestrator: OrchestratorUnderTest, unlocked: Path
) -> None:
    first = await create_ready(orchestrator)
    assert install_note(first).startswith("install cache miss")
    (entry,) = await cache_entries(orchestrator)

    second = await create_ready(orchestrator)
    key = entry.name.removesuffix(".tar.gz")
    assert install_note(second).startswith(f"install cache hit {key[:12]} (node_modules and package-lock.json in")
    assert runs(unlocked) == ["miss", "hit", "locked"]


async def test_an_entry_without_a_lockfile_expires(orchestrator_config: OrchestratorConfig, unlocked: Path) -> None:
    config = dataclasses.replace(orchestrator_config, install_cache_unlocked_max_age_s=0.0)
    o = await start_orchestrator(config)
    try:
        await create_ready(o)
        await cache_entries(o)
        session = await create_ready(o)
        assert "expired" in install_note(session) and "kept 0 h" in install_note(session)
        assert runs(unlocked) == ["miss", "miss"]
    finally:
        await o.close()
        await stop_all_workspaces(config)


async def test_without_a_package_json_nothing_is_cached(
    orchestrator: OrchestratorUnderTest, install_log: Path, templates: Path
) -> None:
    (templates / TEMPLATE / "package.json").unlink()
    await create_ready(orchestrator)
    session = await create_ready(orchestrator)
    assert install_note(session) == "install cache not used: no package.json"
    assert runs(install_log) == ["miss", "miss"]
    assert list(orchestrator.config.install_cache_dir.glob("*")) == []


async def test_a_session_deleted_right_after_ready_still_fills_the_cache(
    orchestrator: OrchestratorUnderTest, install_log: Path
) -> None:
    first = await create_ready(orchestrator)
    await orchestrator.stub.DeleteSession(pb.DeleteSessionRequest(id=first.id))
    # The delete waited for the entry: it is there the moment the delete returns.
    (entry,) = orchestrator.config.install_cache_dir.glob("*.tar.gz")
    assert members(entry) == {"left-pad/index.js": b'module.exports = "padded";\n'}
    second = await create_ready(orchestrator)
    assert install_note(second).startswith("install cache hit")
    assert runs(install_log) == ["miss", "hit"]


NPM_TEMPLATE = "npm-unlocked"


@pytest.fixture
def npm_unlocked(templates: Path, runtime_kind: str) -> str:
    """A template with a real `npm install` of a local tarball dependency and no lockfile: no registry needed."""
    if runtime_kind == "local" and shutil.which("npm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("npm is needed for the install cache test on the local runtime")
        pytest.skip("npm is not installed")
    derive_template(
        templates, NPM_TEMPLATE, install_command="npm install",
        env={"npm_config_offline": "true", "npm_config_audit": "false", "npm_config_fund": "false",
             "npm_config_update_notifier": "false"},
    )  # fmt: skip
    folder = templates / NPM_TEMPLATE
    manifest = json.loads((folder / "package.json").read_text())
    manifest["dependencies"] = {"tiny-dep": "file:tiny-dep-1.0.0.tgz"}
    (folder / "package.json").write_text(json.dumps(manifest))
    with tarfile.open(folder / "tiny-dep-1.0.0.tgz", "w:gz") as archive:
        for name, content in {
            "package/package.json": b'{"name": "tiny-dep", "version": "1.0.0", "main": "index.js"}',
            "package/index.js": b'module.exports = "tiny";\n',
        }.items():
            member = tarfile.TarInfo(name)
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return NPM_TEMPLATE


@pytest.mark.parametrize("runtime_kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])
async def test_npm_without_a_lockfile_deleted_at_once_still_fills_the_cache_for_the_next_session(
    orchestrator: OrchestratorUnderTest, npm_unlocked: str
) -> None:
    created = await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template=npm_unlocked))
    first = (await watch_until_settled(orchestrator.stub, created.session.id, timeout=180))[-1].session
    assert first.state == pb.SESSION_STATE_READY, first.failure
    assert install_note(first).startswith("install cache miss")
    await orchestrator.stub.DeleteSession(pb.DeleteSessionRequest(id=first.id))
    (entry,) = orchestrator.config.install_cache_dir.glob("*.tar.gz")
    assert members(entry)["tiny-dep/index.js"] == b'module.exports = "tiny";\n'

    created = await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template=npm_unlocked))
    second = (await watch_until_settled(orchestrator.stub, created.session.id, timeout=180))[-1].session
    assert second.state == pb.SESSION_STATE_READY, second.failure
    key = entry.name.removesuffix(".tar.gz")
    assert install_note(second).startswith(f"install cache hit {key[:12]} (node_modules and package-lock.json in")


SKIPPING_TEMPLATE = "skipping-install"
# Leaves a mark in the workspace when it runs (a new session's workspace starts without it) and makes the package.
MARKING_INSTALL_SCRIPT = """\
echo ran > install-ran
mkdir -p node_modules/left-pad && echo 'module.exports = "padded";' > node_modules/left-pad/index.js
"""
# The dev server needs the package at start (without it the session fails), and shows whether the install ran.
MARK_SERVER = """\
const fs = require("node:fs");
const leftPad = require("left-pad");
require("node:http")
  .createServer((request, response) => {
    response.end(JSON.stringify({ leftPad, installRan: fs.existsSync("install-ran") }));
  })
  .listen(Number(process.env.PORT) || 4321, "0.0.0.0");
"""


@pytest.fixture
def skipping(templates: Path) -> str:
    """A template with a lockfile that skips its install on an exact hit, its dev server showing whether the
    install ran in the workspace and what the package it requires says."""
    derive_template(
        templates, SKIPPING_TEMPLATE, install_command="sh install.sh", install_on_cache_hit="skip",
        dev_command="node server.cjs",
    )  # fmt: skip
    folder = templates / SKIPPING_TEMPLATE
    (folder / "install.sh").write_text(MARKING_INSTALL_SCRIPT)
    (folder / "server.cjs").write_text(MARK_SERVER)
    (folder / "package-lock.json").write_text(json.dumps({"lockfileVersion": 3, "packages": {}}))
    return SKIPPING_TEMPLATE


async def create_settled(o: OrchestratorUnderTest, template: str) -> pb.Session:
    created = await o.stub.CreateSession(pb.CreateSessionRequest(template=template))
    session = (await watch_until_settled(o.stub, created.session.id, timeout=120))[-1].session
    assert session.state == pb.SESSION_STATE_READY, session.failure
    return session


def install_phase(session: pb.Session) -> pb.PhaseStatus:
    (install,) = [phase for phase in session.phases if phase.phase == pb.PHASE_INSTALL]
    return install


async def page(session: pb.Session) -> dict:
    status, body = await http_get(session.preview_url)
    assert status == 200, body
    return json.loads(body)


@pytest.mark.parametrize("runtime_kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])
async def test_on_an_exact_hit_a_skipping_template_starts_without_running_its_install(
    orchestrator: OrchestratorUnderTest, skipping: str
) -> None:
    first = await create_settled(orchestrator, skipping)
    assert install_phase(first).outcome == pb.PHASE_OUTCOME_SUCCEEDED
    assert install_phase(first).detail.startswith("install cache miss")
    assert await page(first) == {"leftPad": "padded", "installRan": True}
    (entry,) = await cache_entries(orchestrator, timeout=60)

    second = await create_settled(orchestrator, skipping)
    key = entry.name.removesuffix(".tar.gz")
    install = install_phase(second)
    assert install.outcome == pb.PHASE_OUTCOME_SKIPPED
    assert install.detail.startswith(f"install skipped: exact install-cache hit {key[:12]} (node_modules in ")
    # The dev server runs on the restored node_modules; the install left no mark.
    assert await page(second) == {"leftPad": "padded", "installRan": False}


async def test_on_an_exact_hit_a_verifying_template_runs_its_install(
    orchestrator: OrchestratorUnderTest, skipping: str, templates: Path
) -> None:
    metadata_path = templates / skipping / "template.json"
    metadata = json.loads(metadata_path.read_text())
    del metadata["install_on_cache_hit"]  # "verify", the default
    metadata_path.write_text(json.dumps(metadata))
    await create_settled(orchestrator, skipping)
    (entry,) = await cache_entries(orchestrator)

    second = await create_settled(orchestrator, skipping)
    install = install_phase(second)
    assert install.outcome == pb.PHASE_OUTCOME_SUCCEEDED
    assert install.detail.startswith(f"install cache hit {entry.name[:12]}")
    assert await page(second) == {"leftPad": "padded", "installRan": True}


async def test_without_a_lockfile_a_hit_is_not_exact_and_the_install_runs_even_when_the_template_skips(
    orchestrator: OrchestratorUnderTest, skipping: str, templates: Path
) -> None:
    (templates / skipping / "package-lock.json").unlink()
    await create_settled(orchestrator, skipping)
    (entry,) = await cache_entries(orchestrator)

    second = await create_settled(orchestrator, skipping)
    install = install_phase(second)
    assert install.outcome == pb.PHASE_OUTCOME_SUCCEEDED
    assert install.detail.startswith(f"install cache hit {entry.name[:12]}")
    assert await page(second) == {"leftPad": "padded", "installRan": True}


async def test_a_locked_key_is_of_one_core_image(tmp_path: Path) -> None:
    """Another core image (another node, npm, platform for native packages) is another key, locked or not."""
    root = tmp_path / "workspace"
    root.mkdir()
    (root / "package.json").write_text('{"name": "app"}')
    cache = InstallCache(tmp_path / "cache", max_bytes=1 << 20)
    server, target = await start_inprocess_agent(root)
    agent = AgentClient(target.address, target.token)
    try:
        for locked in (False, True):
            if locked:
                (root / "package-lock.json").write_text('{"lockfileVersion": 3}')
            first = await cache.key(agent, "npm install", "workspace-core:aaaa")
            assert first.locked == locked
            assert first == await cache.key(agent, "npm install", "workspace-core:aaaa")
            assert first.key != (await cache.key(agent, "npm install", "workspace-core:bbbb")).key
    finally:
        await agent.close()
        await target.channel.close()
        await server.stop(None)
