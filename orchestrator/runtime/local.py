"""The local runtime: the agent as a subprocess of the host, rooted in a per-session directory. For development
and machines without a container engine. It is NOT a security boundary: workspace code runs as the
orchestrator's user, with its files, network and environment, and no resource limits."""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from common.constants import TOKEN_ENV
from common.durable import write_atomically
from orchestrator.errors import FailedPrecondition, InitializationFailed, WorkspaceMissing
from orchestrator.runtime.base import (
    ORCHESTRATOR_LABEL,
    SESSION_LABEL,
    Workspace,
    WorkspaceExit,
    check_session_id,
    pool_labels,
    trust_env,
    workspace_agent_env,
    workspace_labels,
)

if TYPE_CHECKING:
    from orchestrator.templates import ResourceHints

# What the image field says for a local workspace: the interpreter the agent runs on.
LOCAL_IMAGE = f"local:{sys.executable}"
STATE_FILE = "workspace.json"
# The pid in a state file written before its agent was started: the agent, if any, is found by its root.
STARTING_PID = 0
TOKEN_FILE = "agent-token"
# The agent binds port 0 and writes the port it got here: chosen by the kernel at bind time, it cannot be
# taken by another process in between (as a port probed free beforehand could, by another session's agent).
PORT_FILE = "agent-port"
# Dev servers' ports come from the PREVIEW_PORTS ports below the kernel's ephemeral range (see _preview_port); one
# handed out is not handed out again for PREVIEW_PORT_HOLD_S, by when its dev server has bound it (or failed).
PREVIEW_PORTS = 8192
PREVIEW_PORT_HOLD_S = 120.0
# How long the agent may take from spawn to serving (it takes well under a second).
AGENT_START_TIMEOUT_S = 30.0
# On SIGTERM the agent kills its commands (SIGKILL 2 s after SIGTERM) and then stops its server (grace 5 s).
STOP_GRACE_S = 10.0
# A pool member's directory is `pool-<id>`; a claim records the session in its workspace.json.
POOL_PREFIX = "pool-"
# exits() looks at the agents this often (an adopted agent is no child of ours: nothing to wait on but its pid).
EXIT_POLL_S = 0.5


class LocalRuntime:
    """Workspaces as agent subprocesses, each with its own process group, under `directory/<session id>/`
    (`directory/pool-<id>/` for a pool member, claimed or not):
    `app/` is the workspace root, `agent.log` the agent's output, `workspace.json` its pid and ports (so a
    restarted orchestrator finds and adopts agents that are still running).

    The dev server's port is a free host port handed to the workspace as $PORT (templates read $PORT,
    default 4321), so the preview is http://<host>:<that port>/ with no port mapping in between."""

    name = "local"
    token_stays_readable = False  # a file the agent removes once read

    def __init__(
        self, *, directory: Path, instance_id: str, host_address: str = "127.0.0.1", trust_bundle: Path | None = None
    ) -> None:
        self.directory = directory
        self.instance_id = instance_id
        self.host_address = host_address
        self.trust_bundle = trust_bundle
        # Agents this orchestrator started, by directory name, so stop() can reap them; adopted ones are
        # watched by pid.
        self._children: dict[str, asyncio.subprocess.Process] = {}
        # Directories stop() is taking down: their agents' exits are not reported.
        self._stopping: set[str] = set()
        # Directories whose agent is starting: an exit before it serves is the start's failure, not an exit.
        self._starting: set[str] = set()
        # Makes claims single in this process (another orchestrator on the same data directory is not supported).
        self._claiming = asyncio.Lock()
        # Dev server ports handed out lately, by when: their servers may not have bound them yet.
        self._preview_ports: dict[int, float] = {}

    def _preview_port(self) -> int:
        """A port for the dev server, which binds $PORT itself: free now, not handed to another workspace in
        the last PREVIEW_PORT_HOLD_S, and below the kernel's ephemeral range. The kernel picks port-0 binds (every
        agent's) and outgoing connections' ports from that range only, so none of them can take this one before
        the dev server binds it; only a process binding this very number can (its readiness then fails and
        the session reports it). Raises InitializationFailed when no port of PREVIEW_PORTS is free."""
        now = time.monotonic()
        self._preview_ports = {p: t for p, t in self._preview_ports.items() if now - t < PREVIEW_PORT_HOLD_S}
        low = _ephemeral_ports().start
        first = max(1024, low - PREVIEW_PORTS)
        candidates = list(range(first, low))
        random.shuffle(candidates)
        for port in candidates:
            if port not in self._preview_ports and _bindable(self.host_address, port):
                self._preview_ports[port] = now
                return port
        raise InitializationFailed(f"no free port for a dev server in {first}-{low - 1}")

    async def start(
        self, session_id: str, token: str, *, resources: ResourceHints, env: dict[str, str], labels: dict[str, str]
    ) -> Workspace:
        """Starts the agent; `resources` are not enforced (no isolation). Raises InvalidArgument (bad id),
        FailedPrecondition (a workspace of that session is running)."""
        check_session_id(session_id)
        existing = await asyncio.to_thread(self._session_dir, session_id)
        if existing is not None and await asyncio.to_thread(self._running, existing):
            raise FailedPrecondition(f"a local workspace of session {session_id} is already running")
        labels = workspace_labels(self.instance_id, session_id, labels)
        return await self._launch(session_id, session_id, token, {**workspace_agent_env(session_id), **env}, labels)

    async def start_pooled(
        self,
        pool_id: str,
        credential: str,
        *,
        kind: str = "warm",
        labels: dict[str, str] | None = None,
        resources: ResourceHints | None = None,
    ) -> Workspace:
        """Starts a pool member's agent under `pool-<pool_id>/` (`resources` are not enforced). Raises InvalidArgument (bad id),
        FailedPrecondition (that member runs already)."""
        check_session_id(pool_id)
        name = f"{POOL_PREFIX}{pool_id}"
        if await asyncio.to_thread(self._running, self.directory / name):
            raise FailedPrecondition(f"a local pool member {pool_id} is already running")
        environment = workspace_agent_env(name)
        return await self._launch(name, "", credential, environment, pool_labels(self.instance_id, kind, labels))

    async def image_id(self) -> str:
        """This Python and its agent: there is no image to rebuild."""
        return LOCAL_IMAGE

    async def claim(self, workspace: Workspace, session_id: str, *, resources: ResourceHints) -> Workspace:
        """Records `session_id` in the member's workspace.json (an atomic replace, under a lock: a member is
        claimed once); `resources` are not enforced. Raises FailedPrecondition (claimed already, or its agent
        is gone), InvalidArgument (bad session id)."""
        check_session_id(session_id)
        session_dir = self.directory / f"{POOL_PREFIX}{workspace.pool_id}"
        async with self._claiming:
            state = await asyncio.to_thread(_read_json, session_dir / STATE_FILE)
            if not workspace.pool_id or state is None or state.get("session_id"):
                raise FailedPrecondition(f"the pool member {workspace.pool_id or workspace.handle} is claimed already")
            if await asyncio.to_thread(_agent_pid, state, session_dir / "app") is None:
                raise FailedPrecondition(f"the pool member {workspace.pool_id}'s agent is not running")
            state["session_id"] = session_id
            await asyncio.to_thread(_write_json, session_dir / STATE_FILE, state)
        return self._workspace(state, session_dir.name, running=True)

    async def discard(self, pool_id: str) -> None:
        """Stops an unclaimed pool member and removes its directory."""
        check_session_id(pool_id)
        name = f"{POOL_PREFIX}{pool_id}"
        state = await asyncio.to_thread(_read_json, self.directory / name / STATE_FILE)
        if state is None or not state.get("session_id"):
            await self._remove(name)

    async def _launch(
        self, name: str, session_id: str, token: str, env: dict[str, str], labels: dict[str, str]
    ) -> Workspace:
        session_dir = self.directory / name
        root = session_dir / "app"
        await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
        preview_port = self._preview_port()
        inherited = {key: value for key, value in os.environ.items() if key != TOKEN_ENV}
        environment = {**inherited, **env, "PORT": str(preview_port)}
        token_file = await asyncio.to_thread(_write_token, session_dir, token)
        port_file = session_dir / PORT_FILE
        port_file.unlink(missing_ok=True)  # left by an earlier agent of this session
        if self.trust_bundle is not None:
            environment.update(trust_env(str(self.trust_bundle)))
        state_file = session_dir / STATE_FILE
        earlier = await asyncio.to_thread(_read_json, state_file)  # a paused session's, when resuming
        state = {
            "session_id": session_id,
            "pid": STARTING_PID,
            "agent_endpoint": "",  # known once it serves
            "preview_port": preview_port,
            "preview_url": f"http://{self.host_address}:{preview_port}/",
            "labels": labels,
        }
        self._starting.add(name)
        try:
            # Written before the agent exists: an orchestrator killed at any point of the start leaves a workspace
            # that list() shows (its agent found by its root until its pid is recorded) and a restart removes or a
            # pool discards, never an agent that no state file names.
            await asyncio.to_thread(_write_json, state_file, state)
            try:
                process = await self._spawn(session_dir, token_file, port_file, root, environment)
                self._children[name] = process
                state["pid"] = process.pid
                await asyncio.to_thread(_write_json, state_file, state)
                agent_port = await _serving_port(process, port_file, session_dir / "agent.log")
            except (OSError, InitializationFailed):
                # No agent is left (_serving_port killed its group): the state file is as before this start.
                await asyncio.to_thread(_restore_json, state_file, earlier)
                raise
            state["agent_endpoint"] = f"{self.host_address}:{agent_port}"
            await asyncio.to_thread(_write_json, state_file, state)
        finally:
            self._starting.discard(name)
        return self._workspace(state, name, running=True)

    async def _spawn(
        self, session_dir: Path, token_file: Path, port_file: Path, root: Path, environment: dict[str, str]
    ) -> asyncio.subprocess.Process:
        # The working directory is not the workspace root: `python -m` puts it first on sys.path, and a
        # workspace may well hold a package named `agent`.
        with open(session_dir / "agent.log", "ab") as log:
            return await asyncio.create_subprocess_exec(
                # --root last: _is_agent recognises the agent by it.
                sys.executable, "-m", "agent", "--token-file", str(token_file), "--port-file", str(port_file),
                "--listen", f"{self.host_address}:0", "--root", str(root),
                cwd=session_dir, env=environment, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # its own process group, outside the orchestrator's terminal signals
            )  # fmt: skip

    async def stop(self, session_id: str) -> None:
        """SIGTERM to the agent's group (the agent then stops its named processes), SIGKILL after a grace
        period, then SIGKILL to any process group the agent had started that is still there; removes the
        session directory."""
        check_session_id(session_id)
        session_dir = await asyncio.to_thread(self._session_dir, session_id)
        if session_dir is not None:
            await self._remove(session_dir.name)

    async def _remove(self, name: str) -> None:
        session_dir = self.directory / name
        self._stopping.add(name)
        try:
            await self._kill(name, await asyncio.to_thread(_read_json, session_dir / STATE_FILE))
            await asyncio.to_thread(shutil.rmtree, session_dir, ignore_errors=True)
        finally:
            self._stopping.discard(name)

    async def _kill(self, name: str, state: dict | None) -> None:
        """Ends the agent of the directory `name` and everything it started, the caller marking it stopping."""
        session_dir = self.directory / name
        child = self._children.pop(name, None)
        pid = None if state is None else await asyncio.to_thread(_agent_pid, state, session_dir / "app")
        if pid is not None:
            groups = await asyncio.to_thread(_descendant_groups, pid)
            _signal_group(pid, signal.SIGTERM)
            if not await _exited(pid, child, STOP_GRACE_S):
                _signal_group(pid, signal.SIGKILL)
                await _exited(pid, child, STOP_GRACE_S)
            for group in groups:
                _signal_group(group, signal.SIGKILL)

    async def pause(self, session_id: str) -> None:
        """Ends the session's agent and everything it started as stop() does, keeping the directory; its
        workspace.json says `paused`, so exits() does not take the agent's end for an exit (also after a restart).
        Raises WorkspaceMissing."""
        check_session_id(session_id)
        session_dir = await asyncio.to_thread(self._session_dir, session_id)
        state = None if session_dir is None else await asyncio.to_thread(_read_json, session_dir / STATE_FILE)
        if session_dir is None or state is None:
            raise WorkspaceMissing(f"session {session_id} has no local workspace")
        self._stopping.add(session_dir.name)
        try:
            state["paused"] = True
            await asyncio.to_thread(_write_json, session_dir / STATE_FILE, state)
            await self._kill(session_dir.name, state)
        finally:
            self._stopping.discard(session_dir.name)

    async def resume(self, session_id: str, token: str, *, env: dict[str, str]) -> Workspace:
        """Starts an agent again in the paused session's directory (new ports; `token` in a new token file).
        Raises WorkspaceMissing (its directory is gone), InitializationFailed (the agent did not serve)."""
        check_session_id(session_id)
        session_dir = await asyncio.to_thread(self._session_dir, session_id)
        state = None if session_dir is None else await asyncio.to_thread(_read_json, session_dir / STATE_FILE)
        if session_dir is None or state is None or not (session_dir / "app").is_dir():
            raise WorkspaceMissing(f"session {session_id}'s local workspace is gone")
        name = session_dir.name
        self._stopping.add(name)
        try:
            await self._kill(name, state)  # in case it runs (started by hand): one agent per root
        finally:
            self._stopping.discard(name)
        environment = {**workspace_agent_env(session_id), **env}
        # The state file _launch writes has no `paused`: from now on its agent's exit is reported again.
        return await self._launch(name, state.get("session_id", ""), token, environment, state["labels"])

    async def list(self) -> list[Workspace]:
        """This instance's workspaces from their state files; `running` is whether the agent still is."""
        return await asyncio.to_thread(self._list)

    async def exits(self) -> AsyncIterator[WorkspaceExit]:
        """This instance's agents that exit other than through stop(), found by looking at their pids every
        EXIT_POLL_S; the exit status is known for agents this runtime started (an adopted one is no child)."""
        reported: set[tuple[str, str]] = set()
        while True:
            listed = await asyncio.to_thread(self._listed)
            present = {(workspace.session_id, workspace.handle) for _, workspace, _ in listed}
            reported &= present
            for name, workspace, paused in listed:
                key = (workspace.session_id, workspace.handle)
                if workspace.running or paused or key in reported or name in self._stopping or name in self._starting:
                    continue
                reported.add(key)
                yield WorkspaceExit(workspace.session_id, workspace.handle, await self._exit_reason(name, workspace))
            await asyncio.sleep(EXIT_POLL_S)

    async def _exit_reason(self, name: str, workspace: Workspace) -> str:
        child = self._children.get(name)
        if child is None or str(child.pid) != workspace.handle:
            return "the agent process exited"
        try:
            # Gone from /proc's point of view (a zombie) before asyncio has reaped it and knows its status.
            code = await asyncio.wait_for(child.wait(), STOP_GRACE_S)
        except TimeoutError:
            return "the agent process exited"
        if code < 0:
            try:
                return f"the agent process was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"the agent process was killed by signal {-code}"
        return f"the agent process exited with code {code}"

    async def close(self) -> None:
        """Leaves the agents running: a restarted orchestrator adopts them from their state files."""
        self._children.clear()

    def _list(self) -> builtins.list[Workspace]:
        return [workspace for _, workspace, _ in self._listed()]

    def _listed(self) -> builtins.list[tuple[str, Workspace, bool]]:
        """This instance's workspaces with their directory names, and whether each is paused."""
        workspaces = []
        for path in sorted(self.directory.glob(f"*/{STATE_FILE}")):
            state = _read_json(path)
            if state is None or state["labels"].get(ORCHESTRATOR_LABEL) != self.instance_id:
                continue
            name = path.parent.name
            pid = _agent_pid(state, path.parent / "app")
            running = pid is not None
            if pid is not None:
                state["pid"] = pid  # found by its root, when its start was cut short before its pid was recorded
            workspaces.append((name, self._workspace(state, name, running=running), bool(state.get("paused"))))
        return workspaces

    def _session_dir(self, session_id: str) -> Path | None:
        """The directory of the session's workspace: its own, or the pool member a claim gave it."""
        if (self.directory / session_id).exists():
            return self.directory / session_id
        for name, workspace, _ in self._listed():
            if workspace.session_id == session_id:
                return self.directory / name
        return None

    def _running(self, session_dir: Path) -> bool:
        state = _read_json(session_dir / STATE_FILE)
        return state is not None and _agent_pid(state, session_dir / "app") is not None

    def _workspace(self, state: dict, name: str, *, running: bool) -> Workspace:
        session_id = state.get("session_id") or state["labels"].get(SESSION_LABEL, "")
        return Workspace(
            session_id=session_id,
            runtime=self.name,
            handle=str(state["pid"]),
            agent_endpoint=state["agent_endpoint"],
            preview_port=state["preview_port"],
            preview_url=state["preview_url"],
            image=LOCAL_IMAGE,
            running=running,
            labels=state["labels"],
            pool_id=name.removeprefix(POOL_PREFIX) if not session_id and name.startswith(POOL_PREFIX) else "",
        )


async def _serving_port(process: asyncio.subprocess.Process, port_file: Path, log: Path) -> int:
    """The port the agent reports in `port_file` once it serves. Raises InitializationFailed (its process
    group killed) when it exits first or does not serve within AGENT_START_TIMEOUT_S."""
    deadline = time.monotonic() + AGENT_START_TIMEOUT_S
    while process.returncode is None and time.monotonic() < deadline:
        with suppress(FileNotFoundError):
            return int(await asyncio.to_thread(port_file.read_text))
        with suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), 0.01)
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGKILL)
        await process.wait()
        raise InitializationFailed(f"the agent did not serve within {AGENT_START_TIMEOUT_S:.0f} s")
    last = await asyncio.to_thread(_last_line, log)
    raise InitializationFailed(f"the agent exited with code {process.returncode} before serving: {last}")


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def _ephemeral_ports() -> range:
    """The ports the kernel picks from for port-0 binds and outgoing connections (Linux's default range
    where it cannot be read)."""
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _write_token(session_dir: Path, token: str) -> Path:
    """The token in a file only our user can read, beside the workspace root; the agent removes it once read."""
    path = session_dir / TOKEN_FILE
    with suppress(FileNotFoundError):
        path.unlink()  # left by an agent that never started
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    return path


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2))


def _restore_json(path: Path, data: dict | None) -> None:
    """Puts `data` back in `path`, or removes it when there was none."""
    if data is None:
        path.unlink(missing_ok=True)
    else:
        _write_json(path, data)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    """The command line of `pid`; [] when it is gone, a zombie, or not ours to see."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _is_agent(pid: int, root: Path) -> bool:
    """The process `pid` is alive and is the agent serving `root`: a recycled pid is never mistaken for it
    (nor is a zombie, whose command line is empty)."""
    command = _cmdline(pid)
    return command[1:3] == ["-m", "agent"] and command[-2:] == ["--root", str(root)]


def _agent_pid(state: dict, root: Path) -> int | None:
    """The pid of the agent serving `root` that `state` records, if it runs. A start cut short before the pid was
    recorded (STARTING_PID) may have left its agent running: it is looked for among the processes."""
    if state["pid"] != STARTING_PID:
        return state["pid"] if _is_agent(state["pid"], root) else None
    return next((process.pid for process in psutil.process_iter() if _is_agent(process.pid, root)), None)


def _descendant_groups(pid: int) -> set[int]:
    """Process groups of everything below `pid` (the agent's commands each run in a group of their own)."""
    try:
        below = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return set()
    groups = set()
    for process in below:
        with suppress(ProcessLookupError):  # exited since
            groups.add(os.getpgid(process.pid))
    return groups - {pid}


def _signal_group(group: int, sig: signal.Signals) -> None:
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


async def _exited(pid: int, child: asyncio.subprocess.Process | None, timeout: float) -> bool:
    """Waits up to `timeout` for `pid` to exit: through our Process when we started it (which also reaps it),
    else by polling (an adopted agent is not our child and is reaped by init)."""
    if child is not None:
        try:
            await asyncio.wait_for(child.wait(), timeout)
            return True
        except TimeoutError:
            return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _ended(pid):
            return True
        await asyncio.sleep(0.05)
    return False


def _ended(pid: int) -> bool:
    """The process is gone or a zombie. (Its command line empties earlier, while it is still exiting.)"""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True
