"""The state database, SQLite and PostgreSQL alike: records survive reopening, filters and keyset paging behave as
ListSessions promises, an SQLite store of schema v1 (from before migrations) is upgraded with its data intact,
and leases give each session one owner among replicas."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator.errors import InvalidArgument
from orchestrator.store import Store
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

READY = pb.SESSION_STATE_READY
STOPPED = pb.SESSION_STATE_STOPPED


def session(n: int, *, state=READY, template="node-basic", labels=None) -> pb.Session:
    created = Timestamp()
    created.FromMicroseconds(1_700_000_000_000_000 + n // 2 * 1000)  # pairs share a timestamp: ties by id
    return pb.Session(id=f"ws-{n:04d}", state=state, template=template, labels=labels or {}, created_at=created)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An SQLite file's path, or a fresh database on the tests' PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "state.sqlite3")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(database: str):
    store = Store(database)
    yield store
    store.close()


async def test_records_survive_reopening(database: str) -> None:
    first = Store(database)
    first.put_session(session(1, labels={"user": "ada"}))
    await first.put_archive(pb.Archive(id="ar-1", session_id="ws-0001", sha256="ab" * 32, size=10))
    first.close()

    again = Store(database)
    assert await again.get_session("ws-0001") == session(1, labels={"user": "ada"})
    assert (await again.get_archive("ar-1")).sha256 == "ab" * 32
    again.close()


async def test_put_replaces_and_delete_removes(store: Store) -> None:
    store.put_session(session(1))
    store.put_session(session(1, state=STOPPED))
    assert (await store.get_session("ws-0001")).state == STOPPED
    await store.delete_session("ws-0001")
    assert await store.get_session("ws-0001") is None


async def test_pages_cover_everything_once_newest_first(store: Store) -> None:
    for n in range(23):
        store.put_session(session(n))
    seen: list[str] = []
    token = ""
    while True:
        page, token = await store.list_sessions(page_size=5, page_token=token)
        seen += [s.id for s in page]
        if not token:
            break
    assert seen == [f"ws-{n:04d}" for n in reversed(range(23))]


async def test_sessions_created_between_pages_do_not_shift_them(store: Store) -> None:
    for n in range(10):
        store.put_session(session(n))
    first, token = await store.list_sessions(page_size=4)
    store.put_session(session(100))  # newer than everything: belongs before page one, not in page two
    second, _ = await store.list_sessions(page_size=4, page_token=token)
    assert [s.id for s in first + second] == [f"ws-{n:04d}" for n in reversed(range(2, 10))]


async def test_filters_by_state_template_and_every_label(store: Store) -> None:
    store.put_session(session(1, labels={"user": "ada", "team": "x"}))
    store.put_session(session(2, labels={"user": "ada"}))
    store.put_session(session(3, state=STOPPED, labels={"user": "ada", "team": "x"}))
    store.put_session(session(4, template="vite-react", labels={"user": "bob", "team": "x"}))

    async def ids(**filters) -> list[str]:
        return [s.id for s in (await store.list_sessions(**filters))[0]]

    assert await ids(states=[READY], labels={"user": "ada"}) == ["ws-0002", "ws-0001"]
    assert await ids(labels={"user": "ada", "team": "x"}) == ["ws-0003", "ws-0001"]
    assert await ids(template="vite-react") == ["ws-0004"]
    assert await ids(states=[STOPPED, READY], template="node-basic", labels={"team": "x"}) == ["ws-0003", "ws-0001"]
    assert await ids(labels={"user": "eve"}) == []
    # Keys and values are data, never SQL or JSON paths.
    store.put_session(session(5, labels={'we"ird': "it's"}))
    assert await ids(labels={'we"ird': "it's"}) == ["ws-0005"]


@pytest.mark.parametrize("token", ["garbage!", "bm90IGpzb24=", "WzEsIDJd"])
async def test_a_foreign_page_token_is_invalid_argument(store: Store, token: str) -> None:
    with pytest.raises(InvalidArgument):
        await store.list_sessions(page_token=token)


async def test_archives_list_newest_first_and_by_session(store: Store) -> None:
    for n, owner in enumerate(["ws-a", "ws-b", "ws-a"]):
        created = Timestamp()
        created.FromSeconds(1_700_000_000 + n)
        await store.put_archive(pb.Archive(id=f"ar-{n}", session_id=owner, created_at=created))
    assert [a.id for a in await store.list_archives()] == ["ar-2", "ar-1", "ar-0"]
    assert [a.id for a in await store.list_archives("ws-a")] == ["ar-2", "ar-0"]
    assert await store.delete_archive("ar-1") and not await store.delete_archive("ar-1")


# The schema v1 store as the orchestrator made it before migrations (PRAGMA user_version 1), verbatim.
SCHEMA_V1 = """
CREATE TABLE sessions (
    id TEXT PRIMARY KEY,
    state INTEGER NOT NULL,
    template TEXT NOT NULL,
    labels TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX sessions_by_age ON sessions (created_us DESC, id DESC);
CREATE TABLE archives (
    id TEXT PRIMARY KEY,
    session_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    record BLOB NOT NULL
);
CREATE INDEX archives_by_age ON archives (created_us DESC, id DESC);
"""


async def test_an_sqlite_store_of_schema_v1_is_upgraded_with_its_records(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.sqlite3"
    old = session(7, labels={"user": "ada"})
    archive = pb.Archive(id="ar-7", session_id=old.id, sha256="cd" * 32)
    with sqlite3.connect(path) as db:
        db.executescript(f"BEGIN; {SCHEMA_V1} PRAGMA user_version=1; COMMIT;")
        db.execute(
            "INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?)",
            (
                old.id,
                old.state,
                old.template,
                '{"user": "ada"}',
                old.created_at.ToMicroseconds(),
                old.SerializeToString(),
            ),
        )
        db.execute("INSERT INTO archives VALUES (?, ?, ?, ?)", ("ar-7", old.id, 0, archive.SerializeToString()))
    db.close()

    store = Store(path)
    assert await store.get_session(old.id) == old
    assert await store.list_sessions(labels={"user": "ada"}) == ([old], "")
    assert await store.list_archives(old.id) == [archive]
    # The upgraded store takes the new columns: its session is claimable, then owned.
    assert [s.id for s in await store.orphans([READY])] == [old.id]
    assert await store.claim(old.id)
    store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
    db.close()
    Store(path).close()  # opening an upgraded store again changes nothing


def test_a_store_newer_than_this_orchestrator_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "orchestrator.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version=9")
    db.close()
    with pytest.raises(RuntimeError, match="schema version 9"):
        Store(path)


@pytest.mark.postgres
async def test_a_session_has_one_owner_and_is_claimable_once_its_lease_expires(postgres_url: str) -> None:
    first = Store(postgres_url, replica_id="rep-a", lease_ttl_s=0.5)
    second = Store(postgres_url, replica_id="rep-b", lease_ttl_s=0.5)
    try:
        assert await first.heartbeat("127.0.0.1:1") and not await second.heartbeat("127.0.0.1:2")  # one leader
        first.put_session(session(1))
        await first.flush()
        assert await second.owner("ws-0001") == ("rep-a", "127.0.0.1:1", True)
        assert not await second.claim("ws-0001") and await second.orphans([READY]) == []
        # A write by a replica that does not own the session changes nothing.
        second.put_session(session(1, state=STOPPED))
        await second.flush()
        assert (await first.get_session("ws-0001")).state == READY

        # rep-a stops renewing (it died): once its leases expire, rep-b leads and owns its session.
        while (await second.owner("ws-0001"))[2]:
            await asyncio.sleep(0.1)
        assert [s.id for s in await second.orphans([READY])] == ["ws-0001"]
        assert await second.heartbeat("127.0.0.1:2")
        assert await second.claim("ws-0001") and not await first.claim("ws-0001")
        lost: list[str] = []
        first.on_lost = lost.append
        first.put_session(session(1, state=STOPPED))  # rep-a, back, finds the session taken
        await first.flush()
        await asyncio.sleep(0)  # the callback comes through the event loop
        assert lost == ["ws-0001"] and (await second.get_session("ws-0001")).state == READY
        await second.resign()  # a replica stopping hands its sessions over at once
        assert await first.claim("ws-0001")
    finally:
        first.close()
        second.close()
