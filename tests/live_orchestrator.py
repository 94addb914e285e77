"""A real orchestrator process (`python -m orchestrator --runtime local`) for tests that drive it from outside:
grpcurl, the Node.js client, traces exported over OTLP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.runtime import make_runtime
from tests.conftest import REPO

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_orchestrator(data_dir: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Starts the orchestrator with the local runtime and the repository's templates, yields its address once
    it answers health checks, and stops it with SIGTERM (then deletes the workspaces it left running)."""
    address = f"127.0.0.1:{free_port()}"
    log = data_dir / "orchestrator.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as output:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "--listen",
                address,
                "--data-dir",
                str(data_dir),
                "--runtime",
                "local",
            ],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_serving(address, process, log)
        yield address
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _stop_leftover_workspaces(data_dir)


def _wait_serving(address: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the orchestrator exited with {process.returncode}:\n{log.read_text()}")
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"the orchestrator did not answer within {STARTUP_TIMEOUT_S:g} s:\n{log.read_text()}")


def _stop_leftover_workspaces(data_dir: Path) -> None:
    """A failed test may leave sessions running (the orchestrator keeps them across its restarts): stop them
    the way the orchestrator would, agents and the commands they started."""
    runtime = make_runtime("local", OrchestratorConfig(data_dir=data_dir, runtime="local"))

    async def stop_all() -> None:
        for workspace in await runtime.list():
            if workspace.pool_id:
                await runtime.discard(workspace.pool_id)
            else:
                await runtime.stop(workspace.session_id)

    asyncio.run(stop_all())
