"""SQLite state of the orchestrator: session records and archive metadata, in one versioned schema."""

from __future__ import annotations

import base64
import binascii
import json
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from orchestrator.errors import InvalidArgument
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

SCHEMA_VERSION = 1

# Sessions are stored as their serialized `Session` message (the record a caller sees) plus the
# columns the queries filter and order by. Labels are a JSON object so json_each can match them.
SCHEMA = """
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

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class Store:
    """One SQLite database in WAL mode. Each call is one short statement or transaction; they are
    fast enough (well under a millisecond) to run on the event loop, and a lock serializes them."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives process crashes; only an OS crash can lose the last commits.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            (version,) = self._db.execute("PRAGMA user_version").fetchone()
            if version == SCHEMA_VERSION:
                return
            if version != 0:
                raise RuntimeError(
                    f"state database has schema version {version}, this orchestrator knows {SCHEMA_VERSION}"
                )
            # One script, one transaction: a crash midway leaves version 0 and nothing created.
            self._db.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ sessions

    def put_session(self, session: pb.Session) -> None:
        """Inserts or replaces the session's record."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO sessions (id, state, template, labels, created_us, record)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    session.id,
                    session.state,
                    session.template,
                    json.dumps(dict(session.labels), sort_keys=True),
                    session.created_at.ToMicroseconds(),
                    session.SerializeToString(),
                ),
            )

    def get_session(self, session_id: str) -> pb.Session | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return pb.Session.FromString(row[0]) if row else None

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))

    def sessions_in(self, states: Iterable[int]) -> list[pb.Session]:
        """Every session in one of `states`, oldest first."""
        states = list(states)
        marks = ",".join("?" * len(states))
        with self._lock:
            rows = self._db.execute(
                f"SELECT record FROM sessions WHERE state IN ({marks}) ORDER BY created_us, id", states
            ).fetchall()
        return [pb.Session.FromString(row[0]) for row in rows]

    def list_sessions(
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
        where: list[str] = []
        params: list[object] = []
        states = list(states)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            params += states
        if template:
            where.append("template = ?")
            params.append(template)
        for key, value in (labels or {}).items():
            where.append("EXISTS (SELECT 1 FROM json_each(sessions.labels) WHERE key = ? AND value = ?)")
            params += [key, value]
        if page_token:
            created_us, last_id = _decode_page_token(page_token)
            where.append("(created_us < ? OR (created_us = ? AND id < ?))")
            params += [created_us, created_us, last_id]
        query = "SELECT record FROM sessions"
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY created_us DESC, id DESC LIMIT ?"
        params.append(limit + 1)  # one more than asked tells whether another page exists
        with self._lock:
            rows = self._db.execute(query, params).fetchall()
        sessions = [pb.Session.FromString(row[0]) for row in rows[:limit]]
        next_token = ""
        if len(rows) > limit:
            last = sessions[-1]
            next_token = _encode_page_token(last.created_at.ToMicroseconds(), last.id)
        return sessions, next_token

    # ------------------------------------------------------------------ archives

    def put_archive(self, archive: pb.Archive) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO archives (id, session_id, created_us, record) VALUES (?, ?, ?, ?)",
                (archive.id, archive.session_id, archive.created_at.ToMicroseconds(), archive.SerializeToString()),
            )

    def get_archive(self, archive_id: str) -> pb.Archive | None:
        with self._lock:
            row = self._db.execute("SELECT record FROM archives WHERE id = ?", (archive_id,)).fetchone()
        return pb.Archive.FromString(row[0]) if row else None

    def list_archives(self, session_id: str = "") -> list[pb.Archive]:
        """Archives, newest first; only those saved from `session_id` when it is given."""
        query = "SELECT record FROM archives"
        params: tuple[str, ...] = ()
        if session_id:
            query += " WHERE session_id = ?"
            params = (session_id,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created_us DESC, id DESC", params).fetchall()
        return [pb.Archive.FromString(row[0]) for row in rows]

    def delete_archive(self, archive_id: str) -> bool:
        """Removes the record; False when there was none."""
        with self._lock:
            cursor = self._db.execute("DELETE FROM archives WHERE id = ?", (archive_id,))
        return cursor.rowcount > 0


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
