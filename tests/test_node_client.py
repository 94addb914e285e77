"""The Node.js client example (clients/node) against a real orchestrator with the local runtime: a session
created, followed to READY, a file read and a command run through the agent, the session deleted."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import REPO
from tests.live_orchestrator import running_orchestrator
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

CLIENT = REPO / "clients" / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    """clients/node with its dependencies installed from package-lock.json (`npm ci` once, from the registry)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if os.environ.get("CI"):
            pytest.fail("Node.js and npm are needed for the Node.js client test")
        pytest.skip("Node.js and npm are not installed")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=CLIENT, check=True, timeout=300)
    return CLIENT


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[str]:
    with running_orchestrator(tmp_path / "orchestrator") as address:
        yield address


def test_example_runs_a_whole_session(node_client: Path, orchestrator: str) -> None:
    result = subprocess.run(
        ["node", "example.js", orchestrator, "node-basic"], cwd=node_client, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()

    created = re.fullmatch(r"session (ws-\w+): SESSION_STATE_(PENDING|STARTING)", lines[0])
    assert created, lines[0]
    session_id = created.group(1)
    assert "phase PHASE_READY: PHASE_OUTCOME_SUCCEEDED" in lines
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
