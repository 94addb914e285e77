"""The old way for tests/bench_orchestrator.py, as a fleet runs it: a Dockerfile per template, its image pushed to
a real registry on loopback (Debian's docker-registry), pulled, rebuilt and run with the docker CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from orchestrator.readiness import wait_until_ready
from orchestrator.runtime.base import trust_env
from orchestrator.templates import TemplateSpec

BENCH_LABEL = "workspace-core.bench"
# Where the old way's image keeps the extra CA bundle, as the docker runtime mounts it.
IMAGE_CA_BUNDLE = "/etc/workspace/extra-ca.pem"
# What a one-line edit looks like at the end of a source file, by suffix (anything else: a JS comment).
COMMENTS = {".html": "<!-- {} -->", ".astro": "<!-- {} -->", ".css": "/* {} */"}
# Files a Dockerfile copies before its install step, so that a source edit keeps the install layer cached.
MANIFESTS = ("package.json", "package-lock.json", "npm-shrinkwrap.json", ".npmrc")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker(*args: str) -> str:
    """Runs the docker CLI; returns its stdout. Raises RuntimeError with its stderr when it fails."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {result.stderr.strip()[-2000:]}")
    return result.stdout.strip()


def edit_source(root: Path, note: str) -> Path:
    """Appends a one-line comment to the template's first source file (the edit of situation (b)); returns it."""
    sources = sorted(p for p in (root / "src").rglob("*") if p.is_file()) if (root / "src").is_dir() else []
    path = sources[0] if sources else root / "package.json"
    if path.name == "package.json":
        raise RuntimeError(f"{root.name} has no source file under src/ to edit")
    with open(path, "a") as file:
        file.write("\n" + COMMENTS.get(path.suffix, "// {}").format(note) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- the registry


class Registry:
    """Debian's docker-registry serving on 127.0.0.1:<free port> from a temp config and storage directory. The
    engine allows plain HTTP to registries on 127.0.0.0/8, so pushes and pulls need no TLS."""

    def __init__(self, directory: Path) -> None:
        ensure_registry_installed()
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        config = directory / "config.yml"
        storage = directory / "storage"
        storage.mkdir(parents=True)
        # JSON is YAML: the registry reads this as its config.yml.
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "error", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True}},
            "http": {"addr": self.address},
        }))  # fmt: skip
        self.log = directory / "registry.log"
        with open(self.log, "wb") as log:
            # Its own process group: a Ctrl-C reaches the benchmark, whose cleanup stops it.
            self.process = subprocess.Popen(
                ["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not answer on {self.address}:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def ensure_registry_installed() -> None:
    """Installs Debian's docker-registry when its binary is missing, as core_image/ensure_docker.sh installs
    docker.io. The package also enables and starts a system-wide registry on :5000, which this benchmark does
    not use: that service is stopped and disabled again."""
    if shutil.which("docker-registry"):
        return
    if os.geteuid() != 0:
        raise RuntimeError(
            "docker-registry is missing, and installing it needs root (sudo apt-get install docker-registry)"
        )
    print("bench: installing docker-registry (apt-get)", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "docker-registry"],
        env=env, check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", "docker-registry"], capture_output=True)
    else:
        subprocess.run(["invoke-rc.d", "docker-registry", "stop"], capture_output=True)


# ---------------------------------------------------------------------------------------------- the old way


class OldWay:
    """One template the old way: its build context (a copy of the template and a Dockerfile FROM `base`), its
    image in `registry`, and the three situations a fleet host meets it in."""

    def __init__(
        self, spec: TemplateSpec, source: Path, scratch: Path, base: str, registry: Registry, run_label: str,
        extra_ca_bundle: Path | None,
    ) -> None:  # fmt: skip
        self.spec = spec
        self.base = base
        self.run_label = run_label
        self.context = scratch / f"context-{spec.name}"
        shutil.copytree(source, self.context, ignore=shutil.ignore_patterns("template.json", "node_modules", "dist"))
        manifests = [name for name in MANIFESTS if (self.context / name).is_file()]
        (self.context / "Dockerfile").write_text(
            dockerfile(base, spec, run_label, manifests, extra_ca_bundle is not None)
        )
        (self.context / ".dockerignore").write_text("Dockerfile\n.dockerignore\n")
        if extra_ca_bundle is not None:
            shutil.copyfile(extra_ca_bundle, self.context / "extra-ca.pem")
        self.image = f"{registry.address}/workspace-core-bench/{spec.name}:{run_label}"
        self.edits = 0

    def build(self, tag: str | None = None) -> None:
        docker("build", "--quiet", "--tag", tag or self.image, str(self.context))

    def publish(self) -> None:
        """Builds the image from the unedited template and pushes it (what the fleet's CI does; not timed)."""
        self.build()
        docker("push", self.image)

    def remove_image(self) -> None:
        """Leaves the host without the template's image: its tags go, and with them every layer only it used
        (the base's layers stay, as on a host that runs other templates)."""
        tags = docker(
            "image", "ls", "--filter", f"label={BENCH_LABEL}={self.run_label}", "--format", "{{.Repository}}:{{.Tag}}"
        )
        mine = [tag for tag in tags.splitlines() if tag.startswith(self.image.rpartition(":")[0] + ":")]
        if mine:
            docker("rmi", "--force", *mine)

    def pull(self) -> tuple[int, int]:
        """`docker pull` of the image; returns (layers downloaded, layers already present)."""
        output = docker("pull", self.image)
        return len(re.findall(r": Pull complete", output)), len(re.findall(r": Already exists", output))

    def edit_and_build(self) -> str:
        """Situation (b): one source file edited, the image rebuilt with the build cache of the last build.
        Returns the new image's tag."""
        self.edits += 1
        edit_source(self.context, f"bench edit {self.run_label}-{self.edits}")
        tag = f"{self.image}-edit{self.edits}"
        self.build(tag)
        return tag

    def run(self, tag: str | None = None) -> str:
        """`docker run` of the image as the docker runtime runs a workspace: the template's limits, uid 1000,
        every capability dropped, no-new-privileges, the dev port published on 127.0.0.1. Returns its id."""
        spec = self.spec
        memory = f"{spec.resources.memory_mb}m"
        return docker(
            "run", "--detach", "--label", f"{BENCH_LABEL}={self.run_label}", "--publish", f"127.0.0.1::{spec.dev_port}",
            "--memory", memory, "--memory-swap", memory, "--cpus", str(spec.resources.cpus),
            "--pids-limit", str(spec.resources.pids), "--user", "1000:1000", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", tag or self.image,
        )  # fmt: skip

    def run_probe(self, tag: str | None = None, *, idle_s: float = 0.0) -> tuple[float, float]:
        """Seconds for `docker run` and the readiness probe answering; with `idle_s`, also the container's MiB
        after that long idle (else 0). The container is removed afterwards."""
        spec = self.spec
        started = time.perf_counter()
        container = self.run(tag)
        try:
            port = docker("port", container, f"{spec.dev_port}/tcp").splitlines()[0].rpartition(":")[2]
            asyncio.run(wait_until_ready(f"http://127.0.0.1:{port}{spec.readiness_path}", spec.readiness_timeout_s))
            elapsed = time.perf_counter() - started
            if idle_s:
                time.sleep(idle_s)
            return elapsed, container_memory(container) if idle_s else 0.0
        finally:
            docker("rm", "--force", "--volumes", container)

    def first_exec(self) -> float:
        """Seconds from `docker run` to a first command answered in the container (`docker exec true`): the old
        way's counterpart of create -> first agent Exec."""
        started = time.perf_counter()
        container = self.run()
        try:
            docker("exec", container, "true")
            return time.perf_counter() - started
        finally:
            docker("rm", "--force", "--volumes", container)


def dockerfile(base: str, spec: TemplateSpec, run_label: str, manifests: list[str], trusted_ca: bool) -> str:
    """What a template would be without runtime injection: its own image FROM the core image (the same Node
    and npm), written as a fleet writes it: the manifests and the install before the sources, so that a source
    edit rebuilds from the cached install layer. The label (first, so no layer is shared with another run)
    lets cleanup find every image of the run."""
    trust = [f"COPY extra-ca.pem {IMAGE_CA_BUNDLE}", *(f"ENV {k}={v}" for k, v in trust_env(IMAGE_CA_BUNDLE).items())]
    lines = [
        f"FROM {base}",
        f"LABEL {BENCH_LABEL}={run_label}",
        *(trust if trusted_ca else []),
        "WORKDIR /app",
        *(f"ENV {key}={json.dumps(value)}" for key, value in sorted(spec.env.items())),
        f"ENV PORT={spec.dev_port}",
        *([f"COPY --chown=1000:1000 {' '.join(manifests)} /app/"] if manifests and spec.install_command else []),
        *([f"RUN {spec.install_command}"] if spec.install_command else []),
        "COPY --chown=1000:1000 . /app",
        f"EXPOSE {spec.dev_port}",
        # The base's entrypoint is the agent and its health check asks for it: neither belongs here.
        "HEALTHCHECK NONE",
        "ENTRYPOINT []",
        f'CMD ["/bin/sh", "-c", "exec {spec.dev_command}"]',
    ]
    return "\n".join(lines) + "\n"


def container_memory(container: str) -> float:
    """The container's memory use in MiB as `docker stats` reports it (the cgroup's usage less the page cache)."""
    return mib(docker("stats", "--no-stream", "--format", "{{.MemUsage}}", container).partition(" / ")[0])


def mib(usage: str) -> float:
    """MiB in a figure like docker's `41.2MiB` or `1.1GiB`."""
    units = {
        "KiB": 1 / 1024,
        "MiB": 1.0,
        "GiB": 1024.0,
        "kB": 1e3 / 2**20,
        "MB": 1e6 / 2**20,
        "GB": 1e9 / 2**20,
        "B": 1 / 2**20,
    }
    for unit, factor in units.items():
        if usage.endswith(unit):
            return float(usage.removesuffix(unit)) * factor
    raise ValueError(f"not a memory figure: {usage!r}")


def cleanup_old_way(run_label: str) -> None:
    """Removes the run's old-way containers and every image it built or pulled (found by its label)."""
    ids = docker("ps", "--all", "--quiet", "--filter", f"label={BENCH_LABEL}={run_label}").split()
    if ids:
        subprocess.run(["docker", "rm", "--force", "--volumes", *ids], capture_output=True)
    tags = docker("image", "ls", "--filter", f"label={BENCH_LABEL}={run_label}", "--format", "{{.Repository}}:{{.Tag}}")
    tagged = [tag for tag in tags.splitlines() if not tag.endswith("<none>")]
    if tagged:
        subprocess.run(["docker", "rmi", "--force", *tagged], capture_output=True)
    # What is left carries the label without a tag: intermediate images of builds whose result was replaced.
    rest = docker("image", "ls", "--all", "--quiet", "--filter", f"label={BENCH_LABEL}={run_label}").split()
    if rest:
        subprocess.run(["docker", "rmi", "--force", *dict.fromkeys(rest)], capture_output=True)
