"""The SessionReaper: stops (or, with --idle-action pause, pauses) sessions idle past the idle TTL, and stops
those alive past their max lifetime."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc

from orchestrator.errors import OrchestratorError
from orchestrator.sessions.live import FAILED, READY, LiveSession, reason_of

if TYPE_CHECKING:
    from orchestrator.sessions.manager import SessionManager

log = logging.getLogger(__name__)


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
                reason = await self.reap_if_due(live, now)
            except (grpc.aio.AioRpcError, OrchestratorError) as error:
                log.warning("reaper: skipping session %s this round: %s", live.session.id, reason_of(error))
                continue
            if reason:
                log.info("reaper: session %s: %s", live.session.id, reason)
                reaped.append((live.session.id, reason))
        return reaped

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.sweep()

    async def reap_if_due(self, live: LiveSession, now: float) -> str:
        """Stops the session if it passed its max lifetime or sat idle past the idle TTL (saving it first
        when configured); returns why, or "" when it keeps running. Raises what the agent call raises."""
        manager = self._manager
        config = manager.config
        session = live.session
        age = now - session.created_at.ToNanoseconds() / 1e9
        reason, idle = "", False
        if config.max_lifetime_s and age > config.max_lifetime_s:
            reason = f"max lifetime of {config.max_lifetime_s:g}s reached"
        elif config.idle_ttl_s:
            activity = await live.connected_agent.activity()
            # The agent's calls and file writes, and the preview's requests and WebSocket frames (the gateway's).
            last = max(activity.last_activity.ToNanoseconds() / 1e9, live.preview_activity)
            session.last_activity_at.FromNanoseconds(int(last * 1e9))
            manager.persist(live)
            # Named processes (the dev server) run forever; a build or an open stream means someone works. An
            # open preview socket alone does not: a forgotten browser tab keeps its HMR socket open for ever.
            busy = activity.running_commands > activity.running_named_processes or activity.open_streams > 0
            idle_for = now - last
            if not busy and idle_for > config.idle_ttl_s:
                reason, idle = f"idle for {idle_for:.0f}s (idle TTL {config.idle_ttl_s:g}s)", True
        if not reason:
            return ""
        async with live.lock:
            if manager.live_session(session.id) is not live or session.state not in (READY, FAILED):
                return ""  # deleted, paused or being resumed meanwhile
            if config.save_before_reap and session.state == READY:
                await manager.save_live(live, f"{session.id} before reaping")
            if idle and config.idle_action == "pause" and session.state == READY:
                await manager.pause_live(live)
                return f"{reason}: paused"
            await manager.stop_live(live, reason)
        return reason
