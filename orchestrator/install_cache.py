"""The install cache: a workspace's node_modules after a successful install, kept as a tar.gz under
data-dir/install-cache and keyed by what decides it (the install command, package.json and the lockfile),
so a later session with the same key starts from it and its install only verifies. The layer cache of the
old per-template images, for runtime injection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.agent_client import AgentClient
from orchestrator.archives import TEMP_PREFIX, file_chunks, flush_to_disk, publish
from orchestrator.errors import ChecksumMismatch, InvalidArgument, NotFound, OrchestratorError

log = logging.getLogger(__name__)

NODE_MODULES = "node_modules"
MANIFEST = "package.json"
# Without one of these the install resolves versions anew each time: its result is not reproducible.
LOCKFILES = ("package-lock.json", "npm-shrinkwrap.json")
# Caches tools write into node_modules while the dev server runs (Vite's pre-bundled deps, babel and
# friends): not part of the install, and possibly half-written while the archive is made.
RUNTIME_CACHES = ("/.vite/", "/.cache/")
# On a hit node_modules already matches the lockfile: npm need not ask the registry (for packages, audits,
# funding or its own updates).
HIT_ENV = {
    "npm_config_prefer_offline": "true",
    "npm_config_audit": "false",
    "npm_config_fund": "false",
    "npm_config_update_notifier": "false",
}


@dataclass(frozen=True)
class Injected:
    """What inject() did: `hit` when the cached node_modules is in the workspace, and a note saying so."""

    hit: bool
    note: str


class InstallCache:
    """Entries `<key>.tar.gz` in `directory`, at most `max_bytes` in all (least recently used go first)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self._dir = directory
        self._max_bytes = max_bytes
        self._writers: dict[str, asyncio.Task[None]] = {}
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in directory.glob(f"{TEMP_PREFIX}*"):  # of a crash mid-write
            leftover.unlink(missing_ok=True)

    def path(self, key: str) -> Path:
        return self._dir / f"{key}.tar.gz"

    async def key(self, agent: AgentClient, install_command: str) -> str:
        """The key of the workspace's install as it is now, or "" when it cannot be cached (no
        package.json or no lockfile)."""
        digest = hashlib.sha256(install_command.encode() + b"\0")
        try:
            digest.update(await agent.read_file(MANIFEST) + b"\0")
            for lockfile in LOCKFILES:
                with contextlib.suppress(NotFound):
                    digest.update(lockfile.encode() + b"\0" + await agent.read_file(lockfile))
                    return digest.hexdigest()
        except OrchestratorError as error:  # missing, or not a regular file: the install decides what it means
            log.debug("install cache: no key: %s", error)
        return ""

    async def inject(self, agent: AgentClient, key: str) -> Injected:
        """Merges the cached node_modules of `key` into the workspace, if there is one. An entry that cannot
        be read or extracted is discarded: the install then runs as without a cache."""
        path = self.path(key)
        try:
            # Touched on use: eviction goes by least recent use.
            await asyncio.to_thread(os.utime, path)
        except FileNotFoundError:
            return Injected(False, f"install cache miss {key[:12]}")
        started = time.monotonic()
        try:
            # No checksum to announce: gzip's own CRC and the agent's checks catch a damaged entry.
            await agent.extract_archive(file_chunks(path), "", destination=NODE_MODULES, merge=True)
        except (OSError, InvalidArgument, ChecksumMismatch) as error:
            log.warning("install cache entry %s is unusable, discarded: %s", key[:12], error)
            await asyncio.to_thread(path.unlink, True)
            return Injected(False, f"install cache entry {key[:12]} was unusable and is discarded")
        except OrchestratorError as error:  # e.g. the agent refused it for its size: the install runs as usual
            log.warning("install cache entry %s was not injected: %s", key[:12], error)
            return Injected(False, f"install cache entry {key[:12]} not injected: {error}")
        return Injected(True, f"install cache hit {key[:12]} (node_modules in {time.monotonic() - started:.2f} s)")

    def store_in_background(self, agent: AgentClient, key: str) -> None:
        """Archives the workspace's node_modules as the entry of `key`, unless it exists or is being written."""
        if key in self._writers or self.path(key).exists():
            return
        task = asyncio.create_task(self._store(agent, key), name=f"install cache {key[:12]}")
        self._writers[key] = task
        task.add_done_callback(lambda _: self._writers.pop(key, None))

    async def _store(self, agent: AgentClient, key: str) -> None:
        temp = self._dir / f"{TEMP_PREFIX}{key}"
        size = 0
        try:
            stream = await agent.create_archive(RUNTIME_CACHES, path=NODE_MODULES, no_default_excludes=True)
            with open(temp, "wb") as file:
                async for chunk in stream:
                    size += len(chunk)
                    if size > self._max_bytes:
                        log.info("install cache: node_modules of %s exceeds the cache size, not kept", key[:12])
                        return
                    await asyncio.to_thread(file.write, chunk)
                await asyncio.to_thread(flush_to_disk, file)
            await asyncio.to_thread(publish, temp, self.path(key))
            await asyncio.to_thread(self._evict, keep=self.path(key))
            log.info("install cache: stored %s (%d bytes)", key[:12], size)
        except (OrchestratorError, OSError) as error:  # the session went away, the disk filled up: no entry
            log.warning("install cache: could not store %s: %s", key[:12], error)
        finally:
            temp.unlink(missing_ok=True)

    def _evict(self, keep: Path) -> None:
        """Removes least recently used entries until all fit in max_bytes."""
        entries = []
        for entry in self._dir.glob("*.tar.gz"):
            with contextlib.suppress(FileNotFoundError):  # another writer's eviction took it
                stat = entry.stat()
                entries.append((stat.st_mtime, stat.st_size, entry))
        entries.sort()
        total = sum(size for _, size, _ in entries)
        for _, size, entry in entries:
            if total <= self._max_bytes:
                break
            if entry != keep:
                entry.unlink(missing_ok=True)
                total -= size

    async def close(self) -> None:
        """Abandons the writes in progress (their temp files are removed)."""
        tasks = list(self._writers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

