"""The agent server as a whole: auth, health, reflection, activity."""

from __future__ import annotations

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb


async def test_rpc_without_token_is_unauthenticated(agent: AgentTarget) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await agent.stub.GetActivity(pb.GetActivityRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in (err.value.details() or "")


async def test_rpc_with_wrong_token_is_unauthenticated(agent: AgentTarget) -> None:
    with pytest.raises(aio.AioRpcError) as err:
        await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=(("authorization", "Bearer nope"),))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_streaming_rpc_without_token_is_unauthenticated(agent: AgentTarget) -> None:
    call = agent.stub.Read(pb.ReadRequest(path="x"))
    with pytest.raises(aio.AioRpcError) as err:
        async for _ in call:
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_token(agent: AgentTarget) -> None:
    health = health_pb2_grpc.HealthStub(agent.channel)
    for service in ("", "workspace.agent.v1.AgentService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_services(agent: AgentTarget) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(agent.channel)

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(requests()):
        names |= {s.name for s in reply.list_services_response.service}
    assert {"workspace.agent.v1.AgentService", "grpc.health.v1.Health"} <= names


async def test_activity_counts_calls_not_probes(agent: AgentTarget) -> None:
    first = await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
    again = await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
    assert again.last_activity == first.last_activity  # asking is not activity
    assert first.started_at.seconds > 0
