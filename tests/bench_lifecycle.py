"""Lifecycle benchmark: fork, pause and resume against their baselines in the same run, through a real orchestrator
(gRPC, in this process). A benchmark, not a test.

Run: python tests/bench_lifecycle.py [--template vite-react] [--runtime docker|local] [--runs N] [--warm-pool N]
                                    [--extra-ca-bundle PEM]   (npm behind a TLS-intercepting proxy)

Each figure is the time from the call to WatchSession's READY (pause: to PauseSession's answer):
  create          CreateSession of the template (warm pool member or cold; install cache warm after the first)
  fork            ForkSession of a READY session of it (node_modules reinstalled: the install cache applies; the
                  first fork of a source whose lockfile its install rewrote misses, and stores the entry the
                  next forks hit: the median is the steady state with --runs 3 or more)
  save+restore    SaveSession of it, then CreateSession from the archive (the other way to copy a workspace)
  pause / resume  PauseSession, then ResumeSession to READY
  delete+create   DeleteSession, then CreateSession (what pause/resume replaces)
  copy node_modules  the source's node_modules streamed agent to agent (CreateArchive with no default excludes
                  into ExtractArchive): what a fork would pay to copy it rather than reinstall it
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from grpc import aio  # noqa: E402

from orchestrator.agent_client import AgentClient  # noqa: E402
from orchestrator.config import OrchestratorConfig  # noqa: E402
from orchestrator.server import create_server  # noqa: E402
from tests.orchestrator.conftest import stop_all_workspaces  # noqa: E402
from workspace.orchestrator.v1 import orchestrator_pb2 as pb  # noqa: E402
from workspace.orchestrator.v1 import orchestrator_pb2_grpc  # noqa: E402

READY = pb.SESSION_STATE_READY
T = TypeVar("T")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Bench:
    def __init__(self, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub, template: str) -> None:
        self.stub = stub
        self.template = template
        self.samples: dict[str, list[float]] = {}

    async def timed(self, name: str, work: Awaitable[T]) -> T:
        """`work` awaited (a coroutine does nothing before), its duration kept under `name`."""
        started = time.perf_counter()
        result = await work
        self.samples.setdefault(name, []).append(time.perf_counter() - started)
        return result

    async def ready(self, session_id: str) -> pb.Session:
        async for _ in self.stub.WatchSession(pb.WatchSessionRequest(id=session_id)):
            pass
        session = (await self.stub.GetSession(pb.GetSessionRequest(id=session_id))).session
        if session.state != READY:
            raise SystemExit(f"session {session_id} is {pb.SessionState.Name(session.state)}: {session.failure}")
        return session

    async def create(self) -> pb.Session:
        created = await self.stub.CreateSession(pb.CreateSessionRequest(template=self.template))
        return await self.ready(created.session.id)

    async def fork(self, source: pb.Session) -> pb.Session:
        forked = await self.stub.ForkSession(pb.ForkSessionRequest(id=source.id))
        return await self.ready(forked.session.id)

    async def save_restore(self, source: pb.Session) -> pb.Session:
        archive = (await self.stub.SaveSession(pb.SaveSessionRequest(id=source.id))).archive
        created = await self.stub.CreateSession(pb.CreateSessionRequest(archive_id=archive.id))
        return await self.ready(created.session.id)

    async def pause(self, session: pb.Session) -> None:
        await self.stub.PauseSession(pb.PauseSessionRequest(id=session.id))

    async def resume(self, session: pb.Session) -> pb.Session:
        await self.stub.ResumeSession(pb.ResumeSessionRequest(id=session.id))
        return await self.ready(session.id)

    async def delete_create(self, session: pb.Session) -> pb.Session:
        await self.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
        return await self.create()

    async def delete(self, *sessions: pb.Session) -> None:
        for session in sessions:
            await self.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))


async def copy_node_modules(source: pb.Session, target: pb.Session) -> None:
    """The source's node_modules into the target, agent to agent, as a fork copying it would (beside the
    target's own node_modules, which the install cache may still be archiving)."""
    source_agent = AgentClient(source.agent_endpoint, source.agent_token)
    target_agent = AgentClient(target.agent_endpoint, target.agent_token)
    try:
        stream = await source_agent.create_archive(path="node_modules", no_default_excludes=True)
        await target_agent.extract_archive(stream, "", destination="bench-node_modules-copy")
    finally:
        await source_agent.close()
        await target_agent.close()


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    scratch = Path(tempfile.mkdtemp(prefix="bench-lifecycle-"))
    image = OrchestratorConfig.image
    if args.runtime == "docker":
        from core_image.build import ensure_image

        image = ensure_image()
    config = OrchestratorConfig(
        listen="127.0.0.1:0", data_dir=scratch / "data", runtime=args.runtime, image=image,
        instance_id=f"bench-{secrets.token_hex(4)}", warm_pool=args.warm_pool, idle_ttl_s=0,
        extra_ca_bundle=args.extra_ca_bundle,
    )  # fmt: skip
    orchestrator = await create_server(config)
    await orchestrator.start()
    channel = aio.insecure_channel(f"127.0.0.1:{orchestrator.port}")
    bench = Bench(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), args.template)
    try:
        note(f"warming up: one {args.template} session (fills the install cache)")
        source = await bench.create()
        await asyncio.sleep(args.settle * 3)  # the install cache entry is written after READY
        for run_number in range(args.runs):
            note(f"run {run_number + 1}/{args.runs}")
            fresh = await bench.timed("create", bench.create())
            fork = await bench.timed("fork", bench.fork(source))
            if args.template_has_node_modules:
                await bench.timed("copy node_modules", copy_node_modules(source, fork))
            restored = await bench.timed("save+restore", bench.save_restore(source))
            await bench.timed("pause", bench.pause(fresh))
            fresh = await bench.timed("resume", bench.resume(fresh))
            again = await bench.timed("delete+create", bench.delete_create(fresh))
            await bench.delete(fork, restored, again)
            await asyncio.sleep(args.settle)  # let the warm pool refill, as between a person's clicks
        await bench.delete(source)
    finally:
        await channel.close()
        await orchestrator.stop(None)
        await stop_all_workspaces(config)
    return bench.samples


def table(samples: dict[str, list[float]], args: argparse.Namespace) -> str:
    rows = [["operation", "median s", "min s", "max s", "runs"]]
    for name, values in samples.items():
        rows.append(
            [name, f"{statistics.median(values):.3f}", f"{min(values):.3f}", f"{max(values):.3f}", str(len(values))]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    title = f"{args.template} on {args.runtime}, warm pool {args.warm_pool}, {args.runs} runs"
    return "\n".join([title, *lines])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", default="node-basic")
    parser.add_argument("--runtime", default="docker", choices=("docker", "local"))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warm-pool", type=int, default=1)
    parser.add_argument("--extra-ca-bundle", type=Path, help="PEM file workspaces trust (see the README)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds between runs (pool refill, cache write)")
    args = parser.parse_args()
    args.template_has_node_modules = (REPO / "templates" / args.template / "package-lock.json").exists()
    print(table(asyncio.run(run(args)), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
