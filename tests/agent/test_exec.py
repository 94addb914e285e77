"""Exec through the gRPC stub: commands, input, signals, PTY, timeouts, cancellation, bad input, backpressure."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from grpc import aio

from agent.config import AgentConfig
from agent.fs.paths import WorkspaceRoot
from agent.process.command import DRAIN_TIMEOUT, CommandSpec
from agent.process.manager import ProcessManager, Started
from tests.conftest import AgentTarget, start_inprocess_agent
from workspace.agent.v1 import agent_pb2 as pb


@dataclass
class Result:
    pid: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    pty: bytes = b""
    sequences: list[int] = field(default_factory=list)
    exited: pb.ProcessExited | None = None


def add_event(result: Result, event: pb.ExecResponse) -> None:
    kind = event.WhichOneof("event")
    if kind == "started":
        result.pid = event.started.pid
    elif kind == "output":
        result.sequences.append(event.output.sequence)
        name = pb.OutputStream.Name(event.output.stream).removeprefix("OUTPUT_STREAM_").lower()
        setattr(result, name, getattr(result, name) + event.output.data)
    else:
        result.exited = event.exited


async def read_to_end(call: aio.StreamStreamCall, result: Result) -> Result:
    while (event := await call.read()) != aio.EOF:
        add_event(result, event)
    return result


async def run(agent: AgentTarget, *requests: pb.ExecRequest, **start: object) -> Result:
    """Runs one command to the end, sending `requests` after the start."""

    async def stream():
        yield pb.ExecRequest(start=pb.ExecStart(**start))
        for request in requests:
            yield request

    result = Result()
    async for event in agent.stub.Exec(stream(), metadata=agent.metadata):
        add_event(result, event)
    return result


async def expect_error(agent: AgentTarget, code: grpc.StatusCode, **start: object) -> str:
    with pytest.raises(aio.AioRpcError) as error:
        await run(agent, **start)
    assert error.value.code() == code, error.value.details()
    return error.value.details()


async def alive(agent: AgentTarget, pid: int) -> bool:
    """Whether a process exists, zombies aside, as seen from inside the agent (pids may be in its container)."""
    stat = (await run(agent, shell=f"cat /proc/{pid}/stat 2>/dev/null")).stdout
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


async def gone_within(agent: AgentTarget, pids: list[int], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while [pid for pid in pids if await alive(agent, pid)]:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_argv_streams_output_in_order_and_exit(agent: AgentTarget) -> None:
    result = await run(agent, argv=["printf", "%s\\n", "hello", "world"])
    assert result.pid > 0
    assert result.stdout == b"hello\nworld\n"
    assert result.sequences == list(range(len(result.sequences)))
    assert (result.exited.exit_code, result.exited.signal, result.exited.timed_out) == (0, 0, False)
    assert result.exited.duration.ToNanoseconds() > 0


async def test_shell_separates_stdout_and_stderr_and_reports_exit_code(agent: AgentTarget) -> None:
    result = await run(agent, shell="echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exited.exit_code) == (b"out\n", b"err\n", 3)


async def test_env_is_added_to_the_agents_environment(agent: AgentTarget) -> None:
    result = await run(agent, shell='echo "$GREETING"; command -v sh', env={"GREETING": "hi there"})
    assert result.stdout.splitlines()[0] == b"hi there"
    assert result.stdout.splitlines()[1].endswith(b"/sh")  # PATH still inherited


async def test_cwd_is_relative_to_the_root(agent: AgentTarget) -> None:
    (agent.root / "src" / "app").mkdir(parents=True)
    result = await run(agent, argv=["pwd"], cwd="src/app")
    assert result.stdout.decode().strip() == f"{agent.root_in_agent}/src/app"
    assert (await run(agent, argv=["pwd"])).stdout.decode().strip() == agent.root_in_agent


async def test_relative_program_path_is_found_from_cwd(agent: AgentTarget) -> None:
    (agent.root / "bin").mkdir()
    script = agent.root / "bin" / "hello"
    script.write_text("#!/bin/sh\necho from script\n")
    script.chmod(0o755)
    assert (await run(agent, argv=["./hello"], cwd="bin")).stdout == b"from script\n"


async def test_stdin_is_streamed_then_closed(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    await call.write(pb.ExecRequest(start=pb.ExecStart(argv=["cat"], open_stdin=True)))
    result = Result()
    add_event(result, await call.read())
    await call.write(pb.ExecRequest(stdin=b"first "))
    add_event(result, await call.read())
    assert result.stdout == b"first "  # echoed before stdin ends: input is streamed, not batched
    await call.write(pb.ExecRequest(stdin=b"second"))
    await call.write(pb.ExecRequest(close_stdin=pb.CloseStdin()))
    await call.done_writing()
    await read_to_end(call, result)
    assert (result.stdout, result.exited.exit_code) == (b"first second", 0)


async def test_stdin_defaults_to_dev_null(agent: AgentTarget) -> None:
    result = await run(agent, argv=["cat"])
    assert (result.stdout, result.exited.exit_code) == (b"", 0)


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_stdin_without_open_stdin_is_refused(agent: AgentTarget) -> None:
    with pytest.raises(aio.AioRpcError) as error:
        await run(agent, pb.ExecRequest(stdin=b"x"), argv=["sleep", "5"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open_stdin" in error.value.details()


async def test_signal_goes_to_the_process_group(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    # The shell's child (sleep) is in the same group; both die of the signal.
    await call.write(pb.ExecRequest(start=pb.ExecStart(shell="sleep 30 & echo $!; wait")))
    result = Result()
    while not result.stdout:
        add_event(result, await call.read())
    child = int(result.stdout)
    await call.write(pb.ExecRequest(signal=pb.SendSignal(signal=pb.SIGNAL_SIGINT)))
    await read_to_end(call, result)
    assert (result.exited.exit_code, result.exited.signal, result.exited.timed_out) == (-1, signal.SIGINT, False)
    assert await gone_within(agent, [child], 2)


async def test_exit_by_signal_is_reported(agent: AgentTarget) -> None:
    result = await run(agent, shell="kill -TERM $$")
    assert (result.exited.exit_code, result.exited.signal) == (-1, signal.SIGTERM)


async def test_pty_has_the_requested_size_and_can_be_resized(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    start = pb.ExecStart(
        shell="stty size; test -t 0 && echo tty; read line; stty size",
        pty=pb.PtySize(rows=24, cols=80),
        open_stdin=True,
    )
    await call.write(pb.ExecRequest(start=start))
    result = Result()
    while b"tty" not in result.pty:
        add_event(result, await call.read())
    await call.write(pb.ExecRequest(resize=pb.PtySize(rows=40, cols=120)))
    await call.write(pb.ExecRequest(stdin=b"go\n"))
    await call.done_writing()
    await read_to_end(call, result)
    lines = result.pty.replace(b"\r\n", b"\n").splitlines()
    assert lines[0] == b"24 80" and lines[1] == b"tty"
    assert lines[-1] == b"40 120"
    assert (result.stdout, result.stderr, result.exited.exit_code) == (b"", b"", 0)


async def test_pty_ctrl_c_interrupts_the_foreground_program(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    start = pb.ExecStart(shell="echo ready; exec sleep 30", pty=pb.PtySize(), open_stdin=True)
    await call.write(pb.ExecRequest(start=start))
    result = Result()
    while b"ready" not in result.pty:
        add_event(result, await call.read())
    await call.write(pb.ExecRequest(stdin=b"\x03"))
    await read_to_end(call, result)
    assert result.exited.signal == signal.SIGINT


async def test_timeout_kills_the_whole_group(agent: AgentTarget) -> None:
    started = time.monotonic()
    result = await run(agent, shell="sleep 30 & echo $!; sleep 30", timeout=Duration(nanos=300_000_000))
    assert time.monotonic() - started < 5
    assert result.exited.timed_out
    assert (result.exited.exit_code, result.exited.signal) == (-1, signal.SIGTERM)
    assert await gone_within(agent, [int(result.stdout), result.pid], 2)


async def test_cancelling_the_call_kills_the_whole_group(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    await call.write(pb.ExecRequest(start=pb.ExecStart(shell="sleep 30 & echo $!; sleep 30")))
    result = Result()
    while not result.stdout:
        add_event(result, await call.read())
    assert await alive(agent, result.pid) and await alive(agent, int(result.stdout))
    call.cancel()
    assert await gone_within(agent, [result.pid, int(result.stdout)], 5)


async def test_background_children_do_not_outlive_the_command(agent: AgentTarget) -> None:
    result = await run(agent, shell="sleep 30 & echo $!")
    assert result.exited.exit_code == 0
    assert await gone_within(agent, [int(result.stdout)], 2)


async def test_a_slow_reader_gets_all_output_of_a_command_that_already_exited(tmp_path: Path) -> None:
    # Below the gRPC layer (whose windows would take it all): the output fits in the agent's buffers and
    # the pipe, so the command exits while the agent still holds output its reader has not taken.
    processes = ProcessManager(WorkspaceRoot(tmp_path), AgentConfig(root=tmp_path))
    size = 400 * 1024

    async def requests():
        yield CommandSpec(argv=("head", "-c", str(size), "/dev/zero"))

    events = processes.exec(requests())
    assert isinstance(await anext(events), Started)
    await asyncio.sleep(DRAIN_TIMEOUT + 0.5)
    received = [event async for event in events]
    assert sum(len(chunk.data) for chunk in received[:-1]) == size
    assert received[-1].exit_code == 0


async def test_a_process_that_left_the_group_cannot_hold_the_call_open(agent: AgentTarget) -> None:
    started = time.monotonic()
    result = await run(agent, shell="setsid sleep 3 & echo detached")
    assert (result.stdout, result.exited.exit_code) == (b"detached\n", 0)
    assert time.monotonic() - started < 2.5


async def test_missing_program_is_not_found(agent: AgentTarget) -> None:
    details = await expect_error(agent, grpc.StatusCode.NOT_FOUND, argv=["no-such-program-xyz", "--help"])
    assert "no-such-program-xyz" in details and "PATH" in details
    await expect_error(agent, grpc.StatusCode.NOT_FOUND, argv=["./missing.sh"])


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
@pytest.mark.parametrize(
    ("cwd", "code"),
    [
        ("/tmp", grpc.StatusCode.INVALID_ARGUMENT),
        ("../", grpc.StatusCode.INVALID_ARGUMENT),
        ("a/../../x", grpc.StatusCode.INVALID_ARGUMENT),
        ("escape", grpc.StatusCode.PERMISSION_DENIED),
        ("missing", grpc.StatusCode.NOT_FOUND),
        ("file.txt", grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
async def test_bad_cwd_is_refused_and_nothing_runs(
    agent: AgentTarget, tmp_path: Path, cwd: str, code: grpc.StatusCode
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (agent.root / "escape").symlink_to(outside)
    (agent.root / "file.txt").write_text("x")
    await expect_error(agent, code, shell="touch ran", cwd=cwd)
    assert not (outside / "ran").exists() and not (agent.root / "ran").exists()


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
@pytest.mark.parametrize(
    ("start", "detail"),
    [
        ({}, "no command"),
        ({"argv": ["true"], "shell": "true"}, "not both"),
        ({"argv": ["true"], "env": {"A=B": "c"}}, "A=B"),
        ({"argv": ["true"], "name": "bad name!"}, "bad name!"),
    ],
)
async def test_malformed_start_is_invalid_argument(agent: AgentTarget, start: dict, detail: str) -> None:
    assert detail in await expect_error(agent, grpc.StatusCode.INVALID_ARGUMENT, **start)


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_first_message_must_be_start(agent: AgentTarget) -> None:
    async def stream():
        yield pb.ExecRequest(stdin=b"x")

    with pytest.raises(aio.AioRpcError) as error:
        async for _ in agent.stub.Exec(stream(), metadata=agent.metadata):
            pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_resize_without_pty_is_refused(agent: AgentTarget) -> None:
    with pytest.raises(aio.AioRpcError) as error:
        await run(agent, pb.ExecRequest(resize=pb.PtySize(rows=1, cols=1)), argv=["sleep", "5"])
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def written_and_agent_rss(agent: AgentTarget, pid: int) -> tuple[int, int]:
    """Bytes process `pid` has written so far, and the agent's resident memory (the parent of this shell)."""
    shell = f"grep ^wchar /proc/{pid}/io; grep ^VmRSS /proc/$PPID/status"
    wchar, rss = (await run(agent, shell=shell)).stdout.decode().splitlines()
    return int(wchar.split()[1]), int(rss.split()[1]) * 1024


async def test_flooding_command_blocks_when_the_client_does_not_read(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    await call.write(pb.ExecRequest(start=pb.ExecStart(argv=["yes", "flood"])))
    pid = (await call.read()).started.pid
    assert (await call.read()).output.data.startswith(b"flood\n")
    _, rss_before = await written_and_agent_rss(agent, pid)
    await asyncio.sleep(0.7)  # the agent's buffers and the transport's windows fill up
    written, _ = await written_and_agent_rss(agent, pid)
    await asyncio.sleep(0.7)
    written_later, rss_after = await written_and_agent_rss(agent, pid)
    # `yes` writes GB/s when nothing holds it; here it is blocked on a full pipe.
    assert written_later == written
    assert written < 64 * 1024 * 1024
    assert rss_after - rss_before < 64 * 1024 * 1024
    # Reading again lets it go on, in order and without gaps.
    sequences = [(await call.read()).output.sequence for _ in range(50)]
    assert sequences == list(range(1, 51))
    call.cancel()
    assert await gone_within(agent, [pid], 5)


async def running_commands_drop_to(agent: AgentTarget, count: int) -> None:
    for _ in range(100):
        if (await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)).running_commands <= count:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"still more than {count} commands running")


async def test_concurrent_commands_are_capped(tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    server, agent = await start_inprocess_agent(root, max_concurrent_commands=2)
    try:
        calls = [agent.stub.Exec(metadata=agent.metadata) for _ in range(2)]
        for call in calls:
            await call.write(pb.ExecRequest(start=pb.ExecStart(argv=["sleep", "30"])))
            assert (await call.read()).started.pid > 0
        activity = await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
        assert (activity.running_commands, activity.running_named_processes) == (2, 0)
        details = await expect_error(agent, grpc.StatusCode.RESOURCE_EXHAUSTED, argv=["true"])
        assert "2 commands" in details
        calls[0].cancel()
        await running_commands_drop_to(agent, 1)  # the slot is free once the cancelled command has exited
        assert (await run(agent, argv=["true"])).exited.exit_code == 0
        calls[1].cancel()
        await running_commands_drop_to(agent, 0)
    finally:
        await agent.channel.close()
        await server.stop(None)


async def marked_processes(agent: AgentTarget, marker: str) -> dict[int, int]:
    """The process group of each process (zombies aside) whose command line holds `marker`, a unique `sleep`
    duration `<digits>.<digits>`, by pid; the grep itself is left out by writing the dot as `[.]`."""
    pattern = marker.replace(".", "[.]")
    script = (
        f"for f in $(grep -ls {pattern} /proc/[0-9]*/cmdline); do d=${{f%/cmdline}};"
        " echo ${d#/proc/} $(cut -d')' -f2 $d/stat 2>/dev/null | cut -d' ' -f5); done"
    )
    groups = {}
    for line in (await run(agent, shell=script)).stdout.decode().splitlines():
        pid, *group = line.split()
        if group and await alive(agent, int(pid)):
            groups[int(pid)] = int(group[0])
    return groups


async def test_exec_calls_cancelled_at_any_point_leave_no_process_and_no_open_stream(agent: AgentTarget) -> None:
    # Deadlines of 1 to 5 ms end calls at every point from before the spawn to the stream's end: no process
    # of any of them (the shell or its children) may survive, and none may still count as an open stream.
    marker = f"1000.{secrets.randbelow(10**9):09d}"
    for attempt in range(60):
        deadline = 0.001 * (1 + attempt % 5)
        with contextlib.suppress(aio.AioRpcError):
            await run_with_timeout(agent, deadline, shell=f"sleep {marker} & sleep {marker}; wait")
    survivors: dict[int, int] = {}
    for _ in range(150):  # the agent kills with SIGTERM, then SIGKILL after KILL_GRACE
        survivors = await marked_processes(agent, marker)
        activity = await agent.stub.GetActivity(pb.GetActivityRequest(), metadata=agent.metadata)
        if not survivors and activity.open_streams == 0 and activity.running_commands == 0:
            break
        await asyncio.sleep(0.05)
    assert survivors == {}
    assert (activity.open_streams, activity.running_commands) == (0, 0)


async def test_named_processes_cancelled_while_spawned_are_listed_or_gone(agent: AgentTarget) -> None:
    # A named process outlives its call once started; one whose call ended while it was being spawned
    # must not run on unlisted, where nobody could stop it.
    marker = f"1000.{secrets.randbelow(10**9):09d}"
    for attempt in range(30):
        with contextlib.suppress(aio.AioRpcError):
            shell = f"sleep {marker} & sleep {marker}; wait"
            await run_with_timeout(agent, 0.001 * (1 + attempt % 5), shell=shell, name=f"n{attempt}")
    listed: set[int] = set()
    survivors: dict[int, int] = {}
    for _ in range(150):  # by process group: a listed process's children are its
        processes = (await agent.stub.ListProcesses(pb.ListProcessesRequest(), metadata=agent.metadata)).processes
        listed = {p.pid for p in processes if p.running}
        survivors = await marked_processes(agent, marker)
        if set(survivors.values()) <= listed:
            break
        await asyncio.sleep(0.05)
    assert set(survivors.values()) <= listed
    for process in processes:
        request = pb.StopProcessRequest(name=process.name, signal=signal.SIGKILL, remove=True)
        await agent.stub.StopProcess(request, metadata=agent.metadata)


async def run_with_timeout(agent: AgentTarget, timeout: float, **start: object) -> None:
    async def stream():
        yield pb.ExecRequest(start=pb.ExecStart(**start))
        await asyncio.sleep(30)

    async for _ in agent.stub.Exec(stream(), metadata=agent.metadata, timeout=timeout):
        pass


async def test_stdin_to_a_command_that_closed_its_stdin_is_dropped_and_the_exit_arrives(agent: AgentTarget) -> None:
    call = agent.stub.Exec(metadata=agent.metadata)
    script = "exec 0<&-; echo closed; read -r line < /dev/null; sleep 0.3; echo done"
    await call.write(pb.ExecRequest(start=pb.ExecStart(shell=script, open_stdin=True)))
    result = Result()
    while b"closed" not in result.stdout:
        add_event(result, await call.read())
    for _ in range(5):
        await call.write(pb.ExecRequest(stdin=b"nobody reads this\n"))
    await read_to_end(call, result)
    assert result.stdout == b"closed\ndone\n"
    assert result.exited is not None and result.exited.exit_code == 0


async def test_stdin_to_a_command_that_exited_is_dropped_and_the_exit_arrives(agent: AgentTarget) -> None:
    # The shell exits once a process has left its group (told through a FIFO), which holds the output open
    # for a while (without stdin), so the call is still open when the input comes.
    call = agent.stub.Exec(metadata=agent.metadata)
    script = (
        'f=$(mktemp -u); mkfifo "$f"; setsid sh -c "echo > $f; exec sleep 0.8" </dev/null &'
        ' read -r _ < "$f"; rm "$f"; echo exiting'
    )
    await call.write(pb.ExecRequest(start=pb.ExecStart(shell=script, open_stdin=True)))
    result = Result()
    while b"exiting" not in result.stdout:
        add_event(result, await call.read())
    assert await gone_within(agent, [result.pid], 0.5)
    for _ in range(5):
        await call.write(pb.ExecRequest(stdin=b"too late\n"))
    await read_to_end(call, result)
    assert result.exited is not None and result.exited.exit_code == 0


@pytest.mark.inprocess_only("request validation, the same code wherever the agent runs")
async def test_stdin_after_close_stdin_is_refused(agent: AgentTarget) -> None:
    with pytest.raises(aio.AioRpcError) as error:
        await run(
            agent,
            pb.ExecRequest(close_stdin=pb.CloseStdin()),
            pb.ExecRequest(stdin=b"late"),
            argv=["sleep", "5"],
            open_stdin=True,
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "close_stdin" in error.value.details()


@pytest.mark.parametrize(
    ("start", "detail"),
    [
        ({"argv": ["echo", "x" * 200 * 1024]}, "MAX_ARG_STRLEN"),  # one argument over 128 KiB
        ({"shell": "true " + "x" * 200 * 1024}, "MAX_ARG_STRLEN"),
        ({"argv": ["true", *["x" * 100_000] * 30]}, "ARG_MAX"),  # each small enough, 3 MB together
        ({"argv": ["true"], "env": {"BIG": "x" * 200 * 1024}}, "MAX_ARG_STRLEN"),
        ({"argv": ["true"], "pty": pb.PtySize(rows=24, cols=80), "env": {"BIG": "x" * 200 * 1024}}, "MAX_ARG_STRLEN"),
    ],
)
async def test_a_command_line_over_the_kernels_limits_is_invalid_argument_naming_the_limit(
    agent: AgentTarget, start: dict, detail: str
) -> None:
    details = await expect_error(agent, grpc.StatusCode.INVALID_ARGUMENT, **start)
    assert detail in details and "bytes" in details
    assert agent.root_in_agent not in details and str(agent.root) not in details


async def test_a_program_path_longer_than_a_path_may_be_is_invalid_argument(agent: AgentTarget) -> None:
    for program in ["./" + "d" * 300, "./" + "/".join(["d" * 200] * 30)]:
        details = await expect_error(agent, grpc.StatusCode.INVALID_ARGUMENT, argv=[program])
        assert "NAME_MAX" in details or "PATH_MAX" in details
        assert agent.root_in_agent not in details
