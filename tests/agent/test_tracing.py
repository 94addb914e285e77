"""Traced agent calls: spans recorded in memory by the real SDK, parent links across the wire, statuses."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from common import telemetry
from tests.conftest import AgentTarget, start_inprocess_agent
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the servers and channels the test creates, exporting into memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.set_tracer_provider(None)
        provider.shutdown()


@pytest.fixture
async def traced(spans: InMemorySpanExporter, tmp_path: Path) -> AsyncIterator[AgentTarget]:
    """A traced agent and a stub on a traced channel (the orchestrator's side of the wire)."""
    root = tmp_path / "app"
    root.mkdir()
    server, target = await start_inprocess_agent(root)
    await target.channel.close()
    target.channel = aio.insecure_channel(target.address, interceptors=telemetry.client_interceptors())
    target.stub = agent_pb2_grpc.AgentServiceStub(target.channel)
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


def by_kind(spans: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans.get_finished_spans() if s.kind == kind]


async def server_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The server's spans, once there is one: the server ends its span after it has answered, so the caller
    can have its answer (a refusal above all, sent by an interceptor) before the span is finished."""
    for _ in range(200):
        if found := by_kind(spans, SpanKind.SERVER):
            return found
        await asyncio.sleep(0.025)
    return []


async def test_server_span_is_a_child_of_the_callers_span(traced: AgentTarget, spans: InMemorySpanExporter) -> None:
    with telemetry.span("orchestrator phase") as phase:
        await traced.stub.GetActivity(pb.GetActivityRequest(), metadata=traced.metadata)

    (client,) = by_kind(spans, SpanKind.CLIENT)
    (server,) = await server_spans(spans)
    trace_id = phase.get_span_context().trace_id
    assert client.context.trace_id == server.context.trace_id == trace_id
    assert client.parent.span_id == phase.get_span_context().span_id
    assert server.parent.span_id == client.context.span_id
    assert server.name == "/workspace.agent.v1.AgentService/GetActivity"
    assert server.attributes["rpc.service"] == "workspace.agent.v1.AgentService"
    assert server.attributes["rpc.method"] == "GetActivity"
    assert server.status.status_code != StatusCode.ERROR


async def test_refused_call_is_recorded_on_both_sides(traced: AgentTarget, spans: InMemorySpanExporter) -> None:
    with pytest.raises(aio.AioRpcError) as refused:
        await traced.stub.GetActivity(pb.GetActivityRequest(), metadata=(("authorization", "Bearer wrong"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    (client,) = by_kind(spans, SpanKind.CLIENT)
    (server,) = await server_spans(spans)
    assert client.status.status_code == StatusCode.ERROR
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    # The semantic conventions leave a server span unset for the caller's mistakes (4xx-like codes).
    assert server.status.status_code == StatusCode.UNSET


async def test_health_probes_are_not_traced(traced: AgentTarget, spans: InMemorySpanExporter) -> None:
    health = health_pb2_grpc.HealthStub(traced.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert spans.get_finished_spans() == ()


async def test_tracing_off_adds_nothing(tmp_path: Path) -> None:
    assert telemetry.server_interceptors() == []
    assert telemetry.client_interceptors() == []
    assert telemetry.trace_env() == {}
    server, agent = await start_inprocess_agent(tmp_path)
    try:
        await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
    finally:
        await agent.channel.close()
        await server.stop(None)


@pytest.mark.parametrize(
    ("environ", "requested"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_only_an_exporter_turns_tracing_on(environ: dict[str, str], requested: bool) -> None:
    assert telemetry.tracing_requested(environ) is requested


async def test_a_command_gets_the_exec_span_as_traceparent(traced: AgentTarget, spans: InMemorySpanExporter) -> None:
    start = pb.ExecRequest(start=pb.ExecStart(shell='echo "$TRACEPARENT"'))
    output = b"".join([r.output.data async for r in traced.stub.Exec(iter([start]), metadata=traced.metadata)])

    (server,) = await server_spans(spans)
    assert server.name == "/workspace.agent.v1.AgentService/Exec"
    assert output.decode().startswith(f"00-{server.context.trace_id:032x}-{server.context.span_id:016x}-")


def test_a_failed_unit_of_work_is_recorded_on_its_span(spans: InMemorySpanExporter) -> None:
    with pytest.raises(TimeoutError), telemetry.span("phase agent_healthy", {telemetry.SESSION_ATTRIBUTE: "ws-1"}):
        raise TimeoutError("the workspace agent was not healthy within 30 s")

    (failed,) = spans.get_finished_spans()
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes[telemetry.SESSION_ATTRIBUTE] == "ws-1"
    (event,) = failed.events
    assert event.name == "exception"
    assert event.attributes["exception.message"] == "the workspace agent was not healthy within 30 s"


def test_log_lines_are_json_with_the_trace_ids(spans: InMemorySpanExporter) -> None:
    record = logging.LogRecord("agent.server", logging.INFO, __file__, 1, "agent serving", None, None)
    record.port = 3001
    with telemetry.span("serve") as current:
        line = json.loads(telemetry.JsonLogFormatter().format(record))
    context = current.get_span_context()
    assert line["message"] == "agent serving"
    assert line["level"] == "info"
    assert line["port"] == 3001
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
