"""What an idle agent has not imported: code only some calls or settings need is loaded on first use, so it
costs an agent that never makes those calls neither start-up time nor memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

# Builds and binds the agent's server as `python -m agent` does, then lists the top-level modules loaded.
LOADED_AFTER_START = """
import asyncio, json, sys
from pathlib import Path
import agent.__main__
from agent.config import AgentConfig
from agent.server import create_server
from common import telemetry

async def main():
    telemetry.configure_from_env()
    server, _, _ = await create_server(AgentConfig(root=Path(sys.argv[1]), listen="127.0.0.1:0", token="t"))
    await server.start()
    await server.stop(None)

asyncio.run(main())
print(json.dumps(sorted(sys.modules)))
"""


def loaded_after_start(root: Path, **env: str) -> set[str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")} | env
    result = subprocess.run([sys.executable, "-c", LOADED_AFTER_START, str(root)], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_an_idle_agent_loads_no_tracing_archive_python_search_or_watch_code(tmp_path: Path) -> None:
    loaded = loaded_after_start(tmp_path)

    # Tracing is off (no OTEL_TRACES_EXPORTER): nothing of OpenTelemetry.
    assert not {m for m in loaded if m.split(".")[0] == "opentelemetry"}
    # Archives: the tar code arrives with the first ExtractArchive or CreateArchive.
    assert not loaded & {"tarfile", "gzip", "common.tarball", "agent.fs.extract", "agent.fs.archive", "pathspec"}
    # The Python search engine (RE2, pathspec) only where there is no rg.
    assert not loaded & {"re2", "agent.fs.search.python_engine"}
    # File watching: inotify and the watcher arrive with the first WatchFiles.
    assert not loaded & {"inotify_simple", "agent.fs.watch", "agent.fs.search.ignores"}


def test_a_traced_agent_loads_opentelemetry(tmp_path: Path) -> None:
    loaded = loaded_after_start(tmp_path, OTEL_TRACES_EXPORTER="console")

    assert {"opentelemetry.sdk.trace", "opentelemetry.instrumentation.grpc"} <= loaded
