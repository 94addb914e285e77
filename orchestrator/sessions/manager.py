"""Sessions: creation with timed initialization phases in the background, progress fan-out to watchers,
save/restore, delete, reconciliation with the runtime after a restart, and the idle SessionReaper."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timezone

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from agent import telemetry
from orchestrator.agent_client import AgentClient
from orchestrator.archives import ArchiveOrigin, ArchiveStore, Expected
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import (
    EngineUnavailable,
    FailedPrecondition,
    ImageMissing,
    InvalidArgument,
    LimitExceeded,
    OrchestratorError,
    SessionNotFound,
)
from orchestrator.install_cache import HIT_ENV, CacheKey, InstallCache
from orchestrator.readiness import wait_until_ready
from orchestrator.runtime import Runtime, Workspace
from orchestrator.runtime.base import WorkspaceExit
from orchestrator.store import Store
from orchestrator.templates import TemplateCatalog, TemplateSpec
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

log = logging.getLogger(__name__)

PENDING, STARTING, READY = pb.SESSION_STATE_PENDING, pb.SESSION_STATE_STARTING, pb.SESSION_STATE_READY
FAILED, STOPPING, STOPPED = pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPING, pb.SESSION_STATE_STOPPED
# A watch ends once the session reaches one of these.
SETTLED = frozenset({READY, FAILED, STOPPED})
# Sessions holding a workspace (or about to): they count against max_sessions.
LIVE_STATES = (PENDING, STARTING, READY, STOPPING, FAILED)

# The named process the dev server runs as in the agent.
DEV_PROCESS = "dev"
MAX_LINE_CHARS = 4096
FAILURE_OUTPUT_LINES = 50
MAX_LABEL_CHARS = 63
# After a restart, an adopted agent must answer this fast or its session is stopped.
ADOPT_HEALTH_TIMEOUT_S = 5.0
# A watcher this many events behind is sent a fresh snapshot instead of what it missed.
WATCH_QUEUE_EVENTS = 1024


def _now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _reason(error: BaseException) -> str:
    """A one-line cause a person can act on."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"agent answered {error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    return str(error) or type(error).__name__


class _Lagged:
    """Put in a watcher's queue in place of events it could not keep up with."""


LAGGED = _Lagged()


class LiveSession:
    """A session this orchestrator holds a workspace for: its record, workspace and agent client, its
    recent output, and the queues of its watchers."""

    def __init__(self, session: pb.Session, template: TemplateSpec | None, history_lines: int) -> None:
        self.session = session
        self.template = template
        self.workspace: Workspace | None = None
        self.agent: AgentClient | None = None
        self.output: deque[pb.OutputLine] = deque(maxlen=history_lines)
        self.watchers: set[asyncio.Queue[pb.WatchSessionResponse | _Lagged]] = set()
        self.initialization: asyncio.Task[None] | None = None
        # Keeping its node_modules in the install cache, after READY: a delete waits for it.
        self.install_store: asyncio.Task[None] | None = None
        # Set when its workspace stopped running by itself (or was removed behind our back).
        self.exited: WorkspaceExit | None = None
        # Serializes save, delete and reaping of this session.
        self.lock = asyncio.Lock()

    def publish(self, event: pb.WatchSessionResponse) -> None:
        for queue in self.watchers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                queue.get_nowait()
                while not queue.empty():  # drop the backlog: a snapshot replaces it
                    queue.get_nowait()
                queue.put_nowait(LAGGED)

    def snapshot(self) -> list[pb.WatchSessionResponse]:
        """The session now, its phases so far, and its recent output lines."""
        events = [pb.WatchSessionResponse(session=self.session)]
        events += [pb.WatchSessionResponse(phase=phase) for phase in self.session.phases]
        events += [pb.WatchSessionResponse(output=line) for line in self.output]
        # Copies: the record keeps changing while the events wait to be sent.
        return [_copy(event) for event in events]

    def line_sink(self, phase: pb.Phase.ValueType) -> Callable[[str, bool], None]:
        """A callback for the agent client: records and publishes one output line of `phase`."""

        def on_line(text: str, stderr: bool) -> None:
            line = pb.OutputLine(phase=phase, text=text[:MAX_LINE_CHARS], stderr=stderr)
            self.output.append(line)
            self.publish(pb.WatchSessionResponse(output=line))

        return on_line


def _copy(event: pb.WatchSessionResponse) -> pb.WatchSessionResponse:
    copy = pb.WatchSessionResponse()
    copy.CopyFrom(event)
    return copy


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
        self._config = config
        self._store = store
        self._archives = archives
        self._catalog = catalog
        self._runtime = runtime
        self._live: dict[str, LiveSession] = {}
        self._following: asyncio.Task[None] | None = None
        self._install_cache = (
            InstallCache(config.install_cache_dir, config.max_install_cache_bytes, config.install_cache_unlocked_max_age_s)
            if config.install_cache
            else None
        )

    # ------------------------------------------------------------------ queries

    def get(self, session_id: str) -> pb.Session:
        """The session's record. Raises SessionNotFound."""
        live = self._live.get(session_id)
        if live is not None:
            return _copied(live.session)
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
        queue: asyncio.Queue[pb.WatchSessionResponse | _Lagged] = asyncio.Queue(WATCH_QUEUE_EVENTS)
        # Subscribing and taking the snapshot happen with no await in between: nothing falls in the gap.
        live.watchers.add(queue)
        try:
            for event in live.snapshot():
                yield event
            if live.session.state in SETTLED:
                return
            while True:
                event = await queue.get()
                if isinstance(event, _Lagged):
                    yield pb.WatchSessionResponse(session=_copied(live.session))
                    if live.session.state in SETTLED:
                        return
                    continue
                yield event
                if event.HasField("session") and event.session.state in SETTLED:
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
        if sum(live.session.state != FAILED for live in self._live.values()) >= self._config.max_sessions:
            raise LimitExceeded(
                f"{self._config.max_sessions} sessions are running: delete one (DeleteSession) or raise --max-sessions"
            )

        session = pb.Session(
            id=f"ws-{secrets.token_hex(5)}",
            state=PENDING,
            template=spec.name,
            archive_id=archive_id,
            agent_token=secrets.token_urlsafe(24),
            labels=labels,
            created_at=_now(),
            runtime=self._runtime.name,
        )
        live = LiveSession(session, spec, self._config.output_history_lines)
        self._live[session.id] = live
        self._store.put_session(session)
        container_started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        live.initialization = asyncio.create_task(
            self._initialize(live, spec, archive, container_started), name=f"initialize {session.id}"
        )
        await asyncio.wait({container_started, live.initialization}, return_when=asyncio.FIRST_COMPLETED)
        error = container_started.exception() if container_started.done() else None
        if isinstance(error, (EngineUnavailable, ImageMissing)):
            # Nothing was started: the caller gets the engine's problem and no session is left behind.
            await live.initialization
            self._live.pop(session.id, None)
            self._store.delete_session(session.id)
            raise error
        return _copied(session)

    @contextlib.asynccontextmanager
    async def _phase(self, live: LiveSession, phase: pb.Phase.ValueType) -> AsyncIterator[pb.PhaseStatus]:
        """Runs one initialization phase: recorded, timed and published as it starts and ends. The body
        may mark it SKIPPED; an exception marks it FAILED with the reason and propagates. Traced as a span
        (a child of the CreateSession call's) that the agent calls made in the body belong to."""
        session = live.session
        session.phase = phase
        status = session.phases.add(phase=phase, outcome=pb.PHASE_OUTCOME_RUNNING, started_at=_now())
        self._record(live, pb.WatchSessionResponse(phase=status))
        started = time.monotonic()
        name = pb.Phase.Name(phase).removeprefix("PHASE_").lower()
        with telemetry.span(f"phase {name}", {telemetry.SESSION_ATTRIBUTE: session.id}) as span:
            try:
                yield status
            except asyncio.CancelledError:
                status.outcome = pb.PHASE_OUTCOME_FAILED
                status.detail = (
                    live.exited.reason if live.exited else "cancelled: the session was stopped or the orchestrator shut down"
                )
                raise
            except Exception as error:
                status.outcome = pb.PHASE_OUTCOME_FAILED
                status.detail = _reason(error)
                raise
            else:
                if status.outcome == pb.PHASE_OUTCOME_RUNNING:
                    status.outcome = pb.PHASE_OUTCOME_SUCCEEDED
            finally:
                status.ended_at.GetCurrentTime()
                status.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
                span.set_attributes(
                    {"workspace.phase.outcome": pb.PhaseOutcome.Name(status.outcome), "workspace.phase.detail": status.detail}
                )
                self._record(live, pb.WatchSessionResponse(phase=status))

    async def _initialize(
        self,
        live: LiveSession,
        template: TemplateSpec,
        archive: pb.Archive | None,
        container_started: asyncio.Future[None],
    ) -> None:
        session = live.session
        session.state = STARTING
        follow_dev: asyncio.Task[None] | None = None
        install_key = CacheKey("")
        try:
            async with self._phase(live, pb.PHASE_CONTAINER_STARTED) as status:
                try:
                    workspace = await self._runtime.start(
                        session.id,
                        session.agent_token,
                        resources=template.resources,
                        env=dict(template.env),
                        labels=dict(session.labels),
                    )
                except Exception as error:
                    container_started.set_exception(error)
                    raise
                container_started.set_result(None)
                self._attach(live, workspace)
                status.detail = f"{workspace.runtime} {workspace.handle[:12]} from {workspace.image}"

            async with self._phase(live, pb.PHASE_AGENT_HEALTHY):
                await live.agent.wait_healthy(self._config.agent_health_timeout_s)

            async with self._phase(live, pb.PHASE_ARCHIVE_INJECTED) as status:
                if archive is not None:
                    await live.agent.extract_archive(self._archives.read(archive.id), archive.sha256)
                    status.detail = f"archive {archive.id}: {archive.files} files, {archive.size} bytes"
                else:
                    built = await self._catalog.archive(template.name)
                    await live.agent.extract_archive(built.chunks(), built.sha256)
                    status.detail = f"template {template.name}: {built.files} files, {built.size} bytes"

            async with self._phase(live, pb.PHASE_INSTALL) as status:
                if not template.install_command:
                    status.outcome = pb.PHASE_OUTCOME_SKIPPED
                    status.detail = "the template has no install command"
                else:
                    install_key, env, status.detail = await self._from_install_cache(live, template)
                    exit_code = await live.agent.run(
                        template.install_command,
                        env=env,
                        on_line=live.line_sink(pb.PHASE_INSTALL),
                        timeout=self._config.install_timeout_s,
                    )
                    if exit_code != 0:
                        raise InitializationFailed(f"`{template.install_command}` exited with code {exit_code}")

            async with self._phase(live, pb.PHASE_DEV_SERVER_STARTED):
                await live.agent.start_process(DEV_PROCESS, template.dev_command, env=dict(template.env))
                # Following the dev server's output shows it to watchers and tells when it dies early.
                follow_dev = asyncio.create_task(
                    live.agent.process_lines(DEV_PROCESS, live.line_sink(pb.PHASE_DEV_SERVER_STARTED))
                )

            async with self._phase(live, pb.PHASE_READY) as status:
                url = session.preview_url.rstrip("/") + template.readiness_path
                probe = asyncio.create_task(wait_until_ready(url, template.readiness_timeout_s))
                await asyncio.wait({probe, follow_dev}, return_when=asyncio.FIRST_COMPLETED)
                if not probe.done():
                    probe.cancel()
                    raise InitializationFailed(
                        f"the dev server (`{template.dev_command}`) exited before answering on {url}"
                    )
                status.detail = f"{url} answered HTTP {probe.result()}"
        except asyncio.CancelledError:
            if live.exited is None:
                raise
            return  # cancelled because its workspace is gone: _workspace_exited fails the session
        except Exception as error:  # noqa: BLE001 - every failure ends the session as FAILED with its reason
            self._fail(live, error)
            return
        finally:
            # Following after READY would hold a stream open on the agent: the reaper would see it as busy.
            if follow_dev is not None:
                follow_dev.cancel()
                # Its end (the dev server's exit, or a lost stream) is already reported as the failure, if any.
                follow_dev.add_done_callback(lambda task: task.cancelled() or task.exception())
        session.state = READY
        session.ready_at.GetCurrentTime()
        self._record(live, pb.WatchSessionResponse(session=session))
        if install_key:
            # After READY: keeping node_modules for later sessions must not delay this one.
            live.install_store = self._install_cache.store_in_background(live.agent, install_key)

    async def _from_install_cache(
        self, live: LiveSession, template: TemplateSpec
    ) -> tuple[CacheKey, dict[str, str], str]:
        """Puts the cached node_modules for the workspace's install in place, if there is one. Returns the
        install's cache key (empty = not cacheable, or no cache), the install's environment and a note."""
        if self._install_cache is None:
            return CacheKey(""), dict(template.env), "install cache off"
        key = await self._install_cache.key(live.agent, template.install_command, live.session.image)
        if not key:
            return key, dict(template.env), key.note
        injected = await self._install_cache.inject(live.agent, key)
        # The template's own settings win over the hit's defaults.
        env = {**HIT_ENV, **template.env} if injected.hit else dict(template.env)
        return key, env, injected.note

    def _attach(self, live: LiveSession, workspace: Workspace) -> None:
        live.workspace = workspace
        live.agent = AgentClient(workspace.agent_endpoint, live.session.agent_token)
        live.session.preview_url = workspace.preview_url
        live.session.agent_endpoint = workspace.agent_endpoint
        live.session.image = workspace.image

    def _fail(self, live: LiveSession, error: BaseException) -> None:
        session = live.session
        session.state = FAILED
        session.failure.CopyFrom(
            pb.SessionFailure(
                phase=session.phase,
                reason=_reason(error),
                last_output=[line.text for line in list(live.output)[-FAILURE_OUTPUT_LINES:]],
            )
        )
        log.warning("session %s failed in %s: %s", session.id, pb.Phase.Name(session.phase), session.failure.reason)
        self._record(live, pb.WatchSessionResponse(session=session))

    def _record(self, live: LiveSession, event: pb.WatchSessionResponse) -> None:
        """Persists the session and tells its watchers."""
        self._store.put_session(live.session)
        live.publish(_copy(event))

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
            return await self._save(live, name)

    async def _save(self, live: LiveSession, name: str) -> pb.Archive:
        session = live.session
        excludes = list(live.template.archive_excludes) if live.template else []
        stream = await live.agent.create_archive(excludes)
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        origin = ArchiveOrigin(
            name=name or f"{session.id} {stamp}",
            source=pb.ARCHIVE_SOURCE_SAVED,
            template=session.template,
            session_id=session.id,
        )
        return await self._archives.write(
            origin, stream, expected=lambda: Expected(stream.summary.sha256, stream.summary.files)
        )

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
            archive = await self._save(live, "") if save else None
            await self._stop(live, reason)
        return archive

    async def _stop(self, live: LiveSession, reason: str) -> None:
        session = live.session
        if live.initialization is not None and not live.initialization.done():
            live.initialization.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await live.initialization
        session.state = STOPPING
        self._record(live, pb.WatchSessionResponse(session=session))
        if live.install_store is not None:
            # The entry is being written from this workspace: stopping it now would lose the entry.
            await self._install_cache.finish(live.install_store)
        if live.agent is not None:
            await live.agent.close()
        await self._runtime.stop(session.id)
        session.state = STOPPED
        session.stop_reason = reason
        self._record(live, pb.WatchSessionResponse(session=session))
        self._live.pop(session.id, None)

    # ------------------------------------------------------------------ restart

    async def reconcile(self) -> None:
        """Matches the records with what the runtime runs: READY sessions whose workspace still runs are
        adopted (after a health check), vanished ones marked STOPPED, sessions caught mid-initialization
        marked FAILED; from then on, a workspace that stops running by itself fails its session (see
        _workspace_exited). Raises EngineUnavailable.

        A workspace is removed only when it is provably ours: it carries our instance id AND our store has a
        record of its session (session ids are random, made by this store). One with our instance id and no
        record is left alone with a warning: it may be another orchestrator's started with the same
        --instance-id on another data directory, and removing it would destroy that one's live workspace."""
        # Subscribed before listing: an exit between the listing and the adoption is not missed.
        exits = self._runtime.exits()
        workspaces = {workspace.session_id: workspace for workspace in await self._runtime.list()}
        for session in self._store.sessions_in(LIVE_STATES):
            workspace = workspaces.pop(session.id, None)
            live = LiveSession(session, None, self._config.output_history_lines)
            if workspace is None or not workspace.running:
                if workspace is not None:  # ours, exited while the orchestrator was away
                    await self._runtime.stop(session.id)
                if session.state != FAILED:
                    session.state = STOPPED
                    session.stop_reason = "vanished: its workspace was gone when the orchestrator started"
                    self._store.put_session(session)
                continue
            if session.state in (PENDING, STARTING):
                self._fail(live, InitializationFailed("the orchestrator restarted during initialization"))
            if session.state == STOPPING:
                session.stop_reason = session.stop_reason or "deleted"
            if session.state in (READY, FAILED):
                try:
                    await self._adopt(live, workspace)
                    continue
                except (grpc.aio.AioRpcError, OrchestratorError, TimeoutError) as error:
                    session.stop_reason = f"its agent did not answer after an orchestrator restart: {_reason(error)}"
            await self._runtime.stop(session.id)
            if session.state != FAILED:
                session.state = STOPPED
            self._store.put_session(session)
        for session_id, workspace in workspaces.items():
            if self._store.get_session(session_id) is not None:
                # Our record says it ended (STOPPED): its removal was cut short.
                log.info("removing workspace %s: its session is over", session_id)
                await self._runtime.stop(session_id)
            else:
                log.warning(
                    "leaving workspace %s (%s %s) alone: it carries this orchestrator's instance id but %s has no"
                    " record of it (another orchestrator with the same --instance-id?); remove it by hand if stray",
                    session_id, workspace.runtime, workspace.handle[:12], self._config.data_dir,
                )  # fmt: skip
        self._following = asyncio.create_task(self._follow_exits(exits), name="workspace exits")
        self._following.add_done_callback(_log_unexpected_end)

    async def _follow_exits(self, exits: AsyncIterator[WorkspaceExit]) -> None:
        async for exit in exits:
            live = self._live.get(exit.session_id)
            if live is None or (live.workspace is not None and live.workspace.handle != exit.handle):
                continue  # not ours, over already, or an earlier workspace of the session
            try:
                await self._workspace_exited(live, exit)
            except (OrchestratorError, grpc.aio.AioRpcError) as error:
                log.warning("session %s: cleaning up after its workspace exited: %s", exit.session_id, _reason(error))

    async def _workspace_exited(self, live: LiveSession, exit: WorkspaceExit) -> None:
        """The session's workspace stopped running without being stopped (removed behind our back, OOM-killed,
        exited): the session is FAILED with the reason (a session FAILED already keeps its first failure),
        watchers are told, and it no longer holds a slot or a workspace."""
        session = live.session
        async with live.lock:
            if self._live.get(session.id) is not live or session.state in (STOPPING, STOPPED):
                return  # being stopped on purpose
            live.exited = exit
            failed_before = session.state == FAILED
            if live.initialization is not None and not live.initialization.done():
                live.initialization.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await live.initialization
            if live.install_store is not None:
                live.install_store.cancel()  # the workspace it reads from is gone
            self._live.pop(session.id, None)
            try:
                if live.agent is not None:
                    await live.agent.close()
                await self._runtime.stop(session.id)  # what is left of it (an exited container)
            finally:
                # Told last: a session seen FAILED holds nothing any more.
                if failed_before:
                    # Often the cause of that failure (an agent call cut off as the workspace died): said too.
                    session.failure.reason += f"; then its workspace stopped: {exit.reason}"
                    log.warning("session %s (FAILED before): its workspace stopped: %s", session.id, exit.reason)
                    self._record(live, pb.WatchSessionResponse(session=session))
                else:
                    self._fail(live, WorkspaceGone(exit.reason))

    async def _adopt(self, live: LiveSession, workspace: Workspace) -> None:
        self._attach(live, workspace)
        try:
            await live.agent.wait_healthy(ADOPT_HEALTH_TIMEOUT_S)
        except BaseException:
            await live.agent.close()
            raise
        with contextlib.suppress(OrchestratorError):
            live.template = self._catalog.get(live.session.template)
        self._live[live.session.id] = live
        self._store.put_session(live.session)
        log.info("adopted session %s (%s)", live.session.id, pb.SessionState.Name(live.session.state))

    async def close(self) -> None:
        """Lets go of the sessions without stopping them: a later orchestrator adopts them."""
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following
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

    # ------------------------------------------------------------------ reaping

    def running(self) -> list[LiveSession]:
        """Sessions whose initialization is over and whose workspace runs (READY or FAILED)."""
        return [live for live in self._live.values() if live.agent is not None and live.session.state in (READY, FAILED)]

    async def reap_if_due(self, live: LiveSession, now: float) -> str:
        """Stops the session if it passed its max lifetime or sat idle past the idle TTL (saving it first
        when configured); returns why, or "" when it keeps running. Raises what the agent call raises."""
        config = self._config
        session = live.session
        age = now - session.created_at.ToNanoseconds() / 1e9
        reason = ""
        if config.max_lifetime_s and age > config.max_lifetime_s:
            reason = f"max lifetime of {config.max_lifetime_s:g}s reached"
        elif config.idle_ttl_s:
            activity = await live.agent.activity()
            session.last_activity_at.CopyFrom(activity.last_activity)
            self._store.put_session(session)
            # Named processes (the dev server) run forever; a build or an open stream means someone works.
            busy = activity.running_commands > activity.running_named_processes or activity.open_streams > 0
            idle_for = now - activity.last_activity.ToNanoseconds() / 1e9
            if not busy and idle_for > config.idle_ttl_s:
                reason = f"idle for {idle_for:.0f}s (idle TTL {config.idle_ttl_s:g}s)"
        if not reason:
            return ""
        async with live.lock:
            if session.id not in self._live:
                return ""
            if config.save_before_reap and session.state == READY:
                await self._save(live, f"{session.id} before reaping")
            await self._stop(live, reason)
        return reason


class InitializationFailed(OrchestratorError):
    """A phase ran but did not do its job (a non-zero exit, a dev server that died)."""


class WorkspaceGone(OrchestratorError):
    """The session's workspace stopped running by itself or was removed behind the orchestrator's back."""


class SessionReaper:
    """Periodically stops sessions idle past the idle TTL or alive past the max lifetime."""

    def __init__(self, manager: SessionManager, interval_s: float) -> None:
        self._manager = manager
        self._interval_s = interval_s

    async def sweep(self) -> list[tuple[str, str]]:
        """One pass over the running sessions; returns the (session id, reason) of those stopped."""
        now = time.time()
        reaped = []
        for live in self._manager.running():
            try:
                reason = await self._manager.reap_if_due(live, now)
            except (grpc.aio.AioRpcError, OrchestratorError) as error:
                log.warning("reaper: skipping session %s this round: %s", live.session.id, _reason(error))
                continue
            if reason:
                log.info("reaper stopped session %s: %s", live.session.id, reason)
                reaped.append((live.session.id, reason))
        return reaped

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sweep()


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("no longer following workspace exits: %s", _reason(task.exception()), exc_info=task.exception())


def _copied(session: pb.Session) -> pb.Session:
    copy = pb.Session()
    copy.CopyFrom(session)
    return copy
