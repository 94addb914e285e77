"""Named long-running processes: they outlive their Exec call, are listed, attached to (replay + live), resumed
after a dropped connection without loss, stopped, and stopped with the agent."""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from agent.config import AgentConfig
from agent.server import create_server
from agent.service import AgentServicer
from tests.agent.test_exec import alive, gone_within, run
from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc


@pytest.fixture
async def processes(agent: AgentTarget) -> AsyncIterator[AgentTarget]:
    """The agent, with every named process a test left running stopped afterwards."""
    yield agent
    for process in (await agent.stub.ListProcesses(pb.ListProcessesRequest(), metadata=agent.metadata)).processes:
        if process.running:
            await agent.stub.StopProcess(
                pb.StopProcessRequest(name=process.name, signal=pb.SIGNAL_SIGKILL), metadata=agent.metadata
            )


async def start_named(agent: AgentTarget, name: str, shell: str, wait_for: bytes = b"") -> tuple[int, bytes, int]:
    """Starts a named process, reads its output until `wait_for` appears, then leaves the call.
    Returns the pid, the output read and the last sequence seen."""
    call = agent.stub.Exec(metadata=agent.metadata)
    await call.write(pb.ExecRequest(start=pb.ExecStart(shell=shell, name=name)))
    started = (await call.read()).started
    assert started.name == name
    output, last = b"", -1
    while wait_for not in output:
        event = await call.read()
        output, last = output + event.output.data, event.output.sequence
    call.cancel()
    return started.pid, output, last


async def attach(agent: AgentTarget, name: str, from_sequence: int = 0) -> list[pb.AttachProcessResponse]:
    request = pb.AttachProcessRequest(name=name, from_sequence=from_sequence)
    return [event async for event in agent.stub.AttachProcess(request, metadata=agent.metadata)]


async def list_processes(agent: AgentTarget) -> list[pb.ProcessInfo]:
    return list((await agent.stub.ListProcesses(pb.ListProcessesRequest(), metadata=agent.metadata)).processes)


async def activity(agent: AgentTarget) -> tuple[int, int]:
    reply = await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
    return reply.running_commands, reply.running_named_processes


async def test_named_process_outlives_its_call_and_is_listed_attached_and_stopped(processes: AgentTarget) -> None:
    agent = processes
    pid, _, _ = await start_named(agent, "dev", "echo ready; sleep 30", wait_for=b"ready")
    await asyncio.sleep(0.2)  # the call is gone; the process is not
    assert await alive(agent, pid)
    [info] = await list_processes(agent)
    assert (info.name, info.pid, info.running, info.cwd) == ("dev", pid, True, ".")
    assert list(info.command) == ["/bin/sh", "-c", "echo ready; sleep 30"]
    assert (info.first_buffered_sequence, info.next_sequence) == (0, 1)
    assert await activity(agent) == (1, 1)

    # Attach replays, then follows live output; leaving does not stop the process.
    follow = agent.stub.AttachProcess(pb.AttachProcessRequest(name="dev"), metadata=agent.metadata)
    attached = await follow.read()
    assert (attached.attached.process.pid, attached.attached.missed_chunks) == (pid, 0)
    replayed = await follow.read()
    assert (replayed.output.sequence, replayed.output.data) == (0, b"ready\n")
    follow.cancel()
    assert await alive(agent, pid)

    stopped = await agent.stub.StopProcess(pb.StopProcessRequest(name="dev"), metadata=agent.metadata)
    assert (stopped.exited.exit_code, stopped.exited.signal) == (-1, signal.SIGTERM)
    assert await gone_within(agent, [pid], 2)
    [info] = await list_processes(agent)
    assert not info.running and info.exited.signal == signal.SIGTERM
    assert await activity(agent) == (0, 0)

    # An exited process can still be attached to: its output, then how it ended.
    events = await attach(agent, "dev")
    assert [e.WhichOneof("event") for e in events] == ["attached", "output", "exited"]
    assert events[1].output.data == b"ready\n" and events[2].exited.signal == signal.SIGTERM

    removed = await agent.stub.StopProcess(pb.StopProcessRequest(name="dev", remove=True), metadata=agent.metadata)
    assert removed.exited == stopped.exited
    assert await list_processes(agent) == []


async def test_exec_of_a_named_process_streams_until_it_exits(processes: AgentTarget) -> None:
    result = await run(processes, shell="echo one; echo two >&2; exit 4", name="job", timeout=Duration(nanos=1))
    assert (result.stdout, result.stderr, result.exited.exit_code) == (b"one\n", b"two\n", 4)
    assert not result.exited.timed_out  # timeouts do not apply to named processes


async def test_resume_after_a_dropped_connection_loses_no_output(processes: AgentTarget) -> None:
    agent = processes
    lines = 150
    shell = f'i=0; while [ $i -lt {lines} ]; do echo "line $i"; i=$((i+1)); sleep 0.005; done'
    _, received, last_seen = await start_named(agent, "counter", shell, wait_for=b"line 0\n")

    # A second client connection follows from there for a while, then drops without a goodbye.
    channel = aio.insecure_channel(agent.address)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    request = pb.AttachProcessRequest(name="counter", from_sequence=last_seen + 1)
    follow = stub.AttachProcess(request, metadata=agent.metadata)
    assert (await follow.read()).attached.missed_chunks == 0
    for _ in range(5):
        event = await follow.read()
        assert event.output.sequence == last_seen + 1
        received, last_seen = received + event.output.data, event.output.sequence
    await channel.close()

    # Resuming from the last sequence seen gets the rest, nothing lost or repeated.
    events = await attach(agent, "counter", last_seen + 1)
    assert events[0].attached.missed_chunks == 0
    assert [e.output.sequence for e in events[1:-1]] == list(range(last_seen + 1, last_seen + len(events) - 1))
    received += b"".join(e.output.data for e in events[1:-1])
    assert events[-1].exited.exit_code == 0
    assert received == b"".join(f"line {i}\n".encode() for i in range(lines))


async def test_starting_a_running_name_is_already_exists_and_an_exited_name_is_replaced(processes: AgentTarget) -> None:
    agent = processes
    first_pid, _, _ = await start_named(agent, "dev", "echo first; sleep 30", wait_for=b"first")
    with pytest.raises(aio.AioRpcError) as error:
        await run(agent, shell="echo second", name="dev")
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS and "dev" in error.value.details()
    assert await alive(agent, first_pid)

    await agent.stub.StopProcess(pb.StopProcessRequest(name="dev", grace_period=Duration()), metadata=agent.metadata)
    second = await run(agent, shell="echo second", name="dev")
    [info] = await list_processes(agent)
    assert (info.pid, info.running, info.exited.exit_code) == (second.pid, False, 0)
    assert b"".join(e.output.data for e in (await attach(agent, "dev"))[1:-1]) == b"second\n"


async def test_a_process_ignoring_the_signal_is_killed_after_the_grace_period(processes: AgentTarget) -> None:
    agent = processes
    pid, _, _ = await start_named(agent, "stubborn", "trap '' TERM; echo up; sleep 30", wait_for=b"up")
    request = pb.StopProcessRequest(name="stubborn", grace_period=Duration(nanos=200_000_000))
    stopped = await agent.stub.StopProcess(request, metadata=agent.metadata)
    assert (stopped.exited.exit_code, stopped.exited.signal) == (-1, signal.SIGKILL)
    assert await gone_within(agent, [pid], 2)


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_unknown_names_are_not_found(processes: AgentTarget) -> None:
    agent = processes
    with pytest.raises(aio.AioRpcError) as error:
        await attach(agent, "nope")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(aio.AioRpcError) as error:
        await agent.stub.StopProcess(pb.StopProcessRequest(name="nope"), metadata=agent.metadata)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_stopping_with_a_signal_callers_may_not_send_is_invalid(processes: AgentTarget) -> None:
    await start_named(processes, "dev", "echo up; sleep 30", wait_for=b"up")
    with pytest.raises(aio.AioRpcError) as error:
        await processes.stub.StopProcess(pb.StopProcessRequest(name="dev", signal=4), metadata=processes.metadata)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [p.running for p in await list_processes(processes)] == [True]


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_attaching_past_the_output_is_invalid(processes: AgentTarget) -> None:
    await run(processes, shell="echo once", name="once")
    with pytest.raises(aio.AioRpcError) as error:
        await attach(processes, "once", from_sequence=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "next sequence: 1" in error.value.details()


@pytest.fixture
async def small_agent(tmp_path: Path) -> AsyncIterator[tuple[AgentTarget, AgentServicer]]:
    """An in-process agent with a 1 KiB replay buffer, and its servicer (to shut it down)."""
    root = tmp_path / "app"
    root.mkdir()
    token = secrets.token_urlsafe(16)
    server, port, servicer = await create_server(
        AgentConfig(root=root, listen="127.0.0.1:0", token=token, process_buffer_bytes=1024)
    )
    await server.start()
    address = f"127.0.0.1:{port}"
    channel = aio.insecure_channel(address)
    stub = agent_pb2_grpc.AgentServiceStub(channel)
    target = AgentTarget("inprocess", address, token, root, channel, stub, str(root))
    try:
        yield target, servicer
    finally:
        await servicer.close()
        await channel.close()
        await server.stop(None)


async def test_replay_buffer_is_bounded_and_reports_missed_chunks(
    small_agent: tuple[AgentTarget, AgentServicer],
) -> None:
    agent, _ = small_agent
    line = "x" * 99 + "\n"
    # Separate writes a little apart, so they arrive as separate chunks.
    await run(agent, shell=f"for i in $(seq 40); do echo {line[:-1]}; sleep 0.005; done", name="chatty")
    [info] = await list_processes(agent)
    events = await attach(agent, "chatty")
    missed = events[0].attached.missed_chunks
    replayed = b"".join(e.output.data for e in events[1:-1])
    assert missed > 0 and missed == info.first_buffered_sequence
    assert events[1].output.sequence == missed
    assert 0 < len(replayed) <= 1024 + len(line) and replayed == (line * 40).encode()[-len(replayed) :]


async def test_agent_shutdown_stops_named_processes(small_agent: tuple[AgentTarget, AgentServicer]) -> None:
    agent, servicer = small_agent
    pid, _, _ = await start_named(agent, "dev", "echo up; sleep 30", wait_for=b"up")
    await servicer.close()
    [info] = await list_processes(agent)
    assert not info.running and info.exited.signal == signal.SIGTERM
    assert await gone_within(agent, [pid], 2)


async def test_agent_shutdown_is_not_held_up_by_a_caller_that_does_not_read(
    small_agent: tuple[AgentTarget, AgentServicer],
) -> None:
    agent, servicer = small_agent
    call = agent.stub.Exec(metadata=agent.metadata)
    await call.write(pb.ExecRequest(start=pb.ExecStart(argv=["yes"])))
    pid = (await call.read()).started.pid
    await asyncio.sleep(0.3)  # every buffer between `yes` and this client fills up
    await asyncio.wait_for(servicer.close(), timeout=5)
    assert await gone_within(agent, [pid], 2)
    call.cancel()
