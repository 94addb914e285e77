"""A session's initialization: an explicit sequence of phase steps (container, agent, archive, install, dev
server, readiness), each timed, traced and published; pools start it further along the sequence, a resume with
the container started again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from common import telemetry
from orchestrator.agent_client import AgentClient
from orchestrator.archives import ArchiveStore
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import InitializationFailed, OrchestratorError, WorkspaceMissing
from orchestrator.install_cache import HIT_ENV, CacheKey, Injected, InstallCache
from orchestrator.pool import FROM_POOL, WarmPool
from orchestrator.readiness import wait_until_ready
from orchestrator.runtime import Runtime, Workspace
from orchestrator.sessions.hot_pool import FROM_HOT_POOL, HOT_DETAIL, HotPool
from orchestrator.sessions.live import READY, STARTING, LiveSession, reason_of, timestamp_now
from orchestrator.templates import SKIP, TemplateArchive, TemplateCatalog, TemplateSpec
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

log = logging.getLogger(__name__)

# Removals of discarded prefetched node_modules under way (see Initialization._discard_prefetched).
_REMOVALS: set[asyncio.Task[int]] = set()

# The named process the dev server runs as in the agent.
DEV_PROCESS = "dev"


class Recorder(Protocol):
    """What an initialization needs of the SessionManager to keep the record and the watchers current."""

    def record(self, live: LiveSession, event: pb.WatchSessionResponse) -> None: ...

    def fail(self, live: LiveSession, error: BaseException) -> None: ...

    def attach(self, live: LiveSession, workspace: Workspace, agent: AgentClient | None = None) -> None: ...


class Initialization:
    """Takes one session from PENDING to READY (or FAILED) through `steps`, in order. A step may mark its
    phase SKIPPED; its exception marks the phase FAILED and fails the session with the reason."""

    def __init__(
        self,
        live: LiveSession,
        template: TemplateSpec,
        archive: pb.Archive | None,
        *,
        recorder: Recorder,
        config: OrchestratorConfig,
        runtime: Runtime,
        catalog: TemplateCatalog,
        archives: ArchiveStore,
        install_cache: InstallCache | None,
        pool: WarmPool | None = None,
        steps: Sequence[tuple[pb.Phase.ValueType, Step]] | None = None,
        hot_pool: HotPool | None = None,
        hot_key: str = "",
        template_archive: TemplateArchive | None = None,
        fork_source: LiveSession | None = None,
        relocation: str = "",
    ) -> None:
        """`hot_pool` and `hot_key`: the template's hot pool, and the key (content hash, image) an entry must
        have for this session (computed when it was created). `template_archive`: the template's archive to
        inject (pinned with `template`; else the catalog's at the injection). `fork_source`: the session whose
        current files are injected instead (a fork). `relocation`: why the session's workspace is made again and
        from what (ends the container phase's detail)."""
        self.live = live
        self.template = template
        self.archive = archive
        self.steps = tuple(steps if steps is not None else self.STEPS)
        self._recorder = recorder
        self._config = config
        self._runtime = runtime
        self._catalog = catalog
        self._archives = archives
        self._install_cache = install_cache
        self._pool = pool
        self._hot_pool = hot_pool
        self._hot_key = hot_key
        self._template_archive = template_archive
        self._fork_source = fork_source
        # A resumed workspace kept its files (and node_modules): injection and install have nothing to do.
        self._files_kept = False
        self._relocation = relocation
        # Started with a one-time credential that the health step replaces with the session's token (Claim).
        self._claim_with_token = False
        # Whether the workspace is a hot entry: the later phases were done by its fill.
        self._from_hot = False
        # The install-cache entry a claimed warm member holds in node_modules already (WarmPool prefetch).
        self._prefetched: CacheKey | None = None
        # Where _discard_prefetched moved it, for removal after READY.
        self._set_aside = ""
        # Resolved once the workspace is started (or starting it failed): CreateSession returns then.
        self.container_started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._follow_dev: asyncio.Task[int] | None = None
        # Set by each line the dev server prints: the readiness probe tries again at once (it prints when it listens).
        self._dev_output = asyncio.Event()
        self._install_key = CacheKey("")

    async def run(self) -> None:
        """Runs the steps, then marks the session READY; a failure marks it FAILED instead (nothing raised
        but the cancellation of a session being stopped)."""
        live = self.live
        session = live.session
        session.state = STARTING
        if pb.PHASE_CONTAINER_STARTED not in [phase for phase, _ in self.steps]:
            self.container_started.set_result(None)  # the workspace is there already
        try:
            for phase, step in self.steps:
                async with self._phase(phase) as status:
                    if self._from_hot:
                        status.detail = HOT_DETAIL
                    else:
                        await step(self, status)
        except asyncio.CancelledError:
            if live.exited is None:
                raise
            return  # cancelled because its workspace is gone: the reconciler fails the session
        except Exception as error:  # noqa: BLE001 - every failure ends the session as FAILED with its reason
            self._recorder.fail(live, error)
            return
        finally:
            for pool in (self._pool, self._hot_pool):
                if pool is not None:
                    pool.refill()  # settled: a member started now no longer competes with this session
            # Following after READY would hold a stream open on the agent: the reaper would see it as busy.
            if self._follow_dev is not None:
                self._follow_dev.cancel()
                # Its end (the dev server's exit, or a lost stream) is already reported as the failure, if any.
                self._follow_dev.add_done_callback(lambda task: task.cancelled() or task.exception())
        session.state = READY
        session.ready_at.GetCurrentTime()
        self._recorder.record(live, pb.WatchSessionResponse(session=session))
        self._remove_set_aside()
        if self._install_key and self._install_cache is not None:
            # After READY: keeping node_modules for later sessions must not delay this one.
            live.install_store = self._install_cache.store_in_background(live.connected_agent, self._install_key)

    @contextlib.asynccontextmanager
    async def _phase(self, phase: pb.Phase.ValueType) -> AsyncIterator[pb.PhaseStatus]:
        """Runs one initialization phase: recorded, timed and published as it starts and ends. The body
        may mark it SKIPPED; an exception marks it FAILED with the reason and propagates. Traced as a span
        (a child of the CreateSession call's) that the agent calls made in the body belong to."""
        live = self.live
        session = live.session
        session.phase = phase
        status = session.phases.add(phase=phase, outcome=pb.PHASE_OUTCOME_RUNNING, started_at=timestamp_now())
        self._recorder.record(live, pb.WatchSessionResponse(phase=status))
        started = time.monotonic()
        name = pb.Phase.Name(phase).removeprefix("PHASE_").lower()
        with telemetry.span(f"phase {name}", {telemetry.SESSION_ATTRIBUTE: session.id}) as span:
            try:
                yield status
            except asyncio.CancelledError:
                status.outcome = pb.PHASE_OUTCOME_FAILED
                status.detail = (
                    live.exited.reason
                    if live.exited
                    else "cancelled: the session was stopped or the orchestrator shut down"
                )
                raise
            except Exception as error:
                status.outcome = pb.PHASE_OUTCOME_FAILED
                status.detail = reason_of(error)
                raise
            else:
                if status.outcome == pb.PHASE_OUTCOME_RUNNING:
                    status.outcome = pb.PHASE_OUTCOME_SUCCEEDED
            finally:
                status.ended_at.GetCurrentTime()
                status.duration.FromNanoseconds(int((time.monotonic() - started) * 1e9))
                span.set_attributes(
                    {
                        "workspace.phase.outcome": pb.PhaseOutcome.Name(status.outcome),
                        "workspace.phase.detail": status.detail,
                    }
                )
                self._recorder.record(live, pb.WatchSessionResponse(phase=status))

    # ------------------------------------------------------------------ the steps

    async def start_container(self, status: pb.PhaseStatus) -> None:
        """Claims an entry of the template's hot pool at the session's key (READY already: the later phases are
        instant), else a member of the warm pool (its agent is up: the next step takes no time), or, with the
        pools empty or the claim failed, starts a container (never waits for a refill)."""
        if await self._claim_from_hot_pool(status) or await self._claim_from_pool(status):
            self._note_relocation(status)
            return
        session = self.live.session
        # Started with a one-time credential where the workspace could go on reading what it was started with;
        # the agent's Claim then swaps in the session's token (wait_agent_healthy), as for a pool member.
        credential = secrets.token_urlsafe(24) if self._runtime.token_stays_readable else session.agent_token
        try:
            workspace = await self._runtime.start(
                session.id,
                credential,
                resources=self.template.resources,
                env=dict(self.template.env),
                labels=dict(session.labels),
            )
        except Exception as error:
            self.container_started.set_exception(error)
            raise
        self.container_started.set_result(None)
        self._claim_with_token = credential != session.agent_token
        agent = AgentClient(workspace.agent_endpoint, credential) if self._claim_with_token else None
        self._recorder.attach(self.live, workspace, agent)
        status.detail = f"{workspace.runtime} {workspace.handle[:12]} from {workspace.image}"
        self._note_relocation(status)

    def _note_relocation(self, status: pb.PhaseStatus) -> None:
        if self._relocation:
            status.detail += f"; {self._relocation}"

    async def _claim_from_pool(self, status: pb.PhaseStatus) -> bool:
        """Whether the session got a pool member, bound to it with the template's limits and env."""
        if self._pool is None:
            return False
        member = await self._pool.take()
        if member is None:
            return False
        session, template = self.live.session, self.template
        try:
            workspace, agent = await self._pool.claim(
                member, session.id, session.agent_token, resources=template.resources, env=dict(template.env)
            )
        except OrchestratorError as error:  # the member is removed; a cold start gives the same result
            log.warning("session %s: claiming a pool member failed (%s); starting cold", session.id, reason_of(error))
            return False
        self.container_started.set_result(None)
        self._recorder.attach(self.live, workspace, agent)
        status.detail = f"{workspace.runtime} {workspace.handle[:12]} from {workspace.image} {FROM_POOL}"
        # Only a template's injection keeps it (a merge into the member's empty tree); a restore's or a fork's
        # replaces the tree, node_modules with it.
        if self.archive is None and self._fork_source is None:
            self._prefetched = member.prefetched
        return True

    async def _claim_from_hot_pool(self, status: pb.PhaseStatus) -> bool:
        """Whether the session got a hot entry made from exactly its template content and image."""
        hot = self._hot_pool
        if hot is None or not self._hot_key:
            return False
        member = await hot.take_matching(self._hot_key)
        if member is None:
            return False
        session, template = self.live.session, self.template
        try:
            workspace, agent = await hot.claim(
                member, session.id, session.agent_token, resources=template.resources, env=dict(template.env)
            )
        except OrchestratorError as error:  # the entry is removed; a warm or cold start gives the same result
            log.warning(
                "session %s: claiming a hot entry failed (%s); starting otherwise", session.id, reason_of(error)
            )
            return False
        self._from_hot = True
        self.container_started.set_result(None)
        self._recorder.attach(self.live, workspace, agent)
        status.detail = f"{workspace.runtime} {workspace.handle[:12]} from {workspace.image} {FROM_HOT_POOL}"
        return True

    async def resume_container(self, status: pb.PhaseStatus) -> None:
        """Starts the paused session's workspace again with its token; when it is gone, a cold start restored
        from the session's last save (the detail says so), or the phase fails with the reason."""
        session = self.live.session
        try:
            workspace, agent = await resume_workspace(
                self._runtime, session, dict(self.template.env), self._config.agent_health_timeout_s
            )
        except WorkspaceMissing as missing:
            saves = await self._archives.list(session.id)
            if not saves:
                self.container_started.set_result(None)
                raise InitializationFailed(
                    f"cannot resume: {missing}, and the session was never saved, so there is nothing to restore"
                ) from missing
            await self._runtime.stop(session.id)  # whatever is left of it
            self.archive = saves[0]  # the newest
            await self.start_container(status)
            status.detail = (
                f"{status.detail}; the paused workspace was gone ({missing}): restored from its last"
                f" save {self.archive.id}"
            )
            return
        except Exception as error:
            self.container_started.set_exception(error)
            raise
        self._files_kept = True
        self.container_started.set_result(None)
        self._recorder.attach(self.live, workspace, agent)
        status.detail = f"resumed: {workspace.runtime} {workspace.handle[:12]} started again with its files"

    async def wait_agent_healthy(self, status: pb.PhaseStatus) -> None:
        agent = self.live.connected_agent
        await agent.wait_healthy(self._config.agent_health_timeout_s)
        if self._claim_with_token:
            session = self.live.session
            await agent.claim(session.agent_token, dict(self.template.env), session.id)
            status.detail = "the session's token installed by Claim (the workspace can read what it started with)"

    async def inject_archive(self, status: pb.PhaseStatus) -> None:
        agent, archive, template = self.live.connected_agent, self.archive, self.template
        if self._files_kept:
            status.outcome = pb.PHASE_OUTCOME_SKIPPED
            status.detail = "resumed: the workspace kept its files"
        elif self._fork_source is not None:
            await self._inject_fork(self._fork_source, status)
        elif archive is not None:
            await agent.extract_archive(self._archives.read(archive.id), archive.sha256)
            status.detail = f"archive {archive.id}: {archive.files} files, {archive.size} bytes"
        else:
            built = self._template_archive or await self._catalog.archive(template.name)
            # Merged, not replacing, into a warm member holding prefetched node_modules and nothing else: the same
            # tree as a replace, node_modules kept for the install step to judge.
            await agent.extract_archive(built.chunks(), built.sha256, merge=self._prefetched is not None)
            status.detail = f"template {template.name}: {built.files} files, {built.size} bytes"

    async def _inject_fork(self, source: LiveSession, status: pb.PhaseStatus) -> None:
        """Streams the source session's /app from its agent into this workspace's, through this process and no
        store: without node_modules, which the install step puts back (from the install cache when an install of
        the same package.json and lockfile left an entry). Holds the source's lock meanwhile: it is not paused,
        saved or deleted halfway through; it keeps running."""
        async with source.lock:
            state = source.session.state
            if state != READY or source.agent is None:
                raise InitializationFailed(f"the source session {source.session.id} is {pb.SessionState.Name(state)}")
            stream = await source.agent.create_archive()
            # The stream checks its bytes against the source's summary; the extraction swaps them in only if
            # every byte arrived, so a cut-off copy leaves nothing behind.
            extracted = await self.live.connected_agent.extract_archive(stream, "")
        if stream.summary is None or extracted.sha256 != stream.summary.sha256:
            raise InitializationFailed(f"the copy of {source.session.id}'s files arrived altered or incomplete")
        status.detail = (
            f"forked from {source.session.id}: {extracted.files} files, {stream.summary.size} bytes streamed"
            " (node_modules left to the install)"
        )

    async def install(self, status: pb.PhaseStatus) -> None:
        template = self.template
        if self._files_kept:
            status.outcome = pb.PHASE_OUTCOME_SKIPPED
            status.detail = "resumed: the workspace kept its node_modules"
            return
        if not template.install_command:
            await self._discard_prefetched()
            status.outcome = pb.PHASE_OUTCOME_SKIPPED
            status.detail = "the template has no install command"
            return
        self._install_key, injected = await self._from_install_cache()
        status.detail = injected.note
        if injected.exact and template.install_on_cache_hit == SKIP:
            # node_modules is what this install made before from the same core image, command, package.json
            # and lockfile: running it again would only verify that.
            status.outcome = pb.PHASE_OUTCOME_SKIPPED
            short = self._install_key.key[:12]
            status.detail = f"install skipped: exact install-cache hit {short} ({injected.restored})"
            return
        # The template's own settings win over the hit's defaults.
        env = {**HIT_ENV, **template.env} if injected.hit else dict(template.env)
        exit_code = await self.live.connected_agent.run(
            template.install_command,
            env=env,
            on_line=self.live.line_sink(pb.PHASE_INSTALL),
            timeout=self._config.install_timeout_s,
        )
        if exit_code != 0:
            raise InitializationFailed(f"`{template.install_command}` exited with code {exit_code}")

    async def start_dev_server(self, status: pb.PhaseStatus) -> None:
        agent, template = self.live.connected_agent, self.template
        await agent.start_process(DEV_PROCESS, template.dev_command, env=dict(template.env))
        # Following the dev server's output shows it to watchers, nudges the probe and tells when it dies early.
        sink = self.live.line_sink(pb.PHASE_DEV_SERVER_STARTED)

        def on_line(text: str, stderr: bool) -> None:
            sink(text, stderr)
            self._dev_output.set()

        self._follow_dev = asyncio.create_task(agent.process_lines(DEV_PROCESS, on_line))

    async def wait_ready(self, status: pb.PhaseStatus) -> None:
        template = self.template
        url = self.live.session.preview_url.rstrip("/") + template.readiness_path
        probe = asyncio.create_task(wait_until_ready(url, template.readiness_timeout_s, nudge=self._dev_output))
        waited = {probe} if self._follow_dev is None else {probe, self._follow_dev}
        try:
            await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the session is stopped meanwhile: the probe must not outlive the phase
            answered = probe.done()
            if not answered:
                probe.cancel()
        if not answered:
            raise InitializationFailed(f"the dev server (`{template.dev_command}`) exited before answering on {url}")
        status.detail = f"{url} answered HTTP {probe.result()}"

    async def _from_install_cache(self) -> tuple[CacheKey, Injected]:
        """Puts the cached node_modules for the workspace's install in place, if there is one. Returns the
        install's cache key (empty = not cacheable, or no cache) and what was injected."""
        template, agent = self.template, self.live.connected_agent
        if self._install_cache is None:
            return CacheKey(""), Injected(False, "install cache off")
        key = await self._install_cache.key(agent, template.install_command, self.live.session.image)
        if key and key == self._prefetched:
            return key, self._install_cache.prefetched(key)
        await self._discard_prefetched()
        if not key:
            return key, Injected(False, key.note)
        return key, await self._install_cache.inject(agent, key)

    async def _discard_prefetched(self) -> None:
        """Moves a warm member's prefetched node_modules, not this session's, out of the tree (one rename into
        the agent's own directory, which archives and searches leave out); it is removed once the session is
        READY, in the background."""
        if self._prefetched is None:
            return
        self._prefetched = None
        agent = self.live.connected_agent
        aside = f".workspace-agent/prefetched-{secrets.token_hex(4)}"
        # Where the rename cannot be made, the tree is removed in place (and nothing is left to remove later).
        moved = await agent.run(
            f"mkdir -p .workspace-agent && mv -T node_modules {aside} 2>/dev/null || rm -rf node_modules",
            on_line=lambda text, _: None,
        )
        if moved != 0:
            raise InitializationFailed("the warm pool member's prefetched node_modules could not be removed")
        self._set_aside = aside  # removed after READY: deleting files beside the dev server's start slows it

    def _remove_set_aside(self) -> None:
        if not self._set_aside or self.live.agent is None:
            return
        removal = asyncio.create_task(self.live.agent.run(f"rm -rf {self._set_aside}", on_line=lambda text, _: None))
        _REMOVALS.add(removal)  # held until done (the loop keeps weak references only)
        removal.add_done_callback(_removed)

    # Every phase from a bare core image to READY, in order. A caller may pass its own sequence (a pool's
    # claim in place of start_container, or only the last steps for a workspace prepared ahead).
    STEPS: tuple[tuple[pb.Phase.ValueType, Step], ...] = (
        (pb.PHASE_CONTAINER_STARTED, start_container),
        (pb.PHASE_AGENT_HEALTHY, wait_agent_healthy),
        (pb.PHASE_ARCHIVE_INJECTED, inject_archive),
        (pb.PHASE_INSTALL, install),
        (pb.PHASE_DEV_SERVER_STARTED, start_dev_server),
        (pb.PHASE_READY, wait_ready),
    )
    # A paused session's way back to READY: the same six phases, the container started again (or, gone, a
    # cold start from the last save) in place of a new one.
    RESUME_STEPS: tuple[tuple[pb.Phase.ValueType, Step], ...] = (
        (pb.PHASE_CONTAINER_STARTED, resume_container),
        *STEPS[1:],
    )


async def resume_workspace(
    runtime: Runtime, session: pb.Session, env: dict[str, str], health_timeout_s: float
) -> tuple[Workspace, AgentClient]:
    """Starts the paused session's workspace again and hands its agent to the session as a pool member's is: the
    runtime delivers a new one-time credential (the agent removed the last token file when it read it), and the
    agent's Claim replaces it with the session's token and adds the template's `env` to later commands (a claimed
    member's agent had them from its first Claim; a restarted one starts without). So the session's token is never
    written into the workspace again, and what the file held is refused once claimed. Returns the workspace and a
    client holding the session's token. Raises WorkspaceMissing, and what the runtime or the agent raise."""
    credential = secrets.token_urlsafe(24)
    workspace = await runtime.resume(session.id, credential, env=env)
    agent = AgentClient(workspace.agent_endpoint, credential)
    try:
        await agent.wait_healthy(health_timeout_s)
        await agent.claim(session.agent_token, env, session.id)
    except BaseException:
        await agent.close()
        raise
    return workspace, agent


# One phase's work: given the Initialization and the phase's status (to set its detail or SKIPPED).
Step = Callable[[Initialization, pb.PhaseStatus], Awaitable[None]]


def _removed(task: asyncio.Task[int]) -> None:
    _REMOVALS.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a workspace gone meanwhile has nothing left to remove
