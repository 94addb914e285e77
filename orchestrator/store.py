"""The orchestrator's state: session records, archive metadata and the replicas' leases, in SQLite (the default)
or PostgreSQL (several orchestrator replicas on one database), one schema kept by migrations (store_migrations/).

Why SQLAlchemy Core (with Alembic) rather than psycopg 3 and a pool: the two databases must run the same queries
and the same migrations. Core writes each statement once for both dialects (upserts included, through each
dialect's `insert().on_conflict_do_update`), and Alembic is its migration tool: the v1 schema of an existing
SQLite store is stamped and upgraded like any other. psycopg 3 is still the driver underneath for PostgreSQL; on
its own it would have left SQLite a second hand-written code path. No ORM: the records are the contract's own
messages, stored serialized beside the columns queries filter on.

Calls: SQLite's run inline (well under a millisecond, as before). PostgreSQL's go over the network, so they run on
the store's own thread, off the event loop, in the order they were made (a read after a write sees it)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import functools
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from orchestrator.errors import InvalidArgument
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

log = logging.getLogger(__name__)
# Alembic says at INFO which context it runs in at every start: noise in the orchestrator's log.
logging.getLogger("alembic").setLevel(logging.WARNING)

# PRAGMA user_version of an SQLite store: 1 was the schema before migrations (kept by hand), 2 is Alembic's head.
# An older orchestrator refuses a store whose version it does not know, rather than write to it.
SCHEMA_VERSION = 2
LEGACY_REVISION = "0001"
MIGRATIONS = Path(__file__).resolve().parent / "store_migrations"
# Serializes schema upgrades of replicas starting at once on one PostgreSQL database.
MIGRATION_LOCK = 0x77736331
LEADER = "leader"
INSTANCE_ID_KEY = "instance_id"

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# A replica's leases (its own, and its sessions') last this long unless renewed.
DEFAULT_LEASE_TTL_S = 10.0

T = TypeVar("T")

metadata = sa.MetaData()
# Sessions are stored as their serialized `Session` message (the record a caller sees) plus the columns the
# queries filter and order by. Labels are a JSON object (json_each / jsonb match them). `owner` is the replica
# that holds the session's workspace, until `lease_expires_us`.
sessions = sa.Table(
    "sessions", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("template", sa.Text, nullable=False),
    sa.Column("labels", sa.Text, nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
    sa.Column("owner", sa.Text),
    sa.Column("lease_expires_us", sa.BigInteger),
)  # fmt: skip
archives = sa.Table(
    "archives", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("session_id", sa.Text, nullable=False),
    sa.Column("created_us", sa.BigInteger, nullable=False),
    sa.Column("record", sa.LargeBinary, nullable=False),
)  # fmt: skip
# Live replicas and the address other replicas forward calls to.
replicas = sa.Table(
    "replicas", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("expires_us", sa.BigInteger, nullable=False),
)  # fmt: skip
# Cluster-wide leases by name: "leader" (the replica that runs the pools).
leases = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    sa.Column("expires_us", sa.BigInteger, nullable=False),
)  # fmt: skip
meta = sa.Table(
    "meta", metadata,
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)  # fmt: skip


def database_url(database: str | Path) -> str:
    """The SQLAlchemy URL of `database`: a postgresql:// URL (psycopg 3 as the driver) or an SQLite file's path."""
    text = str(database)
    if text.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + text.partition("://")[2]
    if text.startswith("postgresql+"):
        return text
    return f"sqlite:///{Path(text).absolute()}"


def now_us() -> int:
    # Wall clocks of the replicas' hosts: leases assume them in step (NTP) to well within the lease TTL.
    return int(time.time() * 1e6)


class Store:
    """The state database. `shared` (PostgreSQL) means other replicas may use it at once: every session write is
    fenced by ownership (a replica whose lease was taken writes nothing and is told through `on_lost`)."""

    def __init__(self, database: str | Path, *, replica_id: str = "", lease_ttl_s: float = DEFAULT_LEASE_TTL_S) -> None:
        url = database_url(database)
        self.shared = url.startswith("postgresql")
        self.replica_id = replica_id or f"rep-{secrets.token_hex(4)}"
        self.lease_ttl_s = lease_ttl_s
        # Called (on the event loop) with a session's id when a write found another replica owning it.
        self.on_lost: Callable[[str], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        if self.shared:
            self._engine = sa.create_engine(url, pool_size=2, pool_pre_ping=True)
            self._thread: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="store"
            )
        else:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # One connection, as before: the lock serializes its use; transactions are ours (BEGIN below).
            self._engine = sa.create_engine(url, poolclass=sa.StaticPool, connect_args={"check_same_thread": False})
            sa.event.listen(self._engine, "connect", _sqlite_connected)
            sa.event.listen(self._engine, "begin", lambda connection: connection.exec_driver_sql("BEGIN IMMEDIATE"))
            self._thread = None
        self._insert = postgresql.insert if self.shared else sqlite.insert
        self._migrate()

    # ------------------------------------------------------------------ schema

    def _migrate(self) -> None:
        """Brings the schema to Alembic's head: a new database from nothing, an SQLite store of schema v1 (from
        before migrations, PRAGMA user_version 1) stamped as revision 0001 first. Raises RuntimeError for a
        store newer than this orchestrator."""
        with self._lock, self._engine.connect() as connection:
            if self.shared:
                connection.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK})
                connection.commit()
            try:
                config = Config()
                config.set_main_option("script_location", str(MIGRATIONS))
                config.attributes["connection"] = connection
                current = MigrationContext.configure(connection).get_current_revision()
                if not self.shared:
                    (version,) = connection.exec_driver_sql("PRAGMA user_version").one()
                    connection.commit()
                    if version > SCHEMA_VERSION:
                        raise RuntimeError(
                            f"state database has schema version {version}, this orchestrator knows {SCHEMA_VERSION}"
                        )
                    if current is None and version == 1:
                        command.stamp(config, LEGACY_REVISION)
                command.upgrade(config, "head")
                connection.commit()
                if not self.shared:
                    connection.exec_driver_sql(f"PRAGMA user_version={SCHEMA_VERSION}")
                    connection.commit()
            finally:
                if self.shared:
                    connection.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK})
                    connection.commit()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        with self._lock:
            self._engine.dispose()

    # ------------------------------------------------------------------ running calls

    def _transaction(self, work: Callable[[Connection], T]) -> T:
        with self._lock, self._engine.begin() as connection:
            return work(connection)

    async def _call(self, work: Callable[[Connection], T]) -> T:
        if self._thread is None:
            return self._transaction(work)
        self._loop = asyncio.get_running_loop()
        return await asyncio.wrap_future(self._thread.submit(self._transaction, work))

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Calls `callback` on the event loop once every write made so far is in the database (now, on SQLite)."""
        if self._thread is None:
            callback()
            return
        loop = asyncio.get_running_loop()
        done = self._thread.submit(lambda: None)  # the thread takes calls in order: this one comes after them
        done.add_done_callback(lambda _: _call_soon(loop, callback))

    async def flush(self) -> None:
        """Waits until every write made so far (put_session) is in the database."""
        await self._call(lambda connection: None)

    # ------------------------------------------------------------------ sessions

    def put_session(self, session: pb.Session) -> None:
        """Inserts or replaces the session's record, as its owner (this replica). On SQLite it is written now; on
        PostgreSQL queued on the store's thread in order (`flush` waits for it), and written only while this
        replica still owns the session."""
        row = {
            "id": session.id,
            "state": session.state,
            "template": session.template,
            "labels": json.dumps(dict(session.labels), sort_keys=True),
            "created_us": session.created_at.ToMicroseconds(),
            "record": session.SerializeToString(),
        }
        statement = self._insert(sessions).values(
            **row, owner=self.replica_id, lease_expires_us=now_us() + int(self.lease_ttl_s * 1e6)
        )
        excluded = statement.excluded
        update = {name: excluded[name] for name in row if name != "id"}
        if self.shared:
            statement = statement.on_conflict_do_update(
                index_elements=["id"], set_=update, where=sessions.c.owner == excluded.owner
            )
        else:
            statement = statement.on_conflict_do_update(index_elements=["id"], set_={**update, "owner": excluded.owner})

        # RETURNING tells whether a row was written (psycopg's rowcount does not for an upsert).
        returning = statement.returning(sessions.c.id)

        def write(connection: Connection) -> None:
            if connection.execute(returning).first() is None:
                self._lost(session.id)

        if self._thread is None:
            self._transaction(write)
            return
        future = self._thread.submit(self._transaction, write)
        future.add_done_callback(_log_failed_write)

    def _lost(self, session_id: str) -> None:
        log.warning("session %s is owned by another replica now: this one lets go of it", session_id)
        if self.on_lost is not None and self._loop is not None:
            _call_soon(self._loop, functools.partial(self.on_lost, session_id))

    async def get_session(self, session_id: str) -> pb.Session | None:
        query = sa.select(sessions.c.record).where(sessions.c.id == session_id)
        record = await self._call(lambda connection: connection.execute(query).scalar())
        return pb.Session.FromString(record) if record is not None else None

    async def delete_session(self, session_id: str) -> None:
        statement = sa.delete(sessions).where(sessions.c.id == session_id)
        await self._call(lambda connection: connection.execute(statement))

    async def sessions_in(self, states: Iterable[int]) -> list[pb.Session]:
        """Every session in one of `states`, oldest first."""
        query = (
            sa.select(sessions.c.record)
            .where(sessions.c.state.in_(list(states)))
            .order_by(sessions.c.created_us, sessions.c.id)
        )
        return [pb.Session.FromString(record) for record in await self._records(query)]

    async def list_sessions(
        self,
        *,
        states: Iterable[int] = (),
        template: str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.Session], str]:
        """One page of sessions, newest first, and the token of the next page ("" on the last).

        Paging is by keyset (created time, id), so sessions created between two pages neither shift
        nor repeat entries. Raises InvalidArgument for a token this store did not hand out."""
        limit = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = sa.select(sessions.c.record)
        states = list(states)
        if states:
            query = query.where(sessions.c.state.in_(states))
        if template:
            query = query.where(sessions.c.template == template)
        for n, (key, value) in enumerate((labels or {}).items()):
            query = query.where(self._has_label(n, key, value))
        if page_token:
            created_us, last_id = _decode_page_token(page_token)
            query = query.where(
                sa.or_(
                    sessions.c.created_us < created_us,
                    sa.and_(sessions.c.created_us == created_us, sessions.c.id < last_id),
                )
            )
        # One more than asked tells whether another page exists.
        query = query.order_by(sessions.c.created_us.desc(), sessions.c.id.desc()).limit(limit + 1)
        records = await self._records(query)
        found = [pb.Session.FromString(record) for record in records[:limit]]
        next_token = ""
        if len(records) > limit:
            last = found[-1]
            next_token = _encode_page_token(last.created_at.ToMicroseconds(), last.id)
        return found, next_token

    def _has_label(self, n: int, key: str, value: str) -> sa.ColumnElement[bool]:
        names = {"key": f"label_key_{n}", "value": f"label_value_{n}"}
        params: tuple[sa.BindParameter[str], ...] = (
            sa.bindparam(names["key"], key),
            sa.bindparam(names["value"], value),
        )
        if self.shared:
            clause = sa.text(f"CAST(sessions.labels AS jsonb) ->> :{names['key']} = :{names['value']}")
        else:
            clause = sa.text(
                f"EXISTS (SELECT 1 FROM json_each(sessions.labels) WHERE key = :{names['key']}"
                f" AND value = :{names['value']})"
            )
        return clause.bindparams(*params)  # type: ignore[return-value]

    async def _records(self, query: sa.Select[Any]) -> list[bytes]:
        return await self._call(lambda connection: list(connection.execute(query).scalars()))

    # ------------------------------------------------------------------ archives

    async def put_archive(self, archive: pb.Archive) -> None:
        row = {
            "id": archive.id,
            "session_id": archive.session_id,
            "created_us": archive.created_at.ToMicroseconds(),
            "record": archive.SerializeToString(),
        }
        statement = self._insert(archives).values(**row)
        statement = statement.on_conflict_do_update(
            index_elements=["id"], set_={name: statement.excluded[name] for name in row if name != "id"}
        )
        await self._call(lambda connection: connection.execute(statement))

    async def get_archive(self, archive_id: str) -> pb.Archive | None:
        query = sa.select(archives.c.record).where(archives.c.id == archive_id)
        record = await self._call(lambda connection: connection.execute(query).scalar())
        return pb.Archive.FromString(record) if record is not None else None

    async def list_archives(self, session_id: str = "") -> list[pb.Archive]:
        """Archives, newest first; only those saved from `session_id` when it is given."""
        query = sa.select(archives.c.record)
        if session_id:
            query = query.where(archives.c.session_id == session_id)
        query = query.order_by(archives.c.created_us.desc(), archives.c.id.desc())
        return [pb.Archive.FromString(record) for record in await self._records(query)]

    def archive_ids(self) -> set[str]:
        """Every archive's id, blocking (for start-up, before anything is served)."""
        return set(self._transaction(lambda connection: connection.execute(sa.select(archives.c.id)).scalars()))

    async def delete_archive(self, archive_id: str) -> bool:
        """Removes the record; False when there was none."""
        statement = sa.delete(archives).where(archives.c.id == archive_id)
        return await self._call(lambda connection: connection.execute(statement).rowcount > 0)

    # ------------------------------------------------------------------ replicas and leases

    async def instance_id(self, proposed: str) -> str:
        """The cluster's instance id (the label of its workspaces): the first replica's `proposed`, kept in the
        database, so replicas of one database share their workspaces and no one else's."""

        def work(connection: Connection) -> str:
            connection.execute(self._insert(meta).values(key=INSTANCE_ID_KEY, value=proposed).on_conflict_do_nothing())
            return connection.execute(sa.select(meta.c.value).where(meta.c.key == INSTANCE_ID_KEY)).scalar_one()

        return await self._call(work)

    async def heartbeat(self, address: str) -> bool:
        """Renews this replica's registration (`address`: where others forward calls) and the leases of the
        sessions it owns, and takes or keeps the leader lease when it is free. Returns whether this replica
        leads. Without other replicas (SQLite), it always leads."""
        me = self.replica_id

        def work(connection: Connection) -> bool:
            now = now_us()
            expires = now + int(self.lease_ttl_s * 1e6)
            connection.execute(
                self._insert(replicas)
                .values(id=me, address=address, expires_us=expires)
                .on_conflict_do_update(index_elements=["id"], set_={"address": address, "expires_us": expires})
            )
            connection.execute(sa.update(sessions).where(sessions.c.owner == me).values(lease_expires_us=expires))
            connection.execute(sa.delete(replicas).where(replicas.c.expires_us < now - int(60e6)))
            taken = connection.execute(
                sa.update(leases)
                .where(leases.c.name == LEADER, sa.or_(leases.c.holder == me, leases.c.expires_us < now))
                .values(holder=me, expires_us=expires)
            ).rowcount
            if not taken:
                inserted = self._insert(leases).values(name=LEADER, holder=me, expires_us=expires)
                taken = (
                    connection.execute(inserted.on_conflict_do_nothing().returning(leases.c.name)).first() is not None
                )
            return bool(taken) or not self.shared

        return await self._call(work)

    async def resign(self) -> None:
        """Lets go of the leader lease and of this replica's sessions' leases (they keep running), so another
        replica takes them over at its next heartbeat instead of after the lease TTL."""
        me = self.replica_id

        def work(connection: Connection) -> None:
            connection.execute(sa.update(sessions).where(sessions.c.owner == me).values(lease_expires_us=0))
            connection.execute(sa.update(leases).where(leases.c.holder == me).values(expires_us=0))
            connection.execute(sa.delete(replicas).where(replicas.c.id == me))

        await self._call(work)

    async def orphans(self, states: Iterable[int]) -> list[pb.Session]:
        """Sessions in `states` that no live replica owns (no owner, or its lease expired), oldest first; on
        SQLite (one replica) every one of them not ours already."""
        condition = sa.or_(sessions.c.owner.is_(None), sessions.c.owner != self.replica_id)
        if self.shared:
            condition = sa.or_(sessions.c.owner.is_(None), sessions.c.lease_expires_us < now_us())
        query = (
            sa.select(sessions.c.record)
            .where(sessions.c.state.in_(list(states)), condition)
            .order_by(sessions.c.created_us, sessions.c.id)
        )
        return [pb.Session.FromString(record) for record in await self._records(query)]

    async def claim(self, session_id: str) -> bool:
        """Makes this replica the session's owner if no live replica owns it; whether it did. A session claimed
        by two replicas at once goes to one of them."""
        now = now_us()
        condition = sa.or_(sessions.c.owner.is_(None), sessions.c.owner == self.replica_id)
        if self.shared:
            condition = sa.or_(condition, sessions.c.lease_expires_us < now)
        else:
            condition = sa.true()
        statement = (
            sa.update(sessions)
            .where(sessions.c.id == session_id, condition)
            .values(owner=self.replica_id, lease_expires_us=now + int(self.lease_ttl_s * 1e6))
        )
        return await self._call(lambda connection: connection.execute(statement).rowcount == 1)

    async def owner(self, session_id: str) -> tuple[str, str, bool] | None:
        """The session's owner: (replica id, its address, whether its lease is current), or None when no replica
        owns it (or the session does not exist)."""
        query = (
            sa.select(sessions.c.owner, replicas.c.address, sessions.c.lease_expires_us)
            .select_from(sessions.outerjoin(replicas, replicas.c.id == sessions.c.owner))
            .where(sessions.c.id == session_id)
        )
        row = await self._call(lambda connection: connection.execute(query).first())
        if row is None or row.owner is None:
            return None
        return row.owner, row.address or "", (row.lease_expires_us or 0) >= now_us()


def _sqlite_connected(connection: Any, _record: Any) -> None:
    # Transactions begin where SQLAlchemy begins them (the "begin" listener), DDL included: a migration that
    # fails midway leaves nothing behind.
    connection.isolation_level = None
    connection.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode survives process crashes; only an OS crash can lose the last commits.
    connection.execute("PRAGMA synchronous=NORMAL")


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutting down): no one to tell
        loop.call_soon_threadsafe(callback)


def _log_failed_write(future: concurrent.futures.Future[None]) -> None:
    if (error := future.exception()) is not None:
        log.error("writing a session record failed: %s", error, exc_info=error)


def _encode_page_token(created_us: int, session_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_us, session_id]).encode()).decode()


def _decode_page_token(token: str) -> tuple[int, str]:
    try:
        created_us, session_id = json.loads(base64.urlsafe_b64decode(token.encode()))
        if isinstance(created_us, int) and isinstance(session_id, str):
            return created_us, session_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        pass
    raise InvalidArgument("page_token is not one this server handed out: pass next_page_token unchanged")
