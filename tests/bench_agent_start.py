"""Agent start-up benchmark: time to a SERVING health answer and idle resident memory, as a subprocess and in a
container of the core image, each beside a baseline measured in the same run; then the import-time offenders.

Run: python tests/bench_agent_start.py [--runs N] [--container-runs N] [--image TAG | --no-docker] [--env K=V ...]
       [--oci runc,crun]
A benchmark, not a test. "idle" is after start, one health check and one Exec (`true`). `--env` is given to the
agent (and to the baselines) in both places, to compare settings such as MALLOC_ARENA_MAX. `--oci` (root) runs
the image's agent straight from OCI runtimes on one bundle (the image's exported root filesystem, the host's
network), without the engine, so runtimes the engine has not registered compare on equal terms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from common.constants import AGENT_PORT, TOKEN_ENV  # noqa: E402
from workspace.agent.v1 import agent_pb2 as pb  # noqa: E402
from workspace.agent.v1 import agent_pb2_grpc  # noqa: E402

# Prints this process's VmRSS in KiB, after the statement given as argv[1] ran.
RSS_AFTER = "import sys; exec(sys.argv[1]); print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')))"
# The agent's VmRSS in KiB inside its container (the process whose command line is `python -m agent`).
AGENT_RSS_IN_CONTAINER = (
    "import pathlib\n"
    "for d in pathlib.Path('/proc').glob('[0-9]*'):\n"
    "    if (d / 'cmdline').read_bytes().split(b'\\0')[1:3] == [b'-m', b'agent']:\n"
    "        print(next(l.split()[1] for l in (d / 'status').read_text().splitlines() if l.startswith('VmRSS')))\n"
)
# The floor of any Python gRPC server: grpc.aio serving health only, its bound port written to argv[1].
HEALTH_ONLY_SERVER = """
import asyncio, os, sys
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

async def main():
    server = aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    with open(sys.argv[1] + ".tmp", "w") as out:
        out.write(str(port))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    await server.wait_for_termination()

asyncio.run(main())
"""
IMAGE_PYTHON = "/tools/venv/bin/python"
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.max_reconnect_backoff_ms", 50)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def serving(address: str, deadline: float) -> None:
    """Returns once `address` answers health SERVING; raises TimeoutError at `deadline` (monotonic)."""
    async with aio.insecure_channel(address, options=FAST_RECONNECT) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            await asyncio.sleep(0.005)
    raise TimeoutError(f"{address} did not answer SERVING")


async def exec_true(address: str, token: str) -> None:
    async def requests():
        yield pb.ExecRequest(start=pb.ExecStart(argv=["true"]))

    async with aio.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        async for _ in stub.Exec(requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=10):
            pass


def python_env(extra: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}", **extra}


def process_wall(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def process_rss(python: list[str], statement: str, env: dict[str, str] | None = None) -> float:
    out = subprocess.run([*python, "-c", RSS_AFTER, statement], env=env, check=True, capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024


async def agent_subprocess(work: Path, extra_env: dict[str, str], health_only: bool = False) -> tuple[float, float]:
    """One agent subprocess (or, `health_only`, the HEALTH_ONLY_SERVER floor): seconds from spawn to health
    SERVING, and its VmRSS (MiB) once idle."""
    root = work / f"app-{secrets.token_hex(4)}"
    root.mkdir()
    port_file = root.with_suffix(".port")
    token = secrets.token_urlsafe(16)
    env = python_env({TOKEN_ENV: token, **extra_env})
    argv = [sys.executable, "-m", "agent", "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--root", str(root),
            "--log-level", "WARNING"]  # fmt: skip
    if health_only:
        argv = [sys.executable, "-c", HEALTH_ONLY_SERVER, str(port_file)]
    start = time.perf_counter()
    agent = subprocess.Popen(argv, env=env, cwd=work)
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the agent exited with {agent.returncode} before serving")
            await asyncio.sleep(0.002)
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        await serving(address, deadline)
        elapsed = time.perf_counter() - start
        if not health_only:
            await exec_true(address, token)
        await asyncio.sleep(0.5)  # the Exec's reaping and stream teardown settle
        return elapsed, rss_mib(agent.pid)
    finally:
        agent.terminate()
        agent.wait(10)


async def agent_container(client, image: str, extra_env: dict[str, str], label: str) -> tuple[float, float]:
    """One container of the image, hardened as the orchestrator runs it: seconds from `docker start` to the
    agent's health SERVING on the published port, and the agent's VmRSS (MiB) once idle."""
    from orchestrator.runtime.docker import TOKEN_PATH, deliver_token
    from tests.docker_support import HARDENING

    token = secrets.token_urlsafe(16)
    container = client.containers.create(
        image, ["--token-file", TOKEN_PATH], environment=extra_env, ports={f"{AGENT_PORT}/tcp": ("127.0.0.1", None)},
        labels={label: "agent"}, **HARDENING,
    )  # fmt: skip
    try:
        deliver_token(container, token, path=TOKEN_PATH, uid=1000)
        start = time.perf_counter()
        container.start()
        container.reload()
        address = f"127.0.0.1:{container.ports[f'{AGENT_PORT}/tcp'][0]['HostPort']}"
        await serving(address, time.monotonic() + 30)
        elapsed = time.perf_counter() - start
        await exec_true(address, token)
        await asyncio.sleep(0.5)
        result = container.exec_run([IMAGE_PYTHON, "-c", AGENT_RSS_IN_CONTAINER])
        return elapsed, int(result.output.split()[0]) / 1024
    finally:
        container.remove(force=True)


def container_floor(client, image: str, label: str) -> float:
    """Seconds from `docker start` to the exit of `true` in a container of the same image: the engine's own part."""
    container = client.containers.create(
        image, entrypoint=["/bin/true"], labels={label: "floor"}, **HARDENING_FOR_FLOOR
    )
    try:
        start = time.perf_counter()
        container.start()
        container.wait(timeout=30)
        return time.perf_counter() - start
    finally:
        container.remove(force=True)


HARDENING_FOR_FLOOR = {"cap_drop": ["ALL"], "security_opt": ["no-new-privileges"]}


def oci_bundle(client, image: str, directory: Path, label: str) -> Path:
    """An OCI bundle in `directory` running the image's agent as the workspace user, read-only root, in the
    host's network namespace (so 127.0.0.1 reaches it), `directory/app` bound on /app; returns its config path."""
    rootfs = directory / "rootfs"
    rootfs.mkdir()
    (directory / "app").mkdir()
    os.chown(directory / "app", 1000, 1000)
    container = client.containers.create(image, labels={label: "export"})
    try:
        untar = subprocess.Popen(["tar", "-x", "-C", str(rootfs)], stdin=subprocess.PIPE)
        assert untar.stdin is not None
        for chunk in container.export():
            untar.stdin.write(chunk)
        untar.stdin.close()
        if untar.wait() != 0:
            raise RuntimeError("tar could not unpack the exported image")
    finally:
        container.remove(force=True)
    subprocess.run(["runc", "spec", "--bundle", str(directory)], check=True)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["process"].update(terminal=False, user={"uid": 1000, "gid": 1000}, cwd="/app")
    config["linux"]["namespaces"] = [n for n in config["linux"]["namespaces"] if n["type"] != "network"]
    config["mounts"].append(
        {"destination": "/app", "type": "bind", "source": str(directory / "app"), "options": ["rbind", "rw"]}
    )
    config["mounts"].append({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]})
    config_path.write_text(json.dumps(config))
    return config_path


async def oci_agent(runtime: str, bundle: Path, argv: list[str], token: str) -> tuple[float, float]:
    """`runtime run` of the agent from `bundle`: seconds to health SERVING, and its VmRSS (MiB) once idle."""
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["args"] = argv
    config["process"]["env"] = [
        f"PATH={IMAGE_PYTHON.rsplit('/', 1)[0]}:/usr/bin:/bin",
        "LANG=C.UTF-8",
        f"{TOKEN_ENV}={token}",
    ]
    config_path.write_text(json.dumps(config))
    app = bundle / "app"
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir()
    os.chown(app, 1000, 1000)
    name = f"bench-agent-start-{secrets.token_hex(4)}"
    start = time.perf_counter()
    process = subprocess.Popen([runtime, "run", "--bundle", str(bundle), name], stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not (app / "port").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{runtime}: the agent exited with {process.returncode} before serving")
            await asyncio.sleep(0.002)
        address = f"127.0.0.1:{(app / 'port').read_text().strip()}"
        await serving(address, deadline)
        elapsed = time.perf_counter() - start
        await exec_true(address, token)
        await asyncio.sleep(0.5)
        state = json.loads(subprocess.run([runtime, "state", name], capture_output=True, check=True).stdout)
        # The container's init is tini; the agent is its child.
        children = Path(f"/proc/{state['pid']}/task/{state['pid']}/children").read_text().split()
        return elapsed, rss_mib(int(children[0]) if children else state["pid"])
    finally:
        subprocess.run([runtime, "kill", name, "KILL"], capture_output=True)
        process.wait(10)
        subprocess.run([runtime, "delete", "--force", name], capture_output=True)


def oci_floor(runtime: str, bundle: Path) -> float:
    """`runtime run` of `true` from the same bundle, to its exit. Raises RuntimeError with the runtime's last
    line when it cannot run the bundle here."""
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["args"] = ["/bin/true"]
    config_path.write_text(json.dumps(config))
    name = f"bench-floor-{secrets.token_hex(4)}"
    start = time.perf_counter()
    result = subprocess.run(
        [runtime, "run", "--bundle", str(bundle), name], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        subprocess.run([runtime, "delete", "--force", name], capture_output=True)
        raise RuntimeError((result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[-1])
    return elapsed


async def oci_rows(client, image: str, runtimes: list[str], runs: int, label: str) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="bench-oci-") as tmp:
        bundle = Path(tmp)
        oci_bundle(client, image, bundle, label)
        argv = ["/usr/bin/tini", "--", IMAGE_PYTHON, "-m", "agent", "--listen", "127.0.0.1:0", "--port-file", "/app/port",
                "--root", "/app", "--log-level", "WARNING"]  # fmt: skip
        for runtime in runtimes:
            version = subprocess.run([runtime, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
            try:
                floors = [oci_floor(runtime, bundle) for _ in range(runs)]
            except RuntimeError as error:
                rows.append(
                    (f"{version}: run to SERVING (no engine)", "cannot run here", f"{runtime} says", str(error), "", "")
                )
                continue
            starts, rsss = [], []
            for _ in range(runs):
                elapsed, rss = await oci_agent(runtime, bundle, argv, secrets.token_urlsafe(16))
                starts.append(elapsed)
                rsss.append(rss)
            rows.append((f"{version}: run to SERVING (no engine)", ms(starts), f"{runtime} run of `true` (to exit)",
                         ms(floors), f"idle VmRSS {mib(rsss)}", "faster than runc?"))  # fmt: skip
    return rows


def import_offenders(extra_env: dict[str, str], top: int = 12) -> tuple[int, list[tuple[str, float]]]:
    """The modules `python -m agent` imports before serving, and the top-level packages costing most (self
    time summed over their modules, best of 3 runs per module)."""
    best: dict[str, float] = {}
    count = 0
    for _ in range(3):
        out = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent", "--help"], env=python_env(extra_env),
                             capture_output=True, text=True, cwd=tempfile.gettempdir())  # fmt: skip
        lines = [m.groups() for m in re.finditer(r"import time:\s+(\d+) \|\s+\d+ \|( *)(\S+)", out.stderr)]
        count = len(lines)
        for self_us, _, name in lines:
            best[name] = min(best.get(name, float("inf")), int(self_us) / 1e3)
    packages: dict[str, float] = defaultdict(float)
    for name, ms in best.items():
        packages[name.split(".")[0]] += ms
    return count, sorted(packages.items(), key=lambda item: -item[1])[:top]


def table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers))
    print(fmt.format(*("-" * w for w in widths)))
    for row in rows:
        print(fmt.format(*row))
    print()


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:.0f} ms (min {min(samples) * 1e3:.0f})"


def mib(samples: list[float]) -> str:
    return f"{statistics.median(samples):.1f} MiB"


async def run(args: argparse.Namespace) -> None:
    extra_env = dict(item.split("=", 1) for item in args.env)
    rows: list[tuple[str, ...]] = []
    with tempfile.TemporaryDirectory(prefix="bench-agent-start-") as tmp:
        work = Path(tmp)
        starts, rsss = [], []
        for _ in range(args.runs):
            elapsed, rss = await agent_subprocess(work, extra_env)
            starts.append(elapsed)
            rsss.append(rss)
        floor_starts, floor_rsss = [], []
        for _ in range(args.runs):
            elapsed, rss = await agent_subprocess(work, extra_env, health_only=True)
            floor_starts.append(elapsed)
            floor_rsss.append(rss)
    env = python_env(extra_env)
    bare = [process_wall([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
    grpc_only = [process_wall([sys.executable, "-c", "import grpc.aio"], env) for _ in range(args.runs)]
    rows.append(("subprocess: spawn to health SERVING", ms(starts), "python -c 'import grpc.aio' (to exit)",
                 ms(grpc_only), f"bare python: {ms(bare)}", "~0.1 s"))  # fmt: skip
    rows.append(("", "", "a grpc.aio server with health only", ms(floor_starts), "", ""))
    grpc_rss = [process_rss([sys.executable], "import grpc.aio", env) for _ in range(3)]
    bare_rss = [process_rss([sys.executable], "pass", env) for _ in range(3)]
    rows.append(("subprocess: idle agent VmRSS", mib(rsss), "python -c 'import grpc.aio'", mib(grpc_rss),
                 f"bare python: {mib(bare_rss)}", "<= 32 MiB"))  # fmt: skip
    rows.append(("", "", "a grpc.aio server with health only", mib(floor_rsss), "", ""))

    if not args.no_docker:
        import docker

        client = docker.from_env(timeout=120)
        if args.image is None:
            from core_image.build import ensure_image

            args.image = ensure_image(client)
        label = f"workspace-core.bench-agent-start-{secrets.token_hex(4)}"
        try:
            starts, rsss = [], []
            for _ in range(args.container_runs):
                elapsed, rss = await agent_container(client, args.image, extra_env, label)
                starts.append(elapsed)
                rsss.append(rss)
            floors = [container_floor(client, args.image, label) for _ in range(args.container_runs)]
            rows.append((f"container ({args.image}): docker start to SERVING", ms(starts), "docker start of `true` (to exit)",
                         ms(floors), "", "~0.3 s"))  # fmt: skip
            image_grpc = client.containers.run(args.image, ["-c", RSS_AFTER, "import grpc.aio"], entrypoint=[IMAGE_PYTHON],
                                               environment=extra_env, remove=True, labels={label: "rss"})  # fmt: skip
            rows.append(("container: idle agent VmRSS", mib(rsss), "the image's python -c 'import grpc.aio'",
                         f"{int(image_grpc.split()[-1]) / 1024:.1f} MiB", "", "<= 32 MiB"))  # fmt: skip
            if args.oci:
                rows += await oci_rows(client, args.image, args.oci.split(","), args.container_runs, label)
        finally:
            for leftover in client.containers.list(all=True, filters={"label": label}):
                leftover.remove(force=True)
            client.close()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; runs: {args.runs} subprocess, "
          f"{0 if args.no_docker else args.container_runs} container; agent env: {extra_env or 'none'}\n")  # fmt: skip
    table(("measure", "agent", "baseline", "baseline value", "also", "goal"), rows)
    count, offenders = import_offenders(extra_env)
    print(f"`python -X importtime -m agent --help`: {count} modules; the top-level packages by import self-time:\n")
    table(("package", "self time"), [(name, f"{ms_:.1f} ms") for name, ms_ in offenders])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="agent subprocesses (default %(default)s)")
    parser.add_argument("--container-runs", type=int, default=5, help="agent containers (default %(default)s)")
    parser.add_argument("--image", help="the core image to run (default: built from these sources)")
    parser.add_argument("--no-docker", action="store_true", help="subprocess figures only")
    parser.add_argument("--oci", help="OCI runtimes to compare without the engine, e.g. runc,crun (needs root)")
    parser.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="an environment variable for the agent"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
