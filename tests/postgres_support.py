"""A real PostgreSQL for the tests: Debian's server binaries, a cluster made in a temp directory and started on a
free loopback port (as the `postgres` user when the tests run as root: the server refuses root), stopped by its
pid at the end. In CI a missing server fails the tests that need it; elsewhere they are skipped with the reason."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
SUPERUSER = "workspace"
START_TIMEOUT_S = 60.0


def server_binaries() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin holding initdb and postgres, if Debian's package is there."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda path: int(path.parent.parent.name), reverse=True
    )
    return found[0].parent if found else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PostgresServer:
    """A running PostgreSQL: `url()` of a database on it, `create_database()` a fresh one."""

    port: int
    process: subprocess.Popen[bytes]
    directory: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database's URL (each test its own: no state leaks between tests)."""
        import psycopg

        name = f"test_{secrets.token_hex(4)}"
        with psycopg.connect(self.url(), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process.poll() is None:
            # The postmaster's own pid (under runuser, the child is runuser's): SIGINT is a "fast" shutdown.
            with contextlib.suppress(OSError, ValueError):
                os.kill(int((self.directory / "data" / "postmaster.pid").read_text().split()[0]), signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres(binaries: Path) -> PostgresServer:
    """Makes a cluster in a new temp directory and starts it on a free loopback port. Raises RuntimeError."""
    directory = Path(tempfile.mkdtemp(prefix="workspace-core-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")  # made by Debian's package
        os.chown(directory, account.pw_uid, account.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = directory / "data"
    subprocess.run(
        [*as_user, str(binaries / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    for _ in range(3):  # a port taken between the probe and the bind: another try
        port = free_port()
        log = open(directory / "server.log", "ab")  # noqa: SIM115 (the server writes it while it runs)
        process = subprocess.Popen(
            [
                *as_user, str(binaries / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                "-k", str(directory), "-c", "fsync=off", "-c", "max_connections=200",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        server = PostgresServer(port, process, directory)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and process.poll() is None:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                if _answers(server):
                    return server
            time.sleep(0.1)
        if process.poll() is None:
            server.stop()
            break
    raise RuntimeError(f"PostgreSQL did not start: {(directory / 'server.log').read_text(errors='replace')[-2000:]}")


def _answers(server: PostgresServer) -> bool:
    import psycopg

    try:
        with psycopg.connect(server.url(), connect_timeout=2):
            return True
    except psycopg.OperationalError:  # still starting up
        return False


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    binaries = server_binaries()
    if binaries is None:
        message = "PostgreSQL's server is not installed (Debian's postgresql package; `make tools` installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    server = start_postgres(binaries)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the tests' PostgreSQL."""
    return postgres_server.create_database()
