"""The warm pool on the local runtime (real agents as subprocesses): it fills within its room, hands a member
out at once or says there is none, never hands out a member that stopped answering, and a restarted
orchestrator's pool removes the unclaimed members it finds."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.pool import WarmPool
from orchestrator.runtime.local import LocalRuntime
from orchestrator.templates import ResourceHints
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

FILL_TIMEOUT_S = 60


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[LocalRuntime]:
    runtime = LocalRuntime(directory=tmp_path / "workspaces", instance_id=f"test-{secrets.token_hex(4)}")
    try:
        yield runtime
    finally:
        for workspace in await runtime.list():
            if workspace.pool_id:
                await runtime.discard(workspace.pool_id)
            else:
                await runtime.stop(workspace.session_id)


async def started_pool(runtime: LocalRuntime, size: int, room: int = 100) -> WarmPool:
    pool = WarmPool(runtime, size, room=lambda: room, health_timeout_s=30)
    await pool.start()
    assert await pool.wait_full(FILL_TIMEOUT_S)
    return pool


async def pooled(runtime: LocalRuntime) -> list[str]:
    return sorted(workspace.pool_id for workspace in await runtime.list() if workspace.pool_id)


async def test_fills_hands_out_and_refills(runtime: LocalRuntime) -> None:
    pool = await started_pool(runtime, 2)
    try:
        assert len(await pooled(runtime)) == 2
        member = await pool.take()
        assert member is not None
        workspace, agent = await pool.claim(member, "ws-claimed", "session-token", resources=ResourceHints(), env={})
        assert workspace.session_id == "ws-claimed" and not workspace.pool_id
        await agent.close()
        assert await pool.wait_full(FILL_TIMEOUT_S)
        members = await pooled(runtime)
        assert len(members) == 2 and member.workspace.pool_id not in members
        # The claimed one is the session's now: listed under it, stopped by its id.
        (claimed,) = [w for w in await runtime.list() if w.session_id == "ws-claimed"]
        assert claimed.handle == member.workspace.handle
    finally:
        await pool.close()
    assert await pooled(runtime) == []


async def test_an_empty_pool_says_so_at_once(runtime: LocalRuntime) -> None:
    pool = await started_pool(runtime, 1)
    try:
        assert await pool.take() is not None
        # Its replacement is still starting: no waiting for it.
        assert await pool.take() is None
    finally:
        await pool.close()


async def test_fills_only_as_far_as_max_sessions_leaves_room(runtime: LocalRuntime) -> None:
    pool = await started_pool(runtime, 3, room=1)
    try:
        # Nothing else is starting either: the filler stopped at the room it has.
        assert pool.held == 1 and len(await pooled(runtime)) == 1
    finally:
        await pool.close()


async def test_a_member_that_died_is_never_handed_out_and_is_replaced(runtime: LocalRuntime) -> None:
    pool = await started_pool(runtime, 2)
    try:
        dead, alive = pool.members
        os.killpg(int(dead.workspace.handle), signal.SIGKILL)
        member = await pool.take()
        assert member is not None and member.workspace.handle == alive.workspace.handle
        assert await pool.wait_full(FILL_TIMEOUT_S)
        assert dead.workspace.pool_id not in await pooled(runtime)
        assert dead.workspace.handle not in {m.workspace.handle for m in pool.members}
    finally:
        await pool.close()


async def test_the_pool_credential_is_refused_once_claimed(runtime: LocalRuntime) -> None:
    pool = await started_pool(runtime, 1)
    try:
        member = await pool.take()
        assert member is not None
        _, agent = await pool.claim(member, "ws-a", "token-of-a", resources=ResourceHints(), env={"X": "1"})
        await agent.close()
        async with aio.insecure_channel(member.workspace.agent_endpoint) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            for token in (member.credential, "token-of-b"):
                with pytest.raises(aio.AioRpcError) as refused:
                    await stub.GetActivity(pb.GetActivityRequest(), metadata=(("authorization", f"Bearer {token}"),))
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await stub.GetActivity(pb.GetActivityRequest(), metadata=(("authorization", "Bearer token-of-a"),))
    finally:
        await pool.close()


async def test_a_member_is_claimed_once(runtime: LocalRuntime) -> None:
    pool = await started_pool(runtime, 1)
    try:
        member = await pool.take()
        assert member is not None
        results = await asyncio.gather(
            runtime.claim(member.workspace, "ws-a", resources=ResourceHints()),
            runtime.claim(member.workspace, "ws-b", resources=ResourceHints()),
            return_exceptions=True,
        )
        assert sorted(type(result).__name__ for result in results) == ["FailedPrecondition", "Workspace"]
        sessions = {w.session_id for w in await runtime.list() if w.handle == member.workspace.handle}
        assert len(sessions) == 1
        await member.agent.close()
    finally:
        await pool.close()


async def test_a_new_pool_removes_the_unclaimed_members_an_old_one_left(runtime: LocalRuntime, tmp_path: Path) -> None:
    old = await started_pool(runtime, 2)
    left = {m.workspace.pool_id: m.workspace.agent_endpoint for m in old.members}
    for member in old.members:  # the old orchestrator died: nothing closed
        await member.agent.close()
    for task in (old._filling, old._following):
        assert task is not None
        task.cancel()

    restarted = LocalRuntime(directory=runtime.directory, instance_id=runtime.instance_id)
    new = await started_pool(restarted, 2)
    try:
        members = await pooled(restarted)
        assert len(members) == 2 and not set(members) & set(left)
        for endpoint in left.values():  # their agents are gone, not just forgotten
            async with aio.insecure_channel(endpoint) as channel:
                with pytest.raises(aio.AioRpcError):
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
    finally:
        await new.close()
