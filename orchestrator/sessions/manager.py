"""The SessionManager: the registry of live sessions and the operations on them (queries, watch, create, fork,
pause, resume, save, delete), with the record/fail/attach steps the initialization, reconciler and reaper call."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime

from orchestrator.agent_client import AgentClient
from orchestrator.archives import ArchiveOrigin, ArchiveStore, Expected
from orchestrator.blobs import open_blobs
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import (
    ChecksumMismatch,
    EngineUnavailable,
    FailedPrecondition,
    ImageMissing,
    InvalidArgument,
    LimitExceeded,
    OrchestratorError,
    SessionNotFound,
    WorkspaceMissing,
)
from orchestrator.install_cache import InstallCache
from orchestrator.pool import WarmPool
from orchestrator.runtime import Runtime, Workspace
from orchestrator.sessions.cluster import Cluster
from orchestrator.sessions.hot_pool import HotPool
from orchestrator.sessions.initialization import Initialization, resume_workspace
from orchestrator.sessions.live import (
    FAILED,
    PAUSED,
    PENDING,
    READY,
    SETTLED,
    STARTING,
    STOPPED,
    STOPPING,
    WATCH_QUEUE_EVENTS,
    Lagged,
    LiveSession,
    copied,
    copy_event,
    reason_of,
    timestamp_now,
)
from orchestrator.sessions.reconciliation import Reconciler
from orchestrator.store import Store
from orchestrator.templates import TemplateCatalog
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

log = logging.getLogger(__name__)

FAILURE_OUTPUT_LINES = 50
MAX_LABEL_CHARS = 63


class SessionManager:
    """Owns every session: the records in the Store, the workspaces in the Runtime, the agents in them."""

    def __init__(
        self,
        config: OrchestratorConfig,
        store: Store,
        archives: ArchiveStore,
        catalog: TemplateCatalog,
        runtime: Runtime,
    ) -> None:
        self.config = config
        self._store = store
        self._archives = archives
        self._catalog = catalog
        self._runtime = runtime
        self._live: dict[str, LiveSession] = {}
        self.cluster = Cluster(self, store)
        self._taking: dict[str, asyncio.Task[None]] = {}  # takeovers under way, by session id
        store.on_lost = self._lost
        self._reconciler = Reconciler(self, config, store, catalog, runtime)
        self._install_cache = (
            InstallCache(
                open_blobs(config.archive_store, "install-cache", config.install_cache_dir),
                config.max_install_cache_bytes,
                config.install_cache_unlocked_max_age_s,
            )
            if config.install_cache
            else None
        )
        # Pool members count against max_sessions with the sessions (each holds a workspace, FAILED ones too),
        # and each pool's with the other pools'.
        self.pool = (
            WarmPool(
                runtime, config.warm_pool,
                room=lambda: self._room_for(self.pool), health_timeout_s=config.agent_health_timeout_s,
                install_cache=self._install_cache,
            )
            if config.warm_pool
            else None
        )  # fmt: skip
        declared = {spec.name: spec.hot_pool for spec in catalog.list() if spec.valid and spec.hot_pool}
        self.hot_pools: dict[str, HotPool] = {
            template: self._hot_pool(template, size) for template, size in config.hot_pool_sizes(declared).items()
        }

    def _hot_pool(self, template: str, size: int) -> HotPool:
        def fill(live: LiveSession, pinned, recorder, first: pb.Phase.ValueType) -> Initialization:
            # The session's own steps from `first` on: after a healthy agent (archive, install with the cache, dev
            # server, ready) for a fill, or the dev server's start and readiness for a refresh in place.
            phases = [phase for phase, _ in Initialization.STEPS]
            return Initialization(
                live, pinned.spec, None, recorder=recorder, config=self.config, runtime=self._runtime,
                catalog=self._catalog, archives=self._archives, install_cache=self._install_cache,
                steps=Initialization.STEPS[phases.index(first):], template_archive=pinned.archive,
            )  # fmt: skip

        pool = HotPool(
            self._runtime, size, template,
            room=lambda: self._room_for(pool), health_timeout_s=self.config.agent_health_timeout_s,
            pinned=self._catalog.pinned, initialization=fill, output_history_lines=self.config.output_history_lines,
        )  # fmt: skip
        return pool

    @property
    def pools(self) -> list[WarmPool]:
        """The warm pool (if on) and the hot pools."""
        return [pool for pool in (self.pool, *self.hot_pools.values()) if pool is not None]

    def pools_status(self) -> pb.GetPoolsResponse:
        """How far each running pool is filled (GetPools): on a replica that does not lead, none runs."""
        response = pb.GetPoolsResponse(
            hot=[pool.status() for _, pool in sorted(self.hot_pools.items()) if pool.running]
        )
        if self.pool is not None and self.pool.running:
            response.warm.CopyFrom(self.pool.status())
        return response

    def _room_for(self, pool: WarmPool | None) -> int:
        """How many workspaces `pool` may hold: what max_sessions leaves of the sessions and the other pools."""
        others = sum(other.held for other in self.pools if other is not pool)
        running = sum(live.session.state != PAUSED for live in self._live.values())
        return self.config.max_sessions - running - others

    # ------------------------------------------------------------------ queries

    async def get(self, session_id: str) -> pb.Session:
        """The session's record (from the database when another replica owns it). Raises SessionNotFound."""
        live = self._live.get(session_id)
        if live is not None:
            return copied(live.current())
        session = await self._store.get_session(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}: ListSessions shows the existing ones")
        return session

    async def list(
        self, *, states=(), template: str = "", labels: Mapping[str, str] | None = None, page_size=0, page_token=""
    ) -> tuple[list[pb.Session], str]:
        """One page of sessions, newest first (see Store.list_sessions). Raises InvalidArgument."""
        return await self._store.list_sessions(
            states=states, template=template, labels=labels, page_size=page_size, page_token=page_token
        )

    async def watch(self, session_id: str) -> AsyncIterator[pb.WatchSessionResponse]:
        """The session's snapshot and history, then live events until it is READY, FAILED or STOPPED.
        Raises SessionNotFound, ReplicaUnavailable (the replica owning it does not answer)."""
        live = self._live.get(session_id)
        if live is None and (owner := await self.cluster.owner_stub(session_id)) is not None:
            async for event in self.cluster.forward_watch(session_id, owner):
                yield event
            return
        live = self._live.get(session_id)  # taken over just now, perhaps
        if live is None:
            session = await self.get(session_id)
            yield pb.WatchSessionResponse(session=session)
            for phase in session.phases:
                yield pb.WatchSessionResponse(phase=phase)
            if session.phases:  # the stream ends with the session as it settled
                yield pb.WatchSessionResponse(session=session)
            return
        queue: asyncio.Queue[pb.WatchSessionResponse | Lagged] = asyncio.Queue(WATCH_QUEUE_EVENTS)
        # Subscribing and taking the snapshot happen with no await in between: nothing falls in the gap.
        live.watchers.add(queue)
        try:
            snapshot = live.snapshot()
            for event in snapshot:
                yield event
            # Judged by the snapshot, not the session now: a change since is in the queue, to be sent.
            if snapshot[0].session.state in SETTLED:
                if len(snapshot) > 1:  # the stream ends with the session as it settled, after its history
                    yield snapshot[0]
                return
            while True:
                queued = await queue.get()
                if isinstance(queued, Lagged):
                    yield pb.WatchSessionResponse(session=copied(live.current()))
                    if live.current().state in SETTLED:
                        return
                    continue
                yield queued
                if queued.HasField("session") and queued.session.state in SETTLED:
                    return
        finally:
            live.watchers.discard(queue)

    # ------------------------------------------------------------------ create

    async def create(
        self,
        *,
        template: str = "",
        archive_id: str = "",
        labels: Mapping[str, str] | None = None,
        public_preview: bool = False,
    ) -> pb.Session:
        """Accepts a session and starts its initialization in the background; returns once its container
        is started (or starting it failed), so engine problems reach the caller.

        Raises TemplateNotFound, InvalidTemplate, ArchiveNotFound, InvalidArgument (no source, bad labels),
        LimitExceeded (max_sessions), EngineUnavailable, ImageMissing."""
        labels = dict(labels or {})
        _check_labels(labels)
        archive = await self._archives.get(archive_id) if archive_id else None
        if archive is not None:
            template = archive.template
        if not template:
            raise InvalidArgument("name a template or an archive_id to create the session from")
        spec = self._catalog.get(template)
        # A hot entry is made from the template's content as it is now: restores never take one.
        hot = self.hot_pools.get(spec.name) if archive is None else None
        hot_key, pinned = await hot.current() if hot is not None else ("", None)
        if pinned is not None:
            spec = pinned.spec  # the session runs exactly this content, from a hot entry or not
        self._check_room()
        session = pb.Session(
            id=f"ws-{secrets.token_hex(5)}",
            state=PENDING,
            template=spec.name,
            archive_id=archive_id,
            agent_token=secrets.token_urlsafe(24),
            labels=labels,
            created_at=timestamp_now(),
            runtime=self._runtime.name,
            public_preview=public_preview,
        )
        live = LiveSession(session, spec, self.config.output_history_lines)
        self.hold(live)
        self._store.put_session(session)
        initialization = self._initialization(
            live, archive, hot_pool=hot, hot_key=hot_key, template_archive=pinned.archive if pinned else None
        )
        await self._initialize(live, initialization, new=True)
        return copied(session)

    def _initialization(self, live: LiveSession, archive: pb.Archive | None, **options) -> Initialization:
        """The session's initialization with this manager's parts (the warm pool among them), `options` added."""
        assert live.template is not None
        return Initialization(
            live, live.template, archive, recorder=self, config=self.config, runtime=self._runtime,
            catalog=self._catalog, archives=self._archives, install_cache=self._install_cache, pool=self.pool,
            **options,
        )  # fmt: skip

    async def _initialize(self, live: LiveSession, initialization: Initialization, *, new: bool) -> None:
        """Runs `initialization` in the background and returns once its container is started (or starting it
        failed), so engine problems reach the caller: then a `new` session is forgotten (nothing was started),
        and the error raised."""
        container_started = initialization.container_started
        live.initialization = asyncio.create_task(initialization.run(), name=f"initialize {live.session.id}")
        await asyncio.wait({container_started, live.initialization}, return_when=asyncio.FIRST_COMPLETED)
        error = container_started.exception() if container_started.done() else None
        if isinstance(error, (EngineUnavailable, ImageMissing)):
            await live.initialization
            if new:  # no session is left behind
                self._live.pop(live.session.id, None)
                await self._store.delete_session(live.session.id)
            else:  # a resumption that could not start: the session is as paused as before
                live.session.state = PAUSED
                live.session.ClearField("failure")
                self.record(live, pb.WatchSessionResponse(session=live.session))
            raise error
        await self._store.flush()  # written before the caller hears of it: another replica can read it then

    def _check_room(self) -> None:
        """Raises LimitExceeded when max_sessions sessions hold a running workspace (FAILED and PAUSED ones
        do not count)."""
        if sum(live.session.state not in (FAILED, PAUSED) for live in self._live.values()) >= self.config.max_sessions:
            raise LimitExceeded(
                f"{self.config.max_sessions} sessions are running: delete or pause one (DeleteSession,"
                " PauseSession) or raise --max-sessions"
            )

    # ------------------------------------------------------------------ fork

    async def fork(
        self, session_id: str, *, labels: Mapping[str, str] | None = None, save: bool = False
    ) -> tuple[pb.Session, pb.Archive | None]:
        """A new session from the READY session's current files: streamed from its agent to the new
        workspace's (a warm pool member, or a cold start; never a hot entry, which holds the template's files),
        then the template's install (with the install cache) and dev steps. With `save`, the source is saved
        first and the fork restored from that archive. The source keeps running. Returns the fork (PENDING)
        and the archive saved, if any. Raises SessionNotFound, FailedPrecondition (the source is not READY),
        InvalidArgument (bad labels), LimitExceeded, EngineUnavailable, ImageMissing, ReplicaUnavailable."""
        if session_id not in self._live and (owner := await self.cluster.owner_stub(session_id)) is not None:
            # Made by the source's owner: only it holds the source's agent.
            request = pb.ForkSessionRequest(id=session_id, labels=labels or {}, save=save)
            answer = await self.cluster.forwarded(session_id, owner.ForkSession(request))
            return answer.session, answer.archive if answer.HasField("archive") else None
        source = self._live.get(session_id)
        state = source.session.state if source is not None else (await self.get(session_id)).state
        if source is None or state != READY or source.agent is None:
            raise FailedPrecondition(
                f"session {session_id} is {pb.SessionState.Name(state)}: only a READY session can be forked"
            )
        merged = {**source.session.labels, **(labels or {})}
        _check_labels(merged)
        self._check_room()
        archive = None
        if save:
            async with source.lock:
                archive = await self.save_live(source, f"{session_id} forked")
        template = source.template or self._catalog.get(source.session.template)
        session = pb.Session(
            id=f"ws-{secrets.token_hex(5)}",
            state=PENDING,
            template=template.name,
            archive_id=archive.id if archive else "",
            agent_token=secrets.token_urlsafe(24),
            labels=merged,
            created_at=timestamp_now(),
            runtime=self._runtime.name,
            forked_from=session_id,
            public_preview=source.session.public_preview,  # a public preview forks into a public one
        )
        live = LiveSession(session, template, self.config.output_history_lines)
        self.hold(live)
        self._store.put_session(session)
        initialization = self._initialization(live, archive, fork_source=None if archive else source)
        await self._initialize(live, initialization, new=True)
        return copied(session), archive

    # ------------------------------------------------------------------ pause, resume

    async def pause(self, session_id: str) -> pb.Session:
        """Stops the READY session's workspace, keeping its files, and records it PAUSED; a PAUSED session is
        returned as it is. Raises SessionNotFound, FailedPrecondition (not READY), EngineUnavailable,
        ReplicaUnavailable."""
        if session_id not in self._live and (owner := await self.cluster.owner_stub(session_id)) is not None:
            request = pb.PauseSessionRequest(id=session_id)
            return (await self.cluster.forwarded(session_id, owner.PauseSession(request))).session
        live = self._live.get(session_id)
        if live is None:
            state = (await self.get(session_id)).state
            raise FailedPrecondition(f"session {session_id} is {pb.SessionState.Name(state)}: it cannot be paused")
        async with live.lock:
            if self._live.get(session_id) is not live:
                raise FailedPrecondition(f"session {session_id} stopped meanwhile: it cannot be paused")
            await self.pause_live(live)
        return copied(live.session)

    async def pause_live(self, live: LiveSession) -> None:
        """Pauses the session, the caller holding its lock (see pause)."""
        session = live.session
        if session.state == PAUSED:
            return
        if session.state != READY or live.agent is None:
            raise FailedPrecondition(
                f"session {session.id} is {pb.SessionState.Name(session.state)}: only a READY session can be paused"
            )
        if live.install_store is not None and self._install_cache is not None:
            # Being written from this workspace: stopping it now would lose the entry.
            await self._install_cache.finish(live.install_store)
            live.install_store = None
        # Stopped first: should the engine fail, the session is READY with its agent as before.
        await self._runtime.pause(session.id)
        await live.agent.close()
        live.agent = None
        session.state = PAUSED
        session.paused_at.GetCurrentTime()
        # Its ports are released with the container: what it had stops answering.
        session.preview_url = session.agent_endpoint = ""
        self.record(live, pb.WatchSessionResponse(session=session))
        self._room_freed()

    async def resume(self, session_id: str) -> pb.Session:
        """Starts the PAUSED session's workspace again (see Initialization.RESUME_STEPS) and returns once its
        container is started (state STARTING); a STARTING or READY session is returned as it is.
        Raises SessionNotFound, FailedPrecondition (FAILED, STOPPING or STOPPED), LimitExceeded,
        EngineUnavailable, ReplicaUnavailable."""
        if session_id not in self._live and (owner := await self.cluster.owner_stub(session_id)) is not None:
            request = pb.ResumeSessionRequest(id=session_id)
            return (await self.cluster.forwarded(session_id, owner.ResumeSession(request))).session
        live = self._live.get(session_id)
        state = live.session.state if live is not None else (await self.get(session_id)).state
        if live is not None and state in (PENDING, STARTING, READY):
            return copied(live.session)
        if live is None or state != PAUSED:
            raise FailedPrecondition(
                f"session {session_id} is {pb.SessionState.Name(state)}: only a PAUSED one resumes"
            )
        async with live.lock:
            if self._live.get(session_id) is not live or live.session.state != PAUSED:
                return await self.get(session_id)  # resumed (or deleted) by a concurrent call
            self._check_room()
            if live.template is None:
                live.template = self._catalog.get(live.session.template)
            session = live.session
            session.state = STARTING
            del session.phases[:]  # this run's phases, as a new session's
            session.ClearField("failure")
            live.output.clear()
            self.record(live, pb.WatchSessionResponse(session=session))
            initialization = self._initialization(live, None, steps=Initialization.RESUME_STEPS)
            await self._initialize(live, initialization, new=False)
        return copied(live.session)

    # ------------------------------------------------------------------ the live sessions' records

    def live_session(self, session_id: str) -> LiveSession | None:
        """The session, if this orchestrator holds a workspace for it."""
        return self._live.get(session_id)

    def running(self) -> builtins.list[LiveSession]:
        """Sessions whose initialization is over and whose workspace runs (READY or FAILED)."""
        return [
            live for live in self._live.values() if live.agent is not None and live.session.state in (READY, FAILED)
        ]

    def hold(self, live: LiveSession) -> None:
        """Registers a session whose workspace this orchestrator now holds (a new or adopted one)."""
        if self._store.shared:
            live.after_write = self._store.after_writes
        self._live[live.session.id] = live

    def release(self, live: LiveSession) -> None:
        """Unregisters the session: it no longer holds a slot or a workspace."""
        self._live.pop(live.session.id, None)
        self._room_freed()

    def attach(self, live: LiveSession, workspace: Workspace, agent: AgentClient | None = None) -> None:
        """Connects the session to its started (or adopted, or claimed) workspace and its agent (`agent`: a
        client holding the session's token already, a claimed pool member's)."""
        live.workspace = workspace
        live.agent = agent or AgentClient(workspace.agent_endpoint, live.session.agent_token)
        live.session.preview_url = workspace.preview_url
        live.session.agent_endpoint = workspace.agent_endpoint
        live.session.image = workspace.image

    def persist(self, live: LiveSession) -> None:
        """Persists the session (a change no watcher waits for)."""
        self._tell(live, None)

    def record(self, live: LiveSession, event: pb.WatchSessionResponse) -> None:
        """Persists the session and tells its watchers."""
        self._tell(live, copy_event(event))

    def _tell(self, live: LiveSession, event: pb.WatchSessionResponse | None) -> None:
        self._store.put_session(live.session)
        if live.after_write is None:
            if event is not None:
                live.publish(event)
            return
        written = copied(live.session)

        def told() -> None:  # once written: from now on any replica reads it
            live.view = written
            if event is not None:
                live.publish(event)

        live.after_write(told)

    def fail(self, live: LiveSession, error: BaseException) -> None:
        """Marks the session FAILED in its current phase with the error's reason and its last output."""
        session = live.session
        session.state = FAILED
        session.failure.CopyFrom(
            pb.SessionFailure(
                phase=session.phase,
                reason=reason_of(error),
                last_output=[line.text for line in list(live.output)[-FAILURE_OUTPUT_LINES:]],
            )
        )
        log.warning("session %s failed in %s: %s", session.id, pb.Phase.Name(session.phase), session.failure.reason)
        self.record(live, pb.WatchSessionResponse(session=session))

    async def relocate(self, live: LiveSession, reason: str) -> None:
        """Makes a READY session's workspace again after it stopped recoverably (a Swarm task that ended or whose
        node went down, its volumes with it), from the session's last save (else what
        it was created from), the caller holding its lock. Its phases start over and say so; the initialization
        runs in the background, as a create's does. Raises EngineUnavailable (removing what is left)."""
        session = live.session
        saves = await self._archives.list(session.id)
        archive = saves[0] if saves else (await self._archives.get(session.archive_id) if session.archive_id else None)
        if live.agent is not None:
            await live.agent.close()
            live.agent = None
        await self._runtime.stop(session.id)  # what is left of it
        live.exited = None
        if saves:
            source = f"from its last save {saves[0].id} ({saves[0].name}); later changes are lost"
        elif archive is not None:
            source = f"from the archive it was created from ({archive.id}): it was never saved"
        else:
            source = f"from its template {session.template}: it was never saved"
        log.warning("session %s: its workspace stopped (%s); making it again %s", session.id, reason, source)
        session.archive_id = archive.id if archive is not None else ""
        if live.template is None:
            live.template = self._catalog.get(session.template)
        initialization = self._initialization(
            live, archive, relocation=f"its workspace stopped ({reason}) and was made again {source}"
        )
        live.initialization = asyncio.create_task(initialization.run(), name=f"relocate {session.id}")

    # ------------------------------------------------------------------ save, delete

    async def _savable(self, session_id: str) -> LiveSession:
        live = self._live.get(session_id)
        paused = live is not None and live.session.state == PAUSED
        if live is None or (not paused and (live.agent is None or live.session.state not in (READY, FAILED))):
            state = pb.SessionState.Name((await self.get(session_id)).state)
            raise FailedPrecondition(
                f"session {session_id} is {state}: only a READY (or FAILED) running one, or a PAUSED one"
            )
        return live

    async def save(self, session_id: str, name: str = "") -> pb.Archive:
        """Saves the workspace (without node_modules and the template's exclusions) as a new archive; a PAUSED
        one too (see save_paused). Raises SessionNotFound, FailedPrecondition (not running nor paused),
        ChecksumMismatch, LimitExceeded, ReplicaUnavailable."""
        if session_id not in self._live and (owner := await self.cluster.owner_stub(session_id)) is not None:
            request = pb.SaveSessionRequest(id=session_id, name=name)
            return (await self.cluster.forwarded(session_id, owner.SaveSession(request))).archive
        live = await self._savable(session_id)
        async with live.lock:
            return await self._save_held(live, name)

    async def _save_held(self, live: LiveSession, name: str) -> pb.Archive:
        await self._savable(live.session.id)  # still, now that the caller holds the lock
        if live.session.state == PAUSED:
            return await self.save_paused(live, name)
        return await self.save_live(live, name)

    async def save_paused(self, live: LiveSession, name: str) -> pb.Archive:
        """Saves a PAUSED session, the caller holding its lock: its workspace is started with the agent alone
        (no dev server, nothing of the workspace's own runs), the agent archives it exactly as it would a running
        one (same excludes, same bytes), and it is stopped again; the session stays PAUSED throughout.
        Raises FailedPrecondition (its workspace is gone), and what save_live raises."""
        session = live.session
        template = live.template or self._catalog.get(session.template)
        try:
            _, agent = await resume_workspace(
                self._runtime, session, dict(template.env), self.config.agent_health_timeout_s
            )
        except WorkspaceMissing as error:
            raise FailedPrecondition(f"session {session.id} is PAUSED and its workspace is gone: {error}") from None
        except BaseException:
            with contextlib.suppress(OrchestratorError):  # its agent did not come up: stopped again all the same
                await self._runtime.pause(session.id)
            raise
        live.agent = agent
        try:
            return await self.save_live(live, name)
        finally:
            await live.agent.close()
            live.agent = None
            await self._runtime.pause(session.id)

    async def save_live(self, live: LiveSession, name: str) -> pb.Archive:
        """Saves a running session's workspace, the caller holding its lock. Raises ChecksumMismatch,
        LimitExceeded, and what the agent call raises."""
        session = live.session
        excludes = list(live.template.archive_excludes) if live.template else []
        stream = await live.connected_agent.create_archive(excludes)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        origin = ArchiveOrigin(
            name=name or f"{session.id} {stamp}",
            source=pb.ARCHIVE_SOURCE_SAVED,
            template=session.template,
            session_id=session.id,
        )

        def expected() -> Expected:  # asked once the stream ended, which it does only with a summary
            if stream.summary is None:
                raise ChecksumMismatch(f"session {session.id}: the archive ended without the agent's summary")
            return Expected(stream.summary.sha256, stream.summary.files)

        return await self._archives.write(origin, stream, expected=expected)

    async def delete(self, session_id: str, *, save: bool = False, reason: str = "deleted") -> pb.Archive | None:
        """Stops the session's workspace (saving it first if asked) and keeps its record as STOPPED; a
        session already stopped loses its record. Returns the saved archive, if any.
        Raises SessionNotFound, FailedPrecondition (save asked of a session that is not running),
        ReplicaUnavailable."""
        if session_id not in self._live and (owner := await self.cluster.owner_stub(session_id)) is not None:
            request = pb.DeleteSessionRequest(id=session_id, save=save)
            answer = await self.cluster.forwarded(session_id, owner.DeleteSession(request))
            return answer.archive if answer.HasField("archive") else None
        live = self._live.get(session_id)
        if live is None:
            await self.get(session_id)
            await self._store.delete_session(session_id)
            return None
        if save:
            await self._savable(session_id)
        async with live.lock:
            if session_id not in self._live:  # a concurrent delete or the reaper got there first
                return None
            archive = await self._save_held(live, "") if save else None
            await self.stop_live(live, reason)
        return archive

    async def stop_live(self, live: LiveSession, reason: str) -> None:
        """Stops the session's initialization and workspace and records it STOPPED with `reason`, the caller
        holding its lock. Raises EngineUnavailable."""
        session = live.session
        if not await self._store.claim(session.id):
            # Taken over by another replica while this one was cut off: its workspace is that one's now.
            self._lost(session.id)
            return
        if live.initialization is not None and not live.initialization.done():
            live.initialization.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.initialization
        session.state = STOPPING
        self.record(live, pb.WatchSessionResponse(session=session))
        if live.install_store is not None and self._install_cache is not None:
            # The entry is being written from this workspace: stopping it now would lose the entry.
            await self._install_cache.finish(live.install_store)
        if live.agent is not None:
            await live.agent.close()
        await self._runtime.stop(session.id)
        session.state = STOPPED
        session.stop_reason = reason
        self.record(live, pb.WatchSessionResponse(session=session))
        self._live.pop(session.id, None)
        self._room_freed()

    def _room_freed(self) -> None:
        """A session let go of its workspace: a pool kept small by max_sessions may grow again."""
        for pool in self.pools:
            pool.refill()

    # ------------------------------------------------------------------ restart

    async def reconcile(self) -> None:
        """Matches the records with what the runtime runs: READY sessions whose workspace still runs are
        adopted (after a health check), vanished ones marked STOPPED, sessions caught mid-initialization
        marked FAILED; from then on, a workspace that stops running by itself fails its session (see
        Reconciler). Raises EngineUnavailable.

        A workspace is removed only when it is provably ours: it carries our instance id AND our store has a
        record of its session (session ids are random, made by this store). One with our instance id and no
        record is left alone with a warning: it may be another orchestrator's started with the same
        --instance-id on another data directory, and removing it would destroy that one's live workspace."""
        await self._reconciler.reconcile()
        await self.cluster.beat()  # the pools start here if this replica leads (after the adoptions: they count)

    async def lead(self, leading: bool) -> None:
        """Starts the pools when this replica becomes the leader (one set of pools per cluster), and removes
        their members when it stops leading."""
        for first, pool in enumerate(self.pools):
            if leading:
                await pool.start(remove_leftovers=not first)
            else:
                await pool.close()

    async def take_over(self, session: pb.Session) -> None:
        """Makes the session this replica's if no live replica owns it (its owner died), adopting its workspace
        as a restart would (see Reconciler.settle); nothing when another replica was first. The heartbeat and a
        forwarded call may both get here: the later waits for the takeover under way, so that a call is served
        by the adopted session, not by one half taken over."""
        if session.id in self._live and session.id not in self._taking:
            return
        taking = self._taking.get(session.id)
        if taking is None:
            taking = self._taking[session.id] = asyncio.create_task(
                self._take_over(session), name=f"take over {session.id}"
            )
            taking.add_done_callback(lambda _: self._taking.pop(session.id, None))
        await asyncio.shield(taking)  # a caller that gives up leaves the takeover to finish

    async def _take_over(self, session: pb.Session) -> None:
        if await self._store.claim(session.id):
            log.info("taking over session %s (%s)", session.id, pb.SessionState.Name(session.state))
            await self._reconciler.take_over(session)

    def _lost(self, session_id: str) -> None:
        """Another replica owns the session now (this one was cut off past its lease): lets go of it here without
        touching its workspace, which the new owner adopted."""
        live = self._live.pop(session_id, None)
        if live is None:
            return
        if live.initialization is not None:
            live.initialization.cancel()
        if live.agent is not None:
            asyncio.get_running_loop().create_task(live.agent.close())
        self._room_freed()

    async def close(self) -> None:
        """Lets go of the sessions without stopping them: a later orchestrator adopts them. Removes the pool's
        unclaimed members (their credentials live in this process only), and hands the sessions to the other
        replicas, if any."""
        await self.cluster.close()
        takeovers = list(self._taking.values())
        for task in takeovers:
            task.cancel()
        await asyncio.gather(*takeovers, return_exceptions=True)
        for pool in self.pools:
            await pool.close()
        await self._reconciler.close()
        if self._install_cache is not None:
            await self._install_cache.close()
        tasks = [live.initialization for live in self._live.values() if live.initialization]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for live in self._live.values():
            if live.agent is not None:
                await live.agent.close()
        self._live.clear()


def _check_labels(labels: Mapping[str, str]) -> None:
    """Raises InvalidArgument for an empty key, or a key or value over MAX_LABEL_CHARS."""
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"label {key!r}: keys (non-empty) and values are at most 63 characters")
