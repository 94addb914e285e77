"""Agent benchmark: each RPC's figure beside a baseline measured in the same run, as one table.

Run: python tests/bench_agent.py [--quick]
The agent runs as a subprocess (`python -m agent`), as in a container; the client is this process.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hashlib
import io
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "protos")]

from workspace.agent.v1 import agent_pb2 as pb  # noqa: E402
from workspace.agent.v1 import agent_pb2_grpc  # noqa: E402

MB = 1_000_000


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


async def latencies(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm-up
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def make_tree(root: Path, files: int, size: int) -> None:
    """`files` source-like files of about `size` bytes in nested directories."""
    line = b"const value = compute(alpha, beta); // some ordinary source text\n"
    body = (line * (size // len(line) + 1))[:size]
    for i in range(files):
        d = root / f"pkg{i % 50:02d}" / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        extra = b"export function handler%d() { return 'needle_%d'; }\n" % (i, i) if i % 10 == 0 else b""
        (d / f"file{i:05d}.ts").write_bytes(body + extra)


class Row:
    def __init__(self, what: str, agent: str, baseline_name: str, baseline: str, ratio: str, goal: str) -> None:
        self.cells = (what, agent, baseline_name, baseline, ratio, goal)


def print_table(rows: list[Row]) -> None:
    headers = ("measure", "agent", "baseline", "baseline value", "ratio", "goal")
    widths = [max(len(h), *(len(r.cells[i]) for r in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers))
    print(fmt.format(*("-" * w for w in widths)))
    for r in rows:
        print(fmt.format(*r.cells))


def machine() -> str:
    cpu = "unknown cpu"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    return (
        f"{platform.system()} {platform.release()}, {os.cpu_count()} cpus ({cpu}), {mem:.0f} GiB, "
        f"Python {platform.python_version()}, grpcio {grpc.__version__}"
    )


async def run(quick: bool, work_parent: Path | None) -> None:
    rows: list[Row] = []
    work = Path(tempfile.mkdtemp(prefix="bench-agent-", dir=work_parent))
    root = work / "app"
    root.mkdir()
    token = secrets.token_urlsafe(16)
    port = free_port()
    env = {**os.environ, "WORKSPACE_AGENT_TOKEN": token, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "agent", "--listen", f"127.0.0.1:{port}", "--root", str(root), "--log-level", "WARNING"],
        env=env,
        cwd=REPO,
    )
    channel = aio.insecure_channel(
        f"127.0.0.1:{port}",
        options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
            ("grpc.max_send_message_length", 8 * 1024 * 1024),
        ],
    )
    md = (("authorization", f"Bearer {token}"),)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(100):
            try:
                await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                break
            except aio.AioRpcError:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)

        # Idle memory, before anything has run.
        python_rss = (
            float(
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        "import pathlib;print([l for l in pathlib.Path('/proc/self/status').read_text().splitlines() if l.startswith('VmRSS')][0].split()[1])",
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            / 1024
        )
        idle = rss_mib(agent.pid)
        rows.append(
            Row(
                "idle resident memory",
                f"{idle:.1f} MiB",
                "bare python",
                f"{python_rss:.1f} MiB",
                f"{idle / python_rss:.1f}x",
                "light",
            )
        )

        # Small Read vs the floor of a unary gRPC round trip in this stack.
        n = 300 if quick else 1000
        (root / "small.txt").write_bytes(os.urandom(4096))

        async def small_read() -> None:
            async for _ in stub.Read(pb.ReadRequest(path="small.txt"), metadata=md):
                pass

        read_lat = await latencies(small_read, n)
        floor = await latencies(lambda: stub.GetActivity(pb.GetActivityRequest(), metadata=md), n)
        rows.append(
            Row(
                f"Read 4 KiB p50 / p99 (n={n})",
                f"{percentile(read_lat, 0.5) * 1e3:.2f} / {percentile(read_lat, 0.99) * 1e3:.2f} ms",
                "unary gRPC no-op",
                f"{percentile(floor, 0.5) * 1e3:.2f} / {percentile(floor, 0.99) * 1e3:.2f} ms",
                f"{percentile(read_lat, 0.5) / percentile(floor, 0.5):.1f}x",
                "p50 ~1 ms",
            )
        )

        # Exec true vs subprocess.run.
        n_exec = 100 if quick else 300

        async def exec_true() -> None:
            async def requests():
                yield pb.ExecRequest(start=pb.ExecStart(argv=["true"]))

            async for _ in stub.Exec(requests(), metadata=md):
                pass

        exec_lat = await latencies(exec_true, n_exec)
        sub_lat = [timed(lambda: subprocess.run(["true"], check=True)) for _ in range(n_exec)]
        rows.append(
            Row(
                f"Exec true p50 / p99 (n={n_exec})",
                f"{percentile(exec_lat, 0.5) * 1e3:.2f} / {percentile(exec_lat, 0.99) * 1e3:.2f} ms",
                "subprocess.run(true)",
                f"{percentile(sub_lat, 0.5) * 1e3:.2f} / {percentile(sub_lat, 0.99) * 1e3:.2f} ms",
                f"{percentile(exec_lat, 0.5) / percentile(sub_lat, 0.5):.1f}x",
                "p50 < 10 ms",
            )
        )

        # Large Read throughput vs cat.
        size = (20 if quick else 100) * MB
        big = root / "big.bin"
        with big.open("wb") as f:
            block = os.urandom(MB)
            for _ in range(size // MB):
                f.write(block)

        async def big_read() -> int:
            got = 0
            async for event in stub.Read(pb.ReadRequest(path="big.bin"), metadata=md):
                got += len(event.chunk.data)
            return got

        await big_read()  # warm the page cache and the channel
        reads = []
        for _ in range(3):
            start = time.perf_counter()
            assert await big_read() == size
            reads.append(time.perf_counter() - start)
        cats = [timed(lambda: subprocess.run(f"cat {big} > /dev/null", shell=True, check=True)) for _ in range(3)]
        agent_mbs, cat_mbs = size / MB / statistics.median(reads), size / MB / statistics.median(cats)
        rows.append(
            Row(
                f"Read {size // MB} MB",
                f"{agent_mbs:.0f} MB/s",
                "cat > /dev/null",
                f"{cat_mbs:.0f} MB/s",
                f"{agent_mbs / cat_mbs:.2f}x",
                ">= 300 MB/s",
            )
        )
        big.unlink()

        # ExtractArchive of a 5,000-file archive vs tar -xzf.
        files = 1000 if quick else 5000
        src = work / "src"
        make_tree(src, files, 2000)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            tar.add(src, arcname=".")
        archive = buf.getvalue()
        (work / "tree.tar.gz").write_bytes(archive)
        digest = hashlib.sha256(archive).hexdigest()
        payload = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())

        async def extract(dest: str) -> None:
            async def requests():
                yield pb.ExtractArchiveRequest(spec=pb.ExtractArchiveSpec(destination=dest, expected_sha256=digest))
                for i in range(0, len(archive), 1024 * 1024):
                    yield pb.ExtractArchiveRequest(chunk=archive[i : i + 1024 * 1024])

            await stub.ExtractArchive(requests(), metadata=md)

        ext_times, tar_times = [], []
        # Best of 5 for both: extraction is disk-bound and the disk here is shared, so single runs of
        # either vary several-fold; the best run is each one's own speed with the least interference.
        for i in range(5):
            start = time.perf_counter()
            await extract(f"extract{i}")
            ext_times.append(time.perf_counter() - start)
            out = work / f"tar{i}"
            out.mkdir()
            tar_times.append(
                timed(
                    functools.partial(
                        subprocess.run, ["tar", "-xzf", str(work / "tree.tar.gz"), "-C", str(out)], check=True
                    )
                )
            )
            shutil.rmtree(root / f"extract{i}")
        ext, tar_t = min(ext_times), min(tar_times)
        rows.append(
            Row(
                f"ExtractArchive {files} files ({payload / MB:.0f} MB), best of 5",
                f"{files / ext:,.0f} files/s, {payload / MB / ext:.0f} MB/s",
                "tar -xzf",
                f"{files / tar_t:,.0f} files/s, {payload / MB / tar_t:.0f} MB/s",
                f"{tar_t / ext:.2f}x of tar's speed",
                ">= 0.5x",
            )
        )

        # Search of a regex over a 10,000-file tree vs bare rg.
        tree_files = 2000 if quick else 10000
        make_tree(root / "tree", tree_files, 1500)
        pattern = r"handler\d+\(\)"

        async def search() -> int:
            results = 0
            request = pb.SearchRequest(path="tree", pattern=pattern, regex=True, max_results=100_000)
            async for response in stub.Search(request, metadata=md):
                results += sum(hit.WhichOneof("hit") == "match" for hit in response.hits)
            return results

        found = await search()
        search_times = []
        for _ in range(5):
            start = time.perf_counter()
            await search()
            search_times.append(time.perf_counter() - start)
        rg = shutil.which("rg")
        rg_times = (
            [
                timed(lambda: subprocess.run([rg, "-c", pattern, str(root / "tree")], capture_output=True))
                for _ in range(5)
            ]
            if rg
            else [float("nan")]
        )
        s, r = statistics.median(search_times), statistics.median(rg_times)
        rows.append(
            Row(
                f"Search regex, {tree_files} files ({found} matches)",
                f"{s * 1e3:.0f} ms",
                "bare rg",
                f"{r * 1e3:.0f} ms",
                f"{s / r:.2f}x rg's time",
                "<= 1.5x",
            )
        )
    finally:
        await channel.close()
        agent.terminate()
        agent.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {machine()}")
    print(f"files in: {work.parent} (both the agent's and the baselines')\n")
    print_table(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    # A memory filesystem by default: this machine's disk is shared, and single extractions to it (the
    # agent's and tar's alike) vary several-fold from run to run; --work-dir measures on a disk of your choice.
    parser.add_argument("--work-dir", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    args = parser.parse_args()
    asyncio.run(run(args.quick, args.work_dir))


if __name__ == "__main__":
    main()
