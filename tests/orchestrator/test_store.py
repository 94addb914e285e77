"""The SQLite state: records survive reopening, filters and keyset paging behave as ListSessions promises."""

from __future__ import annotations

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


@pytest.fixture
def store(tmp_path: Path):
    store = Store(tmp_path / "state.sqlite3")
    yield store
    store.close()


def test_records_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    first = Store(path)
    first.put_session(session(1, labels={"user": "ada"}))
    first.put_archive(pb.Archive(id="ar-1", session_id="ws-0001", sha256="ab" * 32, size=10))
    first.close()

    again = Store(path)
    assert again.get_session("ws-0001") == session(1, labels={"user": "ada"})
    assert again.get_archive("ar-1").sha256 == "ab" * 32
    again.close()


def test_put_replaces_and_delete_removes(store: Store) -> None:
    store.put_session(session(1))
    store.put_session(session(1, state=STOPPED))
    assert store.get_session("ws-0001").state == STOPPED
    store.delete_session("ws-0001")
    assert store.get_session("ws-0001") is None


def test_pages_cover_everything_once_newest_first(store: Store) -> None:
    for n in range(23):
        store.put_session(session(n))
    seen: list[str] = []
    token = ""
    while True:
        page, token = store.list_sessions(page_size=5, page_token=token)
        seen += [s.id for s in page]
        if not token:
            break
    assert seen == [f"ws-{n:04d}" for n in reversed(range(23))]


def test_sessions_created_between_pages_do_not_shift_them(store: Store) -> None:
    for n in range(10):
        store.put_session(session(n))
    first, token = store.list_sessions(page_size=4)
    store.put_session(session(100))  # newer than everything: belongs before page one, not in page two
    second, _ = store.list_sessions(page_size=4, page_token=token)
    assert [s.id for s in first + second] == [f"ws-{n:04d}" for n in reversed(range(2, 10))]


def test_filters_by_state_template_and_every_label(store: Store) -> None:
    store.put_session(session(1, labels={"user": "ada", "team": "x"}))
    store.put_session(session(2, labels={"user": "ada"}))
    store.put_session(session(3, state=STOPPED, labels={"user": "ada", "team": "x"}))
    store.put_session(session(4, template="vite-react", labels={"user": "bob", "team": "x"}))

    def ids(**filters) -> list[str]:
        return [s.id for s in store.list_sessions(**filters)[0]]

    assert ids(states=[READY], labels={"user": "ada"}) == ["ws-0002", "ws-0001"]
    assert ids(labels={"user": "ada", "team": "x"}) == ["ws-0003", "ws-0001"]
    assert ids(template="vite-react") == ["ws-0004"]
    assert ids(states=[STOPPED, READY], template="node-basic", labels={"team": "x"}) == ["ws-0003", "ws-0001"]
    assert ids(labels={"user": "eve"}) == []


@pytest.mark.parametrize("token", ["garbage!", "bm90IGpzb24=", "WzEsIDJd"])
def test_a_foreign_page_token_is_invalid_argument(store: Store, token: str) -> None:
    with pytest.raises(InvalidArgument):
        store.list_sessions(page_token=token)


def test_archives_list_newest_first_and_by_session(store: Store) -> None:
    for n, owner in enumerate(["ws-a", "ws-b", "ws-a"]):
        created = Timestamp()
        created.FromSeconds(1_700_000_000 + n)
        store.put_archive(pb.Archive(id=f"ar-{n}", session_id=owner, created_at=created))
    assert [a.id for a in store.list_archives()] == ["ar-2", "ar-1", "ar-0"]
    assert [a.id for a in store.list_archives("ws-a")] == ["ar-2", "ar-0"]
    assert store.delete_archive("ar-1") and not store.delete_archive("ar-1")
