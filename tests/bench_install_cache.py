"""Install-cache benchmark: ways of putting a cached node_modules into a hardened workspace container, each timed
against today's (the agent's ExtractArchive of the entry the agent itself wrote). A benchmark, not a test.

Run: python tests/bench_install_cache.py [--runs N] [--node-modules DIR] [--extra-ca-bundle PEM]
Without --node-modules it runs `npm ci` of templates/vite-react on the host (needs npm and the registry). Every
method restores the same tree into /app/node_modules of a container started by the orchestrator's DockerRuntime
(non-root, caps dropped, read-only rootfs, /app a volume), which is emptied between runs; a method whose result
differs from today's (paths, kinds, modes, owners, link targets) says so in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gzip
import io
import secrets
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "protos")]

import docker  # noqa: E402
import docker.models.containers  # noqa: E402

from core_image.build import ensure_image  # noqa: E402
from orchestrator.agent_client import AgentClient  # noqa: E402
from orchestrator.install_cache import _Stored  # noqa: E402
from orchestrator.runtime.base import ORCHESTRATOR_LABEL  # noqa: E402
from orchestrator.runtime.docker import DockerRuntime  # noqa: E402
from orchestrator.templates import ResourceHints  # noqa: E402

NODE_MODULES = "node_modules"
CACHE_MOUNT = "/install-cache"  # where the "shared read-only volume" methods see the entry
# Of every path under node_modules: kind, mode, owner, link target (what a correct restore must reproduce).
LISTING = "cd /app && find node_modules -printf '%P %y %m %U:%G %l\\n' | LC_ALL=C sort"


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def real_node_modules(extra_ca_bundle: Path | None) -> Path:
    """vite-react's node_modules, installed on the host with `npm ci` (a temporary folder, left for the run)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-install-cache-"))
    for name in ("package.json", "package-lock.json"):
        shutil.copy(REPO / "templates" / "vite-react" / name, folder / name)
    command = ["npm", "ci", "--no-audit", "--no-fund"]
    if extra_ca_bundle:
        command += ["--cafile", str(extra_ca_bundle)]
    note(f"npm ci of vite-react in {folder}")
    subprocess.run(command, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return folder / NODE_MODULES


def tar_bytes(tree: Path, compress: Callable[[bytes], bytes] | None) -> bytes:
    """`tree` as a tar (members relative to it, like the agent's entries), optionally compressed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in sorted(tree.rglob("*")):
            archive.add(path, arcname=path.relative_to(tree).as_posix(), recursive=False)
    data = buffer.getvalue()
    return compress(data) if compress else data


async def chunks_of(data: bytes, size: int = 1024 * 1024) -> AsyncIterator[bytes]:
    for offset in range(0, len(data), size):
        yield data[offset : offset + size]


class Bench:
    def __init__(self, client: docker.DockerClient, image: str, node_modules: Path, runs: int) -> None:
        self.client = client
        self.image = image
        self.node_modules = node_modules
        self.runs = runs
        self.instance = f"bench-install-{secrets.token_hex(4)}"
        self.rows: list[tuple[str, float | None, str]] = []
        self.reference = ""

    async def workspace(self, runtime: DockerRuntime) -> tuple[str, AgentClient, str]:
        session = secrets.token_hex(8)
        token = secrets.token_urlsafe(16)
        workspace = await runtime.start(session, token, resources=ResourceHints(), env={}, labels={})
        agent = AgentClient(workspace.agent_endpoint, token)
        await agent.wait_healthy(60)
        return session, agent, workspace.handle

    async def shell(self, agent: AgentClient, command: str) -> tuple[int, str]:
        lines: list[str] = []
        code = await agent.run(command, on_line=lambda text, _err: lines.append(text), timeout=300)
        return code, "\n".join(lines)

    @staticmethod
    async def extract(agent: AgentClient, data: bytes) -> None:
        await agent.extract_archive(chunks_of(data), "", destination=NODE_MODULES, merge=True)

    async def measure(self, name: str, agent: AgentClient, restore: Callable[[], Awaitable[object]]) -> None:
        times: list[float] = []
        listing = ""
        try:
            for _ in range(self.runs):
                code, output = await self.shell(agent, f"rm -rf /app/{NODE_MODULES}")
                assert code == 0, output
                started = time.perf_counter()
                await restore()
                times.append(time.perf_counter() - started)
                listing = (await self.shell(agent, LISTING))[1]
        except Exception as error:  # noqa: BLE001 - a method that cannot work here is a row saying why
            self.rows.append((name, None, f"fails: {str(error).splitlines()[0][:90]}"))
            note(f"{name}: fails: {error}")
            return
        if not self.reference:
            self.reference = listing
        differs = sorted(set(listing.splitlines()) ^ set(self.reference.splitlines()))
        verdict = "same tree" if not differs else f"DIFFERS ({len(differs)} lines, e.g. {differs[0][:60]!r})"
        median = statistics.median(times)
        self.rows.append((name, median, verdict))
        note(f"{name}: median {median:.3f} s over {len(times)} ({verdict})")

    async def run(self) -> None:
        entry = await self.agent_entry()
        level1 = tar_bytes(self.node_modules, lambda data: gzip.compress(data, 1, mtime=0))
        recode = _Stored()  # what the cache keeps now: the agent's entry, recoded as stored gzip
        stored = recode.feed(entry) + recode.end()
        plain = tar_bytes(self.node_modules, None)
        note(f"entry sizes: agent (gzip 6) {len(entry)}, gzip 1 {len(level1)}, gzip 0 {len(stored)}, tar {len(plain)}")

        runtime = DockerRuntime(image=self.image, instance_id=self.instance)
        try:
            _, agent, handle = await self.workspace(runtime)
            container = self.client.containers.get(handle)
            for name, data in (
                ("agent ExtractArchive, gzip 6 entry (today)", entry),
                ("agent ExtractArchive, gzip 1 entry", level1),
                ("agent ExtractArchive, stored gzip (kept)", stored),
            ):
                await self.measure(name, agent, functools.partial(self.extract, agent, data))
            prefixed = self.prefixed(plain)

            async def put_archive() -> None:
                # The engine extracts as root, keeping the archive's owners (made 1000 here).
                ok = await asyncio.to_thread(container.put_archive, "/app", prefixed)
                assert ok, "put_archive refused"

            await self.measure("docker put_archive (engine as root), tar", agent, put_archive)
            await agent.close()
            await self.volume_methods(entry)
        finally:
            self.remove_containers()
            await runtime.remove_network()
            await runtime.close()

    def remove_containers(self) -> None:
        for container in self.client.containers.list(
            all=True, filters={"label": f"{ORCHESTRATOR_LABEL}={self.instance}"}
        ):
            container.remove(force=True, v=True)

    def prefixed(self, plain: bytes) -> bytes:
        """The tar with members under node_modules/ owned by 1000:1000, for put_archive into /app."""
        buffer = io.BytesIO()
        with (
            tarfile.open(fileobj=io.BytesIO(plain)) as source,
            tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive,
        ):
            top = tarfile.TarInfo(NODE_MODULES)
            top.type, top.mode, top.uid, top.gid = tarfile.DIRTYPE, 0o755, 1000, 1000
            archive.addfile(top)
            for member in source:
                member.name = f"{NODE_MODULES}/{member.name}"
                if member.islnk():
                    member.linkname = f"{NODE_MODULES}/{member.linkname}"
                member.uid = member.gid = 1000
                member.uname = member.gname = ""
                archive.addfile(member, source.extractfile(member) if member.isfile() else None)
        return buffer.getvalue()

    async def agent_entry(self) -> bytes:
        """What today's store writes: the agent's CreateArchive of node_modules in a workspace."""
        runtime = DockerRuntime(image=self.image, instance_id=self.instance)
        try:
            _, agent, handle = await self.workspace(runtime)
            container = self.client.containers.get(handle)
            await asyncio.to_thread(container.put_archive, "/app", self.prefixed(tar_bytes(self.node_modules, None)))
            stream = await agent.create_archive(path=NODE_MODULES, no_default_excludes=True)
            data = b"".join([chunk async for chunk in stream])
            await agent.close()
            return data
        finally:
            self.remove_containers()

    async def volume_methods(self, entry: bytes) -> None:
        """The entry unpacked in a host folder mounted read-only at container creation (what a shared volume
        of entries would be); the container copies or links from it."""
        shared = Path(tempfile.mkdtemp(prefix="bench-install-shared-"))
        try:
            with tarfile.open(fileobj=io.BytesIO(entry)) as archive:
                archive.extractall(shared / NODE_MODULES, filter="tar")
            subprocess.run(["chown", "-R", "1000:1000", str(shared)], check=False)
            (shared / "entry.tar.gz").write_bytes(entry)
            runtime = DockerRuntime(image=self.image, instance_id=self.instance, trust_bundle=None)
            collection = docker.models.containers.ContainerCollection
            real_create = collection.create

            def create_with_mount(self: Any, *args: Any, **options: Any) -> Any:
                options["volumes"] = {**options.get("volumes", {}), str(shared): {"bind": CACHE_MOUNT, "mode": "ro"}}
                return real_create(self, *args, **options)

            # The runtime's own creation, with the one mount added (a mount must exist at creation).
            collection.create = create_with_mount  # type: ignore[method-assign]
            try:
                _, agent, _ = await self.workspace(runtime)
            finally:
                collection.create = real_create  # type: ignore[method-assign]
            for name, command in (
                ("shared ro volume + cp -a", f"cp -a {CACHE_MOUNT}/{NODE_MODULES} /app/"),
                ("shared ro volume + cp -al (hard links)", f"cp -al {CACHE_MOUNT}/{NODE_MODULES} /app/"),
                ("shared ro volume + tar xzf of the entry",
                 f"mkdir /app/{NODE_MODULES} && tar xzf {CACHE_MOUNT}/entry.tar.gz -C /app/{NODE_MODULES}"),
            ):  # fmt: skip

                async def restore(command: str = command) -> None:
                    code, output = await self.shell(agent, command)
                    assert code == 0, output.splitlines()[-1] if output else f"exit {code}"

                await self.measure(name, agent, restore)
            await agent.close()
        finally:
            subprocess.run(["rm", "-rf", str(shared)], check=False)

    def table(self) -> str:
        today = self.rows[0][1]
        lines = [f"{'method':<46} {'median s':>9} {'vs today':>9}  result", "-" * 100]
        for name, median, verdict in self.rows:
            if median is None:
                lines.append(f"{name:<46} {'-':>9} {'-':>9}  {verdict}")
            else:
                ratio = f"{median / today:.2f}x" if today else "-"
                lines.append(f"{name:<46} {median:>9.3f} {ratio:>9}  {verdict}")
        return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--node-modules", type=Path, help="an installed node_modules (default: npm ci of vite-react)")
    parser.add_argument("--extra-ca-bundle", type=Path, help="a CA bundle for npm to trust")
    args = parser.parse_args()
    client = docker.from_env(timeout=600)
    image = ensure_image(client)
    node_modules = args.node_modules or real_node_modules(args.extra_ca_bundle)
    files = sum(1 for _ in node_modules.rglob("*"))
    size = sum(p.lstat().st_size for p in node_modules.rglob("*"))
    bench = Bench(client, image, node_modules, args.runs)
    await bench.run()
    print(
        f"node_modules: {node_modules} ({files} entries, {size / 1e6:.1f} MB); median of {args.runs} runs;"
        f" zlib {zlib.ZLIB_VERSION}"
    )
    print(bench.table())


if __name__ == "__main__":
    asyncio.run(main())
