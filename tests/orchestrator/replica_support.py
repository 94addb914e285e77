"""Orchestrator replicas as real processes (`python -m orchestrator`) of one instance on one database, for the
tests of several replicas: started on free loopback ports, killed at will, stopped (SIGTERM, then SIGKILL) at the
end."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from grpc import aio

from orchestrator.config import OrchestratorConfig
from tests.conftest import REPO
from tests.live_orchestrator import _wait_serving, free_port
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

STOP_TIMEOUT_S = 20.0


@dataclass
class Replica:
    address: str
    process: subprocess.Popen[bytes]
    channel: aio.Channel
    stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub
    log: Path

    def kill(self) -> None:
        """SIGKILL: no resignation, no handover; its leases run out."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


class Replicas:
    """Replicas of `config` (runtime, image, instance id, templates, archive store) on `database`, each with the
    lease TTL `lease_ttl_s`, `env` added to the environment. With `shared_data_dir` they share config.data_dir
    (the local archive directory, and the local runtime's workspaces); otherwise each has a data dir of its own
    under `directory`, as replicas on different machines do."""

    def __init__(
        self,
        config: OrchestratorConfig,
        database: str,
        directory: Path,
        *,
        lease_ttl_s: float,
        shared_data_dir: bool,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._database = database
        self._directory = directory
        self._lease_ttl_s = lease_ttl_s
        self._shared_data_dir = shared_data_dir
        self._env = dict(env or {})
        self.started: list[Replica] = []

    def start(self, *flags: str) -> Replica:
        """A new replica, once it answers health checks; `flags` are added to its command line."""
        config = self.config
        n = len(self.started)
        data_dir = config.data_dir if self._shared_data_dir else self._directory / f"replica-{n}"
        data_dir.mkdir(parents=True, exist_ok=True)
        address = f"127.0.0.1:{free_port()}"
        log = self._directory / f"replica-{n}.log"
        store = ("--archive-store", config.archive_store) if config.archive_store else ()
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "orchestrator", "--listen", address, "--data-dir", str(data_dir),
                    "--database", self._database, "--runtime", config.runtime, "--image", config.image,
                    "--instance-id", config.resolved_instance_id(), "--templates-dir", str(config.templates_dir),
                    "--lease-ttl", str(self._lease_ttl_s), "--no-install-cache", *store, *flags,
                ],
                cwd=REPO, env={**os.environ, **self._env}, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_serving(address, process, log)
        channel = aio.insecure_channel(address)
        replica = Replica(address, process, channel, orchestrator_pb2_grpc.OrchestratorServiceStub(channel), log)
        self.started.append(replica)
        return replica

    async def close(self) -> None:
        """Stops every replica still running (SIGTERM, as a deployment does; SIGKILL after STOP_TIMEOUT_S)."""
        for replica in self.started:
            await replica.channel.close()
            with contextlib.suppress(ProcessLookupError):
                replica.process.send_signal(signal.SIGTERM)
        for replica in self.started:
            try:
                replica.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()
