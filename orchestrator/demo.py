"""`python -m orchestrator --demo TEMPLATE`: a session created as the server starts, its progress and preview URL
printed for a person, and the session deleted when the server stops."""

from __future__ import annotations

import asyncio
import sys

from orchestrator.errors import OrchestratorError
from orchestrator.sessions import READY, SessionManager
from workspace.orchestrator.v1 import orchestrator_pb2 as pb


class DemoFailed(OrchestratorError):
    """The demo session did not become READY; the message says in which phase and why."""


async def run(sessions: SessionManager, template: str, address: str, stopping: asyncio.Event) -> None:
    """Creates a session from `template`, prints each phase as it ends and then where to open it, waits for
    `stopping`, and deletes the session. Raises what SessionManager.create raises, and DemoFailed."""
    session = await sessions.create(template=template, labels={"demo": template})
    _say(f"demo: session {session.id} from template {template!r}, image {session.image or '-'}")
    try:
        settled = await _unless_stopped(_follow(sessions, session.id), stopping)
        if settled is None:  # stopped before it was ready
            return
        if settled.state != READY:
            raise DemoFailed(_failure(settled))
        ready_s = (settled.ready_at.ToNanoseconds() - settled.created_at.ToNanoseconds()) / 1e9
        _say(
            f"\ndemo: READY in {ready_s:.1f} s. Open {settled.preview_url} in a browser.\n"
            f"      Orchestrator on {address}, e.g. `wsctl --server {address} exec {settled.id} -- node --version`.\n"
            "      Ctrl-C stops the orchestrator and deletes this session.\n"
        )
        await stopping.wait()
    finally:
        await sessions.delete(session.id, reason="the demo ended")
        _say(f"demo: session {session.id} deleted")


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


async def _unless_stopped(follow, stopping: asyncio.Event) -> pb.Session | None:
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


def _say(text: str) -> None:
    print(text, file=sys.stdout, flush=True)
