"""One trace from the caller through the orchestrator into the agent, exported by the real OTLP exporters of
both processes (configured only through OTEL_* variables) to an OTLP receiver this test runs."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from tests.live_orchestrator import free_port, running_orchestrator
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

ORCHESTRATOR_SERVICE = "orchestrator-under-test"


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    resource: dict[str, str]
    span: trace_pb2.Span

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The trace half of an OpenTelemetry collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[ExportedSpan] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [ExportedSpan(resource["service.name"], resource, s) for s in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def in_trace(self, trace_id: str) -> list[ExportedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    endpoint = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(endpoint)
    server.start()
    try:
        yield collector, f"http://{endpoint}"
    finally:
        server.stop(None)


def create_ready_session(address: str, traceparent: str) -> pb.Session:
    """CreateSession as a traced caller would send it, then WatchSession until READY."""
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        created = stub.CreateSession(
            pb.CreateSessionRequest(template="node-basic"), metadata=(("traceparent", traceparent),)
        )
        for event in stub.WatchSession(pb.WatchSessionRequest(id=created.session.id), timeout=60):
            if event.HasField("session") and event.session.state in (pb.SESSION_STATE_READY, pb.SESSION_STATE_FAILED):
                assert event.session.state == pb.SESSION_STATE_READY, event.session.failure
                return event.session
    raise AssertionError("WatchSession ended before the session was ready")


def run_in_workspace(session: pb.Session, shell: str, traceparent: str) -> str:
    with grpc.insecure_channel(session.agent_endpoint) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        metadata = (("authorization", f"Bearer {session.agent_token}"), ("traceparent", traceparent))
        start = agent_pb2.ExecRequest(start=agent_pb2.ExecStart(shell=shell))
        return b"".join(r.output.data for r in stub.Exec(iter([start]), metadata=metadata, timeout=30)).decode()


def delete_session(address: str, session_id: str) -> None:
    with grpc.insecure_channel(address) as channel:
        orchestrator_pb2_grpc.OrchestratorServiceStub(channel).DeleteSession(pb.DeleteSessionRequest(id=session_id))


def span_attribute(span: trace_pb2.Span, key: str) -> str:
    return next((a.value.string_value for a in span.attributes if a.key == key), "")


def test_one_trace_spans_caller_orchestrator_and_agent(receiver: tuple[Receiver, str], tmp_path: Path) -> None:
    collector, endpoint = receiver
    trace_id, caller_span_id = secrets.token_hex(16), secrets.token_hex(8)
    traceparent = f"00-{trace_id}-{caller_span_id}-01"
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": ORCHESTRATOR_SERVICE,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with running_orchestrator(tmp_path / "orchestrator", env) as address:
        session = create_ready_session(address, traceparent)
        command_trace = secrets.token_hex(16)
        printed = run_in_workspace(session, "echo $TRACEPARENT", f"00-{command_trace}-{secrets.token_hex(8)}-01")
        # Stopping the agent (and then the orchestrator) flushes the spans each has batched.
        delete_session(address, session.id)

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not {s.service for s in collector.in_trace(trace_id)} >= {
        ORCHESTRATOR_SERVICE,
        "workspace-agent",
    }:
        time.sleep(0.1)
    spans = collector.in_trace(trace_id)
    by_name = {(s.service, s.span.name): s for s in spans}

    create = by_name[(ORCHESTRATOR_SERVICE, "/workspace.orchestrator.v1.OrchestratorService/CreateSession")]
    assert create.span.parent_span_id.hex() == caller_span_id
    injected = by_name[(ORCHESTRATOR_SERVICE, "phase archive_injected")]
    assert injected.span.parent_span_id == create.span.span_id
    phases = {s.span.name for s in spans if s.span.name.startswith("phase ")}
    assert {"phase container_started", "phase agent_healthy", "phase ready"} <= phases

    # The agent's server span hangs below the orchestrator's client span of the same call, in the phase.
    extract = by_name[("workspace-agent", "/workspace.agent.v1.AgentService/ExtractArchive")]
    # A cold-started agent's resource names the session; a pooled one's names its pool member, and every span
    # after the claim names the session.
    assert session.id in (
        extract.resource["workspace.session.id"],
        span_attribute(extract.span, "workspace.session.id"),
    )
    client = next(s for s in spans if s.span.span_id == extract.span.parent_span_id)
    assert client.service == ORCHESTRATOR_SERVICE and client.span.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert client.span.parent_span_id == injected.span.span_id

    # A command the agent runs gets the context of the call that started it.
    assert printed.startswith(f"00-{command_trace}-")
