"""Predictable start-up failures of both services, as a person sees them: one line on stderr naming the address
or path and what to do, exit status 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture
def taken_address() -> Iterator[str]:
    """An address another process (this one) listens on."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


def start(*args: str) -> subprocess.CompletedProcess[str]:
    # A token, so that the agent's warning about running without one is not among the lines.
    env = {**os.environ, "WORKSPACE_AGENT_TOKEN": "t"}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def assert_one_line(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    for text in expected:
        assert text in line, line


def orchestrator(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return start("orchestrator", "--runtime", "local", "--data-dir", str(tmp_path / "data"), *args)


def test_orchestrator_on_a_taken_port(tmp_path: Path, taken_address: str) -> None:
    result = orchestrator(tmp_path, "--listen", taken_address)

    assert_one_line(result, f"orchestrator: cannot listen on {taken_address}", "in use", "--listen")


def test_agent_on_a_taken_port(tmp_path: Path, taken_address: str) -> None:
    result = start("agent", "--root", str(tmp_path), "--listen", taken_address)

    assert_one_line(result, f"agent: cannot listen on {taken_address}", "in use", "--listen")


def test_an_address_not_of_this_machine(tmp_path: Path) -> None:
    result = orchestrator(tmp_path, "--listen", "192.0.2.1:50051")  # TEST-NET-1: never a local interface

    assert_one_line(result, "cannot listen on 192.0.2.1:50051", "127.0.0.1")


def test_an_unusable_data_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = start(
        "orchestrator", "--runtime", "local", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "file")
    )

    assert_one_line(result, f"the data directory {tmp_path / 'file'} is not a writable directory", "--data-dir")


def test_a_listen_address_that_is_not_one(tmp_path: Path) -> None:
    result = start("agent", "--root", str(tmp_path), "--listen", "localhost:http-ish")

    assert_one_line(result, "cannot listen on localhost:http-ish", "HOST:PORT")


def test_a_missing_templates_folder(tmp_path: Path) -> None:
    result = orchestrator(tmp_path, "--listen", "127.0.0.1:0", "--templates-dir", str(tmp_path / "nowhere"))

    assert_one_line(result, f"the templates folder {tmp_path / 'nowhere'} is not a directory", "--templates-dir")


def test_an_unreadable_ca_bundle(tmp_path: Path) -> None:
    result = orchestrator(tmp_path, "--listen", "127.0.0.1:0", "--extra-ca-bundle", str(tmp_path / "none.pem"))

    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert f"extra CA bundle {tmp_path / 'none.pem'}: cannot read it" in line


def test_a_database_that_does_not_answer(tmp_path: Path) -> None:
    database = "postgresql://workspace:secret@127.0.0.1:1/state"  # port 1: nothing listens
    result = orchestrator(tmp_path, "--listen", "127.0.0.1:0", "--database", database)

    assert_one_line(result, "the state database postgresql://workspace:***@127.0.0.1:", "Connection refused")
    assert "secret" not in result.stderr


def test_agent_with_an_unreadable_token_file(tmp_path: Path) -> None:
    result = start("agent", "--root", str(tmp_path), "--listen", "127.0.0.1:0", "--token-file", str(tmp_path / "none"))

    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert f"--token-file {tmp_path / 'none'}: cannot read it (No such file or directory)" in result.stderr


def test_a_relative_data_directory_is_made_absolute() -> None:
    from orchestrator.__main__ import parse_args

    config, _ = parse_args(["--data-dir", ".data", "--extra-ca-bundle", "ca.pem"])

    assert config.data_dir.is_absolute() and config.data_dir == Path.cwd() / ".data"


def test_agent_with_an_unwritable_port_file(tmp_path: Path) -> None:
    port_file = tmp_path / "missing" / "agent-port"
    result = start("agent", "--root", str(tmp_path), "--listen", "127.0.0.1:0", "--port-file", str(port_file))

    assert_one_line(result, f"agent: cannot write --port-file {port_file} (No such file or directory)")
