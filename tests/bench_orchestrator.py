"""Orchestrator benchmark: CreateSession to READY through the real gRPC API on Docker, beside the old way this
architecture replaces (a Dockerfile per template: docker build, docker run, the same readiness probe).

Run: python tests/bench_orchestrator.py [--runs N] [--npm] [--extra-ca-bundle PEM]
The orchestrator runs as a subprocess with the docker runtime; the old way runs the docker CLI. Both use the
same core image (it is the Node base of the old way's Dockerfile) and the template's resource limits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from orchestrator.readiness import wait_until_ready  # noqa: E402
from orchestrator.runtime.base import trust_env  # noqa: E402
from orchestrator.templates import TemplateCatalog, TemplateSpec  # noqa: E402
from workspace.orchestrator.v1 import orchestrator_pb2 as pb  # noqa: E402
from workspace.orchestrator.v1 import orchestrator_pb2_grpc  # noqa: E402

CORE_IMAGE = "workspace-core:latest"
# Only the phases this benchmark reports, in order (the proto's PHASE_* without the prefix).
PHASES = [pb.Phase.Name(p).removeprefix("PHASE_").lower() for p in pb.Phase.values() if p]
READY_TIMEOUT_S = 300.0
BENCH_LABEL = "workspace-core.bench"
# Where the old way's image keeps the extra CA bundle, as the docker runtime mounts it.
IMAGE_CA_BUNDLE = "/etc/workspace/extra-ca.pem"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker(*args: str, capture: bool = True) -> str:
    """Runs the docker CLI; returns its stdout. Raises RuntimeError with its stderr when it fails."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip() if capture else ""


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    mem_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")))
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    engine = docker("version", "--format", "{{.Server.Version}}")
    return (
        f"machine: {cpu}, {os.cpu_count()} cores, {mem_kib / 1024**2:.1f} GiB, load average {load} at start; "
        f"Docker {engine} (storage {docker('info', '--format', '{{.Driver}}')}); Python {platform.python_version()}"
    )


# ---------------------------------------------------------------------------------------------- the new way


class Orchestrator:
    """`python -m orchestrator --runtime docker` as a subprocess with its own data dir and instance id."""

    def __init__(self, data_dir: Path, image: str, instance_id: str, extra_ca_bundle: Path | None) -> None:
        self.install_cache = data_dir / "install-cache"
        self.address = f"127.0.0.1:{free_port()}"
        self.log = data_dir / "orchestrator.log"
        data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "orchestrator", "--runtime", "docker", "--listen", self.address,
                    "--data-dir", str(data_dir), "--image", image, "--instance-id", instance_id, "--log-level", "WARNING",
                    *(["--extra-ca-bundle", str(extra_ca_bundle)] if extra_ca_bundle else []),
                ],  # fmt: skip
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.channel = grpc.insecure_channel(self.address)
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel)
        self._wait_serving()

    def _wait_serving(self, timeout: float = 60.0) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the orchestrator exited:\n{self.log.read_text()}")
            try:
                health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.1)
        raise RuntimeError(f"the orchestrator did not answer within {timeout:g} s:\n{self.log.read_text()}")

    def create_until_ready(
        self, template: str, *, keep_until: Callable[[], None] = lambda: None
    ) -> tuple[float, dict[str, float]]:
        """Seconds from CreateSession to the READY event, and each phase's seconds (Session.phases).
        The session is deleted afterwards, once `keep_until` returns."""
        started = time.perf_counter()
        session = self.stub.CreateSession(pb.CreateSessionRequest(template=template)).session
        try:
            for event in self.stub.WatchSession(pb.WatchSessionRequest(id=session.id), timeout=READY_TIMEOUT_S):
                if event.WhichOneof("event") == "session" and event.session.state in (
                    pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPED,
                ):  # fmt: skip
                    session = event.session
                    break
            elapsed = time.perf_counter() - started
            if session.state != pb.SESSION_STATE_READY:
                raise RuntimeError(f"session {session.id} of {template} did not become READY: {session.failure}")
            phases = {
                pb.Phase.Name(p.phase).removeprefix("PHASE_").lower(): p.duration.ToNanoseconds() / 1e9 for p in session.phases
            }
            keep_until()
            return elapsed, phases
        finally:
            self.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))

    def wait_for_install_cache(self, timeout: float = 120.0) -> None:
        """Returns once an install cache entry exists (it is written in the background after READY)."""
        deadline = time.monotonic() + timeout
        while not any(self.install_cache.glob("*.tar.gz")):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no install cache entry within {timeout:g} s:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# ---------------------------------------------------------------------------------------------- the old way


def dockerfile(base: str, spec: TemplateSpec, trusted_ca: bool) -> str:
    """What a template would be without runtime injection: its own image, built from a Node base (trusting a
    TLS-intercepting proxy's CA the way the docker runtime makes workspaces trust it)."""
    trust = [f"COPY extra-ca.pem {IMAGE_CA_BUNDLE}", *(f"ENV {k}={v}" for k, v in trust_env(IMAGE_CA_BUNDLE).items())]
    lines = [
        f"FROM {base}",
        *(trust if trusted_ca else []),
        "WORKDIR /app",
        "COPY --chown=1000:1000 . /app",
        *(f"ENV {key}={json.dumps(value)}" for key, value in sorted(spec.env.items())),
        f"ENV PORT={spec.dev_port}",
        *([f"RUN {spec.install_command}"] if spec.install_command else []),
        f"EXPOSE {spec.dev_port}",
        # The base's entrypoint is the agent and its health check asks for it: neither belongs here.
        "HEALTHCHECK NONE",
        "ENTRYPOINT []",
        f'CMD ["/bin/sh", "-c", "exec {spec.dev_command}"]',
    ]
    return "\n".join(lines) + "\n"


def build_context(directory: Path, base: str, spec: TemplateSpec, extra_ca_bundle: Path | None) -> Path:
    shutil.copytree(
        spec_path(spec), directory, ignore=shutil.ignore_patterns("template.json", "node_modules", "dist")
    )
    (directory / "Dockerfile").write_text(dockerfile(base, spec, extra_ca_bundle is not None))
    (directory / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
    if extra_ca_bundle is not None:
        shutil.copyfile(extra_ca_bundle, directory / "extra-ca.pem")
    return directory


def spec_path(spec: TemplateSpec) -> Path:
    return REPO / "templates" / spec.name


def build_run_probe(context: Path, tag: str, spec: TemplateSpec, run_label: str, *, no_cache: bool) -> float:
    """Seconds for `docker build`, `docker run` (the template's limits, the workspace's hardening, its port
    published on 127.0.0.1) and the readiness probe answering. The container is removed afterwards."""
    started = time.perf_counter()
    docker("build", "--quiet", *(["--no-cache"] if no_cache else []), "--tag", tag, str(context))
    memory = f"{spec.resources.memory_mb}m"
    container = docker(
        "run", "--detach", "--label", f"{BENCH_LABEL}={run_label}", "--publish", f"127.0.0.1::{spec.dev_port}",
        "--memory", memory, "--memory-swap", memory, "--cpus", str(spec.resources.cpus),
        "--pids-limit", str(spec.resources.pids), "--user", "1000:1000", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", tag,
    )  # fmt: skip
    try:
        port = docker("port", container, f"{spec.dev_port}/tcp").splitlines()[0].rpartition(":")[2]
        asyncio.run(wait_until_ready(f"http://127.0.0.1:{port}{spec.readiness_path}", spec.readiness_timeout_s))
        return time.perf_counter() - started
    finally:
        docker("rm", "--force", "--volumes", container)


# ---------------------------------------------------------------------------------------------- the table


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def measure(runs: int, label: str, once: Callable[[], float]) -> list[float]:
    samples = []
    for run in range(runs):
        samples.append(once())
        print(f"  {label} run {run + 1}/{runs}: {samples[-1]:.2f} s", file=sys.stderr, flush=True)
    return samples


def bench_template(
    orchestrator: Orchestrator,
    fresh_orchestrator: Callable[[], Orchestrator],
    spec: TemplateSpec,
    base: str,
    runs: int,
    run_label: str,
    extra_ca_bundle: Path | None,
) -> list[str]:
    """Rows of the table for one template: the new way (cold and warm install cache when it has an install
    step), its phases, and the old way without and with docker's build cache."""
    name = spec.name
    new_ways: dict[str, tuple[list[float], dict[str, list[float]]]] = {}

    def new_once(kind: str, way: Orchestrator) -> float:
        totals, phase_samples = new_ways.setdefault(kind, ([], {}))
        elapsed, phases = way.create_until_ready(name)
        totals.append(elapsed)
        for phase, seconds in phases.items():
            phase_samples.setdefault(phase, []).append(seconds)
        return elapsed

    def cold_once() -> float:
        # A fresh data dir: an empty install cache, as for the first session of a lockfile.
        way = fresh_orchestrator()
        try:
            return new_once("cold install cache", way)
        finally:
            way.stop()

    if spec.install_command:
        measure(runs, f"{name} new way, cold install cache", cold_once)
        # Fills the install cache; not timed.
        orchestrator.create_until_ready(name, keep_until=orchestrator.wait_for_install_cache)
        measure(runs, f"{name} new way, warm install cache", lambda: new_once("warm install cache", orchestrator))
    else:
        measure(runs, f"{name} new way", lambda: new_once("nothing to install", orchestrator))
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as scratch:
        context = build_context(Path(scratch) / "context", base, spec, extra_ca_bundle)
        cold_tag = f"workspace-core-bench-old:{name}-{run_label}"
        cold = measure(
            runs,
            f"{name} old way, no cache",
            lambda: _then_remove(cold_tag, build_run_probe(context, cold_tag, spec, run_label, no_cache=True)),
        )
        warm_tag = f"workspace-core-bench-old:{name}-{run_label}-warm"
        try:
            docker("build", "--quiet", "--tag", warm_tag, str(context))  # fills the cache; not timed
            warm = measure(
                runs,
                f"{name} old way, warm cache",
                lambda: build_run_probe(context, warm_tag, spec, run_label, no_cache=False),
            )
        finally:
            subprocess.run(["docker", "rmi", "--force", warm_tag], capture_output=True)

    news = {kind: median(totals) for kind, (totals, _) in new_ways.items()}
    rows = []
    for kind, (_, phase_samples) in new_ways.items():
        ratios = "".join(f" {news[kind] / new:5.1f}x" for new in news.values())
        rows.append(f"{name:<11} {'new (' + kind + ')':<42} {news[kind]:8.2f} s {ratios}")
        for phase in PHASES:
            if phase in phase_samples:
                rows.append(f"{'':<11}   {phase:<40} {median(phase_samples[phase]):8.2f} s")
    olds = {"old: build --no-cache + run + probe": cold, "old: build (warm cache) + run + probe": warm}
    for what, samples in olds.items():
        ratios = "".join(f" {median(samples) / new:5.1f}x" for new in news.values())
        rows.append(f"{'':<11} {what:<42} {median(samples):8.2f} s {ratios}")
    columns = " / ".join(f"new ({kind})" for kind in news)
    return [f"{name}: ratios are each row's median / {columns}", *rows, ""]


def _then_remove(tag: str, seconds: float) -> float:
    """Removes the image a cold build made (and its layers), so the next cold build starts from the base."""
    docker("rmi", "--force", tag)
    return seconds


def cleanup(instance_id: str, run_label: str, base_tag: str) -> None:
    """Removes whatever this run left: workspace containers of its orchestrator, old-way containers, tags."""
    for label in (f"workspace-core.orchestrator={instance_id}", f"{BENCH_LABEL}={run_label}"):
        ids = subprocess.run(
            ["docker", "ps", "--all", "--quiet", "--filter", f"label={label}"], capture_output=True, text=True
        ).stdout.split()
        if ids:
            subprocess.run(["docker", "rm", "--force", "--volumes", *ids], capture_output=True)
    subprocess.run(["docker", "rmi", base_tag], capture_output=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs per way and template (medians are reported)")
    parser.add_argument("--npm", action="store_true", help="also vite-react, whose install needs the npm registry")
    parser.add_argument(
        "--extra-ca-bundle", type=Path, default=os.environ.get("WORKSPACE_EXTRA_CA_BUNDLE") or None,
        help="a PEM bundle (public roots + a TLS-intercepting proxy's CA) both ways trust for npm",
    )  # fmt: skip
    args = parser.parse_args()

    run_label = secrets.token_hex(4)
    instance_id = f"bench-{run_label}"
    # Both ways use this exact image, even if someone rebuilds workspace-core:latest meanwhile.
    base_tag = f"workspace-core-bench-base:{run_label}"
    docker("tag", CORE_IMAGE, base_tag)
    image_id = docker("image", "inspect", "--format", "{{.Id}}", base_tag).removeprefix("sha256:")[:12]
    header = machine()
    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-orchestrator-") as data_dir:
        catalog = TemplateCatalog(REPO / "templates", Path(data_dir) / "catalog")
        specs = [catalog.get("node-basic"), *([catalog.get("vite-react")] if args.npm else [])]
        orchestrator = Orchestrator(Path(data_dir) / "orchestrator", base_tag, instance_id, args.extra_ca_bundle)

        def fresh_orchestrator() -> Orchestrator:
            # The same instance id: cleanup finds its containers too. Its start-up removes none of the first
            # orchestrator's, as that one deletes each session before the next is created.
            fresh_dir = Path(tempfile.mkdtemp(prefix="orchestrator-", dir=data_dir))
            return Orchestrator(fresh_dir, base_tag, instance_id, args.extra_ca_bundle)

        try:
            for spec in specs:
                rows += bench_template(
                    orchestrator, fresh_orchestrator, spec, base_tag, args.runs, run_label, args.extra_ca_bundle
                )
        finally:
            orchestrator.stop()
            cleanup(instance_id, run_label, base_tag)

    print(header)
    print(
        f"core image {CORE_IMAGE} ({image_id}) on both ways: the old way's Node base too (no node: image is "
        "available offline); the template's limits and the workspace hardening on both ways"
    )
    print(
        f"medians of {args.runs} runs; the new way cold has an empty install cache (a fresh data dir per run), "
        "warm has node_modules of an earlier session with the same lockfile in it\n"
    )
    print(f"{'template':<11} {'what':<42} {'median':>10}  ratios")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
