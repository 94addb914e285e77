"""`python -m orchestrator --demo`: on stop, the demo deletes every session created while it ran (it turns
reaping off, so nothing else would), and leaves the ones that ran before it alone."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator import demo
from tests.orchestrator.conftest import OrchestratorUnderTest, watch_until_settled
from workspace.orchestrator.v1 import orchestrator_pb2 as pb


async def create_ready(orchestrator: OrchestratorUnderTest) -> str:
    session = (await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))).session
    await watch_until_settled(orchestrator.stub, session.id)
    return session.id


async def state_of(orchestrator: OrchestratorUnderTest, session_id: str) -> int:
    return (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=session_id))).session.state


async def test_stopping_the_demo_deletes_every_session_created_meanwhile(
    orchestrator: OrchestratorUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await create_ready(orchestrator)
    stopping = asyncio.Event()
    running = asyncio.create_task(demo.run(orchestrator.orchestrator.sessions, "node-basic", "127.0.0.1:0", stopping))
    async with asyncio.timeout(60):
        while "READY in" not in capsys.readouterr().out:
            await asyncio.sleep(0.1)
    # What the README's `wsctl create` and `wsctl restore` lines do beside the demo.
    extra = await create_ready(orchestrator)
    listed = (await orchestrator.stub.ListSessions(pb.ListSessionsRequest(labels={"demo": "node-basic"}))).sessions
    (demo_session,) = [session.id for session in listed]

    stopping.set()
    await running

    assert await state_of(orchestrator, demo_session) == pb.SESSION_STATE_STOPPED
    assert await state_of(orchestrator, extra) == pb.SESSION_STATE_STOPPED
    assert await state_of(orchestrator, before) == pb.SESSION_STATE_READY
    assert f"demo: session {extra} deleted" in capsys.readouterr().out
