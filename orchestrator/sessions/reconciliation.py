"""After a restart: the records matched with what the runtime runs (workspaces adopted, vanished sessions
stopped), then every workspace exit followed, so one that stops by itself fails its session."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from orchestrator.config import OrchestratorConfig
from orchestrator.errors import InitializationFailed, OrchestratorError, WorkspaceGone
from orchestrator.runtime import Runtime, Workspace
from orchestrator.runtime.base import WorkspaceExit
from orchestrator.sessions.live import (
    FAILED,
    HELD_STATES,
    PAUSED,
    PENDING,
    READY,
    STARTING,
    STOPPED,
    STOPPING,
    LiveSession,
    reason_of,
)
from orchestrator.store import Store
from orchestrator.templates import TemplateCatalog
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from orchestrator.sessions.manager import SessionManager

log = logging.getLogger(__name__)

# After a restart, an adopted agent must answer this fast or its session is stopped.
ADOPT_HEALTH_TIMEOUT_S = 5.0
# A session whose workspace keeps stopping (killed over its memory limit each time, say) fails after this many
# recoveries from its last save.
MAX_RELOCATIONS = 3


class Reconciler:
    """Keeps the SessionManager's records true to the runtime: at start-up, and as workspaces exit."""

    def __init__(
        self,
        manager: SessionManager,
        config: OrchestratorConfig,
        store: Store,
        catalog: TemplateCatalog,
        runtime: Runtime,
    ) -> None:
        self._manager = manager
        self._config = config
        self._store = store
        self._catalog = catalog
        self._runtime = runtime
        self._following: asyncio.Task[None] | None = None

    async def reconcile(self) -> None:
        """See SessionManager.reconcile. Raises EngineUnavailable."""
        # Subscribed before listing: an exit between the listing and the adoption is not missed.
        exits = self._runtime.exits()
        # Unclaimed pool members are the pool's (WarmPool.start removes an earlier orchestrator's).
        workspaces = {
            workspace.session_id: workspace for workspace in await self._runtime.list() if not workspace.pool_id
        }
        # The sessions no live replica owns (with SQLite, every one): this replica's from now on.
        for session in await self._store.orphans(HELD_STATES):
            if await self._store.claim(session.id):
                await self.settle(session, workspaces.pop(session.id, None))
            else:
                workspaces.pop(session.id, None)
        for session_id, workspace in workspaces.items():
            record = await self._store.get_session(session_id)
            if record is not None and record.state in HELD_STATES:
                continue  # another live replica's session
            if record is not None:
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

    async def take_over(self, session: pb.Session) -> None:
        """Settles a session this replica just claimed from a replica that died (see settle)."""
        workspace = next((w for w in await self._runtime.list() if w.session_id == session.id and not w.pool_id), None)
        await self.settle(session, workspace)

    async def settle(self, session: pb.Session, workspace: Workspace | None) -> None:
        """Matches a session this replica now owns (after a restart, or taken over) with its workspace: a READY
        or FAILED one whose workspace runs and whose agent answers is adopted; a PAUSED one stays PAUSED; one
        caught mid-initialization is FAILED; one whose workspace is gone is STOPPED."""
        manager = self._manager
        live = LiveSession(session, None, self._config.output_history_lines)
        if session.state == PAUSED:
            await self._keep_paused(live, workspace)
            return
        if workspace is None or not workspace.running:
            if workspace is not None:  # ours, exited while the orchestrator was away
                await self._runtime.stop(session.id)
            if session.state != FAILED:
                session.state = STOPPED
                session.stop_reason = "vanished: its workspace was gone when the orchestrator started"
                self._store.put_session(session)
            return
        if session.state in (PENDING, STARTING):
            manager.fail(live, InitializationFailed("the orchestrator restarted during initialization"))
        if session.state == STOPPING:
            session.stop_reason = session.stop_reason or "deleted"
        if session.state in (READY, FAILED):
            try:
                await self._adopt(live, workspace)
                return
            except (grpc.aio.AioRpcError, OrchestratorError, TimeoutError) as error:
                session.stop_reason = f"its agent did not answer after an orchestrator restart: {reason_of(error)}"
        await self._runtime.stop(session.id)
        if session.state != FAILED:
            session.state = STOPPED
        self._store.put_session(session)

    async def _keep_paused(self, live: LiveSession, workspace: Workspace | None) -> None:
        """A PAUSED session stays PAUSED: its stopped workspace is kept for ResumeSession (one running again,
        started behind our back, is stopped again); without one, ResumeSession restores its last save or fails
        it with the reason."""
        if workspace is not None:
            if workspace.running:
                log.warning("session %s is PAUSED but its workspace runs: stopping it again", live.session.id)
                await self._runtime.pause(live.session.id)
            live.workspace = workspace
        with contextlib.suppress(OrchestratorError):
            live.template = self._catalog.get(live.session.template)
        self._manager.hold(live)

    async def close(self) -> None:
        """Stops following workspace exits."""
        if self._following is not None:
            self._following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._following

    async def _follow_exits(self, exits: AsyncIterator[WorkspaceExit]) -> None:
        async for exit in exits:
            live = self._manager.live_session(exit.session_id)
            if live is None or (live.workspace is not None and live.workspace.handle != exit.handle):
                continue  # not ours, over already, or an earlier workspace of the session
            try:
                await self._workspace_exited(live, exit)
            except (OrchestratorError, grpc.aio.AioRpcError) as error:
                log.warning("session %s: cleaning up after its workspace exited: %s", exit.session_id, reason_of(error))

    async def _workspace_exited(self, live: LiveSession, exit: WorkspaceExit) -> None:
        """The session's workspace stopped running without being stopped (removed behind our back, OOM-killed,
        exited): the session is FAILED with the reason (a session FAILED already keeps its first failure),
        watchers are told, and it no longer holds a slot or a workspace."""
        manager = self._manager
        session = live.session
        async with live.lock:
            if manager.live_session(session.id) is not live or session.state in (STOPPING, STOPPED, PAUSED):
                return  # being stopped on purpose (a paused one's workspace is looked for when it resumes)
            initializing = live.initialization is not None and not live.initialization.done()
            relocations = sum(phase.phase == pb.PHASE_CONTAINER_STARTED for phase in session.phases) - 1
            if exit.recoverable and session.state == READY and not initializing and relocations < MAX_RELOCATIONS:
                await manager.relocate(live, exit.reason)
                return
            live.exited = exit
            failed_before = session.state == FAILED
            if live.initialization is not None and not live.initialization.done():
                live.initialization.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await live.initialization
            if live.install_store is not None:
                live.install_store.cancel()  # the workspace it reads from is gone
            manager.release(live)
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
                    manager.record(live, pb.WatchSessionResponse(session=session))
                else:
                    manager.fail(live, WorkspaceGone(exit.reason))

    async def _adopt(self, live: LiveSession, workspace: Workspace) -> None:
        self._manager.attach(live, workspace)
        agent = live.connected_agent
        try:
            await agent.wait_healthy(ADOPT_HEALTH_TIMEOUT_S)
        except BaseException:
            await agent.close()
            raise
        with contextlib.suppress(OrchestratorError):
            live.template = self._catalog.get(live.session.template)
        self._manager.hold(live)
        self._store.put_session(live.session)
        log.info("adopted session %s (%s)", live.session.id, pb.SessionState.Name(live.session.state))


def _log_unexpected_end(task: asyncio.Task[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if error is not None:
        log.error("no longer following workspace exits: %s", reason_of(error), exc_info=error)
