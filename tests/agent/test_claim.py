"""Claim: a pooled agent handed to a session takes the session's token (the pool credential is refused from
then on), adds the session's environment to what it starts, and can be claimed once only."""

from __future__ import annotations

import secrets

import grpc
import pytest
from grpc import aio

from tests.agent.helpers import collect
from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def output_of(agent: AgentTarget, token: str, shell: str) -> str:
    responses = await collect(
        agent.stub.Exec(iter([pb.ExecRequest(start=pb.ExecStart(shell=shell))]), metadata=bearer(token))
    )
    return b"".join(r.output.data for r in responses if r.HasField("output")).decode()


async def test_claim_swaps_the_token_and_adds_the_environment(agent: AgentTarget) -> None:
    session_token = secrets.token_urlsafe(24)
    reply = await agent.stub.Claim(
        pb.ClaimRequest(token=session_token, env={"SESSION_VAR": "from the claim"}, session_id="ws-1"),
        metadata=agent.metadata,
    )
    assert reply.session_id == "ws-1"

    with pytest.raises(aio.AioRpcError) as refused:
        await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    assert await output_of(agent, session_token, "echo $SESSION_VAR") == "from the claim\n"
    # A command's own env wins over the claim's.
    start = pb.ExecStart(shell="echo $SESSION_VAR", env={"SESSION_VAR": "own"})
    responses = await collect(agent.stub.Exec(iter([pb.ExecRequest(start=start)]), metadata=bearer(session_token)))
    assert b"".join(r.output.data for r in responses if r.HasField("output")) == b"own\n"


async def test_a_second_claim_is_refused(agent: AgentTarget) -> None:
    first, second = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    await agent.stub.Claim(pb.ClaimRequest(token=first, session_id="ws-1"), metadata=agent.metadata)
    with pytest.raises(aio.AioRpcError) as refused:
        await agent.stub.Claim(pb.ClaimRequest(token=second, session_id="ws-2"), metadata=bearer(first))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "ws-1" in (refused.value.details() or "")
    # The first session's token still holds; the second's never did.
    assert await output_of(agent, first, "echo still mine") == "still mine\n"
    with pytest.raises(aio.AioRpcError) as wrong:
        await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=bearer(second))
    assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_claim_needs_the_pool_credential_and_a_token(agent: AgentTarget) -> None:
    with pytest.raises(aio.AioRpcError) as unauthenticated:
        await agent.stub.Claim(pb.ClaimRequest(token="mine now"), metadata=bearer("a guess"))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(aio.AioRpcError) as empty:
        await agent.stub.Claim(pb.ClaimRequest(token=""), metadata=agent.metadata)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Neither took it: the pool credential still works, and a proper claim succeeds.
    await agent.stub.Claim(pb.ClaimRequest(token="the session's", session_id="ws-1"), metadata=agent.metadata)
