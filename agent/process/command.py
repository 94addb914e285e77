"""One running command: its process group, output pumps, stdin, signals, PTY, and how it ended."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import shutil
import signal
import struct
import termios
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import InvalidArgument
from agent.process.output import OutputBuffer, OutputStream

# Seconds between SIGTERM and SIGKILL when the agent kills a command (timeout, cancelled call, shutdown).
KILL_GRACE = 2.0
# After a command exits, how long a process that left its group may hold its output open without writing.
DRAIN_TIMEOUT = 1.0
READ_CHUNK = 64 * 1024
# Found on the agent's PATH, not the command's (a caller may replace PATH); part of every Debian base.
_SETSID = shutil.which("setsid") or "/usr/bin/setsid"
# What a terminal sends for Ctrl-D: end of input for the program reading it.
TERMINAL_EOF = b"\x04"
# The signals a caller may send (those of `workspace.agent.v1.Signal`).
CALLER_SIGNALS = frozenset(
    {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGKILL, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM}
)


@dataclass(frozen=True)
class PtySize:
    """A terminal size in character cells; also the request to resize a running command's PTY."""

    rows: int
    cols: int

    def checked(self) -> PtySize:
        """This size, or 24x80 when either side is unset; raises InvalidArgument when no terminal can have it."""
        if not (self.rows and self.cols):
            return PtySize(24, 80)
        if self.rows > 0xFFFF or self.cols > 0xFFFF:
            raise InvalidArgument(f"PTY size {self.rows}x{self.cols} is too large")
        return self


@dataclass(frozen=True)
class CommandSpec:
    """What to run, as the caller asked: exactly one of `argv` or `shell`."""

    argv: tuple[str, ...] = ()
    shell: str = ""
    cwd: str = ""
    env: Mapping[str, str] | None = None
    timeout: float | None = None
    pty: PtySize | None = None
    name: str = ""
    open_stdin: bool = False


@dataclass(frozen=True)
class StdinData:
    data: bytes


@dataclass(frozen=True)
class CloseStdin:
    pass


@dataclass(frozen=True)
class SendSignal:
    signal: int


Control = StdinData | CloseStdin | SendSignal | PtySize


def caller_signal(signum: int) -> signal.Signals:
    """The signal a caller asked for; raises InvalidArgument for one it may not send."""
    if signum not in CALLER_SIGNALS:
        raise InvalidArgument(f"signal {signum} cannot be sent; use one of {sorted(int(s) for s in CALLER_SIGNALS)}")
    return signal.Signals(signum)


@dataclass(frozen=True)
class CommandExit:
    """How a command ended: `exit_code` is -1 when `signal` killed it."""

    exit_code: int
    signal: int
    timed_out: bool
    duration: float


class Command:
    """A spawned command, leader of its own session and process group.

    Signals go to the whole group. When the leader exits, what is left of its group is killed too,
    so background children cannot hold the output open (and the caller waiting) forever; a process
    meant to outlive its command is started as a named process instead.
    """

    def __init__(
        self,
        argv: list[str],
        cwd: str,
        name: str,
        process: _LeaderProcess,
        output: OutputBuffer,
        terminal: int | None,
        open_stdin: bool,
    ) -> None:
        self.argv = argv
        self.cwd = cwd
        self.name = name
        self.pid = process.pid
        self.output = output
        self.started_at = time.time()
        self.exit: CommandExit | None = None
        self.timed_out = False
        self._started = time.monotonic()
        self._process = process
        self._terminal = terminal  # the PTY master, None for pipes
        self._open_stdin = open_stdin
        self._stdin_closed = False  # by the caller (CloseStdin); the command closing its end is no error
        self._exited = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._killer: asyncio.Task[CommandExit] | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    async def spawn(
        cls,
        argv: list[str],
        *,
        cwd: os.PathLike[str],
        display_cwd: str,
        env: dict[str, str] | None,
        pty: PtySize | None,
        open_stdin: bool,
        name: str,
        output: OutputBuffer,
        timeout: float | None,
        on_exit: Callable[[Command], None],
    ) -> Command:
        """Starts `argv` in a new session; raises OSError (FileNotFoundError, PermissionError) from exec."""
        if pty is None:
            process = await _create_process(
                argv,
                stdin=asyncio.subprocess.PIPE if open_stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                env=env,
            )
            command = cls(argv, display_cwd, name, process, output, None, open_stdin)
            pumps = [
                _pump_pipe(process.stdout, OutputStream.STDOUT, output),
                _pump_pipe(process.stderr, OutputStream.STDERR, output),
            ]
        else:
            terminal, tty = os.openpty()
            try:
                _set_terminal_size(terminal, pty)
                os.set_blocking(terminal, False)
                # The terminal is stdin too (programs want a tty there), but only takes the caller's
                # input with `open_stdin`. util-linux `setsid --ctty` starts the session and makes the
                # terminal its controlling one (job control, Ctrl-C, SIGWINCH), then execs the command
                # under the same pid: no Python code runs in the forked child of this threaded process.
                process = await _create_process(
                    [_SETSID, "--ctty", *argv], stdin=tty, stdout=tty, stderr=tty, cwd=cwd, env=env, new_session=False
                )
            except BaseException:
                os.close(terminal)
                raise
            finally:
                os.close(tty)  # the child has it; the master reads EIO once every holder is gone
            command = cls(argv, display_cwd, name, process, output, terminal, open_stdin)
            pumps = [_pump_terminal(terminal, output)]
        if timeout:
            command._timer = asyncio.get_running_loop().call_later(timeout, command._time_out)
        command._supervisor = asyncio.create_task(command._supervise([asyncio.create_task(p) for p in pumps], on_exit))
        return command

    @property
    def running(self) -> bool:
        return self.exit is None

    async def wait(self) -> CommandExit:
        """Waits for the command to exit and its output to be read."""
        await self._exited.wait()
        assert self.exit is not None
        return self.exit

    async def apply(self, control: Control) -> None:
        """Applies a caller's request to the running command; raises InvalidArgument when it does not fit it."""
        match control:
            case StdinData(data):
                self._require_stdin()
                await self._write_stdin(data)
            case CloseStdin():
                self._require_stdin()
                self._stdin_closed = True
                if self._terminal is None:
                    self.release_stdin()
                else:
                    await self._write_stdin(TERMINAL_EOF)
            case SendSignal(signum):
                self.signal_group(caller_signal(signum))
            case PtySize():
                if self._terminal is None:
                    raise InvalidArgument("resize needs a command started with a PTY (ExecStart.pty)")
                size = control.checked()
                if self.running:
                    _set_terminal_size(self._terminal, size)

    def release_stdin(self) -> None:
        """Closes a stdin pipe: nobody will write to it any more."""
        if self._process.stdin is not None:
            self._process.stdin.close()

    def signal_group(self, signum: int) -> None:
        """Sends a signal to the command's process group, if any of it is left."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    async def terminate(self, signum: int = signal.SIGTERM, grace: float = KILL_GRACE) -> CommandExit:
        """Sends `signum` to the group, SIGKILL if the leader is still there after `grace` seconds; returns the exit."""
        if self.running:
            self.signal_group(signum)
            try:
                async with asyncio.timeout(grace):
                    await self._exited.wait()
            except TimeoutError:
                self.signal_group(signal.SIGKILL)
        return await self.wait()

    def kill(self) -> None:
        """Terminates the command in the background (the caller is gone or the timeout passed)."""
        if self.running and self._killer is None:
            self._killer = asyncio.create_task(self.terminate())

    def _time_out(self) -> None:
        self.timed_out = True
        self.kill()

    def _require_stdin(self) -> None:
        if not self._open_stdin:
            raise InvalidArgument("stdin is /dev/null: start the command with ExecStart.open_stdin to send input")

    async def _write_stdin(self, data: bytes) -> None:
        if self._stdin_closed and self._terminal is None:
            raise InvalidArgument("stdin was already closed by close_stdin; no input may follow it")
        # Input for a command that exited, or closed its stdin, is dropped, as a pipe would (and so not
        # an error that would end the call before the command's exit is reported).
        if not self.running:
            return
        if self._terminal is not None:
            await _write_fd(self._terminal, data)
            return
        stdin = self._process.stdin
        assert stdin is not None
        if stdin.is_closing():
            return
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass

    async def _supervise(self, pumps: list[asyncio.Task[None]], on_exit: Callable[[Command], None]) -> None:
        returncode = await self._process.leader_exited
        self.signal_group(signal.SIGKILL)
        if self._timer is not None:
            self._timer.cancel()
        # Output still in the pipes is read, however slowly the caller takes it. Only a process that
        # left the group can still hold them open: once it has been silent for DRAIN_TIMEOUT, stop.
        while True:
            sequence = self.output.next_sequence
            _, pending = await asyncio.wait(pumps, timeout=DRAIN_TIMEOUT)
            if not pending:
                break
            if self.output.next_sequence == sequence and not self.output.full:
                for pump in pending:
                    pump.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                break
        self._process.close()
        if self._terminal is not None:
            os.close(self._terminal)
        self.exit = CommandExit(
            exit_code=-1 if returncode < 0 else returncode,
            signal=-returncode if returncode < 0 else 0,
            timed_out=self.timed_out,
            duration=time.monotonic() - self._started,
        )
        self.output.finish()
        self._exited.set()
        on_exit(self)


class _LeaderProcess(asyncio.subprocess.Process):
    """A subprocess that also tells when the leader itself exits: `wait()` waits for its pipes to
    close as well, which a background child holding them can put off forever."""

    def __init__(
        self, transport: asyncio.SubprocessTransport, protocol: _LeaderProtocol, loop: asyncio.AbstractEventLoop
    ) -> None:
        super().__init__(transport, protocol, loop)
        self.leader_exited = protocol.leader_exited
        self._pipes = transport

    def close(self) -> None:
        """Closes the pipes (some process that left the group may still hold them) once the output is read."""
        self._pipes.close()


class _LeaderProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=READ_CHUNK, loop=loop)
        self.leader_exited: asyncio.Future[int] = loop.create_future()
        self._subprocess: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._subprocess = transport
        super().connection_made(transport)

    def process_exited(self) -> None:
        assert self._subprocess is not None  # connected before any exit
        returncode = self._subprocess.get_returncode()  # the parent may close the transport
        assert returncode is not None  # set before process_exited is called
        super().process_exited()
        self.leader_exited.set_result(returncode)


async def _create_process(argv: list[str], *, new_session: bool = True, **options: Any) -> _LeaderProcess:
    """Spawns `argv`, as the leader of a new session (and so of a new process group) unless `argv` makes
    itself one."""
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _LeaderProtocol(loop), *argv, start_new_session=new_session, **options
    )
    return _LeaderProcess(transport, protocol, loop)


async def _pump_pipe(pipe: asyncio.StreamReader | None, stream: OutputStream, output: OutputBuffer) -> None:
    assert pipe is not None
    while data := await pipe.read(READ_CHUNK):
        await output.append(stream, data)


async def _pump_terminal(terminal: int, output: OutputBuffer) -> None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = os.read(terminal, READ_CHUNK)
        except BlockingIOError:
            await _fd_ready(loop.add_reader, loop.remove_reader, terminal)
            continue
        except OSError as error:
            if error.errno == errno.EIO:  # every process holding the terminal is gone
                return
            raise
        if not data:
            return
        await output.append(OutputStream.PTY, data)


async def _write_fd(fd: int, data: bytes) -> None:
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _fd_ready(loop.add_writer, loop.remove_writer, fd)
        except OSError as error:
            if error.errno == errno.EIO:  # the terminal hung up: the input is dropped
                return
            raise


async def _fd_ready(add: Callable[..., None], remove: Callable[[int], bool], fd: int) -> None:
    ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(fd, wake)
    try:
        await ready
    finally:
        remove(fd)


def _set_terminal_size(terminal: int, size: PtySize) -> None:
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))
