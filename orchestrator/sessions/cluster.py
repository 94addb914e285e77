"""Several orchestrator replicas on one database: this replica's heartbeat (its leases renewed, the leader lease
taken while free), the takeover of sessions whose owner stopped renewing, and calls forwarded to a session's owner.

A session's workspace, agent client, initialization task, output history and watchers live in one process, its
owner's; the record in the database is what every replica reads. Save, delete and watch of a session another
replica owns are forwarded to that owner over gRPC rather than done here against the agent: the owner's lock
serializes them with its reaper, its initialization and its exit following, the record keeps one writer (writes
are fenced by ownership), and a forwarded watch is the owner's own stream, output lines and all."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, TypeVar

import grpc
from grpc import aio

from orchestrator.errors import ReplicaUnavailable, error_for_status
from orchestrator.sessions.live import HELD_STATES, reason_of
from orchestrator.store import Store
from workspace.orchestrator.v1 import orchestrator_pb2 as pb
from workspace.orchestrator.v1 import orchestrator_pb2_grpc

if TYPE_CHECKING:
    from orchestrator.sessions.manager import SessionManager

log = logging.getLogger(__name__)

T = TypeVar("T")
# Leases are renewed this many times per TTL: a slow beat or two does not lose them.
BEATS_PER_TTL = 3


class Cluster:
    """This replica among the others on its database (on SQLite, the only one: it leads and owns everything)."""

    def __init__(self, manager: SessionManager, store: Store) -> None:
        self._manager = manager
        self._store = store
        self.address = ""  # where other replicas reach this one, once bound (see Orchestrator)
        self.leading = False
        self._channels: dict[str, aio.Channel] = {}
        self._beating: asyncio.Task[None] | None = None

    @property
    def beat_interval_s(self) -> float:
        return self._store.lease_ttl_s / BEATS_PER_TTL

    @property
    def takeover_within_s(self) -> float:
        """How long after a replica's death its sessions are taken over at most: its leases run out, then the
        next beat of another replica finds them."""
        return self._store.lease_ttl_s + self.beat_interval_s

    async def beat(self) -> None:
        """Renews the leases, follows the leader lease (the leader runs the pools), takes over orphaned sessions."""
        leading = await self._store.heartbeat(self.address)
        if leading != self.leading:
            self.leading = leading
            log.info("replica %s %s", self._store.replica_id, "leads now" if leading else "no longer leads")
            await self._manager.lead(leading)
        for session in await self._store.orphans(HELD_STATES):
            await self._manager.take_over(session)

    def start(self) -> None:
        """Beats in the background (only with other replicas possible: on SQLite the first beat settled it all)."""
        if self._store.shared:
            self._beating = asyncio.create_task(self._beat_forever(), name="replica heartbeat")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.beat_interval_s)
            try:
                await self.beat()
            except Exception as error:  # noqa: BLE001 - a database hiccup: the next beat tries again
                log.warning("replica heartbeat failed: %s", reason_of(error))

    async def close(self) -> None:
        """Stops beating and hands this replica's sessions and leadership over (their workspaces keep running)."""
        if self._beating is not None:
            self._beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beating
        if self._store.shared:
            with contextlib.suppress(Exception):
                await self._store.resign()
        for channel in self._channels.values():
            await channel.close()

    # ------------------------------------------------------------------ forwarding

    async def owner_stub(self, session_id: str) -> orchestrator_pb2_grpc.OrchestratorServiceAsyncStub | None:
        """A client of the live replica that owns the session, or None when this one is to act: no other replica
        owns it (a session whose owner's lease ran out is taken over here first). Raises ReplicaUnavailable."""
        if not self._store.shared:
            return None
        owner = await self._store.owner(session_id)
        if owner is None or owner[0] == self._store.replica_id:
            return None
        replica, address, current = owner
        if not current:
            session = await self._store.get_session(session_id)
            if session is not None and session.state in HELD_STATES:
                await self._manager.take_over(session)
            # Another replica may have been first to take it over: then that one serves it.
            owner = await self._store.owner(session_id)
            if owner is None or owner[0] == self._store.replica_id or not owner[2]:
                return None
            replica, address, current = owner
        if not address:
            raise ReplicaUnavailable(f"replica {replica}, owner of session {session_id}, has no address registered")
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio.insecure_channel(address)
        return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

    async def forwarded(self, session_id: str, call: Awaitable[T]) -> T:
        """`call`'s answer, or the owner's error as this replica's. Raises ReplicaUnavailable."""
        try:
            return await call
        except aio.AioRpcError as error:
            raise self._error(session_id, error) from None

    async def forward_watch(
        self, session_id: str, stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub
    ) -> AsyncIterator[pb.WatchSessionResponse]:
        """The owner's WatchSession stream, passed through. Raises what the owner answered."""
        try:
            async for event in stub.WatchSession(pb.WatchSessionRequest(id=session_id)):
                yield event
        except aio.AioRpcError as error:
            raise self._error(session_id, error) from None

    def _error(self, session_id: str, error: aio.AioRpcError) -> Exception:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return ReplicaUnavailable(
                f"the replica owning session {session_id} does not answer ({error.details()}): another replica takes"
                f" its sessions over within {self.takeover_within_s:g}s; try again then"
            )
        return error_for_status(error.code(), error.details() or "")
