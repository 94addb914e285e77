"""Edit through the gRPC API: every operation, all-or-nothing validation, atomic writes, diffs, and
every refusal leaving the workspace byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest
from grpc import aio

from agent.errors import PreconditionFailed
from agent.fs.edit import EditPlan, ReplaceText, WriteFile
from agent.fs.paths import WorkspaceRoot
from tests.agent.helpers import snapshot
from tests.conftest import AgentTarget
from workspace.agent.v1 import agent_pb2 as pb


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: str, content: bytes, **fields) -> pb.EditOperation:
    return pb.EditOperation(write=pb.WriteFile(path=path, content=content, **fields))


def replace(path: str, old: str, new: str, **fields) -> pb.EditOperation:
    return pb.EditOperation(replace=pb.ReplaceText(path=path, old_text=old, new_text=new, **fields))


def insert(path: str, line: int, text: str, **fields) -> pb.EditOperation:
    return pb.EditOperation(insert=pb.InsertText(path=path, line=line, text=text, **fields))


def delete(path: str, **fields) -> pb.EditOperation:
    return pb.EditOperation(delete=pb.DeletePath(path=path, **fields))


def move(source: str, target: str, **fields) -> pb.EditOperation:
    return pb.EditOperation(move=pb.MovePath(from_path=source, to_path=target, **fields))


def mkdir(path: str) -> pb.EditOperation:
    return pb.EditOperation(make_directory=pb.MakeDirectory(path=path))


async def edit(agent: AgentTarget, *operations: pb.EditOperation, dry_run: bool = False) -> pb.EditResponse:
    return await agent.stub.Edit(pb.EditRequest(operations=operations, dry_run=dry_run), metadata=agent.metadata)


async def refused(agent: AgentTarget, *operations: pb.EditOperation) -> tuple[grpc.StatusCode, str]:
    """Runs an edit that must fail, and checks that it left the workspace exactly as it was."""
    before = snapshot(agent.root)
    with pytest.raises(aio.AioRpcError) as error:
        await edit(agent, *operations)
    assert snapshot(agent.root) == before
    return error.value.code(), error.value.details() or ""


async def test_write_creates_parents_and_reports_sha256(agent: AgentTarget) -> None:
    reply = await edit(agent, write("src/deep/new.txt", b"hello\n"))
    path = agent.root / "src/deep/new.txt"
    assert path.read_bytes() == b"hello\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [(f.path, f.sha256, f.deleted) for f in reply.files] == [("src/deep/new.txt", sha(b"hello\n"), False)]
    assert reply.diff == "--- /dev/null\n+++ b/src/deep/new.txt\n@@ -0,0 +1 @@\n+hello\n"
    assert snapshot(agent.root).keys() == {"src", "src/deep", "src/deep/new.txt"}  # no temp files left


async def test_write_sets_mode_of_new_files_and_keeps_mode_of_existing_ones(agent: AgentTarget) -> None:
    script = agent.root / "run.sh"
    script.write_bytes(b"#!/bin/sh\n")
    script.chmod(0o755)
    await edit(agent, write("run.sh", b"#!/bin/sh\necho hi\n", mode=0o600), write("secret", b"k", mode=0o600))
    assert script.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert script.stat().st_mode & 0o777 == 0o755
    assert (agent.root / "secret").stat().st_mode & 0o777 == 0o600


async def test_replace_insert_and_write_build_on_each_other(agent: AgentTarget) -> None:
    reply = await edit(
        agent,
        write("a.py", b"x = 1\ny = 1\n"),
        replace("a.py", "1", "2", expected_occurrences=2),
        insert("a.py", 2, "# between\n"),
        insert("a.py", 0, "# end\n"),
        insert("a.py", 1, "# start\n"),
    )
    final = b"# start\nx = 2\n# between\ny = 2\n# end\n"
    assert (agent.root / "a.py").read_bytes() == final
    assert [(f.path, f.sha256) for f in reply.files] == [("a.py", sha(final))]


async def test_replace_and_insert_on_an_existing_file_with_its_sha256(agent: AgentTarget) -> None:
    original = "def f():\n    return 1\n"
    (agent.root / "f.py").write_text(original)
    reply = await edit(
        agent,
        replace("f.py", "return 1", "return 2", expected_sha256=sha(original.encode())),
        insert("f.py", 3, "# appended after the last line\n"),
    )
    assert (agent.root / "f.py").read_text() == "def f():\n    return 2\n# appended after the last line\n"
    assert reply.diff == (
        "--- a/f.py\n+++ b/f.py\n@@ -1,2 +1,3 @@\n def f():\n-    return 1\n+    return 2\n"
        "+# appended after the last line\n"
    )


async def test_occurrence_count_mismatch_is_refused_with_the_actual_count(agent: AgentTarget) -> None:
    (agent.root / "t.txt").write_text("aa aa aa\n")
    code, details = await refused(agent, replace("t.txt", "aa", "b"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "occurs 3 times, expected 1" in details
    code, details = await refused(agent, replace("t.txt", "zz", "b", expected_occurrences=1))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "occurs 0 times" in details


async def test_sha256_mismatch_is_refused_with_the_actual_hash(agent: AgentTarget) -> None:
    (agent.root / "t.txt").write_bytes(b"current\n")
    stale = sha(b"what the caller saw\n")
    for operation in (
        write("t.txt", b"new", expected_sha256=stale),
        replace("t.txt", "current", "x", expected_sha256=stale),
        insert("t.txt", 1, "x", expected_sha256=stale),
        delete("t.txt", expected_sha256=stale),
        move("t.txt", "u.txt", expected_sha256=stale),
    ):
        code, details = await refused(agent, operation)
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"sha256 is {sha(b'current' + bytes([10]))}, expected {stale}" in details


async def test_a_failing_operation_leaves_earlier_ones_undone(agent: AgentTarget) -> None:
    (agent.root / "keep.txt").write_bytes(b"keep\n")
    code, details = await refused(
        agent,
        write("new.txt", b"new"),
        replace("keep.txt", "keep", "changed"),
        delete("keep.txt"),
        replace("keep.txt", "anything", "x"),  # deleted by the operation before: NOT_FOUND
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("operation 4 (ReplaceText keep.txt)")


async def test_insert_past_the_end_is_invalid(agent: AgentTarget) -> None:
    (agent.root / "two.txt").write_bytes(b"1\n2\n")
    code, details = await refused(agent, insert("two.txt", 4, "x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 2 lines" in details


async def test_delete_files_and_directories(agent: AgentTarget) -> None:
    (agent.root / "d/sub").mkdir(parents=True)
    (agent.root / "d/sub/f").write_bytes(b"f")
    (agent.root / "lone.txt").write_bytes(b"x\n")
    code, details = await refused(agent, delete("d"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "set recursive" in details
    code, _ = await refused(agent, delete("missing"))
    assert code == grpc.StatusCode.NOT_FOUND

    reply = await edit(agent, delete("d", recursive=True), delete("lone.txt", expected_sha256=sha(b"x\n")))
    assert snapshot(agent.root) == {}
    assert [(f.path, f.deleted) for f in reply.files] == [("d", True), ("lone.txt", True)]
    assert reply.diff == "--- a/lone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n"


async def test_move_files_and_directories(agent: AgentTarget) -> None:
    (agent.root / "pkg").mkdir()
    (agent.root / "pkg/mod.py").write_bytes(b"A = 1\n")
    (agent.root / "old.txt").write_bytes(b"old\n")
    (agent.root / "taken.txt").write_bytes(b"taken\n")

    code, _ = await refused(agent, move("old.txt", "taken.txt"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = await refused(agent, move("old.txt", "pkg", overwrite=True))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = await refused(agent, move("pkg", "pkg/inner"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT

    reply = await edit(
        agent,
        move("pkg", "lib/pkg"),
        replace("lib/pkg/mod.py", "1", "2"),  # inside the directory where the move put it
        move("old.txt", "taken.txt", overwrite=True),
    )
    assert snapshot(agent.root) == {
        "lib": ("dir", 0o755, None),
        "lib/pkg": ("dir", 0o755, None),
        "lib/pkg/mod.py": ("file", 0o644, b"A = 2\n"),
        "taken.txt": ("file", 0o644, b"old\n"),
    }
    assert {f.path: (f.sha256, f.deleted) for f in reply.files} == {
        "pkg": ("", True),
        "lib/pkg": ("", False),
        "lib/pkg/mod.py": (sha(b"A = 2\n"), False),
        "old.txt": ("", True),
        "taken.txt": (sha(b"old\n"), False),
    }


async def test_make_directory(agent: AgentTarget) -> None:
    (agent.root / "file").write_bytes(b"")
    reply = await edit(agent, mkdir("a/b/c"), mkdir("a/b"))
    assert (agent.root / "a/b/c").is_dir()
    assert [(f.path, f.sha256, f.deleted) for f in reply.files] == [("a/b/c", "", False), ("a/b", "", False)]
    code, _ = await refused(agent, mkdir("file"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _ = await refused(agent, mkdir("file/sub"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_dry_run_returns_the_diff_and_writes_nothing(agent: AgentTarget) -> None:
    (agent.root / "a.txt").write_bytes(b"one\ntwo\n")
    before = snapshot(agent.root)
    reply = await edit(agent, replace("a.txt", "two", "2"), write("b.txt", b"no newline"), dry_run=True)
    assert snapshot(agent.root) == before
    assert reply.diff == (
        "--- a/a.txt\n+++ b/a.txt\n@@ -1,2 +1,2 @@\n one\n-two\n+2\n"
        "--- /dev/null\n+++ b/b.txt\n@@ -0,0 +1 @@\n+no newline\n\\ No newline at end of file\n"
    )
    assert [f.sha256 for f in reply.files] == [sha(b"one\n2\n"), sha(b"no newline")]


async def test_create_only_and_type_mismatches(agent: AgentTarget) -> None:
    (agent.root / "exists.txt").write_bytes(b"x")
    (agent.root / "dir").mkdir()
    (agent.root / "bin").write_bytes(b"\xff\xfe\0")
    cases = [
        (write("exists.txt", b"y", create_only=True), grpc.StatusCode.ALREADY_EXISTS),
        (write("dir", b"y"), grpc.StatusCode.FAILED_PRECONDITION),
        (write("exists.txt/child", b"y"), grpc.StatusCode.FAILED_PRECONDITION),
        (replace("dir", "a", "b"), grpc.StatusCode.FAILED_PRECONDITION),
        (replace("bin", "a", "b"), grpc.StatusCode.FAILED_PRECONDITION),
        (replace("missing.txt", "a", "b"), grpc.StatusCode.NOT_FOUND),
        (replace("exists.txt", "", "b"), grpc.StatusCode.INVALID_ARGUMENT),
        (write("", b"y"), grpc.StatusCode.FAILED_PRECONDITION),
        (write("new", b"y", mode=0o4755), grpc.StatusCode.INVALID_ARGUMENT),
        (delete(""), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.EditOperation(), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for operation, code in cases:
        assert (await refused(agent, operation))[0] == code, operation
    assert (await refused(agent))[0] == grpc.StatusCode.INVALID_ARGUMENT  # no operations at all


async def test_paths_outside_the_root_are_refused_for_every_operation(agent: AgentTarget, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_bytes(b"victim\n")
    (agent.root / "out").symlink_to(outside)
    (agent.root / "mine.txt").write_bytes(b"mine\n")
    outside_before = snapshot(outside)
    escapes = ["/etc/passwd", "../outside/victim.txt", "a/\x00b", "out/victim.txt", "out/new.txt"]
    for path in escapes:
        for operation in (
            write(path, b"x"),
            replace(path, "victim", "x"),
            insert(path, 1, "x"),
            delete(path),
            mkdir(path),
            move("mine.txt", path),
            move(path, "stolen.txt"),
        ):
            code, _ = await refused(agent, operation)
            expected = (
                grpc.StatusCode.PERMISSION_DENIED if path.startswith("out/") else grpc.StatusCode.INVALID_ARGUMENT
            )
            assert code == expected, (path, operation)
    # The link itself lies inside the root: it may be moved or deleted, never followed.
    await edit(agent, move("out", "moved-link"), delete("moved-link"))
    assert snapshot(outside) == outside_before
    assert snapshot(agent.root) == {"mine.txt": ("file", 0o644, b"mine\n")}


@pytest.mark.inprocess_only("applies a plan in this process after changing the disk under it")
async def test_a_failure_while_applying_rolls_back_every_step(agent: AgentTarget) -> None:
    (agent.root / "existing.txt").write_bytes(b"before\n")
    plan = EditPlan(
        WorkspaceRoot(agent.root),
        [WriteFile("existing.txt", b"after\n"), WriteFile("new.txt", b"new\n"), WriteFile("d/late.txt", b"late\n")],
    )
    # A concurrent writer makes `d` a file after validation: the third step cannot create d/late.txt.
    (agent.root / "d").write_bytes(b"in the way\n")
    before = snapshot(agent.root)
    with pytest.raises(PreconditionFailed, match="rolled back"):
        plan.apply()
    assert snapshot(agent.root) == before  # restored, and no temp file or backup left behind


async def test_an_edit_whose_diff_exceeds_the_message_limit_is_applied_and_reported_with_a_cut_diff(
    agent: AgentTarget,
) -> None:
    # Three files of 900 KB whose every line changes: a diff of about 5.4 MB, past the 4 MiB message limit.
    line = "const a = 1; // " + "x" * 40 + "\n"
    lines = 900_000 // len(line)
    for name in ("one.js", "two.js", "three.js"):
        (agent.root / name).write_text(line * lines)
    reply = await edit(
        agent,
        *(replace(name, "const a", "const b", expected_occurrences=lines) for name in ("one.js", "two.js", "three.js")),
    )
    changed = (line.replace("const a", "const b") * lines).encode()
    assert [(f.path, f.sha256) for f in reply.files] == [(n, sha(changed)) for n in ("one.js", "two.js", "three.js")]
    for name in ("one.js", "two.js", "three.js"):
        assert (agent.root / name).read_bytes() == changed
    assert reply.diff.startswith("--- a/one.js\n+++ b/one.js\n")
    assert reply.diff.endswith("(the response size limit)\n") and "diff truncated" in reply.diff
    assert reply.ByteSize() < 4 * 1024 * 1024


@pytest.mark.inprocess_only(
    "needs root in the test to give a file another owner; the container's hand-over resets owners"
)
async def test_edit_keeps_the_owner_and_mode_of_a_file_owned_by_another_user(agent: AgentTarget) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file another owner needs root")
    path = agent.root / "owned.txt"
    path.write_text("one\n")
    os.chown(path, 12345, 23456)
    path.chmod(0o640)
    await edit(agent, replace("owned.txt", "one", "two"))
    await edit(agent, write("owned.txt", b"three\n"))
    await edit(agent, insert("owned.txt", 1, "zero\n"))
    status = path.stat()
    assert path.read_text() == "zero\nthree\n"
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (12345, 23456, 0o640)


def test_an_edit_the_agent_cannot_write_back_with_its_owner_is_refused_before_any_change() -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file another owner, and acting as another user, needs root")
    root = Path(tempfile.mkdtemp(prefix="agentfs-owner-"))
    try:
        (root / "mine.txt").write_text("mine\n")
        (root / "theirs.txt").write_text("theirs\n")
        for path in (root, root / "mine.txt"):
            os.chown(path, 1000, 1000)
        os.chown(root / "theirs.txt", 12345, 12345)
        (root / "theirs.txt").chmod(0o666)  # writable by anyone: only the owner is in question
        before = snapshot(root)
        plan = None
        os.setegid(1000)
        os.seteuid(1000)  # the agent's user in the core image
        try:
            with pytest.raises(PreconditionFailed) as refusal:
                plan = EditPlan(
                    WorkspaceRoot(root),
                    [ReplaceText("mine.txt", "mine", "MINE"), ReplaceText("theirs.txt", "theirs", "x")],
                )
        finally:
            os.seteuid(0)
            os.setegid(0)
        assert plan is None
        assert str(refusal.value).startswith("operation 2 (ReplaceText theirs.txt): theirs.txt: is owned by uid 12345")
        assert snapshot(root) == before
        assert (root / "theirs.txt").stat().st_uid == 12345
    finally:
        shutil.rmtree(root)


async def test_edits_never_leave_working_files_and_cannot_touch_the_agents_directory(agent: AgentTarget) -> None:
    (agent.root / "src").mkdir()
    (agent.root / "src" / "a.txt").write_text("a\n")
    await edit(
        agent,
        write("src/a.txt", b"b\n"),
        write("src/b.txt", b"new\n"),
        move("src/b.txt", "src/c.txt"),
        delete("src/a.txt"),
    )
    code, _ = await refused(agent, write("src/c.txt", b"x"), replace("src/c.txt", "missing", "y"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert sorted(p.relative_to(agent.root).as_posix() for p in agent.root.rglob("*")) == ["src", "src/c.txt"]
    code, message = await refused(agent, write(".workspace-agent/planted", b"x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "agent's own working directory" in message
