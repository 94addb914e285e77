"""wsctl: the orchestrator from a terminal - templates, sessions with live progress, archives, and the
session's agent (exec, read, write, edit, search, file changes, the dev server's logs) called directly with the
session's endpoint and token."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import re
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import grpc
import typer
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from orchestrator.agent_client import AgentClient
from orchestrator.errors import OrchestratorError
from workspace.agent.v1 import agent_pb2
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

DEFAULT_SERVER = "127.0.0.1:50051"
# Exit statuses beyond the command's own: the shell's conventions for timeouts and signals.
EXIT_FAILED = 1
EXIT_TIMED_OUT = 124
EXIT_SIGNALLED_BASE = 128

app = typer.Typer(
    name="wsctl",
    help="Live coding workspaces: create sessions from templates, talk to them, save and restore them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
templates_app = typer.Typer(help="Templates under the orchestrator's templates folder.", no_args_is_help=True)
sessions_app = typer.Typer(help="Sessions, newest first.", no_args_is_help=True)
archives_app = typer.Typer(help="Saved and uploaded workspace archives.", no_args_is_help=True)
app.add_typer(templates_app, name="templates")
app.add_typer(sessions_app, name="sessions")
app.add_typer(archives_app, name="archives")

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


# Piped output is read by scripts: wide enough that ids and URLs are never cut.
PIPED_WIDTH = 240


def _out() -> Console:
    return Console(highlight=False, width=None if sys.stdout.isatty() else PIPED_WIDTH)


def _key(header: str) -> Column:
    """A column of identifiers (ids, names, URLs): never wrapped or cut, the other columns give way."""
    return Column(header, no_wrap=True, min_width=len(header))


def _err() -> Console:
    return Console(stderr=True, highlight=False)


@app.callback()
def main(
    ctx: typer.Context,
    server: Annotated[
        str, typer.Option("--server", envvar="WSCTL_SERVER", help="The orchestrator's gRPC address.")
    ] = DEFAULT_SERVER,
) -> None:
    ctx.obj = server


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    _err().print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


# The orchestrator's messages point API callers at RPCs; a person at the terminal gets the command instead.
_RPC_HINTS = {
    "ListSessions": "`wsctl sessions list`",
    "ListArchives": "`wsctl archives list`",
    "ListTemplates": "`wsctl templates list`",
}
_RPC_HINT = re.compile(r"\b(" + "|".join(_RPC_HINTS) + r")\b")
# Where ctx.meta keeps the endpoint of the session's agent once a command talks to it (see _agent).
_AGENT_ENDPOINT = "wsctl.agent_endpoint"


def reports_rpc_errors(command: F) -> F:
    """Turns a failed call into its status and message on stderr and exit status 1, instead of a traceback;
    an unreachable server is named (the orchestrator, or the session's agent). The command takes the typer
    context as `ctx`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx: typer.Context = kwargs["ctx"]
        try:
            try:
                return command(*args, **kwargs)
            except OrchestratorError as error:
                # AgentClient's domain error for a failed call to the agent: shown as the call's status, like
                # the orchestrator's own.
                if isinstance(error.__cause__, grpc.RpcError):
                    raise error.__cause__ from None
                raise
        except grpc.RpcError as error:
            code, details = error.code(), _RPC_HINT.sub(lambda m: _RPC_HINTS[m.group(1)], error.details() or "")
            if code == grpc.StatusCode.UNAVAILABLE:
                if (endpoint := ctx.meta.get(_AGENT_ENDPOINT)) is not None:
                    details += f" (the session's agent at {endpoint} did not answer: is the session still running?)"
                else:
                    details += f" (is the orchestrator running at {ctx.find_root().obj}?)"
            _fail(f"{code.name}: {details}")

    return wrapper  # type: ignore[return-value]


def _orchestrator(ctx: typer.Context) -> tuple[grpc.Channel, orchestrator_pb2_grpc.OrchestratorServiceStub]:
    channel = grpc.insecure_channel(ctx.find_root().obj)
    ctx.call_on_close(channel.close)
    return channel, orchestrator_pb2_grpc.OrchestratorServiceStub(channel)


def _with_agent(ctx: typer.Context, session_id: str, work: Callable[[AgentClient], Awaitable[T]]) -> T:
    """Runs `work` with the orchestrator's own client for the session's agent (its endpoint and token from the
    orchestrator), on an event loop of its own for this one command."""
    _, orchestrator = _orchestrator(ctx)
    session = orchestrator.GetSession(pb.GetSessionRequest(id=session_id)).session
    if not session.agent_endpoint:
        _fail(f"session {session_id} has no agent yet (it is {_state(session.state)})")
    # From here on the calls go to the agent: an UNAVAILABLE is about it, not the orchestrator.
    ctx.meta[_AGENT_ENDPOINT] = session.agent_endpoint

    async def run() -> T:
        agent = AgentClient(session.agent_endpoint, session.agent_token)
        try:
            return await work(agent)
        finally:
            await agent.close()

    return asyncio.run(run())


def _enum_label(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).replace("_", " ").lower()


def _state(value: int) -> str:
    return _enum_label(pb.SessionState, value, "SESSION_STATE_")


def _phase(value: int) -> str:
    return _enum_label(pb.Phase, value, "PHASE_")


def _when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    return stamp.ToDatetime(tzinfo=UTC).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _count(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


# ---------------------------------------------------------------- templates


@templates_app.command("list")
@reports_rpc_errors
def templates_list(ctx: typer.Context) -> None:
    """Every template, valid or not (with the reason)."""
    _, stub = _orchestrator(ctx)
    response = stub.ListTemplates(pb.ListTemplatesRequest())
    table = Table(_key("NAME"), "TITLE", "INSTALL", "DEV", "FILES", "SHA256", "PROBLEM")
    for template in response.templates:
        if template.valid:
            table.add_row(
                template.name,
                template.title,
                template.install_command or "-",
                template.dev_command,
                str(template.files),
                template.archive_sha256[:12],
                "",
            )
        else:
            table.add_row(template.name, "", "", "", "", "", f"[red]{escape(template.invalid_reason)}[/red]")
    _out().print(table)


@app.command()
@reports_rpc_errors
def pools(ctx: typer.Context) -> None:
    """The orchestrator's running pools: workspaces ready to hand out, being prepared, and kept."""
    _, stub = _orchestrator(ctx)
    response = stub.GetPools(pb.GetPoolsRequest())
    table = Table(_key("POOL"), "TEMPLATE", "READY", "PREPARING", "TARGET", "SIZE")
    rows = ([("warm", response.warm)] if response.HasField("warm") else []) + [("hot", hot) for hot in response.hot]
    for kind, pool in rows:
        table.add_row(
            kind, pool.template or "-", str(pool.ready), str(pool.preparing), str(pool.target), str(pool.size)
        )
    if not rows:
        _err().print("no pool runs here (--warm-pool 0 and no hot pool, or another replica leads)")
        return
    _out().print(table)


# ---------------------------------------------------------------- sessions


def _follow(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, session: pb.Session, print_id: bool = False) -> None:
    """Shows a session's progress until it settles: the preview URL (or with `print_id` the session id) on
    stdout when READY, the failure (phase, reason, last output) on stderr and exit status 1 otherwise."""
    console = _err()
    console.print(f"session [bold]{session.id}[/bold] ({session.template})")
    try:
        with console.status("waiting for the session to start") as status:
            for event in stub.WatchSession(pb.WatchSessionRequest(id=session.id)):
                kind = event.WhichOneof("event")
                if kind == "phase":
                    _show_phase(console, status, event.phase)
                elif kind == "output":
                    style = "red" if event.output.stderr else "dim"
                    console.print(f"  [{style}]{escape(event.output.text)}[/{style}]", soft_wrap=True)
                elif kind == "session":
                    # The stream ends once the session settles; the first event is only the snapshot, which
                    # a settled session's phases and output still follow.
                    session = event.session
    except KeyboardInterrupt:
        _fail(f"stopped watching; session {session.id} goes on (`wsctl delete {session.id}` stops it)", 130)
    if session.state == pb.SESSION_STATE_READY:
        console.print(f"[green]ready[/green]  agent {session.agent_endpoint}")
        _out().print(session.id if print_id else session.preview_url, soft_wrap=True)
        return
    if session.state == pb.SESSION_STATE_FAILED:
        for line in session.failure.last_output:
            console.print(f"  [dim]{escape(line)}[/dim]")
        _fail(f"session {session.id} failed in {_phase(session.failure.phase)}: {session.failure.reason}")
    _fail(f"session {session.id} is {_state(session.state)} {session.stop_reason}".rstrip())


def _show_phase(console: Console, status: Any, phase: pb.PhaseStatus) -> None:
    name = _phase(phase.phase)
    seconds = phase.duration.ToTimedelta().total_seconds()
    detail = f": {escape(phase.detail)}" if phase.detail else ""
    if phase.outcome == pb.PHASE_OUTCOME_RUNNING:
        status.update(f"{name}...")
    elif phase.outcome == pb.PHASE_OUTCOME_SUCCEEDED:
        console.print(f"[green]✓[/green] {name} [dim]{seconds:.1f}s[/dim]{detail}")
    elif phase.outcome == pb.PHASE_OUTCOME_SKIPPED:
        console.print(f"[dim]- {name} skipped{detail}[/dim]")
    elif phase.outcome == pb.PHASE_OUTCOME_FAILED:
        console.print(f"[red]✗ {name}[/red] [dim]{seconds:.1f}s[/dim]{detail}")


@app.command()
@reports_rpc_errors
def create(
    ctx: typer.Context,
    template: Annotated[str, typer.Argument(help="A template name (see `wsctl templates list`).")],
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, repeatable.")] = None,
    print_id: Annotated[bool, typer.Option("--id", help="Print the session id instead of the preview URL.")] = False,
    public_preview: Annotated[
        bool, typer.Option("--public-preview", help="Its preview opens through the gateway without a token.")
    ] = False,
) -> None:
    """Creates a session from a template, shows its progress and prints the preview URL when it is ready."""
    _, stub = _orchestrator(ctx)
    request = pb.CreateSessionRequest(template=template, labels=_labels(label or []), public_preview=public_preview)
    try:
        session = stub.CreateSession(request).session
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.NOT_FOUND:
            _fail(f"NOT_FOUND: {error.details()}; {_templates_hint(stub, template)}")
        raise
    _follow(stub, session, print_id)


def _templates_hint(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, mistyped: str) -> str:
    """The valid templates nearest to `mistyped`, or all of them."""
    names = [t.name for t in stub.ListTemplates(pb.ListTemplatesRequest()).templates if t.valid]
    if not names:
        return "the orchestrator has no templates"
    if close := difflib.get_close_matches(mistyped, names, n=3, cutoff=0.6):
        return "did you mean " + " or ".join(repr(name) for name in close) + "?"
    return "the templates are " + ", ".join(names)


@app.command()
@reports_rpc_errors
def restore(
    ctx: typer.Context,
    archive_id: Annotated[str, typer.Argument(help="A saved or uploaded archive id (see `wsctl archives list`).")],
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, repeatable.")] = None,
    print_id: Annotated[bool, typer.Option("--id", help="Print the session id instead of the preview URL.")] = False,
) -> None:
    """Creates a session from a saved archive, shows its progress and prints the preview URL."""
    _, stub = _orchestrator(ctx)
    request = pb.CreateSessionRequest(archive_id=archive_id, labels=_labels(label or []))
    _follow(stub, stub.CreateSession(request).session, print_id)


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise typer.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--label")
        labels[key] = value
    return labels


@sessions_app.command("list")
@reports_rpc_errors
def sessions_list(
    ctx: typer.Context,
    template: Annotated[str, typer.Option(help="Only sessions of this template.")] = "",
) -> None:
    """Every session: state, phase, preview URL."""
    _, stub = _orchestrator(ctx)
    table = Table(_key("ID"), "STATE", "TEMPLATE", "PHASE", _key("PREVIEW"), "CREATED", "NOTE")
    for session in _all_sessions(stub, template):
        note = session.failure.reason if session.state == pb.SESSION_STATE_FAILED else session.stop_reason
        note = note or (f"forked from {session.forked_from}" if session.forked_from else "")
        table.add_row(
            session.id,
            _state(session.state),
            session.template,
            _phase(session.phase) if session.phase else "",
            session.preview_url,
            _when(session.created_at),
            escape(note),
        )
    _out().print(table)


def _all_sessions(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, template: str) -> Iterator[pb.Session]:
    token = ""
    while True:
        page = stub.ListSessions(pb.ListSessionsRequest(template=template, page_size=500, page_token=token))
        yield from page.sessions
        if not (token := page.next_page_token):
            return


@app.command()
@reports_rpc_errors
def delete(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    save: Annotated[bool, typer.Option("--save", help="Save the workspace into an archive first.")] = False,
) -> None:
    """Stops and removes a session; saved archives stay."""
    _, stub = _orchestrator(ctx)
    with _err().status(f"deleting {session_id}"):
        response = stub.DeleteSession(pb.DeleteSessionRequest(id=session_id, save=save))
    if response.HasField("archive"):
        _err().print(f"saved as [bold]{response.archive.id}[/bold]")
    _err().print(f"deleted {session_id}")


@app.command()
@reports_rpc_errors
def preview(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    path_form: Annotated[bool, typer.Option("--path", help="The /preview/<session>/ form (no wildcard DNS).")] = False,
    ttl: Annotated[int, typer.Option(help="Seconds the token (and its cookie) is valid.")] = 3600,
    token_only: Annotated[bool, typer.Option("--token", help="Print the bare token instead of the URL.")] = False,
) -> None:
    """Prints the session's preview URL on the orchestrator's gateway, with a fresh preview token in it."""
    _, stub = _orchestrator(ctx)
    minted = stub.CreatePreviewToken(pb.CreatePreviewTokenRequest(id=session_id, ttl=Duration(seconds=ttl)))
    url = minted.path_url if path_form else minted.url
    if not url and not token_only:
        _fail("the orchestrator runs no preview gateway: start it with --preview-address HOST:PORT")
    _err().print(f"valid until {_when(minted.expires_at)}")
    _out().print(minted.token if token_only else url, soft_wrap=True)


@app.command()
@reports_rpc_errors
def save(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    name: Annotated[str, typer.Option(help="A name for the archive.")] = "",
) -> None:
    """Saves a session's workspace (without node_modules) as an archive and prints its id."""
    _, stub = _orchestrator(ctx)
    with _err().status(f"saving {session_id}"):
        archive = stub.SaveSession(pb.SaveSessionRequest(id=session_id, name=name)).archive
    _err().print(f"saved {archive.files} files, {_size(archive.size)}, sha256 {archive.sha256[:12]}")
    _out().print(archive.id, soft_wrap=True)


@app.command()
@reports_rpc_errors
def fork(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION", help="A READY session.")],
    label: Annotated[list[str] | None, typer.Option("--label", "-l", help="KEY=VALUE, repeatable.")] = None,
    save: Annotated[bool, typer.Option("--save", help="Also save the source as an archive; fork from it.")] = False,
    print_id: Annotated[bool, typer.Option("--id", help="Print the fork's id instead of its preview URL.")] = False,
) -> None:
    """Creates a session from a READY session's current files (the source keeps running), shows its progress
    and prints the fork's preview URL."""
    _, stub = _orchestrator(ctx)
    response = stub.ForkSession(pb.ForkSessionRequest(id=session_id, labels=_labels(label or []), save=save))
    if response.HasField("archive"):
        _err().print(f"saved {session_id} as [bold]{response.archive.id}[/bold]")
    _follow(stub, response.session, print_id)


@app.command()
@reports_rpc_errors
def pause(ctx: typer.Context, session_id: Annotated[str, typer.Argument(metavar="SESSION")]) -> None:
    """Stops a READY session's processes, keeping its files (`wsctl resume` brings it back)."""
    _, stub = _orchestrator(ctx)
    with _err().status(f"pausing {session_id}"):
        stub.PauseSession(pb.PauseSessionRequest(id=session_id))
    _err().print(f"paused {session_id}")


@app.command()
@reports_rpc_errors
def resume(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    print_id: Annotated[bool, typer.Option("--id", help="Print the session id instead of the preview URL.")] = False,
) -> None:
    """Starts a PAUSED session again, shows its progress and prints its (new) preview URL."""
    _, stub = _orchestrator(ctx)
    _follow(stub, stub.ResumeSession(pb.ResumeSessionRequest(id=session_id)).session, print_id)


# ---------------------------------------------------------------- archives


@archives_app.command("list")
@reports_rpc_errors
def archives_list(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Option("--session", help="Only archives saved from this session.")] = "",
) -> None:
    """Saved and uploaded archives, newest first."""
    _, stub = _orchestrator(ctx)
    table = Table(_key("ID"), "NAME", "SOURCE", "TEMPLATE", "SESSION", "FILES", "SIZE", "CREATED")
    for archive in stub.ListArchives(pb.ListArchivesRequest(session_id=session_id)).archives:
        table.add_row(
            archive.id,
            escape(archive.name),
            _enum_label(pb.ArchiveSource, archive.source, "ARCHIVE_SOURCE_"),
            archive.template,
            archive.session_id,
            str(archive.files),
            _size(archive.size),
            _when(archive.created_at),
        )
    _out().print(table)


# ---------------------------------------------------------------- the session's agent


@app.command("exec")
@reports_rpc_errors
def exec_command(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    command: Annotated[list[str], typer.Argument(metavar="-- COMMAND...", help="The program and its arguments.")],
    cwd: Annotated[str, typer.Option(help="Working directory, relative to the workspace root.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds before the command is killed; 0: the agent's default.")] = 0,
) -> None:
    """Runs a command in the session's workspace, streaming its output; exits with the command's status."""

    async def run(agent: AgentClient) -> agent_pb2.ProcessExited | None:
        async with contextlib.aclosing(agent.exec_events(command, cwd=cwd, timeout=timeout or None)) as events:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "output":
                    _write_output(event.output)
                elif kind == "exited":
                    return event.exited
        return None

    exited = _with_agent(ctx, session_id, run)
    if exited is None:
        _fail("the agent ended the call before the command exited")
    if exited.timed_out:
        _fail("the command timed out and was killed", EXIT_TIMED_OUT)
    raise typer.Exit(EXIT_SIGNALLED_BASE + exited.signal if exited.signal else exited.exit_code)


@app.command()
@reports_rpc_errors
def read(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    path: Annotated[str, typer.Argument(help="A path relative to the workspace root.")],
) -> None:
    """Writes a workspace file's bytes to stdout."""
    stdout = sys.stdout.buffer

    async def run(agent: AgentClient) -> None:
        async for chunk in agent.read(path):
            stdout.write(chunk)

    _with_agent(ctx, session_id, run)
    stdout.flush()


@app.command()
@reports_rpc_errors
def write(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    path: Annotated[str, typer.Argument(help="A path relative to the workspace root; missing directories are made.")],
    source: Annotated[
        Path | None, typer.Option("--from", help="Take the content from this local file instead of stdin.")
    ] = None,
    create_only: Annotated[bool, typer.Option("--create-only", help="Fail if the file exists.")] = False,
) -> None:
    """Writes stdin (or --from FILE) to a workspace file, atomically, creating or replacing it."""
    content = source.read_bytes() if source is not None else sys.stdin.buffer.read()
    operation = agent_pb2.EditOperation(write=agent_pb2.WriteFile(path=path, content=content, create_only=create_only))
    _edit(ctx, session_id, operation, show_diff=False)
    _err().print(f"wrote {escape(path)} ({_size(len(content))})")


@app.command()
@reports_rpc_errors
def edit(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    path: Annotated[str, typer.Argument(help="A text file, relative to the workspace root.")],
    old: Annotated[str, typer.Argument(help="The exact text to replace.")],
    new: Annotated[str, typer.Argument(help="What replaces it.")],
    count: Annotated[int, typer.Option(help="How many occurrences there must be (all are replaced).")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the diff, change nothing.")] = False,
) -> None:
    """Replaces OLD with NEW in a workspace file and prints the diff; fails, changing nothing, unless OLD occurs
    exactly --count times."""
    replace = agent_pb2.ReplaceText(path=path, old_text=old, new_text=new, expected_occurrences=count)
    _edit(ctx, session_id, agent_pb2.EditOperation(replace=replace), dry_run=dry_run)


def _edit(
    ctx: typer.Context,
    session_id: str,
    operation: agent_pb2.EditOperation,
    *,
    dry_run: bool = False,
    show_diff: bool = True,
) -> None:
    response = _with_agent(ctx, session_id, lambda agent: agent.edit([operation], dry_run=dry_run))
    if show_diff:
        sys.stdout.write(response.diff)
        sys.stdout.flush()


@app.command()
@reports_rpc_errors
def logs(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output until the process exits.")
    ] = False,
    name: Annotated[str, typer.Option(help="The named process: the dev server is `dev`.")] = "dev",
) -> None:
    """Prints the dev server's output (stdout and stderr as they were written) held by the agent; with -f,
    follows it. Ctrl-C stops following, not the server."""

    async def run(agent: AgentClient) -> agent_pb2.ProcessInfo:
        process = agent_pb2.ProcessInfo()
        # Leaving the loop closes the stream: following stops, the process runs on.
        async with contextlib.aclosing(agent.attach(name)) as events:
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "attached":
                    process = event.attached.process
                    if event.attached.missed_chunks:
                        _err().print(
                            f"[dim]({event.attached.missed_chunks} earlier chunks are no longer buffered)[/dim]"
                        )
                    if not follow and process.next_sequence <= process.first_buffered_sequence:
                        break  # nothing buffered
                elif kind == "output":
                    _write_output(event.output)
                    if not follow and event.output.sequence + 1 >= process.next_sequence:
                        break  # caught up with what there was when we attached
                elif kind == "exited":
                    process.exited.CopyFrom(event.exited)
                    process.running = False
                    break
        return process

    try:
        process = _with_agent(ctx, session_id, run)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_SIGNALLED_BASE + 2) from None
    if not process.running and process.HasField("exited"):
        exited = process.exited
        how = f"signal {exited.signal}" if exited.signal else f"status {exited.exit_code}"
        _err().print(f"[dim]{escape(name)} has exited ({how})[/dim]")


def _write_output(output: agent_pb2.ProcessOutput) -> None:
    stream = sys.stderr.buffer if output.stream == agent_pb2.OUTPUT_STREAM_STDERR else sys.stdout.buffer
    stream.write(output.data)
    stream.flush()


@app.command()
@reports_rpc_errors
def watch(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    path: Annotated[str, typer.Argument(help="With --files: the directory to watch (default: the root).")] = "",
    files: Annotated[
        bool, typer.Option("--files", help="Follow the workspace's file changes instead, one line each.")
    ] = False,
    since: Annotated[
        int, typer.Option(help="With --files: first the changes after this sequence number (a line's first field).")
    ] = 0,
    follow: Annotated[
        bool, typer.Option(help="With --files: keep following; --no-follow stops once caught up.")
    ] = True,
) -> None:
    """Shows a session's progress (its history first) until it settles: the preview URL on stdout when it is
    READY, the failure and exit status 1 otherwise. With --files, its file changes instead: `SEQUENCE KIND PATH
    [SIZE]` per line (a directory's path ends with /, a move is `OLD -> NEW`), until Ctrl-C."""
    if not files:
        if path or since:
            _fail("PATH and --since are for --files")
        _, stub = _orchestrator(ctx)
        _follow(stub, stub.GetSession(pb.GetSessionRequest(id=session_id)).session)
        return

    async def run(agent: AgentClient) -> None:
        async with contextlib.aclosing(agent.watch_files(path, since=since)) as events:
            async for event in events:
                if event.WhichOneof("event") == "ready":
                    ready = event.ready
                    _err().print(f"[dim]watching {escape(path or '.')}: resume with --since {ready.sequence}[/dim]")
                    if not follow:
                        return
                    continue
                change = event.change
                sys.stdout.write(_change_line(change) + "\n")
                sys.stdout.flush()
                if change.kind == agent_pb2.FILE_CHANGE_KIND_RESYNC:
                    _err().print("[dim](changes were missed: what you know of the tree may be stale)[/dim]")

    try:
        _with_agent(ctx, session_id, run)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_SIGNALLED_BASE + 2) from None


def _change_line(change: agent_pb2.FileChange) -> str:
    kind = _enum_label(agent_pb2.FileChangeKind, change.kind, "FILE_CHANGE_KIND_")
    if change.kind == agent_pb2.FILE_CHANGE_KIND_RESYNC:
        return f"{change.sequence} {kind}"
    slash = "/" if change.directory else ""
    where = f"{change.old_path}{slash} -> {change.path}{slash}" if change.old_path else f"{change.path}{slash}"
    size = "" if change.directory or change.kind == agent_pb2.FILE_CHANGE_KIND_DELETE else f" {change.size}"
    return f"{change.sequence} {kind} {where}{size}"


@app.command()
@reports_rpc_errors
def search(
    ctx: typer.Context,
    session_id: Annotated[str, typer.Argument(metavar="SESSION")],
    pattern: Annotated[str, typer.Argument(help="Literal text, or a regex with --regex.")],
    path: Annotated[str, typer.Option(help="Directory to search, relative to the workspace root.")] = "",
    regex: Annotated[bool, typer.Option("--regex", "-e", help="PATTERN is a regular expression.")] = False,
    ignore_case: Annotated[bool, typer.Option("--ignore-case", "-i")] = False,
    glob: Annotated[list[str] | None, typer.Option("--glob", "-g", help="Only files matching, repeatable.")] = None,
    max_results: Annotated[int, typer.Option(help="Stop after this many matches; 0: the agent's default.")] = 0,
) -> None:
    """Searches the workspace's files; prints PATH:LINE:TEXT per match. Exits 1 when nothing matches."""
    request = agent_pb2.SearchRequest(
        path=path,
        pattern=pattern,
        regex=regex,
        ignore_case=ignore_case,
        include_globs=glob or [],
        max_results=max_results,
    )
    out = _out()

    async def run(agent: AgentClient) -> agent_pb2.SearchSummary:
        summary = agent_pb2.SearchSummary()
        async for response in agent.search(request):
            for hit in response.hits:
                if hit.WhichOneof("hit") == "match":
                    line = escape(hit.match.line.rstrip("\r\n"))
                    out.print(
                        f"[magenta]{escape(hit.match.path)}[/magenta]:{hit.match.line_number}:{line}", soft_wrap=True
                    )
            if response.HasField("summary"):
                summary = response.summary
        return summary

    summary = _with_agent(ctx, session_id, run)
    truncated = " (truncated)" if summary.truncated else ""
    found = f"{_count(summary.results, 'match', 'matches')} in {_count(summary.files_matched, 'file', 'files')}"
    _err().print(f"[dim]{found}{truncated}[/dim]")
    if not summary.results:
        raise typer.Exit(EXIT_FAILED)


if __name__ == "__main__":
    app()
