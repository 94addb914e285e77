"""The AgentService servicer: converts requests, makes one call into the domain code, converts results."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from grpc import aio

from agent import converters as convert
from agent.activity import ActivityTracker
from agent.claim import PoolClaim
from agent.config import AgentConfig
from agent.errors import InvalidArgument
from agent.fs.edit import Editor
from agent.fs.paths import WorkspaceRoot
from agent.fs.read import Chunk, FileReader
from agent.fs.search import Searcher
from agent.fs.staging import remove_leftovers
from agent.process.manager import ProcessManager
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

if TYPE_CHECKING:  # the watcher (and inotify) load with the first WatchFiles
    from agent.fs.watch import FileWatch


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """One per server; holds the workspace root and the domain services."""

    def __init__(self, config: AgentConfig, activity: ActivityTracker, claim: PoolClaim | None = None) -> None:
        self.config = config
        self.root = WorkspaceRoot(config.root)
        remove_leftovers(self.root)  # what a killed agent left in .workspace-agent/, before any call
        self.activity = activity
        self.processes = ProcessManager(self.root, config)
        self.editor = Editor(self.root, on_write=activity.touch)
        self.searcher = Searcher(
            self.root,
            default_max_results=config.default_max_results,
            max_results_limit=config.max_results_limit,
            engine=config.search_engine,
        )
        self.reader = FileReader(self.root, max_chunk_size=config.max_chunk_size, hash_limit=config.hash_limit)
        # Without auth (no token) there is nothing to claim.
        self.pool_claim = claim or PoolClaim(None)
        self.file_watch: FileWatch | None = None

    async def close(self) -> None:
        """Stops what the servicer started (named processes) on shutdown."""
        await self.processes.close()
        if self.file_watch is not None:
            self.file_watch.close()

    # ------------------------------------------------------------ Search
    async def Search(self, request: pb.SearchRequest, context: aio.ServicerContext) -> AsyncIterator[pb.SearchResponse]:
        # Closed with this generator (at the call's end, common/interceptors.py), so rg is killed then.
        async with contextlib.aclosing(self.searcher.search(convert.search_query(request))) as events:
            async for event in events:
                yield convert.search_response(event)

    # ------------------------------------------------------------ Read
    async def Read(self, request: pb.ReadRequest, context: aio.ServicerContext) -> AsyncIterator[pb.ReadResponse]:
        async for event in self.reader.read(request.path, convert.read_range(request), request.chunk_size):
            if isinstance(event, Chunk):
                yield pb.ReadResponse(chunk=pb.ReadChunk(offset=event.offset, data=event.data))
            else:
                yield pb.ReadResponse(info=convert.file_info(event))

    # ------------------------------------------------------------ Edit
    async def Edit(self, request: pb.EditRequest, context: aio.ServicerContext) -> pb.EditResponse:
        result = await self.editor.edit(
            [convert.edit_operation(op) for op in request.operations], dry_run=request.dry_run
        )
        return convert.edit_response(result)

    # ------------------------------------------------------------ Exec and processes
    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ExecResponse]:
        # Closed with this generator (at the call's end), so the command is killed then, not when collected.
        async with contextlib.aclosing(self.processes.exec(convert.exec_requests(request_iterator))) as events:
            async for event in events:
                yield convert.exec_response(event)

    async def ListProcesses(
        self, request: pb.ListProcessesRequest, context: aio.ServicerContext
    ) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(processes=[convert.process_info(c) for c in self.processes.list()])

    async def AttachProcess(
        self, request: pb.AttachProcessRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.AttachProcessResponse]:
        async for event in self.processes.attach(request.name, request.from_sequence):
            yield convert.attach_response(event)

    async def StopProcess(self, request: pb.StopProcessRequest, context: aio.ServicerContext) -> pb.StopProcessResponse:
        signum, grace = convert.stop_request(request)
        exit = await self.processes.stop(request.name, signum, grace, request.remove)
        return pb.StopProcessResponse(exited=convert.process_exited(exit))

    # ------------------------------------------------------------ Archives
    async def ExtractArchive(
        self, request_iterator: AsyncIterator[pb.ExtractArchiveRequest], context: aio.ServicerContext
    ) -> pb.ExtractArchiveResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("request") != "spec":
            raise InvalidArgument("the first ExtractArchiveRequest must carry the spec")
        spec = first.spec
        convert.archive_format(spec.format)
        # Imported on first use, like ArchiveStream: the tar code is no part of an idle agent's memory.
        from agent.fs.extract import extract_archive

        report = await extract_archive(
            self.root,
            self.config,
            spec.destination,
            convert.archive_chunks(requests),
            mode=convert.extract_mode(spec.mode),
            expected_sha256=spec.expected_sha256,
        )
        self.activity.touch()
        return convert.extract_response(report)

    async def CreateArchive(
        self, request: pb.CreateArchiveRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.CreateArchiveResponse]:
        convert.archive_format(request.format)
        from agent.fs.archive import ArchiveStream

        archive = ArchiveStream(
            self.root,
            self.config,
            request.path,
            excludes=request.excludes,
            default_excludes=not request.no_default_excludes,
        )
        async for chunk in archive:
            yield pb.CreateArchiveResponse(chunk=chunk)
        summary = archive.summary
        assert summary is not None  # set once the stream is exhausted
        yield pb.CreateArchiveResponse(summary=convert.archive_summary(summary))

    # ------------------------------------------------------------ WatchFiles
    async def WatchFiles(
        self, request: pb.WatchFilesRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.WatchFilesResponse]:
        if self.file_watch is None:
            from agent.fs.watch import FileWatch

            self.file_watch = FileWatch(self.root, self.config)
        # Closed with this generator (at the call's end), so the stream stops counting towards the watcher's.
        async with contextlib.aclosing(self.file_watch.watch(request.path, request.since_sequence)) as events:
            async for event in events:
                yield convert.watch_response(event)

    # ------------------------------------------------------------ Activity
    async def GetActivity(self, request: pb.GetActivityRequest, context: aio.ServicerContext) -> pb.GetActivityResponse:
        return pb.GetActivityResponse(
            last_activity=convert.timestamp(self.activity.last_activity),
            open_streams=self.activity.open_streams,
            started_at=convert.timestamp(self.activity.started_at),
            running_commands=self.processes.running_commands,
            running_named_processes=self.processes.running_named_processes,
        )

    # ------------------------------------------------------------ Claim
    async def Claim(self, request: pb.ClaimRequest, context: aio.ServicerContext) -> pb.ClaimResponse:
        session_id = self.pool_claim.claim(request.token, dict(request.env), request.session_id, self.processes)
        return pb.ClaimResponse(session_id=session_id)
