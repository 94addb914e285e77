"""Sessions created per second with one and with two orchestrator replicas on one PostgreSQL database, beside one
orchestrator on SQLite (the default) in the same run: `python tests/bench_replicas.py [--sessions N]`.

Each configuration gets fresh orchestrator processes (no pools, no install cache: every create is a cold start)
and N CreateSession calls, `--concurrency` at a time, spread round-robin over its replicas; the rate is N over the
time from the first call to the last answer (CreateSession answers once the workspace started). Then the time
until all N are READY, and every session is deleted before the next configuration."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from grpc import aio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.config import OrchestratorConfig
from tests.live_orchestrator import _wait_serving, free_port
from tests.orchestrator.conftest import stop_all_workspaces
from tests.postgres_support import server_binaries, start_postgres
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

REPO = Path(__file__).resolve().parent.parent


def start_replicas(count: int, database: str, runtime: str, image: str, work: Path) -> tuple[list, str]:
    """`count` orchestrator processes on `database` ("" for SQLite) sharing one data dir; (processes, instance id)."""
    instance = f"bench-{secrets.token_hex(4)}"
    data = work / instance
    data.mkdir()
    replicas = []
    for n in range(count):
        address = f"127.0.0.1:{free_port()}"
        log = work / f"{instance}-{n}.log"
        with open(log, "ab") as output:
            process = subprocess.Popen(
                [
                    sys.executable, "-m", "orchestrator", "--listen", address, "--data-dir", str(data),
                    "--runtime", runtime, "--image", image, "--instance-id", instance, "--warm-pool", "0",
                    "--no-install-cache", "--max-sessions", "1000", "--idle-ttl", "0",
                    *(("--database", database) if database else ()),
                ],
                cwd=REPO, env=os.environ.copy(), stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        replicas.append((address, process))
        _wait_serving(address, process, log)
    return replicas, instance


async def measure(addresses: list[str], sessions: int, concurrency: int) -> tuple[float, float, int]:
    """(CreateSession answers per second, seconds until all settled, failures: refused creates and sessions
    that did not become READY)."""
    channels = [aio.insecure_channel(address) for address in addresses]
    stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(channel) for channel in channels]
    gate = asyncio.Semaphore(concurrency)
    ids: list[str] = []
    failures = 0

    async def create(n: int) -> None:
        nonlocal failures
        async with gate:
            try:
                answer = await stubs[n % len(stubs)].CreateSession(pb.CreateSessionRequest(template="node-basic"))
                ids.append(answer.session.id)
            except aio.AioRpcError:
                failures += 1

    started = time.monotonic()
    await asyncio.gather(*(create(n) for n in range(sessions)))
    created_s = time.monotonic() - started

    async def ready(session_id: str) -> bool:
        """Whether the session settled READY (the watch ends when it settles, READY or FAILED)."""
        state = pb.SESSION_STATE_UNSPECIFIED
        async for event in stubs[0].WatchSession(pb.WatchSessionRequest(id=session_id)):
            if event.HasField("session"):
                state = event.session.state
        return state == pb.SESSION_STATE_READY

    settled = await asyncio.gather(*(ready(session_id) for session_id in ids))
    ready_s = time.monotonic() - started
    failures += settled.count(False)
    await asyncio.gather(*(stubs[0].DeleteSession(pb.DeleteSessionRequest(id=session_id)) for session_id in ids))
    for channel in channels:
        await channel.close()
    return len(ids) / created_s, ready_s, failures


def stop(replicas: list) -> None:
    for _, process in replicas:
        process.send_signal(signal.SIGTERM)
    for _, process in replicas:
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="CreateSession calls per configuration (20)")
    parser.add_argument("--concurrency", type=int, default=4, help="calls under way at once (4)")
    parser.add_argument("--runtime", default="docker", choices=("docker", "local"))
    args = parser.parse_args()
    image = OrchestratorConfig.image
    if args.runtime == "docker":
        from core_image.build import ensure_image

        image = ensure_image()
    binaries = server_binaries()
    if binaries is None:
        sys.exit("PostgreSQL's server is not installed: `make tools` installs Debian's postgresql")
    postgres = start_postgres(binaries)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as work:
        try:
            for label, count, database in (
                ("SQLite, 1 replica (baseline)", 1, ""),
                ("PostgreSQL, 1 replica", 1, postgres.create_database()),
                ("PostgreSQL, 2 replicas", 2, postgres.create_database()),
            ):
                replicas, instance = start_replicas(count, database, args.runtime, image, Path(work))
                try:
                    rate, ready_s, failures = asyncio.run(
                        measure([address for address, _ in replicas], args.sessions, args.concurrency)
                    )
                finally:
                    stop(replicas)
                    config = OrchestratorConfig(
                        data_dir=Path(work) / instance, runtime=args.runtime, image=image, instance_id=instance
                    )
                    asyncio.run(stop_all_workspaces(config))
                rows.append((label, rate, ready_s, failures))
        finally:
            postgres.stop()
    print(
        f"\n{args.sessions} node-basic sessions, {args.concurrency} at a time, runtime {args.runtime}, {os.cpu_count()} cores"
    )
    print(f"| {'configuration':<30} | created/s | all READY (s) | failures |")
    print(f"| {'-' * 30} | --------- | ------------- | -------- |")
    for label, rate, ready_s, failures in rows:
        print(f"| {label:<30} | {rate:9.2f} | {ready_s:13.1f} | {failures:8d} |")


if __name__ == "__main__":
    main()
