"""The AgentService servicer: converts requests, makes one call into the domain code, converts results."""

from __future__ import annotations

from collections.abc import AsyncIterator

from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from agent.activity import ActivityTracker
from agent.config import AgentConfig
from agent.errors import InvalidArgument
from agent.fs.paths import WorkspaceRoot
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """One per server; holds the workspace root and the domain services."""

    def __init__(self, config: AgentConfig, activity: ActivityTracker) -> None:
        self.config = config
        self.root = WorkspaceRoot(config.root)
        self.activity = activity

    async def close(self) -> None:
        """Stops what the servicer started (named processes) on shutdown."""

    # ------------------------------------------------------------ Search (owner: fs helper)
    async def Search(self, request: pb.SearchRequest, context: aio.ServicerContext) -> AsyncIterator[pb.SearchResponse]:
        raise InvalidArgument("Search: not implemented yet")
        yield

    # ------------------------------------------------------------ Read (owner: fs helper)
    async def Read(self, request: pb.ReadRequest, context: aio.ServicerContext) -> AsyncIterator[pb.ReadResponse]:
        raise InvalidArgument("Read: not implemented yet")
        yield

    # ------------------------------------------------------------ Edit (owner: fs helper)
    async def Edit(self, request: pb.EditRequest, context: aio.ServicerContext) -> pb.EditResponse:
        raise InvalidArgument("Edit: not implemented yet")

    # ------------------------------------------------------------ Exec and processes (owner: process helper)
    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ExecResponse]:
        raise InvalidArgument("Exec: not implemented yet")
        yield

    async def ListProcesses(self, request: pb.ListProcessesRequest, context: aio.ServicerContext) -> pb.ListProcessesResponse:
        raise InvalidArgument("ListProcesses: not implemented yet")

    async def AttachProcess(
        self, request: pb.AttachProcessRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.AttachProcessResponse]:
        raise InvalidArgument("AttachProcess: not implemented yet")
        yield

    async def StopProcess(self, request: pb.StopProcessRequest, context: aio.ServicerContext) -> pb.StopProcessResponse:
        raise InvalidArgument("StopProcess: not implemented yet")

    # ------------------------------------------------------------ Archives (owner: archive helper)
    async def ExtractArchive(
        self, request_iterator: AsyncIterator[pb.ExtractArchiveRequest], context: aio.ServicerContext
    ) -> pb.ExtractArchiveResponse:
        raise InvalidArgument("ExtractArchive: not implemented yet")

    async def CreateArchive(
        self, request: pb.CreateArchiveRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.CreateArchiveResponse]:
        raise InvalidArgument("CreateArchive: not implemented yet")
        yield

    # ------------------------------------------------------------ Activity
    async def GetActivity(self, request: pb.GetActivityRequest, context: aio.ServicerContext) -> pb.GetActivityResponse:
        return pb.GetActivityResponse(
            last_activity=_timestamp(self.activity.last_activity),
            open_streams=self.activity.open_streams,
            started_at=_timestamp(self.activity.started_at),
            # running_commands / running_named_processes: filled in by the process helper.
        )
