"""The warm pool: started core-image workspaces with healthy agents and no session, handed to sessions as they
are created (no container start, no agent boot on the session's path) and refilled in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from orchestrator.agent_client import AgentClient
from orchestrator.errors import OrchestratorError
from orchestrator.install_cache import CacheKey, InstallCache
from orchestrator.runtime import Runtime, Workspace
from orchestrator.runtime.base import POOL_KEY_LABEL
from orchestrator.templates import ResourceHints
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

log = logging.getLogger(__name__)

POOL_KIND = "warm"
# Ends the container phase's detail of a session that claimed a member.
FROM_POOL = "(from the warm pool)"
# Members started at once: one container start keeps a core busy (2-core hosts).
FILL_AT_ONCE = 2
# A member's agent must answer a health check this fast to be handed out.
TAKE_HEALTH_TIMEOUT_S = 0.5
# A refill waits for the session that took a member to settle (Initialization calls refill()), or this long at
# most: a container start beside the session's dev server start slows that down (2 cores), yet a long install
# must not leave the pool empty for its whole duration.
REFILL_DELAY_S = 3.0
# After a failed start (no engine, no image) the pool tries again this much later, not in a tight loop.
RETRY_AFTER_S = 5.0


@dataclass
class Member:
    """One pool member: its workspace, and a client holding the pool credential its agent was started with
    (the credential lives in this process only: a restarted orchestrator cannot claim it, and removes it)."""

    workspace: Workspace
    agent: AgentClient
    credential: str
    # A hot pool entry's key (see HotPool): what it was made from; "" for a warm member.
    key: str = ""
    # A warm member's /app/node_modules, put there ahead from this install-cache entry (InstallCache.prefetch).
    prefetched: CacheKey | None = None


class WarmPool:
    """Keeps `size` members ready, as far as `room()` (how many more workspaces max_sessions allows now, the
    members counted in) lets it. take() hands one out at once or says there is none; never waits for a fill.
    A subclass (HotPool) labels and prepares its members further through `_labels` and `_prepare`."""

    kind = POOL_KIND
    fill_at_once = FILL_AT_ONCE
    retry_after_s = RETRY_AFTER_S

    def __init__(
        self,
        runtime: Runtime,
        size: int,
        *,
        room: Callable[[], int],
        health_timeout_s: float,
        install_cache: InstallCache | None = None,
    ) -> None:
        """With `install_cache`, each member gets the node_modules of the entry last hit or stored put in ahead
        (a session of that install then has nothing to restore), and idle members are restocked with a new
        entry once it is stored."""
        self._runtime = runtime
        self._install_cache = install_cache
        self._restocking: asyncio.Task[None] | None = None
        # The idle member being restocked: out of _ready meanwhile, yet held.
        self._restocked: Member | None = None
        if install_cache is not None:
            install_cache.on_stored.append(self._restock_soon)
        self._size = size
        self._room = room
        self._health_timeout_s = health_timeout_s
        self._ready: list[Member] = []
        self._starting = 0
        self._wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._filling: asyncio.Task[None] | None = None
        self._following: asyncio.Task[None] | None = None

    @property
    def members(self) -> list[Member]:
        """The ready members, oldest first (the next take() tries them in this order)."""
        return list(self._ready)

    @property
    def held(self) -> int:
        """Workspaces the pool holds or is starting: they count against max_sessions like sessions do."""
        return len(self._ready) + self._starting + (self._restocked is not None)

    @property
    def target(self) -> int:
        """How many ready members the pool keeps now: its size, or what max_sessions leaves beside the sessions
        and the other pools."""
        return max(min(self._size, self._room()), 0)

    @property
    def running(self) -> bool:
        """Whether the pool was started and is not closed: it fills, and take() may hand members out."""
        return self._filling is not None and not self._filling.done()

    def status(self) -> pb.Pool:
        """How far the pool is filled, as GetPools reports it."""
        return pb.Pool(
            size=self._size,
            target=self.target,
            ready=len(self._ready),
            preparing=self.held - len(self._ready),
        )

    async def start(self, *, remove_leftovers: bool = True) -> None:
        """Removes the unclaimed members an earlier orchestrator left (their credentials died with it; of every
        pool: the first pool started does it), then fills in the background and drops members whose workspace
        stops. Raises EngineUnavailable."""
        exits = self._runtime.exits()
        for workspace in await self._runtime.list() if remove_leftovers else ():
            if workspace.pool_id:
                log.info("removing pool member %s left by an earlier orchestrator", workspace.pool_id)
                await self._runtime.discard(workspace.pool_id)
        self._following = asyncio.create_task(self._follow_exits(exits), name=f"{self.kind} pool exits")
        self._filling = asyncio.create_task(self._fill(), name=f"{self.kind} pool fill")
        self.refill()

    async def wait_full(self, timeout: float) -> bool:
        """Waits until the pool holds as many ready members as it may (its size, or what max_sessions leaves);
        returns whether it does within `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._ready) < self.target:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def refill(self) -> None:
        """Wakes the filler (after a take, a session's end, a member's loss)."""
        self._wanted.set()

    def _resources(self, labels: dict[str, str]) -> ResourceHints | None:
        """The limits a member with `labels` starts with: the defaults (None), a claim applies the session's."""
        return None

    async def take(self) -> Member | None:
        """A member whose agent answers now, or None at once when there is none (the caller starts cold).
        A member that does not answer is removed, never handed out. The pool refills once the caller calls
        refill() (its session settled) or REFILL_DELAY_S later."""
        asyncio.get_running_loop().call_later(REFILL_DELAY_S, self.refill)
        while self._ready:
            member = self._ready.pop(0)
            if await member.agent.healthy(TAKE_HEALTH_TIMEOUT_S):
                return member
            log.warning("%s pool: member %s did not answer; removed", self.kind, member.workspace.pool_id)
            self._spawn(self._discard(member))
        return None

    async def claim(
        self, member: Member, session_id: str, token: str, *, resources: ResourceHints, env: dict[str, str]
    ) -> tuple[Workspace, AgentClient]:
        """Binds a taken member to the session: the runtime's claim (its name, the template's limits), then the
        agent's (the session's token replaces the pool credential; `env` for every later command). Returns the
        session's workspace and a client with the session's token. On failure the member is removed (by then it
        may be the session's workspace: stopped under the session's id) and the error raised: FailedPrecondition,
        EngineUnavailable, InvalidArgument."""
        try:
            # At once: the engine's rename and the agent's token swap are independent, and both on the session's path.
            claimed, answered = await asyncio.gather(
                self._runtime.claim(member.workspace, session_id, resources=resources),
                member.agent.claim(token, env, session_id),
                return_exceptions=True,
            )
            if isinstance(claimed, BaseException):
                raise claimed
            if isinstance(answered, BaseException):
                raise answered
            workspace = claimed
        except BaseException:
            await member.agent.close()
            with contextlib.suppress(OrchestratorError):
                await self._runtime.stop(session_id)
                await self._runtime.discard(member.workspace.pool_id)
            raise
        return workspace, member.agent

    async def close(self) -> None:
        """Stops filling and removes the members (their credentials are in this process only)."""
        for task in (self._filling, self._following, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._filling, self._following, *self._tasks) if t), return_exceptions=True)
        members, self._ready = self._ready, []
        await asyncio.gather(*(self._discard(member) for member in members), return_exceptions=True)

    # ------------------------------------------------------------------ background

    async def _fill(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            wanted = min(self.target - self.held, self.fill_at_once - self._starting)
            for _ in range(max(wanted, 0)):
                self._starting += 1
                self._spawn(self._add_member())

    async def _add_member(self) -> None:
        pool_id = secrets.token_hex(6)
        credential = secrets.token_urlsafe(24)
        agent: AgentClient | None = None
        starting: asyncio.Future[Workspace] | None = None
        failed = False
        try:
            labels = await self._labels()
            # Shielded: a cancelled start would go on in its thread and create the container after the discard.
            starting = asyncio.ensure_future(
                self._runtime.start_pooled(
                    pool_id, credential, kind=self.kind, labels=labels, resources=self._resources(labels)
                )
            )
            workspace = await asyncio.shield(starting)
            agent = AgentClient(workspace.agent_endpoint, credential)
            await agent.wait_healthy(self._health_timeout_s)
            member = Member(workspace, agent, credential, labels.get(POOL_KEY_LABEL, ""))
            await self._prepare(member)
            self._ready.append(member)
            log.info("%s pool: member %s ready (%d of %d)", self.kind, pool_id, len(self._ready), self._size)
        except (OrchestratorError, grpc.aio.AioRpcError) as error:
            failed = True
            log.warning(
                "%s pool: could not start a member (%s); trying again in %g s", self.kind, error, self.retry_after_s
            )
            if agent is not None:
                await agent.close()
            with contextlib.suppress(OrchestratorError):
                await self._runtime.discard(pool_id)
        except asyncio.CancelledError:
            if agent is not None:
                await agent.close()
            with contextlib.suppress(OrchestratorError):
                await asyncio.shield(self._discard_started(starting, pool_id))
            raise
        finally:
            if failed:  # the slot stays taken meanwhile: no other start replaces this one at once
                await asyncio.sleep(self.retry_after_s)
            self._starting -= 1
        self.refill()

    async def _discard_started(self, starting: asyncio.Future[Workspace] | None, pool_id: str) -> None:
        """Removes a member whose start may still be under way, once that start has ended."""
        if starting is not None:
            await asyncio.wait({starting})
            if not starting.cancelled():
                starting.exception()  # retrieved: a failed start has nothing to remove, and is no news
        await self._runtime.discard(pool_id)

    async def _labels(self) -> dict[str, str]:
        """The labels of the next member besides the runtime's (POOL_KEY_LABEL becomes its key)."""
        return {}

    async def _prepare(self, member: Member) -> None:
        """Takes a started member with a healthy agent further before it is handed out: here, the prefetch of the
        recent install-cache entry. Raises OrchestratorError: the member is removed."""
        if self._install_cache is not None:
            member.prefetched = await self._install_cache.prefetch(member.agent)

    def _restock_soon(self) -> None:
        if self._restocking is None or self._restocking.done():
            self._restocking = self._spawn(self._restock())

    async def _restock(self) -> None:
        """Brings the idle members' prefetched node_modules up to the entry stored last, one member at a time
        (out of the pool meanwhile: a create then takes another member, or starts cold)."""
        assert self._install_cache is not None
        while (recent := self._install_cache.recent) is not None:
            member = next((m for m in self._ready if m.prefetched != recent), None)
            if member is None:
                return
            self._ready.remove(member)
            self._restocked = member
            try:
                member.prefetched = await self._install_cache.prefetch(member.agent)
            except asyncio.CancelledError:  # the pool is closing: the member is out of its list, removed here
                await asyncio.shield(self._discard(member))
                raise
            finally:
                self._restocked = None
            self._ready.append(member)
            if member.prefetched != recent:  # failed (logged): not tried again in a loop
                return

    async def _follow_exits(self, exits) -> None:
        async for exit in exits:
            member = next((m for m in self._ready if m.workspace.handle == exit.handle), None)
            if member is not None:
                log.warning(
                    "%s pool: member %s stopped (%s); removed", self.kind, member.workspace.pool_id, exit.reason
                )
                self._ready.remove(member)
                self._spawn(self._discard(member))
                self.refill()

    async def _discard(self, member: Member) -> None:
        await member.agent.close()
        try:
            await self._runtime.discard(member.workspace.pool_id)
        except OrchestratorError as error:
            log.warning("%s pool: could not remove member %s: %s", self.kind, member.workspace.pool_id, error)

    def _spawn(self, coroutine) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def pool_size_problem(size: int, max_sessions: int, hot: dict[str, int] | None = None) -> str:
    """Why a warm pool of `size` and the hot pools `hot` (per template) cannot be run beside `max_sessions`
    ("" when they can)."""
    if size < 0:
        return f"--warm-pool {size}: the pool size is 0 (off) or more"
    held = size + sum((hot or {}).values())
    if held > max_sessions:
        asked = f"--warm-pool {size}" + "".join(f" --hot-pool {name}={k}" for name, k in (hot or {}).items())
        return (
            f"{asked} hold {held} workspaces, more than --max-sessions {max_sessions} allows (pool members count"
            " against it): lower the pools or raise --max-sessions"
        )
    return ""
