"""The README's grpcurl calls, run as written with the real grpcurl binary against a real orchestrator (local
runtime), so the section "Debugging with grpcurl" cannot drift from what the servers answer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from common.tools import ENV_BIN
from tests.conftest import REPO
from tests.live_orchestrator import running_orchestrator

SECTION = "## Debugging with grpcurl"
MARKER = "::: command "


def readme_commands() -> list[str]:
    """The command lines of the section's shell block (comments and blank lines left out)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index(SECTION) :]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, f"no ```sh block under {SECTION!r} in README.md"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_commands(commands: list[str], orchestrator: str) -> dict[str, str]:
    """Runs the commands in one bash (so variables carry over) and returns each command's output. The README's
    own orchestrator address gives way to the one under test."""
    script = ["set -euo pipefail"]
    for number, command in enumerate(commands):
        if command.startswith("ORCH="):
            command = f"ORCH={orchestrator}"
        script += [f"echo '{MARKER}{number}'", activating_this_environment(command)]
    result = subprocess.run(["bash", "-c", "\n".join(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"a README command failed:\n{result.stdout}\n{result.stderr}"
    outputs = re.split(rf"^{re.escape(MARKER)}\d+\n", result.stdout, flags=re.M)[1:]
    assert len(outputs) == len(commands), result.stdout
    return dict(zip(commands, outputs, strict=True))


def activating_this_environment(command: str) -> str:
    """The README's `. .venv/bin/activate`, for the virtual environment running the tests (wherever it is)."""
    return f". {ENV_BIN}/activate" if command == ". .venv/bin/activate" else command


def output_of(outputs: dict[str, str], *words: str) -> str:
    """The output of the one command containing all of `words`."""
    (match,) = [output for command, output in outputs.items() if all(word in command for word in words)]
    return match


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory):
    with running_orchestrator(tmp_path_factory.mktemp("orchestrator")) as address:
        yield address


def test_readme_grpcurl_calls_work(orchestrator: str) -> None:
    if shutil.which("jq") is None:
        pytest.fail("jq is missing (the README's examples use it): apt-get install jq")
    outputs = run_commands(readme_commands(), orchestrator)

    services = output_of(outputs, "$ORCH list").split()
    assert {"workspace.orchestrator.v1.OrchestratorService", "grpc.health.v1.Health"} <= set(services)
    assert "rpc CreateSession ( .workspace.orchestrator.v1.CreateSessionRequest )" in output_of(
        outputs, "describe", "Service"
    )
    assert "string template = 1;" in output_of(outputs, "describe", "CreateSessionRequest")
    assert json.loads(output_of(outputs, "Health/Check")) == {"status": "SERVING"}

    progress = output_of(outputs, "WatchSession").splitlines()
    assert progress[-1] == '"SESSION_STATE_READY"', progress
    phases = [json.loads(line)["phase"] for line in progress if line.startswith("{")]
    assert "PHASE_READY" in phases

    assert "workspace.agent.v1.AgentService" in output_of(outputs, "$AGENT list").split()
    template_manifest = json.loads((REPO / "templates" / "node-basic" / "package.json").read_text())
    assert json.loads(output_of(outputs, "AgentService/Read")) == template_manifest
    node_version, *listing = output_of(outputs, "AgentService/Exec").splitlines()
    assert node_version.startswith("v") and "package.json" in listing
    assert json.loads(output_of(outputs, "DeleteSession")) == {}
