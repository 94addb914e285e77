"""AgentClient: the orchestrator's async client for one workspace's agent (workspace.agent.v1), with the bearer
token on every call and the agent's status codes turned into the orchestrator's domain errors."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from contextlib import contextmanager

import grpc
from google.protobuf.duration_pb2 import Duration
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import serving, telemetry
from common.constants import MiB
from orchestrator.errors import (
    ChecksumMismatch,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    OrchestratorError,
)
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

AGENT_SERVICE = pb.DESCRIPTOR.services_by_name["AgentService"].full_name
# Chunks sent to ExtractArchive are cut to this size, whatever the source yields.
UPLOAD_CHUNK_BYTES = MiB
# Output lines longer than this (in bytes) are cut, and the rest of the line dropped.
MAX_LINE_BYTES = 4096
# A freshly started container refuses connections for a moment: retry connecting every 100 ms to 1 s,
# not with gRPC's default backoff (1 s growing to 120 s), which would add seconds to every session start.
CHANNEL_OPTIONS = [
    *serving.CHANNEL_OPTIONS,
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

OnLine = Callable[[str, bool], None]

# The agent's status codes, as the orchestrator's domain errors. Codes not listed (UNAVAILABLE,
# UNAUTHENTICATED, DEADLINE_EXCEEDED, ...) mean the workspace cannot be used right now: FailedPrecondition.
_ERRORS: dict[grpc.StatusCode, type[OrchestratorError]] = {
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.PERMISSION_DENIED: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitExceeded,
    grpc.StatusCode.DATA_LOSS: ChecksumMismatch,
    grpc.StatusCode.INTERNAL: OrchestratorError,
    grpc.StatusCode.UNKNOWN: OrchestratorError,
}


class AgentClient:
    """One workspace's agent at `endpoint` ("HOST:PORT"), called with `token`. Every method raises the
    orchestrator's domain errors: NotFound, InvalidArgument, LimitExceeded, ChecksumMismatch, and
    FailedPrecondition when the agent cannot be reached or refuses the token."""

    def __init__(self, endpoint: str, token: str) -> None:
        self.endpoint = endpoint
        self._channel = aio.insecure_channel(
            endpoint, options=CHANNEL_OPTIONS, interceptors=telemetry.client_interceptors()
        )
        self._stub = agent_pb2_grpc.AgentServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),)

    async def close(self) -> None:
        await self._channel.close()

    async def wait_healthy(self, timeout: float) -> None:
        """Returns once the agent's health service reports SERVING; raises FailedPrecondition (with the last
        thing seen) if it does not within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer"
        while (remaining := deadline - loop.time()) > 0:
            try:
                response = await self._health.Check(
                    health_pb2.HealthCheckRequest(service=AGENT_SERVICE),
                    timeout=min(remaining, 1.0),
                    wait_for_ready=True,  # wait for the connection instead of failing at once
                )
            except aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise _domain_error("Health.Check", self.endpoint, error) from error
                last = f"{error.code().name}: {error.details()}"
                continue
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            await asyncio.sleep(0.05)
        raise FailedPrecondition(
            f"the workspace agent at {self.endpoint} was not healthy within {timeout:g} s ({last})"
        )

    async def healthy(self, timeout: float) -> bool:
        """Whether the agent answers one health check SERVING within `timeout` seconds (no waiting for a
        connection: an agent that is gone is told at once)."""
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(service=AGENT_SERVICE), timeout=timeout)
        except aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def run(
        self,
        shell: str,
        *,
        on_line: OnLine,
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        cwd: str = "",
    ) -> int:
        """Runs `shell` with /bin/sh in the workspace, calls `on_line(text, is_stderr)` for every output line,
        and returns the exit code (-1 when killed by a signal). Raises LimitExceeded when it ran past
        `timeout` seconds (the agent killed it), NotFound / InvalidArgument for a bad command or cwd."""
        start = pb.ExecStart(shell=shell, env=env or {}, cwd=cwd)
        if timeout:
            start.timeout.CopyFrom(_duration(timeout))
        lines = _StreamLines(on_line)
        # The gRPC deadline only guards against an agent that stops answering; the agent enforces `timeout`.
        call = self._stub.Exec(
            iter([pb.ExecRequest(start=start)]),
            metadata=self._metadata,
            timeout=timeout + 30 if timeout else None,
        )
        with _translated("Exec", self.endpoint):
            async for response in call:
                if response.HasField("output"):
                    lines.feed(response.output)
                elif response.HasField("exited"):
                    lines.close()
                    if response.exited.timed_out:
                        raise LimitExceeded(f"`{shell}` ran past its {timeout:g} s timeout and was killed")
                    return response.exited.exit_code
        raise FailedPrecondition(f"the workspace agent at {self.endpoint} ended `{shell}` without an exit status")

    async def exec_events(
        self, argv: list[str], *, cwd: str = "", timeout: float | None = None
    ) -> AsyncGenerator[pb.ExecResponse, None]:
        """Runs `argv` (no shell) in the workspace and yields the agent's events as they come: `started`, the
        output chunks as written, and `exited` (the agent kills it past `timeout` seconds). Raises NotFound /
        InvalidArgument for a bad command or cwd."""
        start = pb.ExecStart(argv=argv, cwd=cwd)
        if timeout:
            start.timeout.CopyFrom(_duration(timeout))
        call = self._stub.Exec(iter([pb.ExecRequest(start=start)]), metadata=self._metadata)
        try:
            with _translated("Exec", self.endpoint):
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def start_process(self, name: str, shell: str, *, env: dict[str, str] | None = None, cwd: str = "") -> int:
        """Starts `shell` as the named long-running process `name` (e.g. the dev server) and returns its pid
        once it runs; follow its output with process_lines(). Raises FailedPrecondition when a process of that
        name is already running."""
        start = pb.ExecStart(shell=shell, env=env or {}, cwd=cwd, name=name)
        call = self._stub.Exec(iter([pb.ExecRequest(start=start)]), metadata=self._metadata)
        try:
            with _translated("Exec", self.endpoint):
                async for response in call:
                    if response.HasField("started"):
                        return response.started.pid
        finally:
            # A named process outlives its Exec call; leaving the call does not stop it.
            call.cancel()
        raise FailedPrecondition(f"the workspace agent at {self.endpoint} did not start process {name!r}")

    async def attach(self, name: str, *, from_sequence: int = 0) -> AsyncGenerator[pb.AttachProcessResponse, None]:
        """Attaches to the named process and yields the agent's events: `attached` (what is buffered), its
        output from `from_sequence` on, and `exited`; following stops (the process keeps running) when the
        caller stops iterating and closes the iterator. Raises NotFound for an unknown name."""
        call = self._stub.AttachProcess(
            pb.AttachProcessRequest(name=name, from_sequence=from_sequence), metadata=self._metadata
        )
        try:
            with _translated("AttachProcess", self.endpoint):
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def process_lines(self, name: str, on_line: OnLine, *, from_sequence: int = 0) -> int:
        """Attaches to the named process: calls `on_line(text, is_stderr)` for its output from `from_sequence`
        (buffered output first), until it exits; returns its exit code. Cancel the task to stop following
        (the process keeps running). Raises NotFound for an unknown name."""
        lines = _StreamLines(on_line)
        call = self._stub.AttachProcess(
            pb.AttachProcessRequest(name=name, from_sequence=from_sequence), metadata=self._metadata
        )
        try:
            with _translated("AttachProcess", self.endpoint):
                async for response in call:
                    if response.HasField("output"):
                        lines.feed(response.output)
                    elif response.HasField("exited"):
                        lines.close()
                        return response.exited.exit_code
        finally:
            call.cancel()
        raise FailedPrecondition(f"the workspace agent at {self.endpoint} stopped following {name!r} before it exited")

    async def stop_process(self, name: str, *, grace: float = 5.0) -> int:
        """Stops the named process (SIGTERM, SIGKILL after `grace` seconds) and returns its exit code.
        Raises NotFound for an unknown name."""
        with _translated("StopProcess", self.endpoint):
            response = await self._stub.StopProcess(
                pb.StopProcessRequest(name=name, grace_period=_duration(grace)), metadata=self._metadata
            )
        return response.exited.exit_code

    async def extract_archive(
        self, chunks: AsyncIterable[bytes], sha256: str, *, destination: str = "", merge: bool = False
    ) -> pb.ExtractArchiveResponse:
        """Streams a tar.gz into the workspace at `destination` (the root by default), replacing its content
        unless `merge`; the agent swaps it in only if everything arrived and matches `sha256`. Raises
        ChecksumMismatch, InvalidArgument (unsafe or corrupt archive), LimitExceeded (too large)."""
        spec = pb.ExtractArchiveSpec(
            destination=destination,
            format=pb.ARCHIVE_FORMAT_TAR_GZIP,
            expected_sha256=sha256,
            mode=pb.EXTRACT_MODE_MERGE if merge else pb.EXTRACT_MODE_REPLACE,
        )

        # gRPC answers a request iterator that raises by cancelling the call: the error of the bytes' source (a
        # blob failing its checksum, an unreachable store) is kept here and raised in place of the cancellation.
        source_failed: list[Exception] = []

        async def requests() -> AsyncIterator[pb.ExtractArchiveRequest]:
            yield pb.ExtractArchiveRequest(spec=spec)
            try:
                async for chunk in chunks:
                    view = memoryview(chunk)
                    for offset in range(0, len(view), UPLOAD_CHUNK_BYTES):
                        yield pb.ExtractArchiveRequest(chunk=bytes(view[offset : offset + UPLOAD_CHUNK_BYTES]))
            except Exception as error:
                source_failed.append(error)
                raise

        try:
            with _translated("ExtractArchive", self.endpoint):
                return await self._stub.ExtractArchive(requests(), metadata=self._metadata)
        except (asyncio.CancelledError, OrchestratorError):
            if source_failed:
                raise source_failed[0] from None
            raise

    async def create_archive(
        self, excludes: tuple[str, ...] | list[str] = (), *, path: str = "", no_default_excludes: bool = False
    ) -> ArchiveStream:
        """Starts archiving the workspace (`path`, the root by default) as tar.gz without `excludes`
        (gitignore-style) and, unless `no_default_excludes`, `node_modules`. Iterate the returned stream for
        the bytes; its `summary` is set at the end."""
        request = pb.CreateArchiveRequest(
            path=path,
            format=pb.ARCHIVE_FORMAT_TAR_GZIP,
            excludes=list(excludes),
            no_default_excludes=no_default_excludes,
        )
        call = self._stub.CreateArchive(request, metadata=self._metadata)
        return ArchiveStream(call, self.endpoint)

    async def read_file(self, path: str) -> bytes:
        """The whole content of the workspace file at `path` (root-relative). Raises NotFound, InvalidArgument
        (not a regular file, or outside the root)."""
        content = bytearray()
        async for chunk in self.read(path):
            content += chunk
        return bytes(content)

    async def read(self, path: str) -> AsyncIterator[bytes]:
        """The content of the workspace file at `path` (root-relative), chunk by chunk as it arrives; raises
        as read_file."""
        call = self._stub.Read(pb.ReadRequest(path=path), metadata=self._metadata)
        try:
            with _translated("Read", self.endpoint):
                async for response in call:
                    if response.HasField("chunk"):
                        yield response.chunk.data
        finally:
            call.cancel()

    async def edit(self, operations: list[pb.EditOperation], *, dry_run: bool = False) -> pb.EditResponse:
        """Applies `operations` to the workspace's files all or none (nothing when `dry_run`); the response
        has the diff. Raises NotFound, InvalidArgument, FailedPrecondition (e.g. the text to replace is not
        there as often as expected)."""
        with _translated("Edit", self.endpoint):
            return await self._stub.Edit(
                pb.EditRequest(operations=operations, dry_run=dry_run), metadata=self._metadata
            )

    async def search(self, request: pb.SearchRequest) -> AsyncIterator[pb.SearchResponse]:
        """The agent's answers to `request` as they come: batches of hits, the summary last."""
        call = self._stub.Search(request, metadata=self._metadata)
        try:
            with _translated("Search", self.endpoint):
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def watch_files(self, path: str = "", *, since: int = 0) -> AsyncGenerator[pb.WatchFilesResponse, None]:
        """The workspace's file changes below `path` as they come: those after sequence number `since` first (or
        one resync change when the agent's journal no longer has them), then `ready`, then live ones. Raises
        InvalidArgument (a bad, ignored or escaping path), NotFound, LimitExceeded (inotify's limits)."""
        call = self._stub.WatchFiles(pb.WatchFilesRequest(path=path, since_sequence=since), metadata=self._metadata)
        try:
            with _translated("WatchFiles", self.endpoint):
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def activity(self) -> pb.GetActivityResponse:
        """What the workspace has been doing (for idle detection); asking does not count as activity."""
        with _translated("GetActivity", self.endpoint):
            return await self._stub.GetActivity(pb.GetActivityRequest(), metadata=self._metadata)

    async def claim(self, token: str, env: dict[str, str], session_id: str, *, timeout: float = 10.0) -> None:
        """Hands this pooled workspace to `session_id` (the client must hold the pool credential): the agent
        expects `token` from now on, and so does this client. Raises FailedPrecondition (claimed already, the
        credential refused, the agent unreachable), InvalidArgument."""
        with _translated("Claim", self.endpoint):
            await self._stub.Claim(
                pb.ClaimRequest(token=token, env=env, session_id=session_id), metadata=self._metadata, timeout=timeout
            )
        self._metadata = (("authorization", f"Bearer {token}"),)


class ArchiveStream:
    """The bytes of an archive as the agent streams them. Once iterated to the end, `summary` holds the
    agent's summary, and the bytes received were checked against its sha256 and size (ChecksumMismatch)."""

    def __init__(self, call: aio.UnaryStreamCall, endpoint: str) -> None:
        self._call = call
        self._endpoint = endpoint
        self.summary: pb.ArchiveSummary | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        size = 0
        try:
            with _translated("CreateArchive", self._endpoint):
                async for response in self._call:
                    if response.HasField("chunk"):
                        digest.update(response.chunk)
                        size += len(response.chunk)
                        yield response.chunk
                    elif response.HasField("summary"):
                        summary = response.summary
                        break
                else:
                    raise FailedPrecondition(
                        f"the workspace agent at {self._endpoint} ended an archive without its summary"
                    )
        finally:
            self._call.cancel()
        if (digest.hexdigest(), size) != (summary.sha256, summary.size):
            raise ChecksumMismatch(
                f"archive from {self._endpoint}: received {size} bytes with sha256 {digest.hexdigest()}, "
                f"the agent announced {summary.size} bytes with sha256 {summary.sha256}"
            )
        self.summary = summary


class _StreamLines:
    """Splits a process's output chunks into lines, one splitter per stream (stdout and stderr interleave)."""

    def __init__(self, on_line: OnLine) -> None:
        self._stdout = _LineSplitter(lambda text: on_line(text, False))
        self._stderr = _LineSplitter(lambda text: on_line(text, True))

    def feed(self, output: pb.ProcessOutput) -> None:
        (self._stderr if output.stream == pb.OUTPUT_STREAM_STDERR else self._stdout).feed(output.data)

    def close(self) -> None:
        self._stdout.close()
        self._stderr.close()


class _LineSplitter:
    """Cuts a byte stream into text lines across chunk boundaries: UTF-8 with invalid bytes replaced, a
    trailing CR removed, and lines over MAX_LINE_BYTES cut (marked with "…"), so no line can grow without bound."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._line = bytearray()
        self._cut = False

    def feed(self, data: bytes) -> None:
        start = 0
        while (end := data.find(b"\n", start)) >= 0:
            self._append(data, start, end)
            self._flush()
            start = end + 1
        self._append(data, start, len(data))

    def close(self) -> None:
        """Emits the last line if the stream did not end with a newline."""
        if self._line or self._cut:
            self._flush()

    def _append(self, data: bytes, start: int, end: int) -> None:
        room = MAX_LINE_BYTES - len(self._line)
        if end - start > room:
            end = start + room
            self._cut = True
        self._line += data[start:end]

    def _flush(self) -> None:
        text = self._line.decode("utf-8", "replace")
        if self._cut:
            # The cut may have split a character; drop its remains rather than show a replacement mark.
            text = text.rstrip("\ufffd") + "…"
        self._emit(text.removesuffix("\r"))
        self._line.clear()
        self._cut = False


def _duration(seconds: float) -> Duration:
    duration = Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _domain_error(method: str, endpoint: str, error: aio.AioRpcError) -> OrchestratorError:
    cls = _ERRORS.get(error.code(), FailedPrecondition)
    return cls(f"workspace agent at {endpoint}, {method}: {error.code().name}: {error.details()}")


@contextmanager
def _translated(method: str, endpoint: str) -> Iterator[None]:
    try:
        yield
    except aio.AioRpcError as error:
        raise _domain_error(method, endpoint, error) from error
