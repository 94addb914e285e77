"""Hot pools: per template, pool members taken through a session's own initialization steps (template injected,
installed, dev server answering), so a session claiming one is READY at once; keyed by what they were made of.
An edit that leaves the install's inputs alone brings the unclaimed entries up to the new content in place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import logging
import shlex
import tarfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc

from orchestrator.agent_client import AgentClient
from orchestrator.errors import InitializationFailed, OrchestratorError
from orchestrator.install_cache import LOCKFILES, MANIFEST
from orchestrator.pool import REFILL_DELAY_S, TAKE_HEALTH_TIMEOUT_S, Member, WarmPool
from orchestrator.readiness import http_status
from orchestrator.runtime import Runtime, Workspace
from orchestrator.runtime.base import POOL_KEY_LABEL, POOL_TEMPLATE_LABEL
from orchestrator.sessions.live import READY, LiveSession, reason_of
from orchestrator.templates import PinnedTemplate, ResourceHints, TemplateArchive
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from orchestrator.sessions.initialization import Initialization

log = logging.getLogger(__name__)

HOT_KIND = "hot"
# Ends the container phase's detail of a session that claimed a hot entry; the later phases' detail.
FROM_HOT_POOL = "(from the hot pool)"
HOT_DETAIL = "from the hot pool"
# How often the pool looks for an edited template or a rebuilt image (its entries are then retired): reading
# and hashing a template's files (node_modules are not among them) is cheap.
KEY_CHECK_S = 5.0
# A hot fill runs an install and a dev server: one at a time (2-core hosts), and a failing template (its
# install or dev server fails) is not tried again in a tight loop.
HOT_FILL_AT_ONCE = 1
HOT_RETRY_AFTER_S = 60.0
# A hot entry's dev server must answer this fast to be handed out.
TAKE_PROBE_TIMEOUT_S = 1.0
# Files besides the template's metadata that decide what the install makes: an edit of one of them (or of the
# install command, env or limits) retires the entries; any other edit is brought into them in place.
INSTALL_INPUTS = (MANIFEST, *LOCKFILES, ".npmrc")
# The dev server is stopped this fast before the edited files go in (it is started again on them).
REFRESH_STOP_GRACE_S = 2.0

# What a hot fill's or refresh's initialization runs: from injecting the archive on, or from starting the dev
# server on (the files are in place).
FILL, RESTART_DEV = pb.PHASE_ARCHIVE_INJECTED, pb.PHASE_DEV_SERVER_STARTED


def entry_key(pinned: PinnedTemplate, image_id: str) -> str:
    """`<template content hash>:<image id>`, both shortened (a Docker label value)."""
    image = (
        image_id.removeprefix("sha256:")
        if image_id.startswith("sha256:")
        else hashlib.sha256(image_id.encode()).hexdigest()
    )
    return f"{pinned.content_hash[:16]}:{image[:12]}"


class _PoolRecorder:
    """The Recorder of a hot fill's initialization: no store, no watchers (there is no session yet); a failure
    is kept for the fill to report."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None

    def record(self, live: LiveSession, event: pb.WatchSessionResponse) -> None:
        pass

    def fail(self, live: LiveSession, error: BaseException) -> None:
        self.failure = error

    def attach(self, live: LiveSession, workspace: Workspace, agent: AgentClient | None = None) -> None:
        live.workspace, live.agent = workspace, agent or live.agent


class HotPool(WarmPool):
    """Keeps `size` members of one template READY: each made by an Initialization of its own (the steps after
    the agent is healthy) from the template at one content hash, on one image, and labelled with that key.
    take_matching(key) hands out only a member of `key` whose agent and dev server answer; members of another
    key (the template was edited, the image rebuilt) are retired in the background and replaced."""

    kind = HOT_KIND
    fill_at_once = HOT_FILL_AT_ONCE
    retry_after_s = HOT_RETRY_AFTER_S

    def __init__(
        self,
        runtime: Runtime,
        size: int,
        template: str,
        *,
        room: Callable[[], int],
        health_timeout_s: float,
        pinned: Callable[[str], Awaitable[PinnedTemplate]],
        initialization: Callable[[LiveSession, PinnedTemplate, _PoolRecorder, pb.Phase.ValueType], Initialization],
        output_history_lines: int,
    ) -> None:
        super().__init__(runtime, size, room=room, health_timeout_s=health_timeout_s)
        self.template = template
        self._pinned_of = pinned
        self._initialization = initialization
        self._history_lines = output_history_lines
        # The template as each key (labelled on a member being started, or asked for by a session) was computed:
        # what _prepare injects and a refresh brings an entry up to.
        self._made_of: dict[str, PinnedTemplate] = {}
        self._checking: asyncio.Task[None] | None = None
        # Entries being brought up to another key in place (out of _ready meanwhile: never handed out half-done).
        self._refreshing: dict[asyncio.Task[None], str] = {}

    @property
    def held(self) -> int:
        return super().held + len(self._refreshing)

    def status(self) -> pb.Pool:
        status = super().status()
        status.template = self.template
        return status

    async def current(self) -> tuple[str, PinnedTemplate]:
        """The key an entry must have to be handed out now, and the template at it. Raises TemplateNotFound,
        InvalidTemplate, EngineUnavailable, ImageMissing."""
        pinned = await self._pinned_of(self.template)
        key = entry_key(pinned, await self._runtime.image_id())
        self._made_of.setdefault(key, pinned)
        return key, pinned

    async def start(self, *, remove_leftovers: bool = True) -> None:
        await super().start(remove_leftovers=remove_leftovers)
        self._checking = asyncio.create_task(self._check_keys(), name=f"hot pool {self.template} keys")

    async def take_matching(self, key: str) -> Member | None:
        """A member of `key` whose agent and dev server answer now; else one being brought up to `key` in place
        (as soon as that is done: a dev server's restart, less than a warm start takes), or None at once. Members of
        another key are brought up to `key` when only files the install does not read differ, else retired; members
        that do not answer are removed, never handed out. `key` must come from current()."""
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self.refill)
        self._update_to(key)
        while True:
            member = next((m for m in self._ready if m.key == key), None)
            if member is None:
                refreshing = [task for task, to in self._refreshing.items() if to == key]
                if not refreshing:
                    return None
                await asyncio.wait(refreshing, return_when=asyncio.FIRST_COMPLETED)
                continue
            self._ready.remove(member)
            made_of = self._made_of.get(member.key)
            if await member.agent.healthy(TAKE_HEALTH_TIMEOUT_S) and made_of and await self._answers(member, made_of):
                return member
            log.warning("hot pool %s: entry %s did not answer; removed", self.template, member.workspace.pool_id)
            self._spawn(self._discard(member))

    # ------------------------------------------------------------------ background

    async def _labels(self) -> dict[str, str]:
        key, pinned = await self.current()
        self._made_of[key] = pinned
        return {POOL_TEMPLATE_LABEL: self.template, POOL_KEY_LABEL: key}

    def _resources(self, labels: dict[str, str]) -> ResourceHints:
        """The template's: the entry's install and dev server run within them, and a claim has nothing to change."""
        return self._made_of[labels[POOL_KEY_LABEL]].spec.resources

    async def _prepare(self, member: Member) -> None:
        """Runs the session's own steps from the archive on, on the member, with the pool credential."""
        await self._run_steps(member, self._made_of[member.key], FILL)

    async def _run_steps(self, member: Member, pinned: PinnedTemplate, first: pb.Phase.ValueType) -> None:
        """Runs the session's own steps from `first` on, on the member, with the pool credential; raises
        InitializationFailed when they do not end READY."""
        workspace = member.workspace
        record = pb.Session(
            id=f"pool-{workspace.pool_id}",
            template=self.template,
            agent_token=member.credential,
            preview_url=workspace.preview_url,
            agent_endpoint=workspace.agent_endpoint,
            image=workspace.image,
            runtime=workspace.runtime,
        )
        live = LiveSession(record, pinned.spec, self._history_lines)
        live.workspace, live.agent = workspace, member.agent
        recorder = _PoolRecorder()
        await self._initialization(live, pinned, recorder, first).run()
        if live.session.state != READY:
            failure = recorder.failure
            last = " | ".join(line.text for line in list(live.output)[-5:])
            raise InitializationFailed(f"{reason_of(failure) if failure else 'not READY'} (last output: {last})")
        if live.install_store is not None:
            # The install cache entry is written through the pool credential, which a claim replaces.
            await live.install_store

    async def _refresh(self, member: Member, key: str) -> None:
        """Brings an entry made from one content up to `key`'s (the same install inputs): its dev server stopped,
        the files deleted by the edit removed, the new archive merged over the tree (node_modules stays), the dev
        server started again on it and answering (or, when the template says its dev server applies edits by
        itself, left running through the edit); then the entry is ready under `key`. On failure it is removed."""
        old, new = self._made_of[member.key], self._made_of[key]
        workspace = member.workspace
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            before, after = await asyncio.gather(
                asyncio.to_thread(_files_of, old.archive), asyncio.to_thread(_files_of, new.archive)
            )
            restart = not new.spec.dev_server_reloads
            if restart:
                await member.agent.stop_process("dev", grace=REFRESH_STOP_GRACE_S)
            stopped = loop.time()
            if gone := sorted(set(before) - set(after)):
                exit_code = await member.agent.run(
                    "rm -rf -- " + " ".join(shlex.quote(path) for path in gone), on_line=lambda text, _: None
                )
                if exit_code != 0:
                    raise InitializationFailed(f"removing the files the edit deleted exited with code {exit_code}")
            await member.agent.extract_archive(new.archive.chunks(), new.archive.sha256, merge=True)
            placed = loop.time()
            if restart:
                await self._run_steps(member, new, RESTART_DEV)
            elif not await self._answers(member, new):  # the dev server may be reloading: the take probes it again
                raise InitializationFailed(f"the dev server did not answer after the edit: {new.spec.readiness_path}")
        except asyncio.CancelledError:
            await asyncio.shield(self._discard(member))
            raise
        except (OrchestratorError, grpc.aio.AioRpcError) as error:
            log.warning(
                "hot pool %s: refreshing entry %s failed (%s); removed", self.template, workspace.pool_id, error
            )
            await self._discard(member)
            self.refill()
            return
        log.info(
            "hot pool %s: entry %s brought up to %s in place in %.3f s (dev server %s %.3f, files %.3f,"
            " dev server answering %.3f)",
            self.template, workspace.pool_id, key, loop.time() - started, "stopped" if restart else "kept",
            stopped - started, placed - stopped, loop.time() - placed,
        )  # fmt: skip
        member.key = key
        self._ready.append(member)

    def _update_to(self, key: str) -> int:
        """Starts bringing the ready entries of another key up to `key` where the edit left the install's inputs
        alone; retires the rest. Returns how many were retired (the filler replaces them)."""
        new = self._made_of.get(key)
        refreshable = [
            member
            for member in self._ready
            if member.key != key
            and new is not None
            and _image_of(member.key) == _image_of(key)
            and _same_install(self._made_of.get(member.key), new)
        ]
        for member in refreshable:
            self._ready.remove(member)
            task = asyncio.create_task(self._refresh(member, key), name=f"hot pool {self.template} refresh")
            self._refreshing[task] = key
            task.add_done_callback(self._refreshing.pop)
        return self._retire(functools.partial(_stale, key=key), "made from another install or image")

    async def _answers(self, member: Member, made_of: PinnedTemplate) -> bool:
        url = member.workspace.preview_url.rstrip("/") + made_of.spec.readiness_path
        try:
            return 200 <= await http_status(url, TAKE_PROBE_TIMEOUT_S) < 400
        except (OSError, TimeoutError):
            return False

    async def _check_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_CHECK_S)
            try:
                key, _ = await self.current()
            except OrchestratorError as error:  # removed or broken: no entry matches what a session would get
                key = ""
                log.warning("hot pool %s: %s", self.template, reason_of(error))
            if self._update_to(key) if key else self._retire(lambda _: True, "the template is gone or invalid"):
                self.refill()

    def _retire(self, stale: Callable[[Member], bool], why: str) -> int:
        retired = [member for member in self._ready if stale(member)]
        for member in retired:
            log.info("hot pool %s: entry %s retired (%s)", self.template, member.workspace.pool_id, why)
            self._ready.remove(member)
            self._spawn(self._discard(member))
        return len(retired)

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checking
        refreshing = list(self._refreshing)
        for task in refreshing:
            task.cancel()
        await asyncio.gather(*refreshing, return_exceptions=True)
        await super().close()


def _stale(member: Member, *, key: str) -> bool:
    """Whether a hot entry was made from other content or another image than `key` names."""
    return member.key != key


def _image_of(key: str) -> str:
    return key.partition(":")[2]


def _same_install(old: PinnedTemplate | None, new: PinnedTemplate) -> bool:
    """Whether an entry made from `old` can be brought up to `new` in place: the same image (the key's second
    half is the image's) is the caller's concern; here the same metadata (install command, env, limits, dev command;
    its title and description aside) and the same INSTALL_INPUTS files. Reads the archives (small, and cached)."""
    if old is None:
        return False
    if _install_metadata(old) != _install_metadata(new):
        return False
    before, after = _files_of(old.archive), _files_of(new.archive)
    return all(before.get(name) == after.get(name) for name in INSTALL_INPUTS)


def _install_metadata(pinned: PinnedTemplate) -> object:
    return replace(pinned.spec, title="", description="", hot_pool=0)


@functools.lru_cache(maxsize=64)
def _files_of(archive: TemplateArchive) -> dict[str, str]:
    """Every member path of a template archive, each with the sha256 of its content ("" for a directory)."""
    files: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(archive.path.read_bytes()), mode="r:gz") as tar:
        for member in tar:
            extracted = tar.extractfile(member) if member.isfile() else None
            files[member.name] = hashlib.sha256(extracted.read()).hexdigest() if extracted else ""
    return files
