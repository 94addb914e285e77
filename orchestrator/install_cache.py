"""The install cache: a workspace's node_modules after a successful install, kept as a tar.gz (stored, not
compressed) under data-dir/install-cache (or in the S3 archive store, shared by replicas) and keyed by what decides it (the core image, the install command,
package.json and the lockfile if there is one), so a later session with the same key starts from it and its
install only verifies (or, on an exact hit, is skipped). The layer cache of the old per-template images, for
runtime injection."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import tarfile
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from common.durable import flush_to_disk
from orchestrator.agent_client import AgentClient
from orchestrator.blobs import TEMP_PREFIX, Blobs, LocalBlobs
from orchestrator.errors import AlreadyExists, ChecksumMismatch, InvalidArgument, NotFound, OrchestratorError

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


# zlib's window bits for a gzip header and trailer.
GZIP_WBITS = 31

# How long a delete waits for the store of its session's node_modules before giving up on the entry.
FINISH_STORE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class CacheKey:
    """What decides an install's result. `locked`: the workspace has a lockfile, which pins every version, so
    a hit is exact (the install would produce what the entry holds); without one the entry carries the
    lockfile its install wrote and expires. `key` is "" when the install cannot be cached, and `note` says why."""

    key: str
    locked: bool = True
    note: str = ""

    def __bool__(self) -> bool:
        return bool(self.key)


@dataclass(frozen=True)
class Injected:
    """What inject() did: `hit` when the cached node_modules is in the workspace, and a note saying so;
    `exact` when the hit is of a locked key, so running the install again would change nothing; `restored`
    what was put in place and how long it took."""

    hit: bool
    note: str
    exact: bool = False
    restored: str = ""


class InstallCache:
    """Entries `<key>.tar.gz` in `blobs` (a directory: local blobs in it), at most `max_bytes` in all (least
    recently used go first; in S3, least recently written). An entry of a workspace without a lockfile has
    `<key>.json` beside it: when it was made and the lockfile its install wrote; it is used for at most
    `unlocked_max_age_s`. Entries are written once (two replicas storing one key: the first one's is kept) and
    read back verified against the sha256 recorded with them."""

    def __init__(self, blobs: Blobs | Path, max_bytes: int, unlocked_max_age_s: float = 24 * 3600.0) -> None:
        self._blobs = LocalBlobs(blobs) if isinstance(blobs, Path) else blobs
        self._dir = self._blobs.spool  # temp files
        self._max_bytes = max_bytes
        self._unlocked_max_age_s = unlocked_max_age_s
        self._writers: dict[str, asyncio.Task[None]] = {}
        # The locked key last hit or stored: what a warm pool member prefetches (see prefetch); and who is told
        # when a new entry is stored (a warm pool, to restock its idle members).
        self.recent: CacheKey | None = None
        self.on_stored: list[Callable[[], None]] = []
        # Temp files of a crash mid-write go, and metadata whose entry a crash cut (it is written first).
        self._blobs.sweep(lambda name, names: not name.endswith(".json") or _entry(name[: -len(".json")]) in names)

    async def key(self, agent: AgentClient, install_command: str, image: str) -> CacheKey:
        """The key of the workspace's install as it is now: the core image `image` (its node and npm, and the
        platform native packages are picked for), the install command, package.json and the lockfile; without
        a lockfile what else decides the result is the registry at the time, hence the age limit."""
        try:
            manifest = await agent.read_file(MANIFEST)
        except NotFound:
            return CacheKey("", note=f"install cache not used: no {MANIFEST}")
        except OrchestratorError as error:  # not a regular file: the install decides what it means
            return CacheKey("", note=f"install cache not used: {MANIFEST}: {error}")
        digest = hashlib.sha256(image.encode() + b"\0" + install_command.encode() + b"\0" + manifest + b"\0")
        for lockfile in LOCKFILES:
            try:
                content = await agent.read_file(lockfile)
            except NotFound:
                continue
            except OrchestratorError as error:
                return CacheKey("", note=f"install cache not used: {lockfile}: {error}")
            digest.update(lockfile.encode() + b"\0" + content)
            return CacheKey(digest.hexdigest())
        digest.update(b"unlocked\0")
        return CacheKey(digest.hexdigest(), locked=False)

    async def inject(self, agent: AgentClient, key: CacheKey) -> Injected:
        """Merges the cached node_modules of `key` into the workspace, if there is one (and for an unlocked
        key the lockfile of its install, unless the entry is past its age). An entry that cannot be read or
        extracted is discarded: the install then runs as without a cache."""
        short = key.key[:12]
        try:
            # Touched on use: eviction goes by least recent use.
            if not await self._blobs.touch(_entry(key.key)):
                return Injected(False, f"install cache miss {short}")
        except OrchestratorError as error:  # the S3 store is unreachable: as without a cache
            log.warning("install cache: could not look up %s: %s", short, error)
            return Injected(False, f"install cache not used: {error}")
        lockfile: tuple[str, bytes] | None = None
        if not key.locked:
            try:
                meta = json.loads(await self._blobs.read_bytes(_meta(key.key)))
                age = time.time() - float(meta["created_at"])
                if meta.get("lockfile"):
                    lockfile = (str(meta["lockfile"]), str(meta["lockfile_content"]).encode())
            except (OSError, ValueError, KeyError, TypeError, NotFound, ChecksumMismatch) as error:
                log.warning("install cache entry %s has no usable metadata, discarded: %s", short, error)
                await self._discard(key.key)
                return Injected(False, f"install cache entry {short} was unusable and is discarded")
            if age > self._unlocked_max_age_s:
                await self._discard(key.key)
                return Injected(
                    False,
                    f"install cache entry {short} expired ({age / 3600:.1f} h old; entries without a lockfile"
                    f" are kept {self._unlocked_max_age_s / 3600:g} h)",
                )
        started = time.monotonic()
        try:
            # The blob is verified against the sha256 stored with it (the agent sees it fail before its end).
            await agent.extract_archive(self._blobs.read(_entry(key.key)), "", destination=NODE_MODULES, merge=True)
            if lockfile is not None:
                await agent.extract_archive(_single_file_chunks(*lockfile), "", merge=True)
        except (OSError, InvalidArgument, ChecksumMismatch, NotFound) as error:
            log.warning("install cache entry %s is unusable, discarded: %s", short, error)
            await self._discard(key.key)
            return Injected(False, f"install cache entry {short} was unusable and is discarded")
        except OrchestratorError as error:  # e.g. the agent refused it for its size: the install runs as usual
            log.warning("install cache entry %s was not injected: %s", short, error)
            return Injected(False, f"install cache entry {short} not injected: {error}")
        what = f"node_modules and {lockfile[0]}" if lockfile else "node_modules"
        restored = f"{what} in {time.monotonic() - started:.2f} s"
        if key.locked:
            self.recent = key
        return Injected(True, f"install cache hit {short} ({restored})", exact=key.locked, restored=restored)

    async def prefetch(self, agent: AgentClient) -> CacheKey | None:
        """Puts the node_modules of the `recent` entry into a workspace of no session yet (a warm pool member,
        through its pool credential), replacing any there, ahead of knowing whether its session will want it.
        Returns the key, or None when there is nothing to prefetch or it failed (logged; the member stays
        usable: a session then restores or installs as usual). Only locked keys: their entry is the whole hit."""
        key = self.recent
        if key is None:
            return None
        try:
            if not await self._blobs.touch(_entry(key.key)):
                return None
            await agent.extract_archive(self._blobs.read(_entry(key.key)), "", destination=NODE_MODULES)
        except (OSError, OrchestratorError) as error:
            log.warning("install cache: could not prefetch %s into a pool member: %s", key.key[:12], error)
            return None
        return key

    @staticmethod
    def prefetched(key: CacheKey) -> Injected:
        """What inject() would have done for `key`, done ahead: the member was prefetched with its entry."""
        restored = "node_modules prefetched into the warm pool member"
        return Injected(True, f"install cache hit {key.key[:12]} ({restored})", exact=key.locked, restored=restored)

    def store_in_background(self, agent: AgentClient, key: CacheKey) -> asyncio.Task[None] | None:
        """Archives the workspace's node_modules (and for an unlocked key the lockfile its install wrote) as
        the entry of `key`, unless it exists or is being written. Returns the task writing it, if any: the
        session must not be stopped before it ends (see finish)."""
        if key.key in self._writers:
            return None
        task = asyncio.create_task(self._store(agent, key), name=f"install cache {key.key[:12]}")
        self._writers[key.key] = task
        task.add_done_callback(lambda _: self._writers.pop(key.key, None))
        return task

    async def finish(self, task: asyncio.Task[None], timeout: float = FINISH_STORE_TIMEOUT_S) -> None:
        """Waits for a store that store_in_background started, before its workspace goes away; after
        `timeout` seconds the entry is given up (and that is logged)."""
        if task.done():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            log.warning("install cache: gave up storing %s: not written within %g s", task.get_name(), timeout)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _store(self, agent: AgentClient, key: CacheKey) -> None:
        short = key.key[:12]
        temp = self._dir / f"{TEMP_PREFIX}{key.key}"
        temp_meta = self._dir / f"{TEMP_PREFIX}{key.key}.json"
        size = 0
        digest = hashlib.sha256()
        try:
            if await self._blobs.touch(_entry(key.key)):
                return  # stored by an earlier session (or another replica)
            meta = None if key.locked else await self._installed_lockfile(agent)
            stream = await agent.create_archive(RUNTIME_CACHES, path=NODE_MODULES, no_default_excludes=True)
            recode = _Stored()
            with open(temp, "wb") as file:
                async for chunk in stream:
                    size += await asyncio.to_thread(_write, file, recode.feed(chunk), digest)
                    if size > self._max_bytes:
                        log.info("install cache: node_modules of %s exceeds the cache size, not kept", short)
                        return
                size += await asyncio.to_thread(_write, file, recode.end(), digest)
                await asyncio.to_thread(flush_to_disk, file)
            if meta is not None:
                # The metadata first: an entry without it is discarded, metadata without an entry removed.
                encoded = json.dumps(meta).encode()
                await asyncio.to_thread(_write_durably, temp_meta, encoded)
                await self._blobs.put(temp_meta, _meta(key.key), hashlib.sha256(encoded).hexdigest())
            await self._blobs.put(temp, _entry(key.key), digest.hexdigest())
            await self._evict(keep=_entry(key.key))
            log.info("install cache: stored %s (%d bytes)", short, size)
            if key.locked:
                self.recent = key
                for listener in self.on_stored:
                    listener()
        except AlreadyExists:  # another replica stored it first: one copy is kept
            log.info("install cache: %s was stored meanwhile by another writer; theirs is kept", short)
        except asyncio.CancelledError:
            log.warning("install cache: could not store %s: cancelled (shut down, or given up on by a delete)", short)
            raise
        except Exception as error:  # noqa: BLE001 - the session went away, the disk filled up: no entry, said so
            log.warning("install cache: could not store %s: %s", short, error)
        finally:
            temp.unlink(missing_ok=True)
            temp_meta.unlink(missing_ok=True)

    async def _installed_lockfile(self, agent: AgentClient) -> dict:
        """The metadata of an unlocked entry: now, and the lockfile the install wrote (if it wrote one)."""
        meta: dict = {"created_at": time.time(), "lockfile": ""}
        for lockfile in LOCKFILES:
            with contextlib.suppress(NotFound):
                content = await agent.read_file(lockfile)
                meta.update(lockfile=lockfile, lockfile_content=content.decode())
                break
        return meta

    async def _discard(self, key: str) -> None:
        try:
            await self._blobs.delete(_entry(key))
            await self._blobs.delete(_meta(key))
        except OrchestratorError as error:  # the S3 store is unreachable: the entry stays, and is said so
            log.warning("install cache: could not discard %s: %s", key[:12], error)

    async def _evict(self, keep: str) -> None:
        """Removes least recently used entries until all fit in max_bytes."""
        entries = sorted(
            (blob.modified, blob.size, blob.name)
            for blob in await self._blobs.entries()
            if blob.name.endswith(".tar.gz")
        )
        total = sum(size for _, size, _ in entries)
        for _, size, name in entries:
            if total <= self._max_bytes:
                break
            if name != keep:
                await self._discard(name.removesuffix(".tar.gz"))
                total -= size

    async def close(self) -> None:
        """Abandons the writes in progress (their temp files are removed)."""
        tasks = list(self._writers.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Stored:
    """Turns the agent's gzip stream (level 6) into a stored one (level 0, no compression), chunk by chunk.
    Restoring is what a session waits for, and inflating there cost more than the smaller entry saved on the
    loopback (tests/bench_install_cache.py); the price is about three times the disk per entry."""

    def __init__(self) -> None:
        self._inflate = zlib.decompressobj(wbits=GZIP_WBITS)
        self._deflate = zlib.compressobj(0, zlib.DEFLATED, GZIP_WBITS)

    def feed(self, chunk: bytes) -> bytes:
        if self._inflate.eof:
            raise ValueError("the archive has data after its gzip stream")
        return self._deflate.compress(self._inflate.decompress(chunk))

    def end(self) -> bytes:
        if not self._inflate.eof or self._inflate.unused_data:
            raise ValueError("the archive's gzip stream is cut short or has data after its end")
        return self._deflate.flush()


def _entry(key: str) -> str:
    return f"{key}.tar.gz"


def _meta(key: str) -> str:
    return f"{key}.json"


def _write(file: BinaryIO, data: bytes, digest: hashlib._Hash) -> int:
    file.write(data)
    digest.update(data)
    return len(data)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        flush_to_disk(file)


async def _single_file_chunks(name: str, content: bytes) -> AsyncIterator[bytes]:
    """A tar.gz holding one regular file `name` (mode 0644) with `content`."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        member = tarfile.TarInfo(name)
        member.size = len(content)
        member.mode = 0o644
        member.mtime = int(time.time())
        archive.addfile(member, io.BytesIO(content))
    yield buffer.getvalue()
