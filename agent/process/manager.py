"""Starts commands for Exec calls, enforces the concurrency cap, and keeps the named long-running processes."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass

from agent.config import AgentConfig
from agent.errors import AgentError, AlreadyExists, InvalidArgument, LimitExceeded, NotFound, PreconditionFailed
from agent.fs.paths import WorkingDirectory, WorkspaceRoot
from agent.process.command import KILL_GRACE, Command, CommandExit, CommandSpec, Control, PtySize, caller_signal
from agent.process.output import OutputBuffer, OutputChunk
from common import telemetry

# Output a one-shot command may have read ahead of its caller before the command is made to wait.
EXEC_BUFFER_BYTES = 256 * 1024
# StopProcess waits this long between its signal and SIGKILL unless told otherwise.
STOP_GRACE = 5.0
PROCESS_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Linux's limit on one argument or environment string, its terminating NUL included (MAX_ARG_STRLEN,
# 32 pages); the whole command line and environment together are bounded by ARG_MAX.
MAX_ARG_STRLEN = 32 * 4096


@dataclass(frozen=True)
class Started:
    pid: int
    name: str


@dataclass(frozen=True)
class Attached:
    process: Command
    missed_chunks: int


ExecEvent = Started | OutputChunk | CommandExit
AttachEvent = Attached | OutputChunk | CommandExit


class ProcessManager:
    """Every command the agent runs. One-shot commands live as long as their Exec call; named
    processes outlive it and are kept (running or exited) until stopped with `remove` or replaced."""

    def __init__(self, root: WorkspaceRoot, config: AgentConfig) -> None:
        self._root = root
        self._config = config
        self._running: set[Command] = set()
        self._starting = 0  # slots held by commands being spawned, so concurrent starts respect the cap
        self._named: dict[str, Command] = {}
        self._names_starting: set[str] = set()
        # Added to every command's environment (under its own `env`): a claimed pooled workspace's (Claim).
        self.environment: dict[str, str] = {}

    @property
    def running_commands(self) -> int:
        return len(self._running)

    @property
    def running_named_processes(self) -> int:
        return sum(1 for command in self._named.values() if command.running)

    async def exec(self, requests: AsyncIterator[CommandSpec | Control]) -> AsyncGenerator[ExecEvent, None]:
        """Runs the command of the first request, applies the later ones to it, and streams what happens.

        When the caller leaves early, a one-shot command's process group is killed; a named process
        keeps running. Raises InvalidArgument, NotFound, PathEscapesRoot, AlreadyExists, LimitExceeded,
        and InvalidArgument for a later request that does not fit the command (which ends the call).
        """
        spec = await anext(requests, None)
        if not isinstance(spec, CommandSpec):
            raise InvalidArgument("the first Exec message must be `start`")
        command = await self.start(spec)
        # Nothing is awaited from here to the `try`: whatever ends the call after the spawn reaches the `finally`.
        follower = command.output.follow(0)

        async def apply_controls() -> None:
            try:
                async for control in requests:
                    if isinstance(control, CommandSpec):
                        raise InvalidArgument("`start` may only be the first Exec message")
                    await command.apply(control)
            except Exception as error:  # noqa: BLE001 - ends the call with it (mapped or logged there)
                follower.abort(error)

        controls = asyncio.create_task(apply_controls())
        try:
            yield Started(command.pid, command.name)
            async for chunk in follower:
                yield chunk
            yield await command.wait()
        finally:
            controls.cancel()
            if command.name:
                command.release_stdin()
            else:
                command.output.abandon()
                command.kill()

    async def start(self, spec: CommandSpec) -> Command:
        """Spawns a command (named or not) and registers it; raises as `exec` does."""
        argv = _argv(spec)
        if spec.name and not PROCESS_NAME.fullmatch(spec.name):
            raise InvalidArgument(f"process name {spec.name!r}: use 1 to 64 letters, digits, '-', '_' or '.'")
        cwd = self._root.working_directory(spec.cwd)  # opened beneath the root, so no swapped-in link leads out
        if spec.timeout is not None and spec.timeout < 0:
            raise InvalidArgument("timeout must not be negative")
        env = _environment({**self.environment, **(spec.env or {})})
        _require_executable(argv[0], cwd, env)
        pty = spec.pty.checked() if spec.pty else None
        if spec.name and (spec.name in self._names_starting or self._is_running(spec.name)):
            raise AlreadyExists(f"a process named {spec.name!r} is running; stop it first (StopProcess)")
        limit = self._config.max_concurrent_commands
        if len(self._running) + self._starting >= limit:
            raise LimitExceeded(f"{limit} commands are running, the most allowed; wait for one to finish")

        spawning = asyncio.ensure_future(self._spawn(spec, argv, cwd, env, pty))
        try:
            # Shielded: a call cancelled while the process is being spawned must not leave it running
            # unregistered (the exec may already have happened); once spawned, it is taken down.
            return await asyncio.shield(spawning)
        except asyncio.CancelledError:
            spawning.add_done_callback(self._discard_spawned)
            raise

    async def _spawn(
        self, spec: CommandSpec, argv: list[str], cwd: WorkingDirectory, env: dict[str, str] | None, pty: PtySize | None
    ) -> Command:
        """Spawns and registers a command, holding its slot (and name) meanwhile."""
        self._starting += 1
        if spec.name:
            self._names_starting.add(spec.name)
        try:
            command = await Command.spawn(
                argv,
                cwd=cwd,
                display_cwd=cwd.relative,
                env=env,
                pty=pty,
                open_stdin=spec.open_stdin,
                name=spec.name,
                output=_output_buffer(spec.name, self._config),
                timeout=None if spec.name else spec.timeout,
                on_exit=self._running.discard,
            )
        except OSError as error:
            raise _spawn_error(error, argv, env) from error
        finally:
            self._starting -= 1
            self._names_starting.discard(spec.name)
        self._running.add(command)
        if spec.name:
            self._named.pop(spec.name, None)  # an exited process of that name is replaced
            self._named[spec.name] = command
        return command

    def _discard_spawned(self, spawning: asyncio.Future[Command]) -> None:
        """Kills (with its group) a command whose call was cancelled while it was spawned: the caller never
        learned it started, so nobody could stop it."""
        if spawning.cancelled() or spawning.exception() is not None:
            return
        command = spawning.result()
        if command.name and self._named.get(command.name) is command:
            del self._named[command.name]
        command.output.abandon()
        command.kill()

    def list(self) -> list[Command]:
        """The named processes, oldest first."""
        return list(self._named.values())

    async def attach(self, name: str, from_sequence: int) -> AsyncGenerator[AttachEvent, None]:
        """`Attached`, the buffered output from `from_sequence`, then live output until the process exits
        (then its exit). Raises NotFound, InvalidArgument (a sequence the process has not reached)."""
        command = self._get(name)
        if from_sequence > command.output.next_sequence:
            raise InvalidArgument(
                f"from_sequence {from_sequence} is past the output of {name!r} (next sequence:"
                f" {command.output.next_sequence}); was the process replaced?"
            )
        follower = command.output.follow(from_sequence)
        yield Attached(command, follower.missed)
        async for chunk in follower:
            yield chunk
        yield await command.wait()

    async def stop(self, name: str, signum: int | None, grace: float | None, remove: bool) -> CommandExit:
        """Stops a named process (signal to its group, SIGKILL after `grace`) and returns how it ended.
        Raises NotFound, InvalidArgument (a signal a caller may not send, a negative grace period)."""
        command = self._get(name)
        if grace is not None and grace < 0:
            raise InvalidArgument("grace_period must not be negative")
        signum = signal.SIGTERM if signum is None else caller_signal(signum)
        exit = await command.terminate(signum, STOP_GRACE if grace is None else grace)
        if remove and self._named.get(name) is command:
            del self._named[name]
        return exit

    async def close(self) -> None:
        """Kills every command still running (the agent is shutting down)."""
        running = list(self._running)
        for command in running:
            # Output a slow caller has not taken yet must not hold up the agent's exit.
            command.output.abandon()
        await asyncio.gather(*(command.terminate(grace=KILL_GRACE) for command in running))

    def _get(self, name: str) -> Command:
        command = self._named.get(name)
        if command is None:
            raise NotFound(f"no process named {name!r}")
        return command

    def _is_running(self, name: str) -> bool:
        command = self._named.get(name)
        return command is not None and command.running


def _argv(spec: CommandSpec) -> list[str]:
    if spec.argv and spec.shell:
        raise InvalidArgument("give either argv or shell, not both")
    argv = list(spec.argv) if spec.argv else ["/bin/sh", "-c", spec.shell] if spec.shell else []
    if not argv or not argv[0]:
        raise InvalidArgument("no command: set argv or shell")
    if any("\x00" in arg for arg in argv):
        raise InvalidArgument("the command contains a NUL byte")
    return argv


def _environment(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    """The agent's environment with the calling span's TRACEPARENT (while tracing) and the caller's additions;
    None (inherit as is) when there are none."""
    trace_context = telemetry.trace_env()
    if not extra and not trace_context:
        return None
    for key, value in (extra or {}).items():
        if not key or "=" in key or "\x00" in key or "\x00" in value:
            raise InvalidArgument(
                f"environment variable {key!r}: names must be non-empty without '=', and no NUL bytes"
            )
    return {**os.environ, **trace_context, **(extra or {})}


def _require_executable(program: str, cwd: os.PathLike[str], env: dict[str, str] | None) -> None:
    """Raises NotFound unless `program` is an executable file: a path (relative to the command's cwd)
    or a name on the command's PATH; InvalidArgument for a path no file can have."""
    if "/" in program:
        path = os.path.join(cwd, program)
        _require_path_fits(program, path)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise NotFound(f"{program!r}: no such executable file")
        return
    search_path = (env if env is not None else os.environ).get("PATH", os.defpath)
    if shutil.which(program, path=search_path) is None:
        raise NotFound(f"{program!r}: command not found on PATH ({search_path})")


def _require_path_fits(program: str, path: str) -> None:
    """Raises InvalidArgument for a program path longer than any path can be (ENAMETOOLONG at exec)."""
    name_max = os.pathconf("/", "PC_NAME_MAX")
    if any(len(os.fsencode(part)) > name_max for part in program.split("/")):
        raise InvalidArgument(
            f"program path {_shorten(program)}: a path component is longer than {name_max} bytes (NAME_MAX)"
        )
    path_max = os.pathconf("/", "PC_PATH_MAX")
    if len(os.fsencode(path)) >= path_max:
        raise InvalidArgument(
            f"program path {_shorten(program)}: longer than the {path_max} bytes a path may have (PATH_MAX),"
            " counted from the filesystem root"
        )


def _spawn_error(error: OSError, argv: list[str], env: dict[str, str] | None) -> AgentError:
    """The domain error for an OSError from spawning `argv`, in the caller's terms (no agent paths)."""
    program = _shorten(argv[0])
    match error.errno:
        case errno.E2BIG:
            return InvalidArgument(_too_long(argv, env))
        case errno.ENOENT | errno.EACCES | errno.ENOTDIR | errno.EPERM:
            return NotFound(f"cannot run {program}: {error.strerror}")
        case errno.ENAMETOOLONG | errno.ELOOP:
            return InvalidArgument(f"cannot run {program}: {error.strerror}")
        case errno.ENOEXEC:
            return PreconditionFailed(f"cannot run {program}: not an executable format (a script needs a #! line)")
        case errno.ETXTBSY:
            return PreconditionFailed(f"cannot run {program}: the file is open for writing")
        case errno.EMFILE | errno.ENFILE | errno.EAGAIN | errno.ENOMEM | errno.ENOSPC:
            return LimitExceeded(f"cannot start {program}: {error.strerror}; try again when fewer commands run")
    return PreconditionFailed(f"cannot run {program}: {error.strerror or error}")


def _too_long(argv: list[str], env: dict[str, str] | None) -> str:
    """Which limit a command line over the kernel's (E2BIG) broke, and how far."""
    environment = os.environ if env is None else env
    strings = [
        *(("argument", str(index), arg) for index, arg in enumerate(argv)),
        *(("environment variable", key, f"{key}={value}") for key, value in environment.items()),
    ]
    for kind, which, text in strings:
        size = len(os.fsencode(text)) + 1
        if size > MAX_ARG_STRLEN:
            return (
                f"{kind} {which} is {size} bytes; Linux allows at most {MAX_ARG_STRLEN} bytes (MAX_ARG_STRLEN) in one"
                " argument or environment string: pass large data on stdin or in a file"
            )
    total = sum(len(os.fsencode(text)) + 1 + 8 for _, _, text in strings)  # and a pointer to each
    return (
        f"the command line and environment take {total} bytes; Linux allows at most {os.sysconf('SC_ARG_MAX')}"
        " bytes (ARG_MAX) together: pass large data on stdin or in a file"
    )


def _shorten(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else f"{text[:limit]}...")


def _output_buffer(name: str, config: AgentConfig) -> OutputBuffer:
    if name:
        return OutputBuffer(config.process_buffer_bytes, evict_oldest=True)
    return OutputBuffer(EXEC_BUFFER_BYTES, evict_oldest=False)
