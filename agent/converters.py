"""Every conversion between the agent's protobuf messages and its domain types, so that the servicer
stays thin and agent/fs and agent/process know nothing of protobuf."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from agent.errors import InvalidArgument
from agent.fs import edit
from agent.fs.edit import EditResult
from agent.fs.read import ByteRange, FileInfo, LineRange
from agent.fs.search import Context, Hit, Match, SearchQuery, Summary
from agent.process.command import CloseStdin, Command, CommandExit, CommandSpec, Control, PtySize, SendSignal, StdinData
from agent.process.manager import Attached, AttachEvent, ExecEvent, Started
from agent.process.output import OutputChunk
from workspace.agent.v1 import agent_pb2 as pb

if TYPE_CHECKING:  # the archive code (tarfile, gzip, pathspec) is imported on the first archive call
    from agent.fs.archive import ArchiveSummary
    from agent.fs.extract import ExtractionReport, ExtractMode
    from agent.fs.watch import WatchEvent  # inotify is imported with the first WatchFiles


def _seconds(duration: Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


# ------------------------------------------------------------ Search


def search_query(request: pb.SearchRequest) -> SearchQuery:
    return SearchQuery(
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


def search_response(event: list[Hit] | Summary) -> pb.SearchResponse:
    if isinstance(event, Summary):
        return pb.SearchResponse(
            summary=pb.SearchSummary(
                results=event.results,
                files_matched=event.files_matched,
                truncated=event.truncated,
                engine=event.engine,
                elapsed=_duration(event.elapsed),
            )
        )
    return pb.SearchResponse(hits=[_search_hit(hit) for hit in event])


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


# ------------------------------------------------------------ Read


def read_range(request: pb.ReadRequest) -> ByteRange | LineRange | None:
    which = request.WhichOneof("range")
    if which == "bytes":
        return ByteRange(request.bytes.offset, request.bytes.length)
    if which == "lines":
        return LineRange(request.lines.start, request.lines.end)
    return None


def file_info(info: FileInfo) -> pb.FileInfo:
    return pb.FileInfo(
        path=info.path,
        size=info.size,
        mode=info.mode,
        modified=timestamp(info.modified),
        sha256=info.sha256,
        binary=info.binary,
    )


# ------------------------------------------------------------ Edit


def edit_operation(op: pb.EditOperation) -> edit.Operation:
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


def edit_response(result: EditResult) -> pb.EditResponse:
    return pb.EditResponse(
        files=[pb.EditedFile(path=f.path, sha256=f.sha256, deleted=f.deleted) for f in result.files],
        diff=result.diff,
    )


# ------------------------------------------------------------ Archives

# By ExtractMode's member names: agent.fs.extract is imported on the first extraction.
_EXTRACT_MODES = {
    pb.EXTRACT_MODE_UNSPECIFIED: "REPLACE",
    pb.EXTRACT_MODE_REPLACE: "REPLACE",
    pb.EXTRACT_MODE_MERGE: "MERGE",
}


def archive_format(format: pb.ArchiveFormat.ValueType) -> None:
    """Refuses (InvalidArgument) any format but tar.gz."""
    if format not in (pb.ARCHIVE_FORMAT_UNSPECIFIED, pb.ARCHIVE_FORMAT_TAR_GZIP):
        raise InvalidArgument(f"unknown archive format {format}; only tar.gz is supported")


def extract_mode(mode: pb.ExtractMode.ValueType) -> ExtractMode:
    from agent.fs.extract import ExtractMode

    if mode not in _EXTRACT_MODES:
        raise InvalidArgument(f"unknown extract mode {mode}")
    return ExtractMode[_EXTRACT_MODES[mode]]


async def archive_chunks(requests: AsyncIterator[pb.ExtractArchiveRequest]) -> AsyncIterator[bytes]:
    """The archive bytes of an ExtractArchive call, after its spec."""
    async for request in requests:
        if request.WhichOneof("request") != "chunk":
            raise InvalidArgument("only the first ExtractArchiveRequest may carry a spec; later ones carry chunks")
        yield request.chunk


def extract_response(report: ExtractionReport) -> pb.ExtractArchiveResponse:
    return pb.ExtractArchiveResponse(
        files=report.files,
        directories=report.directories,
        symlinks=report.symlinks,
        bytes_extracted=report.bytes_extracted,
        sha256=report.sha256,
        stripped_special_bits=report.stripped_special_bits,
    )


def archive_summary(summary: ArchiveSummary) -> pb.ArchiveSummary:
    return pb.ArchiveSummary(
        sha256=summary.sha256,
        size=summary.size,
        files=summary.files,
        directories=summary.directories,
        symlinks=summary.symlinks,
    )


# ------------------------------------------------------------ Exec and processes


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
    return pb.ProcessExited(
        exit_code=exit.exit_code, signal=exit.signal, timed_out=exit.timed_out, duration=_duration(exit.duration)
    )


def process_output(chunk: OutputChunk) -> pb.ProcessOutput:
    return pb.ProcessOutput(sequence=chunk.sequence, stream=pb.OutputStream.ValueType(chunk.stream), data=chunk.data)


def process_info(command: Command) -> pb.ProcessInfo:
    return pb.ProcessInfo(
        name=command.name,
        pid=command.pid,
        command=command.argv,
        cwd=command.cwd,
        running=command.running,
        exited=process_exited(command.exit) if command.exit else None,
        started_at=timestamp(command.started_at),
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


_CHANGE_KINDS = {
    "create": pb.FILE_CHANGE_KIND_CREATE,
    "modify": pb.FILE_CHANGE_KIND_MODIFY,
    "delete": pb.FILE_CHANGE_KIND_DELETE,
    "move": pb.FILE_CHANGE_KIND_MOVE,
    "resync": pb.FILE_CHANGE_KIND_RESYNC,
}


def watch_response(event: WatchEvent) -> pb.WatchFilesResponse:
    from agent.fs.watch import Ready

    if isinstance(event, Ready):
        return pb.WatchFilesResponse(ready=pb.WatchReady(sequence=event.sequence, oldest_sequence=event.oldest))
    change = pb.FileChange(
        sequence=event.sequence,
        kind=_CHANGE_KINDS[event.kind],
        path=event.path,
        old_path=event.old_path,
        size=event.size,
        directory=event.directory,
    )
    return pb.WatchFilesResponse(change=change)
