"""wsctl against a real orchestrator (local runtime): what a person at a terminal sees and the exit statuses
scripts rely on. The CLI is synchronous, so it runs in a thread while the server runs on the test's loop."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from common.tools import ENV_BIN
from orchestrator.cli import app
from orchestrator.config import OrchestratorConfig
from tests.conftest import REPO
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    http_get,
    page_showing,
    start_orchestrator,
    stop_all_workspaces,
    watch_until_settled,
)
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

# Wide enough that tables are not wrapped.
ENV = {"COLUMNS": "250", "WSCTL_SERVER": ""}


async def wsctl(orchestrator: OrchestratorUnderTest, *args: str, stdin: str | None = None) -> Result:
    address = f"127.0.0.1:{orchestrator.orchestrator.port}"
    return await asyncio.to_thread(CliRunner().invoke, app, ["--server", address, *args], input=stdin, env=ENV)


async def ready_session(orchestrator: OrchestratorUnderTest, template: str = "node-basic") -> pb.Session:
    session = (await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template=template))).session
    return (await watch_until_settled(orchestrator.stub, session.id))[-1].session


def table_row(output: str, first_cell: str) -> str:
    (row,) = [line for line in output.splitlines() if re.search(rf"[│|]\s*{re.escape(first_cell)}\s", line)]
    return row


async def test_templates_list_shows_valid_and_invalid_templates(orchestrator: OrchestratorUnderTest) -> None:
    result = await wsctl(orchestrator, "templates", "list")

    assert result.exit_code == 0, result.output
    node_basic = table_row(result.stdout, "node-basic")
    assert "node --watch-path=server.js server.js" in node_basic
    assert re.search(r"\b[0-9a-f]{12}\b", node_basic), node_basic
    assert "$.dev_port: 4321 was expected" in table_row(result.stdout, "invalid")


async def test_pools_shows_the_warm_pool_or_says_none_runs(
    orchestrator_config: OrchestratorConfig, orchestrator: OrchestratorUnderTest
) -> None:
    quiet = await wsctl(orchestrator, "pools")
    assert quiet.exit_code == 0 and "no pool runs here" in quiet.stderr
    config = dataclasses.replace(
        orchestrator_config,
        warm_pool=1,
        data_dir=orchestrator_config.data_dir.with_name("pooled"),
        instance_id=f"{orchestrator_config.instance_id}-pooled",
    )
    pooled = await start_orchestrator(config)
    try:
        assert pooled.orchestrator.sessions.pool is not None
        assert await pooled.orchestrator.sessions.pool.wait_full(60)
        shown = await wsctl(pooled, "pools")
        assert shown.exit_code == 0, shown.output
        assert re.search(
            r"warm\s*[│|]\s*-\s*[│|]\s*1\s*[│|]\s*0\s*[│|]\s*1\s*[│|]\s*1", table_row(shown.stdout, "warm")
        )
    finally:
        await pooled.close()
        await stop_all_workspaces(config)


async def test_a_session_from_create_to_restore(orchestrator: OrchestratorUnderTest, tmp_path: Path) -> None:
    created = await wsctl(orchestrator, "create", "node-basic", "--label", "owner=cli-test")

    assert created.exit_code == 0, created.output
    preview_url = created.stdout.strip()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", preview_url), created.stdout
    assert "✓ agent healthy" in created.stderr
    assert "install skipped" in created.stderr
    status, page = await http_get(preview_url)
    assert status == 200 and "Hello from node-basic" in page
    session_id = re.search(r"session (ws-\S+)", created.stderr).group(1)

    listed = await wsctl(orchestrator, "sessions", "list")
    assert "ready" in table_row(listed.stdout, session_id)

    ran = await wsctl(orchestrator, "exec", session_id, "--", "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (ran.exit_code, ran.stdout, ran.stderr) == (7, "out\n", "err\n"), ran.stderr

    read = await wsctl(orchestrator, "read", session_id, "src/index.html")
    assert read.exit_code == 0
    assert read.stdout_bytes == (orchestrator.config.templates_dir / "node-basic/src/index.html").read_bytes()

    found = await wsctl(orchestrator, "search", session_id, "hello from")
    assert found.exit_code == 1, "search is case-sensitive unless told otherwise"
    found = await wsctl(orchestrator, "search", session_id, "-i", "hello from")
    assert found.exit_code == 0, found.output
    assert re.fullmatch(r"src/index\.html:\d+:\s*<h1>Hello from node-basic</h1>\n", found.stdout)
    only_js = await wsctl(orchestrator, "search", session_id, "-i", "hello from", "--glob", "*.js")
    assert (only_js.exit_code, only_js.stdout) == (1, "")

    saved = await wsctl(orchestrator, "save", session_id, "--name", "before-delete")
    assert saved.exit_code == 0, saved.output
    archive_id = saved.stdout.strip()
    archives = await wsctl(orchestrator, "archives", "list")
    assert "before-delete" in table_row(archives.stdout, archive_id)

    deleted = await wsctl(orchestrator, "delete", session_id)
    assert deleted.exit_code == 0, deleted.output
    gone = await wsctl(orchestrator, "exec", session_id, "--", "true")
    assert gone.exit_code != 0

    restored = await wsctl(orchestrator, "restore", archive_id)
    assert restored.exit_code == 0, restored.output
    status, page = await http_get(restored.stdout.strip())
    assert status == 200 and "Hello from node-basic" in page


async def test_create_reports_the_failed_phase_and_its_output(orchestrator: OrchestratorUnderTest) -> None:
    result = await wsctl(orchestrator, "create", "failing-install")

    assert result.exit_code == 1
    assert "failed in install" in result.stderr
    assert "npm ERR! 404 no-such-package" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["create", "no-such-template"], "NOT_FOUND: no template 'no-such-template'"),
        (["create", "invalid"], "FAILED_PRECONDITION: template 'invalid' is invalid"),
        (["read", "ws-0000000000", "x"], "NOT_FOUND"),
        (["delete", "ws-0000000000"], "NOT_FOUND: no session 'ws-0000000000': `wsctl sessions list` shows"),
        (["restore", "ar-0000000000"], "NOT_FOUND: no archive 'ar-0000000000': `wsctl archives list` shows"),
        (["create", "node-basci"], "did you mean 'node-basic'?"),
        (["create", "rails"], "the templates are dying-dev, failing-install, node-basic"),
        (["logs", "ws-0000000000"], "`wsctl sessions list`"),
    ],
)
async def test_bad_input_gets_the_status_and_message(
    orchestrator: OrchestratorUnderTest, args: list[str], expected: str
) -> None:
    result = await wsctl(orchestrator, *args)

    assert result.exit_code == 1
    assert expected in result.stderr
    assert "Traceback" not in result.output
    assert not re.search(r"\bList(Sessions|Archives|Templates)\b", result.stderr), "the hint names the RPC"


def test_an_unreachable_orchestrator_is_reported_with_its_address() -> None:
    result = CliRunner().invoke(app, ["--server", "127.0.0.1:1", "templates", "list"], env=ENV)

    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.stderr
    assert "is the orchestrator running at 127.0.0.1:1?" in result.stderr


def test_labels_must_be_key_value() -> None:
    result = CliRunner().invoke(app, ["--server", "127.0.0.1:1", "create", "node-basic", "-l", "novalue"], env=ENV)

    assert result.exit_code == 2
    assert "is not KEY=VALUE" in result.output


async def test_write_edit_and_read_a_file(orchestrator: OrchestratorUnderTest, tmp_path: Path) -> None:
    session = await ready_session(orchestrator)

    wrote = await wsctl(orchestrator, "write", session.id, "notes/todo.txt", stdin="one\ntwo\n")
    assert wrote.exit_code == 0, wrote.output
    local = tmp_path / "page.html"
    local.write_text("<h1>Hello from a file</h1>\n")
    from_file = await wsctl(orchestrator, "write", session.id, "src/index.html", "--from", str(local))
    assert from_file.exit_code == 0, from_file.output

    edited = await wsctl(orchestrator, "edit", session.id, "notes/todo.txt", "two", "three")
    assert edited.exit_code == 0, edited.output
    assert "-two\n+three\n" in edited.stdout

    read = await wsctl(orchestrator, "read", session.id, "notes/todo.txt")
    assert read.stdout == "one\nthree\n"
    status, page = await page_showing(session.preview_url, "Hello from a file")
    assert status == 200 and "Hello from a file" in page

    missing = await wsctl(orchestrator, "edit", session.id, "notes/todo.txt", "four", "five")
    assert missing.exit_code == 1 and "FAILED_PRECONDITION" in missing.stderr, missing.output
    assert (await wsctl(orchestrator, "read", session.id, "notes/todo.txt")).stdout == "one\nthree\n"


async def test_logs_print_the_dev_servers_output_and_follow_it(orchestrator: OrchestratorUnderTest) -> None:
    session = await ready_session(orchestrator)

    logs = await wsctl(orchestrator, "logs", session.id)
    assert logs.exit_code == 0, logs.output
    assert "node-basic listening on http://0.0.0.0:" in logs.stdout

    # Followed from a real terminal process: new output shows up as it comes, Ctrl-C stops following only.
    follower = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator.cli", "--server", f"127.0.0.1:{orchestrator.orchestrator.port}",
        "logs", "-f", session.id,
        cwd=REPO, env={**os.environ, **ENV}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            assert b"listening on" in await follower.stdout.readline()
            # node --watch restarts the server when server.js changes: a second "listening" line.
            touched = await wsctl(orchestrator, "edit", session.id, "server.js", "listening on", "listening again on")
            assert touched.exit_code == 0, touched.output
            while b"listening again on" not in (line := await follower.stdout.readline()):
                assert line, "the follower stopped"
            follower.send_signal(signal.SIGINT)
            assert await follower.wait() == 130
    finally:
        if follower.returncode is None:
            follower.kill()
            await follower.wait()
    status, _ = await http_get(session.preview_url)
    assert status == 200, "stopping to follow must not stop the dev server"


async def test_watch_shows_a_sessions_progress_until_it_settles(orchestrator: OrchestratorUnderTest) -> None:
    session = (await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session

    watched = await wsctl(orchestrator, "watch", session.id)

    assert watched.exit_code == 0, watched.output
    assert (
        watched.stdout.strip()
        == (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=session.id))).session.preview_url
    )
    assert "✓ agent healthy" in watched.stderr
    again = await wsctl(orchestrator, "watch", session.id)  # settled: its history, then the URL
    assert (again.exit_code, again.stdout) == (0, watched.stdout), again.output
    assert "✓ agent healthy" in again.stderr and "✓ ready" in again.stderr
    failing = (await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="failing-install"))).session
    watched = await wsctl(orchestrator, "watch", failing.id)
    assert watched.exit_code == 1 and "failed in install" in watched.stderr


async def test_an_unreachable_agent_is_reported_with_its_endpoint(orchestrator: OrchestratorUnderTest) -> None:
    session = await ready_session(orchestrator)
    await orchestrator.orchestrator.runtime.stop(session.id)  # the workspace is gone; its record says READY

    result = await wsctl(orchestrator, "read", session.id, "package.json")

    assert result.exit_code == 1
    assert "UNAVAILABLE" in result.stderr
    assert f"the session's agent at {session.agent_endpoint} did not answer" in result.stderr
    assert "orchestrator running" not in result.stderr


async def test_the_readme_wsctl_lines_work_as_written(orchestrator: OrchestratorUnderTest) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Templates and `wsctl`") :]
    (block,) = re.findall(r"```sh\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    lines = [line for line in block.splitlines() if line.strip()]
    assert lines[0] == ". .venv/bin/activate"
    # The environment running the tests, wherever it is; the README's server is the default one, ours is not.
    script = ["set -euo pipefail", f". {ENV_BIN}/activate", *lines[1:]]
    env = {**os.environ, **ENV, "WSCTL_SERVER": f"127.0.0.1:{orchestrator.orchestrator.port}"}
    shell = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        "\n".join(script),
        cwd=REPO,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(120):
        stdout, stderr = await shell.communicate()

    assert shell.returncode == 0, stdout.decode() + stderr.decode()
    assert re.search(r"^\+\s*<h1>Hi from node-basic</h1>$", stdout.decode(), re.M), "edit prints its diff"
    assert re.search(r"^src/index\.html:\d+:\s*<h1>Hi from node-basic</h1>$", stdout.decode(), re.M), stdout.decode()
    assert "node-basic listening on" in stdout.decode()
    assert "deleted ws-" in stderr.decode()
