"""Conversions between the protobuf messages of Exec and the process RPCs and the process domain types."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from agent.errors import InvalidArgument
from agent.process.command import CloseStdin, Command, CommandExit, CommandSpec, Control, PtySize, SendSignal, StdinData
from agent.process.manager import Attached, AttachEvent, ExecEvent, Started
from agent.process.output import OutputChunk
from workspace.agent.v1 import agent_pb2 as pb


def _seconds(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def command_spec(start: pb.ExecStart) -> CommandSpec:
    return CommandSpec(
        argv=tuple(start.argv),
        shell=start.shell,
        cwd=start.cwd,
        env=dict(start.env),
        timeout=_seconds(start.timeout) if start.HasField("timeout") else None,
        pty=PtySize(start.pty.rows, start.pty.cols) if start.HasField("pty") else None,
        name=start.name,
        open_stdin=start.open_stdin,
    )


async def exec_requests(requests: AsyncIterator[pb.ExecRequest]) -> AsyncIterator[CommandSpec | Control]:
    """The caller's Exec messages as domain requests; raises InvalidArgument for an empty message."""
    async for request in requests:
        match request.WhichOneof("request"):
            case "start":
                yield command_spec(request.start)
            case "stdin":
                yield StdinData(request.stdin)
            case "close_stdin":
                yield CloseStdin()
            case "signal":
                yield SendSignal(request.signal.signal)
            case "resize":
                yield PtySize(request.resize.rows, request.resize.cols)
            case _:
                raise InvalidArgument("empty Exec message: set one of start, stdin, close_stdin, signal, resize")


def process_exited(exit: CommandExit) -> pb.ProcessExited:
    duration = Duration()
    duration.FromNanoseconds(int(exit.duration * 1e9))
    return pb.ProcessExited(exit_code=exit.exit_code, signal=exit.signal, timed_out=exit.timed_out, duration=duration)


def process_output(chunk: OutputChunk) -> pb.ProcessOutput:
    return pb.ProcessOutput(sequence=chunk.sequence, stream=chunk.stream, data=chunk.data)


def process_info(command: Command) -> pb.ProcessInfo:
    started_at = Timestamp()
    started_at.FromNanoseconds(int(command.started_at * 1e9))
    return pb.ProcessInfo(
        name=command.name,
        pid=command.pid,
        command=command.argv,
        cwd=command.cwd,
        running=command.running,
        exited=process_exited(command.exit) if command.exit else None,
        started_at=started_at,
        next_sequence=command.output.next_sequence,
        first_buffered_sequence=command.output.first_sequence,
    )


def exec_response(event: ExecEvent) -> pb.ExecResponse:
    match event:
        case OutputChunk():
            return pb.ExecResponse(output=process_output(event))
        case Started(pid, name):
            return pb.ExecResponse(started=pb.ProcessStarted(pid=pid, name=name))
        case CommandExit():
            return pb.ExecResponse(exited=process_exited(event))


def attach_response(event: AttachEvent) -> pb.AttachProcessResponse:
    match event:
        case OutputChunk():
            return pb.AttachProcessResponse(output=process_output(event))
        case Attached(command, missed):
            attached = pb.ProcessAttached(process=process_info(command), missed_chunks=missed)
            return pb.AttachProcessResponse(attached=attached)
        case CommandExit():
            return pb.AttachProcessResponse(exited=process_exited(event))


def stop_request(request: pb.StopProcessRequest) -> tuple[int | None, float | None]:
    """The signal (None: the default) and grace period (None: the default) of a StopProcess request."""
    return request.signal or None, _seconds(request.grace_period) if request.HasField("grace_period") else None
