"""Two orchestrators on one engine: each data directory has its own instance id, and neither takes the
other's workspaces for orphans, even when both were given the same --instance-id."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest

from orchestrator.config import OrchestratorConfig
from orchestrator.store import Store
from tests.orchestrator.conftest import http_get, start_orchestrator, stop_all_workspaces
from tests.orchestrator.test_sessions import create_ready
from workspace.orchestrator.v1 import orchestrator_pb2 as pb


def test_the_default_instance_id_is_the_data_directorys_own(tmp_path: Path) -> None:
    first = OrchestratorConfig(data_dir=tmp_path / "a")
    ids = set()
    # Racing starts on a new data directory agree on one id.
    threads = [threading.Thread(target=lambda: ids.add(first.resolved_instance_id())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (chosen,) = ids
    assert chosen.startswith("orch-")
    assert OrchestratorConfig(data_dir=tmp_path / "a").resolved_instance_id() == chosen  # stable across restarts
    assert OrchestratorConfig(data_dir=tmp_path / "b").resolved_instance_id() != chosen
    Store(tmp_path / "new" / "orchestrator.sqlite3").close()  # made by this start, before the runtime
    assert OrchestratorConfig(data_dir=tmp_path / "new").resolved_instance_id().startswith("orch-")
    assert OrchestratorConfig(data_dir=tmp_path / "a", instance_id="mine").resolved_instance_id() == "mine"
    # A data directory from before ids were kept goes on with the id its workspaces carry.
    old = Store(tmp_path / "old" / "orchestrator.sqlite3")
    old.put_session(pb.Session(id="ws-old", state=pb.SESSION_STATE_READY))
    old.close()
    assert OrchestratorConfig(data_dir=tmp_path / "old").resolved_instance_id() == "default"


@pytest.mark.parametrize("runtime_kind", [pytest.param("docker", marks=pytest.mark.docker)])
async def test_two_orchestrators_on_one_engine_keep_their_own_workspaces(
    orchestrator_config: OrchestratorConfig, tmp_path: Path
) -> None:
    # Both with the default (per data directory) instance id.
    mine = dataclasses.replace(orchestrator_config, instance_id="", data_dir=tmp_path / "mine")
    theirs = dataclasses.replace(mine, data_dir=tmp_path / "theirs")
    first = await start_orchestrator(mine)
    second = third = None
    try:
        session = await create_ready(first, template="node-basic")
        # Another orchestrator starts on another data directory (e.g. `make demo` beside a test run)...
        second = await start_orchestrator(theirs)
        assert (await second.stub.ListSessions(pb.ListSessionsRequest())).sessions == []
        # ...and one misconfigured with the first one's very instance id: it has no record of the workspace.
        third = await start_orchestrator(
            dataclasses.replace(theirs, data_dir=tmp_path / "same-id", instance_id=mine.resolved_instance_id())
        )
        ours = await second.stub.CreateSession(pb.CreateSessionRequest(template="node-basic"))
        assert ours.session.id != session.id

        still = (await first.stub.GetSession(pb.GetSessionRequest(id=session.id))).session
        assert still.state == pb.SESSION_STATE_READY
        assert (await http_get(still.preview_url))[0] == 200
        assert [w.session_id for w in await first.orchestrator.runtime.list()] == [session.id]
        # A restart on the same data directory adopts it: the id is stable.
        await first.close()
        first = await start_orchestrator(mine)
        adopted = (await first.stub.GetSession(pb.GetSessionRequest(id=session.id))).session
        assert adopted.state == pb.SESSION_STATE_READY
    finally:
        for running, config in ((first, mine), (second, theirs)):
            if running is not None:
                await running.close()
            await stop_all_workspaces(config)
        if third is not None:
            await third.close()
