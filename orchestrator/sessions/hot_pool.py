"""Hot pools: per template, pool members taken through a session's own initialization steps (template injected,
installed, dev server answering), so a session claiming one is READY at once; keyed by what they were made of."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from orchestrator.agent_client import AgentClient
from orchestrator.errors import InitializationFailed, OrchestratorError
from orchestrator.pool import REFILL_DELAY_S, TAKE_HEALTH_TIMEOUT_S, Member, WarmPool
from orchestrator.readiness import http_status
from orchestrator.runtime import Runtime, Workspace
from orchestrator.runtime.base import POOL_KEY_LABEL, POOL_TEMPLATE_LABEL
from orchestrator.sessions.live import READY, LiveSession, reason_of
from orchestrator.templates import PinnedTemplate
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

if TYPE_CHECKING:
    from orchestrator.sessions.initialization import Initialization

log = logging.getLogger(__name__)

HOT_KIND = "hot"
# Ends the container phase's detail of a session that claimed a hot entry; the later phases' detail.
FROM_HOT_POOL = "(from the hot pool)"
HOT_DETAIL = "from the hot pool"
# How often the pool looks for an edited template or a rebuilt image (its entries are then retired): reading
# and hashing a template's files (node_modules are not among them) is cheap.
KEY_CHECK_S = 5.0
# A hot fill runs an install and a dev server: one at a time (2-core hosts), and a failing template (its
# install or dev server fails) is not tried again in a tight loop.
HOT_FILL_AT_ONCE = 1
HOT_RETRY_AFTER_S = 60.0
# A hot entry's dev server must answer this fast to be handed out.
TAKE_PROBE_TIMEOUT_S = 1.0


def entry_key(pinned: PinnedTemplate, image_id: str) -> str:
    """`<template content hash>:<image id>`, both shortened (a Docker label value)."""
    image = (
        image_id.removeprefix("sha256:")
        if image_id.startswith("sha256:")
        else hashlib.sha256(image_id.encode()).hexdigest()
    )
    return f"{pinned.content_hash[:16]}:{image[:12]}"


class _PoolRecorder:
    """The Recorder of a hot fill's initialization: no store, no watchers (there is no session yet); a failure
    is kept for the fill to report."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None

    def record(self, live: LiveSession, event: pb.WatchSessionResponse) -> None:
        pass

    def fail(self, live: LiveSession, error: BaseException) -> None:
        self.failure = error

    def attach(self, live: LiveSession, workspace: Workspace, agent: AgentClient | None = None) -> None:
        live.workspace, live.agent = workspace, agent or live.agent


class HotPool(WarmPool):
    """Keeps `size` members of one template READY: each made by an Initialization of its own (the steps after
    the agent is healthy) from the template at one content hash, on one image, and labelled with that key.
    take_matching(key) hands out only a member of `key` whose agent and dev server answer; members of another
    key (the template was edited, the image rebuilt) are retired in the background and replaced."""

    kind = HOT_KIND
    fill_at_once = HOT_FILL_AT_ONCE
    retry_after_s = HOT_RETRY_AFTER_S

    def __init__(
        self,
        runtime: Runtime,
        size: int,
        template: str,
        *,
        room: Callable[[], int],
        health_timeout_s: float,
        pinned: Callable[[str], Awaitable[PinnedTemplate]],
        initialization: Callable[[LiveSession, PinnedTemplate, _PoolRecorder], Initialization],
        output_history_lines: int,
    ) -> None:
        super().__init__(runtime, size, room=room, health_timeout_s=health_timeout_s)
        self.template = template
        self._pinned_of = pinned
        self._initialization = initialization
        self._history_lines = output_history_lines
        # The template as each key (labelled on a member being started) was computed: what _prepare injects.
        self._made_of: dict[str, PinnedTemplate] = {}
        self._checking: asyncio.Task[None] | None = None

    async def current(self) -> tuple[str, PinnedTemplate]:
        """The key an entry must have to be handed out now, and the template at it. Raises TemplateNotFound,
        InvalidTemplate, EngineUnavailable, ImageMissing."""
        pinned = await self._pinned_of(self.template)
        return entry_key(pinned, await self._runtime.image_id()), pinned

    async def start(self, *, remove_leftovers: bool = True) -> None:
        await super().start(remove_leftovers=remove_leftovers)
        self._checking = asyncio.create_task(self._check_keys(), name=f"hot pool {self.template} keys")

    async def take_matching(self, key: str) -> Member | None:
        """A member of `key` whose agent and dev server answer now, or None at once. Members of another key are
        retired; members that do not answer are removed, never handed out."""
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self.refill)
        self._retire(lambda member: member.key != key, "made from another template content or image")
        while self._ready:
            member = self._ready.pop(0)
            made_of = self._made_of.get(member.key)
            if await member.agent.healthy(TAKE_HEALTH_TIMEOUT_S) and made_of and await self._answers(member, made_of):
                return member
            log.warning("hot pool %s: entry %s did not answer; removed", self.template, member.workspace.pool_id)
            self._spawn(self._discard(member))
        return None

    # ------------------------------------------------------------------ background

    async def _labels(self) -> dict[str, str]:
        key, pinned = await self.current()
        self._made_of[key] = pinned
        return {POOL_TEMPLATE_LABEL: self.template, POOL_KEY_LABEL: key}

    async def _prepare(self, member: Member) -> None:
        """Runs the session's own steps from the archive on, on the member, with the pool credential."""
        pinned = self._made_of[member.key]
        workspace = member.workspace
        record = pb.Session(
            id=f"pool-{workspace.pool_id}",
            template=self.template,
            agent_token=member.credential,
            preview_url=workspace.preview_url,
            agent_endpoint=workspace.agent_endpoint,
            image=workspace.image,
            runtime=workspace.runtime,
        )
        live = LiveSession(record, pinned.spec, self._history_lines)
        live.workspace, live.agent = workspace, member.agent
        recorder = _PoolRecorder()
        await self._initialization(live, pinned, recorder).run()
        if live.session.state != READY:
            failure = recorder.failure
            last = " | ".join(line.text for line in list(live.output)[-5:])
            raise InitializationFailed(f"{reason_of(failure) if failure else 'not READY'} (last output: {last})")
        if live.install_store is not None:
            # The install cache entry is written through the pool credential, which a claim replaces.
            await live.install_store

    async def _answers(self, member: Member, made_of: PinnedTemplate) -> bool:
        url = member.workspace.preview_url.rstrip("/") + made_of.spec.readiness_path
        try:
            return 200 <= await http_status(url, TAKE_PROBE_TIMEOUT_S) < 400
        except (OSError, TimeoutError):
            return False

    async def _check_keys(self) -> None:
        while True:
            await asyncio.sleep(KEY_CHECK_S)
            try:
                key, _ = await self.current()
            except OrchestratorError as error:  # removed or broken: no entry matches what a session would get
                key = ""
                log.warning("hot pool %s: %s", self.template, reason_of(error))
            if self._retire(functools.partial(_stale, key=key), "the template or the core image changed"):
                self.refill()

    def _retire(self, stale: Callable[[Member], bool], why: str) -> int:
        retired = [member for member in self._ready if stale(member)]
        for member in retired:
            log.info("hot pool %s: entry %s retired (%s)", self.template, member.workspace.pool_id, why)
            self._ready.remove(member)
            self._spawn(self._discard(member))
        return len(retired)

    async def close(self) -> None:
        if self._checking is not None:
            self._checking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checking
        await super().close()


def _stale(member: Member, *, key: str) -> bool:
    """Whether a hot entry was made from other content or another image than `key` names."""
    return member.key != key
