"""The SessionManager: the registry of live sessions and the operations on them (queries, watch, create,
save, delete), with the record/fail/attach steps the initialization, reconciler and reaper call."""

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
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import (
    ChecksumMismatch,
    EngineUnavailable,
    FailedPrecondition,
    ImageMissing,
    InvalidArgument,
    LimitExceeded,
    SessionNotFound,
)
from orchestrator.install_cache import InstallCache
from orchestrator.pool import WarmPool
from orchestrator.runtime import Runtime, Workspace
from orchestrator.sessions.hot_pool import HotPool
from orchestrator.sessions.initialization import Initialization
from orchestrator.sessions.live import (
    FAILED,
    PENDING,
    READY,
    SETTLED,
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
        self._reconciler = Reconciler(self, config, store, catalog, runtime)
        self._install_cache = (
            InstallCache(
                config.install_cache_dir, config.max_install_cache_bytes, config.install_cache_unlocked_max_age_s
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
            )
            if config.warm_pool
            else None
        )  # fmt: skip
        declared = {spec.name: spec.hot_pool for spec in catalog.list() if spec.valid and spec.hot_pool}
        self.hot_pools: dict[str, HotPool] = {
            template: self._hot_pool(template, size) for template, size in config.hot_pool_sizes(declared).items()
        }

    def _hot_pool(self, template: str, size: int) -> HotPool:
        def fill(live: LiveSession, pinned, recorder) -> Initialization:
            # The session's own steps after a healthy agent: archive, install (with the cache), dev server, ready.
            return Initialization(
                live, pinned.spec, None, recorder=recorder, config=self.config, runtime=self._runtime,
                catalog=self._catalog, archives=self._archives, install_cache=self._install_cache,
                steps=Initialization.STEPS[2:], template_archive=pinned.archive,
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

    def _room_for(self, pool: WarmPool | None) -> int:
        """How many workspaces `pool` may hold: what max_sessions leaves of the sessions and the other pools."""
        others = sum(other.held for other in self.pools if other is not pool)
        return self.config.max_sessions - len(self._live) - others

    # ------------------------------------------------------------------ queries

    def get(self, session_id: str) -> pb.Session:
        """The session's record. Raises SessionNotFound."""
        live = self._live.get(session_id)
        if live is not None:
            return copied(live.session)
        session = self._store.get_session(session_id)
        if session is None:
            raise SessionNotFound(f"no session {session_id!r}: ListSessions shows the existing ones")
        return session

    def list(
        self, *, states=(), template: str = "", labels: Mapping[str, str] | None = None, page_size=0, page_token=""
    ) -> tuple[list[pb.Session], str]:
        """One page of sessions, newest first (see Store.list_sessions). Raises InvalidArgument."""
        return self._store.list_sessions(
            states=states, template=template, labels=labels, page_size=page_size, page_token=page_token
        )

    async def watch(self, session_id: str) -> AsyncIterator[pb.WatchSessionResponse]:
        """The session's snapshot and history, then live events until it is READY, FAILED or STOPPED.
        Raises SessionNotFound."""
        live = self._live.get(session_id)
        if live is None:
            session = self.get(session_id)
            yield pb.WatchSessionResponse(session=session)
            for phase in session.phases:
                yield pb.WatchSessionResponse(phase=phase)
            return
        queue: asyncio.Queue[pb.WatchSessionResponse | Lagged] = asyncio.Queue(WATCH_QUEUE_EVENTS)
        # Subscribing and taking the snapshot happen with no await in between: nothing falls in the gap.
        live.watchers.add(queue)
        try:
            for event in live.snapshot():
                yield event
            if live.session.state in SETTLED:
                return
            while True:
                queued = await queue.get()
                if isinstance(queued, Lagged):
                    yield pb.WatchSessionResponse(session=copied(live.session))
                    if live.session.state in SETTLED:
                        return
                    continue
                yield queued
                if queued.HasField("session") and queued.session.state in SETTLED:
                    return
        finally:
            live.watchers.discard(queue)

    # ------------------------------------------------------------------ create

    async def create(
        self, *, template: str = "", archive_id: str = "", labels: Mapping[str, str] | None = None
    ) -> pb.Session:
        """Accepts a session and starts its initialization in the background; returns once its container
        is started (or starting it failed), so engine problems reach the caller.

        Raises TemplateNotFound, InvalidTemplate, ArchiveNotFound, InvalidArgument (no source, bad labels),
        LimitExceeded (max_sessions), EngineUnavailable, ImageMissing."""
        labels = dict(labels or {})
        for key, value in labels.items():
            if not key or len(key) > MAX_LABEL_CHARS or len(value) > MAX_LABEL_CHARS:
                raise InvalidArgument(f"label {key!r}: keys (non-empty) and values are at most 63 characters")
        archive = self._archives.get(archive_id) if archive_id else None
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
        if sum(live.session.state != FAILED for live in self._live.values()) >= self.config.max_sessions:
            raise LimitExceeded(
                f"{self.config.max_sessions} sessions are running: delete one (DeleteSession) or raise --max-sessions"
            )

        session = pb.Session(
            id=f"ws-{secrets.token_hex(5)}",
            state=PENDING,
            template=spec.name,
            archive_id=archive_id,
            agent_token=secrets.token_urlsafe(24),
            labels=labels,
            created_at=timestamp_now(),
            runtime=self._runtime.name,
        )
        live = LiveSession(session, spec, self.config.output_history_lines)
        self._live[session.id] = live
        self._store.put_session(session)
        initialization = Initialization(
            live,
            spec,
            archive,
            recorder=self,
            config=self.config,
            runtime=self._runtime,
            catalog=self._catalog,
            archives=self._archives,
            install_cache=self._install_cache,
            pool=self.pool,
            hot_pool=hot,
            hot_key=hot_key,
            template_archive=pinned.archive if pinned is not None else None,
        )
        container_started = initialization.container_started
        live.initialization = asyncio.create_task(initialization.run(), name=f"initialize {session.id}")
        await asyncio.wait({container_started, live.initialization}, return_when=asyncio.FIRST_COMPLETED)
        error = container_started.exception() if container_started.done() else None
        if isinstance(error, (EngineUnavailable, ImageMissing)):
            # Nothing was started: the caller gets the engine's problem and no session is left behind.
            await live.initialization
            self._live.pop(session.id, None)
            self._store.delete_session(session.id)
            raise error
        return copied(session)

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
        """Registers a session whose workspace this orchestrator now holds (an adopted one)."""
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
        self._store.put_session(live.session)

    def record(self, live: LiveSession, event: pb.WatchSessionResponse) -> None:
        """Persists the session and tells its watchers."""
        self._store.put_session(live.session)
        live.publish(copy_event(event))

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
        saves = self._archives.list(session.id)
        archive = saves[0] if saves else (self._archives.get(session.archive_id) if session.archive_id else None)
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
        spec = live.template or self._catalog.get(session.template)
        initialization = Initialization(
            live, spec, archive, recorder=self, config=self.config, runtime=self._runtime, catalog=self._catalog,
            archives=self._archives, install_cache=self._install_cache, pool=self.pool,
            relocation=f"its workspace stopped ({reason}) and was made again {source}",
        )  # fmt: skip
        live.initialization = asyncio.create_task(initialization.run(), name=f"relocate {session.id}")

    # ------------------------------------------------------------------ save, delete

    def _running(self, session_id: str) -> LiveSession:
        live = self._live.get(session_id)
        if live is None or live.agent is None or live.session.state not in (READY, FAILED):
            state = pb.SessionState.Name(self.get(session_id).state)
            raise FailedPrecondition(f"session {session_id} is {state}: only a READY (or FAILED) running one")
        return live

    async def save(self, session_id: str, name: str = "") -> pb.Archive:
        """Saves the workspace (without node_modules and the template's exclusions) as a new archive.
        Raises SessionNotFound, FailedPrecondition (not running), ChecksumMismatch, LimitExceeded."""
        live = self._running(session_id)
        async with live.lock:
            return await self.save_live(live, name)

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
        Raises SessionNotFound, FailedPrecondition (save asked of a session that is not running)."""
        live = self._live.get(session_id)
        if live is None:
            self.get(session_id)
            self._store.delete_session(session_id)
            return None
        if save:
            self._running(session_id)
        async with live.lock:
            if session_id not in self._live:  # a concurrent delete or the reaper got there first
                return None
            archive = await self.save_live(live, "") if save else None
            await self.stop_live(live, reason)
        return archive

    async def stop_live(self, live: LiveSession, reason: str) -> None:
        """Stops the session's initialization and workspace and records it STOPPED with `reason`, the caller
        holding its lock. Raises EngineUnavailable."""
        session = live.session
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
        for first, pool in enumerate(self.pools):  # after the adoptions: they count against max_sessions
            await pool.start(remove_leftovers=not first)

    async def close(self) -> None:
        """Lets go of the sessions without stopping them: a later orchestrator adopts them. Removes the pool's
        unclaimed members (their credentials live in this process only)."""
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
