"""One validity check for ListTemplates and CreateSession: a template ListTemplates reports invalid (a
symlink or a FIFO among its files) is refused by CreateSession with FAILED_PRECONDITION and the reason,
before any workspace exists."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from orchestrator.runtime import make_runtime
from tests.conftest import status_of
from tests.orchestrator.conftest import OrchestratorUnderTest, derive_template
from workspace.orchestrator.v1 import orchestrator_pb2 as pb


def add_symlink(folder: Path) -> None:
    (folder / "src" / "passwd").symlink_to("/etc/passwd")


def add_fifo(folder: Path) -> None:
    os.mkfifo(folder / "src" / "pipe")


@pytest.mark.parametrize(
    ("make_invalid", "reason"),
    [
        (add_symlink, "src/passwd is not a regular file; templates hold plain files"),
        (add_fifo, "src/pipe is not a regular file; templates hold plain files"),
    ],
)
async def test_a_template_listed_invalid_is_refused_before_any_workspace(
    orchestrator: OrchestratorUnderTest, templates: Path, make_invalid: Callable[[Path], None], reason: str
) -> None:
    derive_template(templates, "broken-files")
    make_invalid(templates / "broken-files")

    listed = {t.name: t for t in (await orchestrator.stub.ListTemplates(pb.ListTemplatesRequest())).templates}
    assert (listed["broken-files"].valid, listed["broken-files"].invalid_reason) == (False, reason)

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="broken-files"))
    assert status_of(refused.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == f"template 'broken-files' is invalid: {reason}"

    sessions = await orchestrator.stub.ListSessions(pb.ListSessionsRequest())
    assert list(sessions.sessions) == []
    runtime = make_runtime(orchestrator.config.runtime, orchestrator.config)
    try:
        assert await runtime.list() == []
    finally:
        await runtime.close()
