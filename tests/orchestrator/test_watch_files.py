"""File watching from a terminal: the README's `wsctl watch --files` and grpcurl lines, run as written against a
session of a real orchestrator (local runtime, and Docker's), follow changes made through the agent and resume."""

from __future__ import annotations

import asyncio
import os
import re
import signal

import pytest

from common.tools import ENV_BIN
from orchestrator.agent_client import AgentClient
from tests.conftest import REPO
from tests.orchestrator.conftest import OrchestratorUnderTest
from tests.orchestrator.test_cli import ENV, ready_session
from workspace.agent.v1 import agent_pb2 as pb

# A guard against a hang, never a measure.
PATIENCE = 90


def readme_lines() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## File watching") :]
    (block,) = re.findall(r"```sh\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    return [line for line in block.splitlines() if line.strip()]


class Shell:
    """One README line in bash, with the variables it names set, read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None and process.stderr is not None
        self.process = process
        self.stdout: asyncio.StreamReader = process.stdout
        self.stderr: asyncio.StreamReader = process.stderr

    @classmethod
    async def start(cls, line: str, orchestrator: OrchestratorUnderTest, **variables: str) -> Shell:
        env = {**os.environ, **ENV, "WSCTL_SERVER": f"127.0.0.1:{orchestrator.orchestrator.port}", **variables}
        env["PATH"] = f"{ENV_BIN}:{env['PATH']}"
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", f"exec {line}", cwd=REPO, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        return cls(process)

    async def line(self, stream: asyncio.StreamReader, matching: str) -> str:
        """The next line of `stream` that matches `matching` (the test fails if the stream ends first)."""
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the command ended before printing {matching!r}: {(await self.stderr.read()).decode()}"
            if re.search(matching, line):
                return line

    async def interrupt(self) -> int:
        self.process.send_signal(signal.SIGINT)
        return await self.process.wait()

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.mark.parametrize("runtime_kind", ["local", pytest.param("docker", marks=pytest.mark.docker)])
async def test_the_readme_watch_lines_follow_changes_and_resume(orchestrator: OrchestratorUnderTest) -> None:
    follow_line, resume_line, grpcurl_line = readme_lines()
    session = await ready_session(orchestrator)
    agent = AgentClient(session.agent_endpoint, session.agent_token)

    async def write(path: str, content: bytes) -> None:
        await agent.edit([pb.EditOperation(write=pb.WriteFile(path=path, content=content))])

    watching = await Shell.start(follow_line, orchestrator, session=session.id)
    try:
        async with asyncio.timeout(PATIENCE):
            ready = await watching.line(watching.stderr, r"resume with --since \d+")
            cursor = int(ready.rsplit(maxsplit=1)[1])
            await write("src/watched.js", b"console.log(1);\n")
            await write("outside.txt", b"not below src")
            assert await watching.line(watching.stdout, "watched") == f"{cursor + 1} create src/watched.js 16\n"
            assert await watching.interrupt() == 130
    finally:
        await watching.kill()

    # While nobody watches: changes to two files, which the resume line picks up from the journal.
    await write("src/watched.js", b"console.log(22);\n")
    await write("src/second.js", b"2")
    resumed = await Shell.start(resume_line, orchestrator, session=session.id, last=str(cursor + 1))
    try:
        async with asyncio.timeout(PATIENCE):
            lines = [await resumed.line(resumed.stdout, "src/") for _ in range(2)]
            assert await resumed.interrupt() == 130
    finally:
        await resumed.kill()
    # outside.txt took cursor + 2: it is not below src.
    assert lines == [f"{cursor + 3} modify src/watched.js 17\n", f"{cursor + 4} create src/second.js 1\n"]

    grpcurl = await Shell.start(grpcurl_line, orchestrator, AGENT=session.agent_endpoint, TOKEN=session.agent_token)
    try:
        async with asyncio.timeout(PATIENCE):
            await grpcurl.line(grpcurl.stdout, '"ready"')
            await write("src/grpcurl.js", b"1")
            assert '"path": "src/grpcurl.js"' in await grpcurl.line(grpcurl.stdout, '"path"')
    finally:
        await grpcurl.kill()
        await agent.close()


async def test_a_watch_outside_the_workspace_is_refused_like_read(orchestrator: OrchestratorUnderTest) -> None:
    from tests.orchestrator.test_cli import wsctl

    session = await ready_session(orchestrator)

    watched = await wsctl(orchestrator, "watch", session.id, "--files", "../etc")
    read = await wsctl(orchestrator, "read", session.id, "../etc/passwd")

    assert watched.exit_code == read.exit_code == 1
    assert "INVALID_ARGUMENT" in watched.stderr and "INVALID_ARGUMENT" in read.stderr, watched.stderr
    assert "'..'" in watched.stderr
