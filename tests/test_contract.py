"""The contract: buf lint is clean, nothing breaks the previous commit's contract, and the committed generated
code (the Python stubs, the TypeScript of clients/node) matches the .proto files."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common.tools import find_tool, path_with_tools
from tests.conftest import REPO
from tests.node_support import node_client


def _buf() -> str:
    buf = find_tool("buf")
    if buf is None:
        pytest.fail("the buf CLI is missing: pip install -e '.[dev]' installs it (buf-bin) beside the interpreter")
    return buf


def test_buf_lint_is_clean() -> None:
    result = subprocess.run([_buf(), "lint"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def breaking_changes(repo: Path, against: str) -> subprocess.CompletedProcess[str]:
    """`buf breaking` (FILE rules, from buf.yaml) of the working tree's protos/ against commit `against`."""
    return subprocess.run(
        [_buf(), "breaking", "protos", "--against", f".git#ref={against},subdir=protos"],
        cwd=repo,
        capture_output=True,
        text=True,
    )


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)


def baseline_commit(repo: Path) -> str | None:
    """The commit whose contract must still hold: $BUF_BREAKING_AGAINST (CI sets the merge base of a pull
    request) or else HEAD~1. None when there is no earlier contract: the first commit, or one before protos/."""
    ref = os.environ.get("BUF_BREAKING_AGAINST", "HEAD~1")
    found = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if found.returncode != 0:
        if _git(repo, "rev-parse", "--is-shallow-repository").stdout.strip() == "true":
            pytest.fail(f"{ref} is not in this shallow clone: fetch more history (actions/checkout: fetch-depth: 0)")
        if "BUF_BREAKING_AGAINST" in os.environ:
            pytest.fail(f"BUF_BREAKING_AGAINST={ref} is not a commit")
        return None
    commit = found.stdout.strip()
    return commit if _git(repo, "ls-tree", "-d", commit, "protos").stdout else None


def test_no_breaking_change_against_the_previous_commit() -> None:
    against = baseline_commit(REPO)
    if against is None:
        pytest.skip("no earlier contract to compare with (first commit)")
    result = breaking_changes(REPO, against)
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_check_catches_a_deleted_rpc(tmp_path: Path) -> None:
    shutil.copytree(REPO / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    shutil.copy(REPO / "buf.yaml", tmp_path)
    for args in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "v1"]):
        _git(tmp_path, *args).check_returncode()
    proto = tmp_path / "protos" / "workspace" / "agent" / "v1" / "agent.proto"
    proto.write_text("\n".join(line for line in proto.read_text().splitlines() if "rpc GetActivity(" not in line))

    result = breaking_changes(tmp_path, "HEAD")
    assert result.returncode != 0
    assert 'Previously present RPC "GetActivity" on service "AgentService" was deleted' in result.stdout


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    # protoc looks its plugins (protoc-gen-mypy) up on PATH: the environment's own first, as after activating it.
    env = {**os.environ, "PATH": path_with_tools()}
    generate = [sys.executable, str(REPO / "protos" / "generate.py"), "--lang", "python", "--out", str(tmp_path)]
    subprocess.run(generate, check=True, env=env)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "nothing was generated"
    stale = [str(p) for p in generated if not filecmp.cmp(tmp_path / p, REPO / "protos" / p, shallow=False)]
    assert not stale, f"stale generated code, run `python protos/generate.py`: {stale}"


def test_generated_typescript_is_fresh(tmp_path: Path) -> None:
    node_client()  # buf.gen.yaml's plugin, protoc-gen-es, comes from clients/node's devDependencies
    generate = [sys.executable, str(REPO / "protos" / "generate.py"), "--lang", "typescript", "--ts-out", str(tmp_path)]
    subprocess.run(generate, check=True)
    committed = REPO / "clients" / "node" / "src" / "gen"
    fresh = tmp_path / "clients" / "node" / "src" / "gen"
    generated = sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())
    expected = {"workspace/agent/v1/agent_pb.ts", "workspace/orchestrator/v1/orchestrator_pb.ts"}
    assert {str(p) for p in generated} >= expected
    on_disk = sorted(p.relative_to(committed) for p in committed.rglob("*") if p.is_file())
    assert on_disk == generated, "generated TypeScript added or removed, run `make stubs`"
    stale = [str(p) for p in generated if not filecmp.cmp(fresh / p, committed / p, shallow=False)]
    assert not stale, f"stale generated TypeScript, run `make stubs`: {stale}"
