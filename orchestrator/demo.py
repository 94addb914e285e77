"""`python -m orchestrator --demo TEMPLATE`: a session created as the server starts, its progress and preview URL
printed for a person, and every session created while the demo ran deleted when the server stops."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

from common.tools import ENV_BIN
from orchestrator.errors import DemoFailed
from orchestrator.pool import FROM_POOL
from orchestrator.sessions import READY, SessionManager
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

# How long the demo waits for the warm pool to fill before its session starts cold instead.
POOL_FILL_TIMEOUT_S = 60.0


async def run(sessions: SessionManager, template: str, address: str, stopping: asyncio.Event) -> None:
    """Creates a session from `template`, prints each phase as it ends and then where to open it, waits for
    `stopping`, and deletes it and every other session created meanwhile (`wsctl create`, `wsctl restore`:
    the demo turns reaping off, so nothing else would). Sessions that ran before the demo are left alone.
    Raises what SessionManager.create raises, and DemoFailed."""
    earlier = await _unstopped(sessions)
    try:
        await _demo(sessions, template, address, stopping)
    finally:
        for session_id in sorted(await _unstopped(sessions) - earlier):
            await sessions.delete(session_id, reason="the demo ended")
            _say(f"demo: session {session_id} deleted")


async def _unstopped(sessions: SessionManager) -> set[str]:
    """The ids of every session not STOPPED."""
    ids: set[str] = set()
    token = ""
    while True:
        page, token = await sessions.list(page_size=500, page_token=token)
        ids.update(session.id for session in page if session.state != pb.SESSION_STATE_STOPPED)
        if not token:
            return ids


async def _demo(sessions: SessionManager, template: str, address: str, stopping: asyncio.Event) -> None:
    pool = sessions.pool
    if pool is not None:
        # The demo shows the fast path: its session claims a pool member rather than racing the first fill.
        started = time.monotonic()
        full = await _unless_stopped(pool.wait_full(POOL_FILL_TIMEOUT_S), stopping)
        if full is None:
            return
        _say(
            f"demo: warm pool of {len(pool.members)} ready in {time.monotonic() - started:.1f} s" if full
            else f"demo: the warm pool is not full after {POOL_FILL_TIMEOUT_S:g} s; the session may start cold"
        )  # fmt: skip
    session = await sessions.create(template=template, labels={"demo": template})
    _say(f"demo: session {session.id} from template {template!r}, image {session.image or '-'}")
    settled = await _unless_stopped(_follow(sessions, session.id), stopping)
    if settled is None:  # stopped before it was ready
        return
    if settled.state != READY:
        raise DemoFailed(_failure(settled))
    ready_s = (settled.ready_at.ToNanoseconds() - settled.created_at.ToNanoseconds()) / 1e9
    pooled = any(phase.detail.endswith(FROM_POOL) for phase in settled.phases)
    _say(
        f"\ndemo: READY in {ready_s:.2f} s{f' {FROM_POOL}' if pooled else ' (cold start)'}. Open {settled.preview_url} in a browser.\n"
        f"      Orchestrator on {address}, e.g. `{_wsctl()} --server {address} exec {settled.id} -- node --version`.\n"
        "      Ctrl-C stops the orchestrator and deletes every session created since it started.\n"
    )
    await stopping.wait()


async def _follow(sessions: SessionManager, session_id: str) -> pb.Session:
    """Prints the session's phases and output lines as they come; returns the session once it settles."""
    settled = pb.Session()
    async for event in sessions.watch(session_id):
        kind = event.WhichOneof("event")
        if kind == "phase" and event.phase.outcome != pb.PHASE_OUTCOME_RUNNING:
            phase = event.phase
            name = pb.Phase.Name(phase.phase).removeprefix("PHASE_").lower()
            outcome = pb.PhaseOutcome.Name(phase.outcome).removeprefix("PHASE_OUTCOME_").lower()
            seconds = phase.duration.ToNanoseconds() / 1e9
            _say(f"  {name:<20} {outcome:<9} {seconds:6.2f} s  {phase.detail}")
        elif kind == "output":
            _say(f"  | {event.output.text}")
        elif kind == "session":
            settled = event.session
    return settled


async def _unless_stopped(follow, stopping: asyncio.Event):
    """`follow`'s result, or None once `stopping` is set first (then `follow` is cancelled)."""
    following = asyncio.ensure_future(follow)
    stopped = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
        return following.result() if following.done() else None
    finally:
        following.cancel()
        stopped.cancel()


def _failure(session: pb.Session) -> str:
    if session.state != pb.SESSION_STATE_FAILED:
        return f"the demo session is {pb.SessionState.Name(session.state)}"
    failure = session.failure
    output = "".join(f"\n  | {line}" for line in failure.last_output[-10:])
    return f"the demo session failed in {pb.Phase.Name(failure.phase)}: {failure.reason}{output}"


def _wsctl() -> str:
    """How to call wsctl from here: by name when PATH finds this environment's copy, else by its path
    (`make demo` does not activate the virtual environment)."""
    installed = ENV_BIN / "wsctl"
    if not installed.exists() or shutil.which("wsctl") == str(installed):
        return "wsctl"
    return os.path.relpath(installed) if installed.is_relative_to(Path.cwd()) else str(installed)


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
