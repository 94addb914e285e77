"""A live session (its record, workspace, agent client, recent output) and the fan-out of its events to
watchers; the session states and the small helpers every sessions module shares."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator.agent_client import AgentClient
from orchestrator.errors import FailedPrecondition
from orchestrator.runtime import Workspace
from orchestrator.runtime.base import WorkspaceExit
from orchestrator.templates import TemplateSpec
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

PENDING, STARTING, READY = pb.SESSION_STATE_PENDING, pb.SESSION_STATE_STARTING, pb.SESSION_STATE_READY
FAILED, STOPPING, STOPPED = pb.SESSION_STATE_FAILED, pb.SESSION_STATE_STOPPING, pb.SESSION_STATE_STOPPED
PAUSED = pb.SESSION_STATE_PAUSED
# A watch ends once the session reaches one of these.
SETTLED = frozenset({READY, FAILED, STOPPED, PAUSED})
# Sessions holding a running workspace (or about to): they count against max_sessions.
LIVE_STATES = (PENDING, STARTING, READY, STOPPING, FAILED)
# Sessions this orchestrator keeps a record and a workspace of: the live ones and the paused ones (whose stopped
# workspace holds their files but no CPU or memory, so they do not count against max_sessions).
HELD_STATES = (*LIVE_STATES, PAUSED)

MAX_LINE_CHARS = 4096
# A watcher this many events behind is sent a fresh snapshot instead of what it missed.
WATCH_QUEUE_EVENTS = 1024


def timestamp_now() -> Timestamp:
    stamp = Timestamp()
    stamp.GetCurrentTime()
    return stamp


def reason_of(error: BaseException) -> str:
    """A one-line cause a person can act on."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"agent answered {error.code().name}: {error.details()}"
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    return str(error) or type(error).__name__


class Lagged:
    """Put in a watcher's queue in place of events it could not keep up with."""


LAGGED = Lagged()


class LiveSession:
    """A session this orchestrator holds a workspace for: its record, workspace and agent client, its
    recent output, and the queues of its watchers."""

    def __init__(self, session: pb.Session, template: TemplateSpec | None, history_lines: int) -> None:
        self.session = session
        self.template = template
        self.workspace: Workspace | None = None
        self.agent: AgentClient | None = None
        self.output: deque[pb.OutputLine] = deque(maxlen=history_lines)
        self.watchers: set[asyncio.Queue[pb.WatchSessionResponse | Lagged]] = set()
        self.initialization: asyncio.Task[None] | None = None
        # Keeping its node_modules in the install cache, after READY: a delete waits for it.
        self.install_store: asyncio.Task[None] | None = None
        # Set when its workspace stopped running by itself (or was removed behind our back).
        self.exited: WorkspaceExit | None = None
        # Wall time of the last request or WebSocket frame of its preview through the gateway: activity too.
        self.preview_activity = 0.0
        # Serializes save, delete and reaping of this session.
        self.lock = asyncio.Lock()
        # Set when the store writes in the background (PostgreSQL): runs a callback once every write made so far
        # is in. Watchers are then told of a change only once it is written, so what a watcher saw, any replica
        # reads; `view` is the session as last written and told.
        self.after_write: Callable[[Callable[[], None]], None] | None = None
        self.view: pb.Session | None = None

    def current(self) -> pb.Session:
        """The session as watchers know it: as last written when writes are in the background, else the record."""
        return self.view if self.view is not None else self.session

    @property
    def connected_agent(self) -> AgentClient:
        """The agent client, for the steps that come after the workspace started (raises before that)."""
        if self.agent is None:
            raise FailedPrecondition(f"session {self.session.id} has no workspace agent yet")
        return self.agent

    def publish(self, event: pb.WatchSessionResponse) -> None:
        for queue in self.watchers:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                queue.get_nowait()
                while not queue.empty():  # drop the backlog: a snapshot replaces it
                    queue.get_nowait()
                queue.put_nowait(LAGGED)

    def snapshot(self) -> list[pb.WatchSessionResponse]:
        """The session now, its phases so far, and its recent output lines."""
        session = self.current()
        events = [pb.WatchSessionResponse(session=session)]
        events += [pb.WatchSessionResponse(phase=phase) for phase in session.phases]
        events += [pb.WatchSessionResponse(output=line) for line in self.output]
        # Copies: the record keeps changing while the events wait to be sent.
        return [copy_event(event) for event in events]

    def line_sink(self, phase: pb.Phase.ValueType) -> Callable[[str, bool], None]:
        """A callback for the agent client: records and publishes one output line of `phase`."""

        def on_line(text: str, stderr: bool) -> None:
            line = pb.OutputLine(phase=phase, text=text[:MAX_LINE_CHARS], stderr=stderr)

            def tell() -> None:
                self.output.append(line)
                self.publish(pb.WatchSessionResponse(output=line))

            # In order with the phase and state changes around it.
            if self.after_write is not None:
                self.after_write(tell)
            else:
                tell()

        return on_line


def copy_event(event: pb.WatchSessionResponse) -> pb.WatchSessionResponse:
    copy = pb.WatchSessionResponse()
    copy.CopyFrom(event)
    return copy


def copied(session: pb.Session) -> pb.Session:
    copy = pb.Session()
    copy.CopyFrom(session)
    return copy
