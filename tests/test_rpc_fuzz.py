"""Every RPC of both services, driven with malformed and random requests: none may answer UNKNOWN or INTERNAL.
The RPCs come from the service descriptors, so a new one is covered without a change here."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import AgentConfig
from agent.server import create_server as create_agent_server
from orchestrator.config import OrchestratorConfig
from tests.conftest import REPO
from workspace.agent.v1 import agent_pb2
from workspace.orchestrator.v1 import orchestrator_pb2

SERVICES = {
    "agent": agent_pb2.DESCRIPTOR.services_by_name["AgentService"],
    "orchestrator": orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"],
}
# What no request may get: a server that does not know what went wrong.
UNEXPLAINED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}
# Each call is bounded: a random request may well start something that waits (a command reading stdin).
CALL_TIMEOUT = 5.0
PLACEHOLDER = "@@not-utf-8@@"
INVALID_UTF8 = b"\xff" * len(PLACEHOLDER)  # the same length, so every length prefix stays right


@dataclass
class Served:
    """A real server of one service, run on its own event loop in a thread, for a synchronous client."""

    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]


class ServerThread:
    """Runs `start` (which returns the address, the metadata to send and an async `stop`) on a loop of its own."""

    def __init__(self, start: Callable[[], Awaitable[tuple[str, tuple, Callable[[], Awaitable[None]]]]]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address, self.metadata, self._stop = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Served]]:
    base = tmp_path_factory.mktemp("fuzz")
    root = base / "app"
    root.mkdir()
    (root / "file.txt").write_text("hello\n")
    token = secrets.token_urlsafe(16)

    async def start_agent():
        server, port, servicer = await create_agent_server(AgentConfig(root=root, listen="127.0.0.1:0", token=token))
        await server.start()

        async def stop() -> None:
            await servicer.close()  # named processes a random request started
            await server.stop(None)

        return f"127.0.0.1:{port}", (("authorization", f"Bearer {token}"),), stop

    templates = base / "templates"
    shutil.copytree(REPO / "templates" / "node-basic", templates / "node-basic")
    config = OrchestratorConfig(
        listen="127.0.0.1:0",
        data_dir=base / "data",
        templates_dir=templates,
        runtime="local",
        instance_id=f"fuzz-{secrets.token_hex(4)}",
        reap_interval_s=3600,
    )

    async def start_orchestrator():
        from orchestrator.server import create_server
        from tests.orchestrator.conftest import stop_all_workspaces

        orchestrator = await create_server(config)
        await orchestrator.start()

        async def stop() -> None:
            await orchestrator.stop(None)
            await stop_all_workspaces(config)

        return f"127.0.0.1:{orchestrator.port}", (), stop

    threads = {"agent": ServerThread(start_agent), "orchestrator": ServerThread(start_orchestrator)}
    channels = {name: grpc.insecure_channel(thread.address) for name, thread in threads.items()}
    try:
        yield {name: Served(channels[name], threads[name].metadata) for name in threads}
    finally:
        for name, thread in threads.items():
            channels[name].close()
            thread.close()


def call(served: Served, method: MethodDescriptor, payloads: list[bytes]) -> grpc.StatusCode:
    """Sends `payloads` as the raw request (or request stream) of `method`; the status it ends with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel, options = served.channel, {"timeout": CALL_TIMEOUT, "metadata": served.metadata}
    try:
        if method.client_streaming and method.server_streaming:
            for _ in channel.stream_stream(path)(iter(payloads), **options):
                pass
        elif method.client_streaming:
            channel.stream_unary(path)(iter(payloads), **options)
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(payloads[0], **options):
                pass
        else:
            channel.unary_unary(path)(payloads[0], **options)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def request_class(method: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(method.input_type)


def all_methods() -> list[tuple[str, MethodDescriptor]]:
    return [(name, method) for name, service in SERVICES.items() for method in service.methods]


# ------------------------------------------------------------------ invalid UTF-8 in every string field


def string_field_paths(descriptor: Descriptor, depth: int = 0) -> Iterator[tuple[FieldDescriptor, ...]]:
    """Every string field reachable in a message of `descriptor` (nested messages to a few levels)."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield (field,)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 3:
            for rest in string_field_paths(field.message_type, depth + 1):
                yield (field, *rest)


def with_placeholder(message: Message, path: tuple[FieldDescriptor, ...]) -> None:
    """Sets the string field at `path` in `message` to PLACEHOLDER (an entry of a list or map, if need be)."""
    field, rest = path[0], path[1:]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        entries, value = getattr(message, field.name), field.message_type.fields_by_name["value"]
        if rest[0].name == "key":
            if value.message_type is not None:
                entries.get_or_create(PLACEHOLDER)
            else:
                entries[PLACEHOLDER] = value.default_value
        elif value.message_type is not None:
            with_placeholder(entries.get_or_create("k"), rest[1:])
        else:
            entries["k"] = PLACEHOLDER
        return
    if not rest:
        if field.is_repeated:
            getattr(message, field.name).append(PLACEHOLDER)
        else:
            setattr(message, field.name, PLACEHOLDER)
        return
    child = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
    with_placeholder(child, rest)


def invalid_utf8_cases() -> list[tuple[str, MethodDescriptor, str, bytes]]:
    cases = []
    for name, method in all_methods():
        for path in string_field_paths(method.input_type):
            message = request_class(method)()
            with_placeholder(message, path)
            data = message.SerializeToString()
            assert data.count(PLACEHOLDER.encode()) == 1, (method.full_name, path)
            corrupted = data.replace(PLACEHOLDER.encode(), INVALID_UTF8)
            cases.append((name, method, ".".join(f.name for f in path), corrupted))
    return cases


INVALID_UTF8_CASES = invalid_utf8_cases()


def test_every_rpc_has_string_fields_to_corrupt() -> None:
    # The descriptors are read: each service has RPCs, and most requests have a string field somewhere.
    methods = {method.full_name for _, method, _, _ in INVALID_UTF8_CASES}
    assert len(methods) >= len(all_methods()) - 4 and len(INVALID_UTF8_CASES) > 30


@pytest.mark.parametrize(
    ("service", "method", "field", "data"),
    INVALID_UTF8_CASES,
    ids=[f"{m.name}.{field}" for _, m, field, _ in INVALID_UTF8_CASES],
)
def test_invalid_utf8_in_any_string_field_is_invalid_argument(
    served: dict[str, Served], service: str, method: MethodDescriptor, field: str, data: bytes
) -> None:
    assert call(served[service], method, [data]) == grpc.StatusCode.INVALID_ARGUMENT
    if method.client_streaming:  # and as a later message of the stream
        assert call(served[service], method, [request_class(method)().SerializeToString(), data]) not in UNEXPLAINED


# ------------------------------------------------------------------ random and truncated requests


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            keys = field_values(entry.fields_by_name["key"], depth + 1)
            return st.dictionaries(keys, field_values(entry.fields_by_name["value"], depth + 1), max_size=3)
        values = messages(entry, depth + 1)
    elif kind == FieldDescriptor.TYPE_STRING:
        samples = ["", ".", "..", "/", "file.txt", "missing", "a/../..", "\x00", "*"]
        values = st.sampled_from(samples) | st.text(max_size=30)
    elif kind == FieldDescriptor.TYPE_BYTES:
        values = st.binary(max_size=64)
    elif kind == FieldDescriptor.TYPE_BOOL:
        values = st.booleans()
    elif kind == FieldDescriptor.TYPE_ENUM:
        values = st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 50)
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        values = st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    else:
        signed = kind in (
            FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64,
        )  # fmt: skip
        bits = 32 if kind in (
            FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32,
        ) else 64  # fmt: skip
        low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        values = st.sampled_from([0, 1, -1 if signed else 2, high]) | st.integers(low, high)
    return st.lists(values, max_size=3) if field.is_repeated else values


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` with random field values (a oneof keeps the last member set)."""
    cls = message_factory.GetMessageClass(descriptor)
    if depth > 3:
        return st.just(cls())
    fields = {field.name: st.deferred(lambda f=field: field_values(f, depth)) for field in descriptor.fields}
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: cls(**values))


@st.composite
def requests(draw: st.DrawFn, method: MethodDescriptor) -> list[bytes]:
    """One raw request (a few for a client stream): random bytes, a random message, or one cut short."""

    def one() -> bytes:
        form = draw(st.sampled_from(["bytes", "message", "truncated"]))
        if form == "bytes":
            return draw(st.binary(max_size=200))
        data = draw(messages(method.input_type)).SerializeToString()
        return data[: draw(st.integers(0, max(len(data) - 1, 0)))] if form == "truncated" else data

    count = draw(st.integers(1, 3)) if method.client_streaming else 1
    return [one() for _ in range(count)]


@st.composite
def method_and_requests(draw: st.DrawFn, service: str) -> tuple[MethodDescriptor, list[bytes]]:
    method = draw(st.sampled_from(list(SERVICES[service].methods)))
    return method, draw(requests(method))


@pytest.mark.parametrize("service", list(SERVICES))
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(data=st.data())
def test_random_requests_never_get_unknown_or_internal(
    served: dict[str, Served], service: str, data: st.DataObject
) -> None:
    method, payloads = data.draw(method_and_requests(service))
    assert call(served[service], method, payloads) not in UNEXPLAINED, (method.full_name, payloads)
