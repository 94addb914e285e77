"""The AgentService servicer: converts requests, makes one call into the domain code, converts results."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from agent.activity import ActivityTracker
from agent.claim import PoolClaim
from agent.config import AgentConfig
from agent.errors import InvalidArgument
from agent.fs import edit
from agent.fs.edit import Editor
from agent.fs.archive import ArchiveStream
from agent.fs.extract import ExtractMode, extract_archive
from agent.fs.paths import WorkspaceRoot
from agent.fs.staging import remove_leftovers
from agent.fs.read import ByteRange, Chunk, FileReader, LineRange
from agent.fs.search import Context, Hit, Match, Searcher, SearchQuery, Summary
from agent.process import messages
from agent.process.manager import ProcessManager
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _search_hit(hit: Hit) -> pb.SearchHit:
    if isinstance(hit, Match):
        submatches = [pb.SearchSubmatch(start=start, end=end) for start, end in hit.submatches]
        return pb.SearchHit(
            match=pb.SearchMatch(
                path=hit.path,
                line_number=hit.line_number,
                line=hit.line,
                submatches=submatches,
                line_truncated=hit.line_truncated,
            )
        )
    if isinstance(hit, Context):
        return pb.SearchHit(context=pb.SearchContext(path=hit.path, line_number=hit.line_number, line=hit.line))
    return pb.SearchHit(file=pb.SearchFile(path=hit.path, size=hit.size))


def _edit_operation(op: pb.EditOperation) -> edit.Operation:
    which = op.WhichOneof("operation")
    if which == "write":
        w = op.write
        return edit.WriteFile(w.path, w.content, w.create_only, w.expected_sha256, w.mode)
    if which == "replace":
        r = op.replace
        return edit.ReplaceText(r.path, r.old_text, r.new_text, r.expected_occurrences, r.expected_sha256)
    if which == "insert":
        i = op.insert
        return edit.InsertText(i.path, i.line, i.text, i.expected_sha256)
    if which == "delete":
        d = op.delete
        return edit.DeletePath(d.path, d.recursive, d.expected_sha256)
    if which == "move":
        m = op.move
        return edit.MovePath(m.from_path, m.to_path, m.overwrite, m.expected_sha256)
    if which == "make_directory":
        return edit.MakeDirectory(op.make_directory.path)
    raise InvalidArgument("an edit operation has none of write, replace, insert, delete, move, make_directory set")


_EXTRACT_MODES = {
    pb.EXTRACT_MODE_UNSPECIFIED: ExtractMode.REPLACE,
    pb.EXTRACT_MODE_REPLACE: ExtractMode.REPLACE,
    pb.EXTRACT_MODE_MERGE: ExtractMode.MERGE,
}


async def _archive_chunks(requests: AsyncIterator[pb.ExtractArchiveRequest]) -> AsyncIterator[bytes]:
    """The archive bytes of an ExtractArchive call, after its spec."""
    async for request in requests:
        if request.WhichOneof("request") != "chunk":
            raise InvalidArgument("only the first ExtractArchiveRequest may carry a spec; later ones carry chunks")
        yield request.chunk


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

    async def close(self) -> None:
        """Stops what the servicer started (named processes) on shutdown."""
        await self.processes.close()

    # ------------------------------------------------------------ Search
    async def Search(self, request: pb.SearchRequest, context: aio.ServicerContext) -> AsyncIterator[pb.SearchResponse]:
        query = SearchQuery(
            path=request.path,
            pattern=request.pattern,
            regex=request.regex,
            ignore_case=request.ignore_case,
            include_globs=tuple(request.include_globs),
            exclude_globs=tuple(request.exclude_globs),
            no_ignore=request.no_ignore,
            hidden=request.hidden,
            include_default_excludes=request.include_default_excludes,
            context_before=request.context_before,
            context_after=request.context_after,
            max_results=request.max_results,
        )
        events = self.searcher.search(query)
        # gRPC leaves the generator of a call cancelled between two messages to the garbage collector;
        # closing it when the call ends kills rg at once. (A generator still running is being unwound
        # by the cancellation itself.)
        context.add_done_callback(lambda _: events.ag_running or asyncio.ensure_future(events.aclose()))
        async for event in events:
            if isinstance(event, Summary):
                elapsed = Duration()
                elapsed.FromNanoseconds(int(event.elapsed * 1e9))
                yield pb.SearchResponse(
                    summary=pb.SearchSummary(
                        results=event.results,
                        files_matched=event.files_matched,
                        truncated=event.truncated,
                        engine=event.engine,
                        elapsed=elapsed,
                    )
                )
            else:
                yield pb.SearchResponse(hits=[_search_hit(hit) for hit in event])

    # ------------------------------------------------------------ Read
    async def Read(self, request: pb.ReadRequest, context: aio.ServicerContext) -> AsyncIterator[pb.ReadResponse]:
        which = request.WhichOneof("range")
        range_: ByteRange | LineRange | None = None
        if which == "bytes":
            range_ = ByteRange(request.bytes.offset, request.bytes.length)
        elif which == "lines":
            range_ = LineRange(request.lines.start, request.lines.end)
        async for event in self.reader.read(request.path, range_, request.chunk_size):
            if isinstance(event, Chunk):
                yield pb.ReadResponse(chunk=pb.ReadChunk(offset=event.offset, data=event.data))
            else:
                yield pb.ReadResponse(
                    info=pb.FileInfo(
                        path=event.path,
                        size=event.size,
                        mode=event.mode,
                        modified=_timestamp(event.modified),
                        sha256=event.sha256,
                        binary=event.binary,
                    )
                )

    # ------------------------------------------------------------ Edit
    async def Edit(self, request: pb.EditRequest, context: aio.ServicerContext) -> pb.EditResponse:
        result = await self.editor.edit([_edit_operation(op) for op in request.operations], dry_run=request.dry_run)
        return pb.EditResponse(
            files=[pb.EditedFile(path=f.path, sha256=f.sha256, deleted=f.deleted) for f in result.files],
            diff=result.diff,
        )

    # ------------------------------------------------------------ Exec and processes
    async def Exec(
        self, request_iterator: AsyncIterator[pb.ExecRequest], context: aio.ServicerContext
    ) -> AsyncIterator[pb.ExecResponse]:
        # Closed with this generator (at the call's end), so the command is killed then, not when collected.
        async with contextlib.aclosing(self.processes.exec(messages.exec_requests(request_iterator))) as events:
            async for event in events:
                yield messages.exec_response(event)

    async def ListProcesses(self, request: pb.ListProcessesRequest, context: aio.ServicerContext) -> pb.ListProcessesResponse:
        return pb.ListProcessesResponse(processes=[messages.process_info(c) for c in self.processes.list()])

    async def AttachProcess(
        self, request: pb.AttachProcessRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.AttachProcessResponse]:
        async for event in self.processes.attach(request.name, request.from_sequence):
            yield messages.attach_response(event)

    async def StopProcess(self, request: pb.StopProcessRequest, context: aio.ServicerContext) -> pb.StopProcessResponse:
        signum, grace = messages.stop_request(request)
        exit = await self.processes.stop(request.name, signum, grace, request.remove)
        return pb.StopProcessResponse(exited=messages.process_exited(exit))

    # ------------------------------------------------------------ Archives
    async def ExtractArchive(
        self, request_iterator: AsyncIterator[pb.ExtractArchiveRequest], context: aio.ServicerContext
    ) -> pb.ExtractArchiveResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or first.WhichOneof("request") != "spec":
            raise InvalidArgument("the first ExtractArchiveRequest must carry the spec")
        spec = first.spec
        if spec.format not in (pb.ARCHIVE_FORMAT_UNSPECIFIED, pb.ARCHIVE_FORMAT_TAR_GZIP):
            raise InvalidArgument(f"unknown archive format {spec.format}; only tar.gz is supported")
        if spec.mode not in _EXTRACT_MODES:
            raise InvalidArgument(f"unknown extract mode {spec.mode}")
        report = await extract_archive(
            self.root,
            self.config,
            spec.destination,
            _archive_chunks(requests),
            mode=_EXTRACT_MODES[spec.mode],
            expected_sha256=spec.expected_sha256,
        )
        self.activity.touch()
        return pb.ExtractArchiveResponse(
            files=report.files,
            directories=report.directories,
            symlinks=report.symlinks,
            bytes_extracted=report.bytes_extracted,
            sha256=report.sha256,
            stripped_special_bits=report.stripped_special_bits,
        )

    async def CreateArchive(
        self, request: pb.CreateArchiveRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.CreateArchiveResponse]:
        if request.format not in (pb.ARCHIVE_FORMAT_UNSPECIFIED, pb.ARCHIVE_FORMAT_TAR_GZIP):
            raise InvalidArgument(f"unknown archive format {request.format}; only tar.gz is supported")
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
        yield pb.CreateArchiveResponse(
            summary=pb.ArchiveSummary(
                sha256=summary.sha256,
                size=summary.size,
                files=summary.files,
                directories=summary.directories,
                symlinks=summary.symlinks,
            )
        )

    # ------------------------------------------------------------ Activity
    async def GetActivity(self, request: pb.GetActivityRequest, context: aio.ServicerContext) -> pb.GetActivityResponse:
        return pb.GetActivityResponse(
            last_activity=_timestamp(self.activity.last_activity),
            open_streams=self.activity.open_streams,
            started_at=_timestamp(self.activity.started_at),
            running_commands=self.processes.running_commands,
            running_named_processes=self.processes.running_named_processes,
        )

    # ------------------------------------------------------------ Claim
    async def Claim(self, request: pb.ClaimRequest, context: aio.ServicerContext) -> pb.ClaimResponse:
        session_id = self.pool_claim.claim(request.token, dict(request.env), request.session_id, self.processes)
        return pb.ClaimResponse(session_id=session_id)
