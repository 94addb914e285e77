"""The typed TypeScript client (clients/node): it compiles under `tsc --strict`, a program misusing it does not,
and its own tests (node --test) and the example pass against a real orchestrator with the local runtime."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO
from tests.live_orchestrator import running_orchestrator
from tests.node_support import CLIENT, node_client, tsc
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

MISUSE = Path("test") / "misuse" / "misuse.ts"


@pytest.fixture(scope="module")
def built() -> Path:
    """clients/node compiled (`tsc --strict`: the client, its tests, the examples, the NestJS one included)."""
    client = node_client()
    result = tsc("-p", ".", "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    return client


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[str]:
    with running_orchestrator(tmp_path / "orchestrator") as address:
        yield address


def test_the_client_its_tests_and_examples_compile_strict(built: Path) -> None:
    assert (built / "dist" / "src" / "index.js").is_file()
    assert (built / "dist" / "src" / "index.d.ts").is_file()
    assert (built / "dist" / "examples" / "nestjs" / "workspaces.service.js").is_file()


def test_the_readme_s_typescript_compiles(built: Path, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## From a Node.js backend") :]
    snippet = re.search(r"```ts\n(.*?)```", section, re.DOTALL)
    assert snippet, "the README's Node.js section has no TypeScript example"
    (tmp_path / "readme.ts").write_text(snippet.group(1) + "export {};\n")
    (tmp_path / "package.json").write_text('{"type": "module"}')  # top-level await: an ES module
    config = {
        "extends": str(CLIENT / "tsconfig.json"),
        "compilerOptions": {
            "noEmit": True,
            "rootDir": "/",
            "paths": {"workspace-core-node-client": [str(CLIENT / "src" / "index.ts")]},
            "typeRoots": [str(CLIENT / "node_modules" / "@types")],
        },
        "include": ["readme.ts"],
        "exclude": [],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(config))
    result = tsc("-p", str(tmp_path / "tsconfig.json"), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr


def _marked_errors(source: str) -> dict[int, tuple[str, str]]:
    """Line number -> (error code, words its message must hold) from the `// error TSnnnn[: words]` markers."""
    marks = {}
    for number, line in enumerate(source.splitlines(), start=1):
        found = re.search(r"// error (TS\d{4})(?:: (.+))?$", line)
        if found:
            marks[number] = (found.group(1), found.group(2) or "")
    return marks


def _reported_errors(output: str) -> dict[int, tuple[str, str]]:
    """Line number -> (error code, whole message with its indented continuation lines) of tsc's misuse.ts errors."""
    errors: dict[int, tuple[str, str]] = {}
    last = None
    for line in output.splitlines():
        found = re.match(r"test/misuse/misuse\.ts\((\d+),\d+\): error (TS\d{4}): (.*)", line)
        if found:
            last = int(found.group(1))
            assert last not in errors, f"two errors on line {last}:\n{output}"
            errors[last] = (found.group(2), found.group(3))
        elif line.startswith(" ") and last is not None:
            errors[last] = (errors[last][0], errors[last][1] + "\n" + line.strip())
        else:
            pytest.fail(f"an error outside the marked lines:\n{line}\n\n{output}")
    return errors


def test_a_program_misusing_the_client_fails_to_compile(built: Path) -> None:
    result = tsc("-p", str(MISUSE.parent / "tsconfig.json"), "--strict")
    assert result.returncode != 0, "the misuse program compiled"
    marks = _marked_errors((built / MISUSE).read_text())
    reported = _reported_errors(result.stdout)
    assert {line: code for line, (code, _) in reported.items()} == {line: code for line, (code, _) in marks.items()}
    for line, (_, words) in marks.items():
        assert words in reported[line][1], f"line {line}: {reported[line][1]!r} does not say {words!r}"
    # Wrong types, a missing id, an unknown field, comparing an enum with a string: each one refused.
    assert {"TS2322", "TS2345", "TS2353", "TS2367", "TS2554"} <= {code for code, _ in marks.values()}


def test_the_client_s_tests_pass_against_a_real_orchestrator(built: Path, orchestrator: str) -> None:
    result = subprocess.run(
        ["node", "--test", "dist/test/client.test.js"],
        cwd=built,
        env={**os.environ, "WORKSPACE_ORCHESTRATOR": orchestrator},
        capture_output=True,
        text=True,
        timeout=240,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    counts = dict(re.findall(r"^# (pass|fail|cancelled|skipped) (\d+)$", result.stdout, re.MULTILINE))
    assert counts.get("fail") == "0" and counts.get("cancelled") == "0" and counts.get("skipped") == "0", report
    assert int(counts["pass"]) >= 15, report
    for name in (
        "a named process is followed through a dropped connection",
        "a fork has the files of its source and a token of its own",
        "a preview token is minted with its expiry",
    ):
        assert re.search(rf"^\s*ok \d+ - {name}", result.stdout, re.MULTILINE), report


def test_the_example_runs_a_whole_session(built: Path, orchestrator: str) -> None:
    result = subprocess.run(
        ["node", "dist/examples/example.js", orchestrator, "node-basic"],
        cwd=built,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    created = re.fullmatch(r"session (ws-\w+): (PENDING|STARTING)", lines[0])
    assert created, lines[0]
    session_id = created.group(1)
    assert "phase READY: SUCCEEDED" in lines
    assert any(line.startswith("ready: preview http://127.0.0.1:") for line in lines)
    assert "package.json names node-basic" in lines
    # The command's output, streamed: `node --version`, then the workspace listing.
    assert any(re.fullmatch(r"v\d+\.\d+\.\d+", line) for line in lines)
    assert {"package.json", "server.js", "src"} <= set(lines)
    assert "exit code 0" in lines
    assert lines[-1] == f"deleted {session_id}"

    with grpc.insecure_channel(orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        try:
            state = stub.GetSession(pb.GetSessionRequest(id=session_id)).session.state
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
        else:
            assert state == pb.SESSION_STATE_STOPPED
