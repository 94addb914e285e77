"""Fleet benchmark: the new way (CreateSession through the real gRPC API on Docker, with and without pools) beside
the old way it replaces (a Dockerfile per template, images in a registry), on one machine in one run.

Run: python tests/bench_orchestrator.py [--runs N] [--npm] [--extra-ca-bundle PEM] [--warm-pool N] [--concurrent N]
Three situations a fleet host meets a template in: (a) it has never seen it (old: pull + run + probe; new: the
core image but an empty data dir), (b) it was just edited, one source file (old: rebuild with a warm build cache
+ run + probe; new: its archive rebuilt, its install cache still hits), (c) steady state (old: image present, run
+ probe; new: warm caches). Also create -> first Exec answered, concurrent creates, and idle memory. One table:
medians and p95 over --runs, the ratio old / new, the goal and whether this run met it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from core_image.build import ensure_image  # noqa: E402
from orchestrator.agent_client import CHANNEL_OPTIONS  # noqa: E402
from orchestrator.errors import OrchestratorError  # noqa: E402
from orchestrator.runtime.base import ORCHESTRATOR_LABEL, SESSION_LABEL  # noqa: E402
from orchestrator.runtime.docker import DockerRuntime  # noqa: E402
from orchestrator.templates import TemplateCatalog, TemplateSpec  # noqa: E402
from tests.bench_fleet import (  # noqa: E402
    OldWay,
    Registry,
    cleanup_old_way,
    container_memory,
    docker,
    edit_source,
    free_port,
)
from tests.s3_server import S3Server, running_s3_server  # noqa: E402
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc  # noqa: E402
from workspace.orchestrator.v1 import orchestrator_pb2 as pb  # noqa: E402
from workspace.orchestrator.v1 import orchestrator_pb2_grpc  # noqa: E402

PHASES = [pb.Phase.Name(p).removeprefix("PHASE_").lower() for p in pb.Phase.values() if p]
READY_TIMEOUT_S = 300.0
SITUATIONS = {"a": "never seen", "b": "just edited", "c": "steady"}
# Situation (a) on a host of no fleet: nothing shared, the install runs from the npm registry.
ALONE = "a alone"
NO_POOL, WARM, HOT = "no pool", "warm pool", "hot pool"
NA_POOLS = "n/a (pools not in this build)"
IDLE_S = 5.0
# Idle sessions measured side by side: their agents share the image's file-backed pages (cygrpc, python, libcrypto:
# ~22 MiB of each agent's RSS), which PSS splits among them and USS leaves out.
IDLE_SESSIONS = 3
# Notes printed under the table: what a figure means beyond its row.
NOTES: list[str] = []


def note(text: str) -> None:
    if text not in NOTES:
        NOTES.append(text)
    print(f"  note: {text}", file=sys.stderr, flush=True)


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(
        next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal"))
    )
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {mem_kib / 1024**2:.1f} GiB, load average {load} at start; "
        f"Docker {docker('version', '--format', '{{.Server.Version}}')} (storage {docker('info', '--format', '{{.Driver}}')}); "
        f"Python {platform.python_version()}"
    )


def pools_in_build() -> bool:
    """Whether this build's orchestrator offers --warm-pool and --hot-pool (until it does, those rows say n/a)."""
    usage = subprocess.run(
        [sys.executable, "-m", "orchestrator", "--help"], cwd=REPO, capture_output=True, text=True
    ).stdout
    return "--warm-pool" in usage and "--hot-pool" in usage


# ---------------------------------------------------------------------------------------------- the new way


@dataclass
class Created:
    seconds: float
    phases: dict[str, float]
    session: pb.Session

    @property
    def from_pool(self) -> bool:
        started = [p for p in self.session.phases if p.phase == pb.PHASE_CONTAINER_STARTED]
        return bool(started) and "pool" in started[0].detail


class Orchestrator:
    """`python -m orchestrator --runtime docker` as a subprocess with its own data dir and instance id."""

    def __init__(
        self, data_dir: Path, image: str, instance_id: str, templates_dir: Path, extra_ca_bundle: Path | None,
        pool_args: list[str], fleet: FleetStore | None = None,
    ) -> None:  # fmt: skip
        self.instance_id = instance_id
        self.fleet = fleet
        self.install_cache = data_dir / "install-cache"
        self.address = f"127.0.0.1:{free_port()}"
        self.log = data_dir / "orchestrator.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "orchestrator",
                    "--runtime",
                    "docker",
                    "--listen",
                    self.address,
                    "--data-dir",
                    str(data_dir),
                    "--templates-dir",
                    str(templates_dir),
                    "--image",
                    image,
                    "--instance-id",
                    instance_id,
                    "--log-level",
                    "WARNING",
                    "--idle-ttl",
                    "0",
                    *(["--extra-ca-bundle", str(extra_ca_bundle)] if extra_ca_bundle else []),
                    *pool_args,
                    *(fleet.args if fleet else []),
                ],
                cwd=REPO,
                env={**os.environ, **(fleet.env if fleet else {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the benchmark, whose cleanup stops it
            )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)
        self._wait_serving()

    def _wait_serving(self, timeout: float = 60.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the orchestrator exited:\n{self.log.read_text()[-3000:]}")
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError(f"the orchestrator did not answer within {timeout:g} s:\n{self.log.read_text()[-3000:]}")

    def install_cache_entries(self) -> int:
        """How many install-cache entries its store holds (the fleet's, when it has one)."""
        if self.fleet:
            return self.fleet.install_cache_entries()
        return len(list(self.install_cache.glob("*.tar.gz")))

    def create(self, template: str) -> Created:
        """CreateSession, then WatchSession until READY: the seconds between, and each phase's seconds. The
        session is left running (see delete); one that fails is deleted and raises RuntimeError."""
        started = time.perf_counter()
        session = self.stub.CreateSession(pb.CreateSessionRequest(template=template)).session
        session = self._until_settled(session)
        elapsed = time.perf_counter() - started
        if session.state != pb.SESSION_STATE_READY:
            self.delete(session.id)
            raise RuntimeError(f"session {session.id} of {template} did not become READY: {session.failure}")
        phases = {
            pb.Phase.Name(p.phase).removeprefix("PHASE_").lower(): p.duration.ToNanoseconds() / 1e9
            for p in session.phases
        }
        return Created(elapsed, phases, session)

    def _until_settled(self, session: pb.Session) -> pb.Session:
        for event in self.stub.WatchSession(pb.WatchSessionRequest(id=session.id), timeout=READY_TIMEOUT_S):
            if event.WhichOneof("event") == "session" and event.session.state in (
                pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPED,
            ):  # fmt: skip
                return event.session
        return self.stub.GetSession(pb.GetSessionRequest(id=session.id)).session

    def delete(self, session_id: str) -> None:
        self.stub.DeleteSession(pb.DeleteSessionRequest(id=session_id))

    def expect_file(self, session: pb.Session, path: Path, text: str) -> None:
        """Raises RuntimeError unless the session's workspace file `path` holds `text` (read through its agent)."""
        with grpc.insecure_channel(session.agent_endpoint, options=CHANNEL_OPTIONS) as channel:
            start = agent_pb2.ExecRequest(start=agent_pb2.ExecStart(argv=["grep", "-qF", "--", text, str(path)]))
            responses = agent_pb2_grpc.AgentServiceStub(channel).Exec(
                iter([start]), metadata=(("authorization", f"Bearer {session.agent_token}"),), timeout=READY_TIMEOUT_S
            )
            exit_code = next(r.exited.exit_code for r in responses if r.WhichOneof("event") == "exited")
        if exit_code != 0:
            raise RuntimeError(f"session {session.id} does not hold the edit of {path} it was created after")

    def create_and_delete(self, template: str, keep_until: Callable[[], None] = lambda: None) -> Created:
        created = self.create(template)
        try:
            keep_until()
            return created
        finally:
            self.delete(created.session.id)

    def first_exec(self, template: str) -> float:
        """Seconds from CreateSession to the first agent Exec (`true`) answered, as a backend sees it: it asks for
        the session until it has an agent endpoint, then calls Exec (waiting for the agent to listen)."""
        started = time.perf_counter()
        session = self.stub.CreateSession(pb.CreateSessionRequest(template=template)).session
        try:
            while not session.agent_endpoint:
                if session.state in (pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPED):
                    raise RuntimeError(f"session {session.id} of {template} failed: {session.failure}")
                time.sleep(0.005)
                session = self.stub.GetSession(pb.GetSessionRequest(id=session.id)).session
            with grpc.insecure_channel(session.agent_endpoint, options=CHANNEL_OPTIONS) as channel:
                start = agent_pb2.ExecRequest(start=agent_pb2.ExecStart(argv=["true"]))
                responses = agent_pb2_grpc.AgentServiceStub(channel).Exec(
                    iter([start]), metadata=(("authorization", f"Bearer {session.agent_token}"),),
                    wait_for_ready=True, timeout=READY_TIMEOUT_S,
                )  # fmt: skip
                exit_code = next(r.exited.exit_code for r in responses if r.WhichOneof("event") == "exited")
            elapsed = time.perf_counter() - started
            if exit_code != 0:
                raise RuntimeError(f"`true` exited {exit_code} in session {session.id}")
            # Settled before it goes, so the next run does not share the CPU with this one's initialization.
            self._until_settled(session)
            return elapsed
        finally:
            self.delete(session.id)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FleetStore:
    """What a fleet's hosts share in the new way, as they share a registry in the old: an S3 bucket (SeaweedFS on
    loopback) as every orchestrator's --archive-store, so an install one host stored is restored by another."""

    def __init__(self, server: S3Server, run_label: str) -> None:
        self.bucket = f"bench-{run_label}"
        self.client = server.client()
        self.client.create_bucket(Bucket=self.bucket)
        self.args = ["--archive-store", f"s3://{self.bucket}"]
        self.env = server.env()

    def install_cache_entries(self) -> int:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix="install-cache/")
        return sum(1 for page in pages for item in page.get("Contents", []) if item["Key"].endswith(".tar.gz"))


class Pool:
    """How to ask an orchestrator for a pool, and how to tell it is full before a timed create: GetPools reports
    every running pool holding its target ready and preparing none (a warm member's install prefetched, a hot
    entry's dev server answering)."""

    def __init__(self, kind: str, warm_size: int, templates: list[str]) -> None:
        self.kind = kind
        if kind == WARM:
            self.args, self.size = ["--warm-pool", str(warm_size)], warm_size
        elif kind == HOT:
            self.args, self.size = [a for t in templates for a in ("--hot-pool", f"{t}=1")], len(templates)
        else:
            # `python -m orchestrator` keeps a warm pool unless told not to: the no-pool rows must say so.
            self.args, self.size = ["--warm-pool", "0"], 0

    def wait_full(self, orchestrator: Orchestrator, timeout: float = 300.0) -> None:
        if not self.size:
            return
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            # A hot row's orchestrator keeps its default warm pool too: a create there must not share the CPU with
            # that pool's filling either.
            response = orchestrator.stub.GetPools(pb.GetPoolsRequest(), timeout=5)
            pools = ([response.warm] if response.HasField("warm") else []) + list(response.hot)
            if pools and all(pool.ready >= pool.target and not pool.preparing for pool in pools):
                return
            time.sleep(0.1)
        note(f"a {self.kind} was not full within {timeout:g} s before a create; it was timed anyway")


def agent_rss(container: str) -> float | None:
    """The agent process's VmRSS in MiB inside the container (from /proc, by its command line `python -m agent`),
    or None when no such process is found."""
    script = (
        "import pathlib\n"
        "for d in pathlib.Path('/proc').glob('[0-9]*'):\n"
        "    try: argv = (d / 'cmdline').read_bytes().split(b'\\0')\n"
        "    except OSError: continue\n"
        "    if argv[1:3] == [b'-m', b'agent'] and b'tini' not in argv[0]:\n"
        "        print(next(l.split()[1] for l in (d / 'status').read_text().splitlines() if l.startswith('VmRSS')))\n"
    )
    kib = docker("exec", container, "/tools/venv/bin/python", "-c", script).split()
    return int(kib[0]) / 1024 if kib else None


# ---------------------------------------------------------------------------------------------- measuring


class Samples:
    """Seconds (or MiB) per figure, keyed by tuples such as ("ready", template, situation, pool)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, ...], list[float]] = defaultdict(list)
        self.phases: dict[tuple[str, ...], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        self.pool_hits: dict[tuple[str, ...], list[bool]] = defaultdict(list)
        self.failures: dict[tuple[str, ...], list[str]] = defaultdict(list)

    def add(self, key: tuple[str, ...], seconds: float) -> float:
        self.values[key].append(seconds)
        print(f"  {' '.join(key)}: {seconds:.3f}", file=sys.stderr, flush=True)
        return seconds

    def add_created(self, key: tuple[str, ...], created: Created) -> None:
        self.add(key, created.seconds)
        for phase, seconds in created.phases.items():
            self.phases[key][phase].append(seconds)
        self.pool_hits[key].append(created.from_pool)


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[18] if len(values) > 1 else values[0]


def old_way(olds: dict[str, OldWay], runs: int, samples: Samples) -> None:
    for name, old in olds.items():
        print(f"{name}: old way (build and push untimed)", file=sys.stderr, flush=True)
        old.publish()
        for _ in range(runs):
            samples.add(("old", name, "c"), old.run_probe()[0])
        samples.add(("old-idle-mib", name), old.run_probe(idle_s=IDLE_S)[1])
        for _ in range(runs):
            samples.add(("old-exec", name), old.first_exec())
        for _ in range(runs):
            old.remove_image()
            started = time.perf_counter()
            pulled, present = old.pull()
            samples.add(("old", name, "a"), time.perf_counter() - started + old.run_probe()[0])
        base_layers = len(json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", old.base)))
        note(
            f"old (a) {name}: each pull downloaded {pulled} layers; {present} were present ({base_layers} of them the "
            "core image's, any other shared with another template's image, as on a host running other templates)"
        )
        old.build()  # the build cache of situation (b): what the last build before the edit left; not timed
        for _ in range(runs):
            started = time.perf_counter()
            tag = old.edit_and_build()
            samples.add(("old", name, "b"), time.perf_counter() - started + old.run_probe(tag)[0])


class NewWay:
    """Starts and stops the orchestrators of the run (one at a time, each with its own instance id) and keeps
    track of the install caches each data dir already holds."""

    def __init__(
        self, scratch: Path, image: str, templates_dir: Path, run_label: str, extra_ca_bundle: Path | None,
        fleet: FleetStore,
    ) -> None:  # fmt: skip
        self.scratch, self.image, self.templates_dir, self.fleet = scratch, image, templates_dir, fleet
        self.run_label, self.extra_ca_bundle = run_label, extra_ca_bundle
        self.instance_ids: list[str] = []
        self.running: list[Orchestrator] = []
        self.warmed: set[tuple[Path | FleetStore, str]] = set()

    def start(self, pool: Pool, data_dir: Path | None = None, fleet: bool = False) -> Orchestrator:
        """An orchestrator on `data_dir`, or on a fresh one: a host that has the core image and nothing else;
        with `fleet`, on the fleet's shared store."""
        instance_id = f"bench-{self.run_label}-{len(self.instance_ids)}"
        self.instance_ids.append(instance_id)
        data_dir = data_dir or self.scratch / f"fresh-{len(self.instance_ids)}"
        orchestrator = Orchestrator(
            data_dir, self.image, instance_id, self.templates_dir, self.extra_ca_bundle, pool.args,
            self.fleet if fleet else None,
        )  # fmt: skip
        self.running.append(orchestrator)
        return orchestrator

    def stop(self, orchestrator: Orchestrator) -> None:
        self.running.remove(orchestrator)
        orchestrator.stop()

    def warm_up(self, orchestrator: Orchestrator, spec: TemplateSpec) -> None:
        """One untimed session, kept until its install cache entry is written (the first time in a data dir)."""
        key = (orchestrator.fleet or orchestrator.install_cache, spec.name)
        before = orchestrator.install_cache_entries()

        def cached() -> None:
            deadline = time.monotonic() + 120
            while orchestrator.install_cache_entries() <= before:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no install cache entry for {spec.name} within 120 s:\n{orchestrator.log.read_text()[-2000:]}"
                    )
                time.sleep(0.2)

        wait = spec.install_command and key not in self.warmed
        print(f"  warming up {spec.name}", file=sys.stderr, flush=True)
        orchestrator.create_and_delete(spec.name, cached if wait else lambda: None)
        self.warmed.add(key)

    def cleanup(self) -> None:
        for orchestrator in list(self.running):
            self.stop(orchestrator)
        for instance_id in self.instance_ids:
            ids = docker("ps", "--all", "--quiet", "--filter", f"label={ORCHESTRATOR_LABEL}={instance_id}").split()
            if ids:
                subprocess.run(["docker", "rm", "--force", "--volumes", *ids], capture_output=True)
            # An orchestrator keeps its workspace network and host firewall rule for its next start; these
            # instances end with the run.
            with contextlib.suppress(OrchestratorError):
                asyncio.run(DockerRuntime(image=self.image, instance_id=instance_id).remove_network())


def new_way(
    new: NewWay, catalog: TemplateCatalog, bench: list[str], concurrent_templates: list[str], args: argparse.Namespace,
    pools: bool, samples: Samples,
) -> None:  # fmt: skip
    runs = args.runs
    steady = new.scratch / "steady"
    # Another host of the fleet has run each template: the fleet's store holds its install, as the registry holds
    # the old way's image.
    print("new way: another host stores the installs in the fleet's store", file=sys.stderr, flush=True)
    seeder = new.start(Pool(NO_POOL, 0, []), fleet=True)
    try:
        for name in bench:
            new.warm_up(seeder, catalog.get(name))
    finally:
        new.stop(seeder)
    for mode in [NO_POOL, WARM, HOT] if pools else [NO_POOL]:
        pool = Pool(mode, args.warm_pool, bench)
        print(f"new way, {mode}", file=sys.stderr, flush=True)
        # (a): a fresh data dir per create on the fleet's store; a hot pool is filled once on it and refilled
        # between creates. Without a pool also on nothing shared: the install runs from the npm registry.
        for name in bench:
            if mode == HOT:
                hot = Pool(HOT, args.warm_pool, [name])
                orchestrator = new.start(hot, fleet=True)
                try:
                    for _ in range(runs):
                        hot.wait_full(orchestrator)
                        samples.add_created(("ready", name, "a", mode), orchestrator.create_and_delete(name))
                finally:
                    new.stop(orchestrator)
                continue
            alone = mode == NO_POOL and bool(catalog.get(name).install_command)
            for situation, fleet in [("a", True), *([(ALONE, False)] if alone else [])]:
                for _ in range(runs):
                    orchestrator = new.start(pool, fleet=fleet)
                    try:
                        pool.wait_full(orchestrator)
                        samples.add_created(("ready", name, situation, mode), orchestrator.create_and_delete(name))
                    finally:
                        new.stop(orchestrator)
        # (c) and (b), then the rest, on one data dir whose caches every mode shares.
        orchestrator = new.start(pool, steady)
        try:
            for name in bench:
                new.warm_up(orchestrator, catalog.get(name))
                for _ in range(runs):
                    pool.wait_full(orchestrator)
                    samples.add_created(("ready", name, "c", mode), orchestrator.create_and_delete(name))
                for run in range(runs):
                    pool.wait_full(orchestrator)
                    note_text = f"bench edit {new.run_label} {mode} {run}"
                    edited = edit_source(new.templates_dir / name, note_text)
                    created = orchestrator.create(name)
                    try:  # timed up to READY; then checked: the session got the edit, never an entry made before it
                        orchestrator.expect_file(
                            created.session, edited.relative_to(new.templates_dir / name), note_text
                        )
                    finally:
                        orchestrator.delete(created.session.id)
                    samples.add_created(("ready", name, "b", mode), created)
            for _ in range(runs):
                pool.wait_full(orchestrator)
                samples.add(("exec", mode), orchestrator.first_exec("node-basic"))
            if mode != HOT:
                for name in concurrent_templates:
                    new.warm_up(orchestrator, catalog.get(name))
                pool.wait_full(orchestrator)
                concurrent(orchestrator, concurrent_templates, args.concurrent, samples, mode)
            if mode == NO_POOL:
                idle(orchestrator, samples, "node-basic")
        finally:
            new.stop(orchestrator)


def concurrent(orchestrator: Orchestrator, templates: list[str], count: int, samples: Samples, mode: str) -> None:
    """`count` CreateSessions at once across `templates`; each one's seconds to READY, or why it failed. All are
    kept until the last is READY, then deleted."""
    print(f"  {count} concurrent creates", file=sys.stderr, flush=True)
    names = [templates[i % len(templates)] for i in range(count)]
    executor = ThreadPoolExecutor(count)
    try:
        futures = [executor.submit(orchestrator.create, name) for name in names]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result())
            except Exception as error:  # noqa: BLE001 - a failed create is a figure of this row, not the end of the run
                samples.failures[("concurrent", mode)].append(str(error)[:300])
    finally:
        # Not waiting: on Ctrl-C the cleanup stops the orchestrator, which ends the creates still waiting.
        executor.shutdown(wait=False, cancel_futures=True)
    for created in outcomes:
        samples.values[("concurrent", mode)].append(created.seconds)
        orchestrator.delete(created.session.id)


def idle(orchestrator: Orchestrator, samples: Samples, template: str) -> None:
    """Memory of IDLE_SESSIONS idle READY sessions side by side: each container's (docker stats), and each agent
    process's VmRSS, PSS and USS (the last two from the host's /proc, when the benchmark may read it)."""
    created = [orchestrator.create(template) for _ in range(IDLE_SESSIONS)]
    try:
        time.sleep(IDLE_S)
        for one in created:
            container = docker("ps", "--quiet", "--filter", f"label={SESSION_LABEL}={one.session.id}")
            samples.add(("idle-mib", template), container_memory(container))
            rss = agent_rss(container)
            if rss is None:
                note("no `python -m agent` process found in the session's container: no agent RSS")
                continue
            samples.add(("agent-rss-mib",), rss)
            shared = agent_pss_uss(container)
            if shared is None:
                note("the agent's /proc/<pid>/smaps_rollup is not readable from here (run as root): no PSS/USS")
            else:
                samples.add(("agent-pss-mib",), shared[0])
                samples.add(("agent-uss-mib",), shared[1])
    finally:
        for one in created:
            orchestrator.delete(one.session.id)


def agent_pss_uss(container: str) -> tuple[float, float] | None:
    """The agent process's PSS and USS (private clean + dirty) in MiB, from the host's smaps_rollup (the agent is
    non-dumpable: inside the container even its own user cannot read it), or None when it cannot be read."""
    top = docker("top", container, "-o", "pid,args").splitlines()[1:]
    pids = [line.split()[0] for line in top if " -m agent" in line and "tini" not in line]
    try:
        rollup = Path(f"/proc/{pids[0]}/smaps_rollup").read_text() if pids else ""
    except OSError:
        return None
    kib = {line.split(":")[0]: int(line.split()[1]) for line in rollup.splitlines()[1:] if line.endswith("kB")}
    if "Pss" not in kib:
        return None
    return kib["Pss"] / 1024, (kib["Private_Clean"] + kib["Private_Dirty"]) / 1024


# ---------------------------------------------------------------------------------------------- the table


def seconds(values: list[float]) -> str:
    def fmt(x: float) -> str:
        return f"{x:.3f}" if x < 1 else f"{x:.2f}"

    return f"{fmt(statistics.median(values))} s (p95 {fmt(p95(values))})" if values else "—"


def table(
    samples: Samples, bench: list[str], pools: bool, concurrent_templates: list[str], count: int
) -> list[list[str]]:
    v = samples.values
    rows = [["figure", "new way", "old way", "ratio", "goal", "met?"]]

    def add(figure: str, new: list[float], old: list[float], goal: str = "", check=None, na: bool = False) -> None:
        if na:
            rows.append([figure, NA_POOLS, seconds(old), "", goal, ""])
            return
        ratio = statistics.median(old) / statistics.median(new) if new and old else None
        met = "" if check is None or not new else ("yes" if check(statistics.median(new), ratio) else "NO")
        rows.append([figure, seconds(new), seconds(old), f"{ratio:.1f}x" if ratio else "", goal, met])

    for name in bench:
        for situation, what in SITUATIONS.items():
            for mode in (NO_POOL, WARM, HOT):
                goal, check = "", None
                if situation in "ab":
                    goal, check = "≥ 5x faster than old", lambda m, r: r is not None and r >= 5
                elif mode == HOT:
                    goal, check = (
                        "≤ 0.1 s, ≥ 10x faster than old (c)",
                        lambda m, r: m <= 0.1 and r is not None and r >= 10,
                    )
                elif mode == WARM and name == "node-basic":
                    goal, check = "≥ 2x faster than old (c)", lambda m, r: r is not None and r >= 2
                elif mode == WARM and name == "vite-react":
                    goal, check = "at least as fast as old (c)", lambda m, r: r is not None and r >= 1
                add(f"{name} create → READY ({situation}) {what}, {mode}", v[("ready", name, situation, mode)],
                    v[("old", name, situation)], goal, check, na=mode != NO_POOL and not pools)  # fmt: skip
                if situation == "a" and mode == NO_POOL and v[("ready", name, ALONE, mode)]:
                    add(f"{name} create → READY (a) never seen, nothing shared, {mode}",
                        v[("ready", name, ALONE, mode)], v[("old", name, "a")])  # fmt: skip
    for mode in (NO_POOL, WARM, HOT):
        goal, check = ("≤ 0.1 s", lambda m, r: m <= 0.1) if mode == WARM else ("", None)
        add(f"create → first Exec answered, {mode}", v[("exec", mode)], v[("old-exec", "node-basic")], goal, check,
            na=mode != NO_POOL and not pools)  # fmt: skip
    for mode in (NO_POOL, WARM):
        figure = f"{count} concurrent creates → READY ({', '.join(concurrent_templates)}), {mode}"
        if mode != NO_POOL and not pools:
            rows.append([figure, NA_POOLS, "", "", "none fails; p95 in the table", ""])
            continue
        new, failures = v[("concurrent", mode)], samples.failures[("concurrent", mode)]
        cell = f"{seconds(new)}, {len(failures)}/{count} failed"
        rows.append([figure, cell, "", "", "none fails; p95 in the table", "NO" if failures or not new else "yes"])

    def mib(key: tuple[str, ...]) -> float | None:  # the median of a memory figure's samples
        return statistics.median(v[key]) if v[key] else None

    memory, old_memory = mib(("idle-mib", "node-basic")), mib(("old-idle-mib", "node-basic"))
    rows.append([
        "node-basic idle session memory (docker stats)", f"{memory:.1f} MiB" if memory else "—",
        f"{old_memory:.1f} MiB" if old_memory else "—",
        f"{old_memory / memory:.1f}x" if memory and old_memory else "", "", "",
    ])  # fmt: skip
    rss, pss, uss = mib(("agent-rss-mib",)), mib(("agent-pss-mib",)), mib(("agent-uss-mib",))
    rows.append(["idle agent RSS (VmRSS)", f"{rss:.1f} MiB" if rss else "—", "", "", "≤ 32 MiB",
                 ("yes" if rss <= 32 else "NO") if rss else ""])  # fmt: skip
    if pss and uss:
        rows.append([f"idle agent PSS / USS ({IDLE_SESSIONS} idle sessions side by side)",
                     f"{pss:.1f} / {uss:.1f} MiB", "", "", "", ""])  # fmt: skip
    return rows


def render(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def prepare_templates(scratch: Path, npm: bool) -> Path:
    """A copy of the built-in templates the run may edit; without --npm two renamed copies of node-basic stand in
    for the templates whose install needs the npm registry."""
    directory = scratch / "templates"
    shutil.copytree(REPO / "templates", directory, ignore=shutil.ignore_patterns("node_modules", "dist", ".astro"))
    if not npm:
        for suffix in ("b", "c"):
            variant = directory / f"node-basic-{suffix}"
            shutil.copytree(directory / "node-basic", variant)
            manifest = json.loads((variant / "template.json").read_text())
            manifest["name"] = variant.name
            (variant / "template.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (medians and p95 are reported)")
    parser.add_argument(
        "--npm", action="store_true", help="also vite-react and astro-basic, whose install needs the npm registry"
    )
    parser.add_argument(
        "--extra-ca-bundle", type=Path, default=os.environ.get("WORKSPACE_EXTRA_CA_BUNDLE") or None,
        help="a PEM bundle (public roots + a TLS-intercepting proxy's CA) both ways trust for npm",
    )  # fmt: skip
    parser.add_argument("--warm-pool", type=int, default=2, help="size of the warm pool, when this build has one")
    parser.add_argument("--concurrent", type=int, default=20, help="CreateSessions at once")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _interrupt)
    pools = pools_in_build()
    run_label = secrets.token_hex(4)
    # The engine, and the core image of this checkout's sources (workspace-core:latest may be another's),
    # tagged for the run so that it stays while the run uses it on both ways.
    subprocess.run(["bash", str(REPO / "core_image" / "ensure_docker.sh")], check=True)
    core_image = ensure_image(progress=lambda line: print(f"core image: {line}", file=sys.stderr, flush=True))
    base_tag = f"workspace-core-bench-base:{run_label}"
    docker("tag", core_image, base_tag)
    image_id = docker("image", "inspect", "--format", "{{.Id}}", base_tag).removeprefix("sha256:")[:12]
    header = machine()
    samples = Samples()
    bench = ["node-basic", *(["vite-react"] if args.npm else [])]
    concurrent_templates = (
        ["node-basic", "vite-react", "astro-basic"] if args.npm else ["node-basic", "node-basic-b", "node-basic-c"]
    )
    scratch = Path(tempfile.mkdtemp(prefix="bench-orchestrator-"))
    registry: Registry | None = None
    new: NewWay | None = None
    try:
        templates_dir = prepare_templates(scratch, args.npm)
        catalog = TemplateCatalog(templates_dir, scratch / "catalog")
        registry = Registry(scratch / "registry")
        olds = {
            name: OldWay(
                catalog.get(name), templates_dir / name, scratch, base_tag, registry, run_label, args.extra_ca_bundle
            )
            for name in bench
        }
        old_way(olds, args.runs, samples)
        with running_s3_server() as s3_server:
            fleet = FleetStore(s3_server, run_label)
            new = NewWay(scratch / "new", base_tag, templates_dir, run_label, args.extra_ca_bundle, fleet)
            try:
                new_way(new, catalog, bench, concurrent_templates, args, pools, samples)
            finally:  # while the store its orchestrators use still serves
                new.cleanup()
                new = None
    finally:
        print("cleaning up", file=sys.stderr, flush=True)
        if new is not None:
            new.cleanup()
        if registry is not None:
            registry.stop()
        cleanup_old_way(run_label)
        subprocess.run(["docker", "rmi", base_tag], capture_output=True)
        shutil.rmtree(scratch, ignore_errors=True)

    print(header)
    print(
        f"core image {core_image} ({image_id}) on both ways, also as the old way's base (same Node, same npm); the "
        f"template's limits and the workspace hardening on both; old-way images in docker-registry on loopback"
    )
    pool_sizes = f"warm {args.warm_pool}, hot 1 per template" if pools else "not in this build"
    print(f"medians (p95) of {args.runs} runs; ratio = old median / new median; pools: {pool_sizes}")
    print(
        "(a) never seen: old pulls its image from the registry (its own layers removed first) + run + probe; new "
        "starts on an empty data dir whose orchestrator shares the fleet's store (S3 on loopback), where another "
        "host stored the install (a hot pool is filled before each timed create); 'nothing shared': no fleet store, "
        "the install runs from the npm registry\n"
        "(b) just edited: one source file changed; old rebuilds with the build cache (install layer hit) + run + "
        "probe; new rebuilds the archive, its install cache hits\n"
        "(c) steady: old has the image, run + probe; new has warm caches. Old's first command: docker run + "
        "docker exec true\n"
    )
    print(render(table(samples, bench, pools, concurrent_templates, args.concurrent)))
    if pools:
        hits = [f"{' '.join(key[1:])} {sum(h)}/{len(h)}" for key, h in samples.pool_hits.items() if key[-1] != NO_POOL]
        note("creates whose container_started phase said the container came from the pool: " + ", ".join(hits))
    print("\nphases of the new way (medians, s):")
    for key, phases in samples.phases.items():
        print(
            f"  {' '.join(key[1:]):<30} "
            + "  ".join(f"{p} {statistics.median(phases[p]):.2f}" for p in PHASES if p in phases)
        )
    for failure in [f for fs in samples.failures.values() for f in fs]:
        note(f"failed: {failure}")
    if NOTES:
        print("\nnotes:\n" + "\n".join(f"- {text}" for text in NOTES))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted (everything the run started is removed)", file=sys.stderr)
        sys.exit(130)
