"""WatchFiles through the gRPC API, with real inotify: the changes a client sees (kinds, paths, sizes), coalescing,
Search's ignore rules, resuming from a sequence number, resyncs, and every refusal."""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
from grpc import aio

from common.constants import TOKEN_ENV
from tests.agent.helpers import status_of_stream
from tests.conftest import REPO, AgentTarget, start_container_agent, start_inprocess_agent
from workspace.agent.v1 import agent_pb2 as pb
from workspace.agent.v1 import agent_pb2_grpc

# A guard against a hang, never a measure: every wait ends as soon as what it waits for arrives.
PATIENCE = 60.0
K = pb.FileChangeKind


class Watching:
    """A WatchFiles stream, read as the test asks."""

    def __init__(self, agent: AgentTarget, path: str = "", since: int = 0) -> None:
        request = pb.WatchFilesRequest(path=path, since_sequence=since)
        self.call = agent.stub.WatchFiles(request, metadata=agent.metadata)
        self.responses = aiter(self.call)

    async def _next(self) -> pb.WatchFilesResponse:
        return await asyncio.wait_for(anext(self.responses), PATIENCE)

    async def ready(self) -> tuple[list[pb.FileChange], pb.WatchReady]:
        """The changes replayed before `ready`, and `ready` itself."""
        replayed = []
        while (response := await self._next()).WhichOneof("event") == "change":
            replayed.append(response.change)
        return replayed, response.ready

    async def until(self, last: Callable[[pb.FileChange], bool]) -> list[pb.FileChange]:
        """The changes up to and including the first for which `last` is true."""
        seen = []
        while True:
            response = await self._next()
            assert response.WhichOneof("event") == "change", response
            seen.append(response.change)
            if last(response.change):
                return seen

    def close(self) -> None:
        self.call.cancel()


async def watching(agent: AgentTarget, path: str = "", since: int = 0) -> Watching:
    """A stream that follows live changes already (its watches are in place)."""
    watch = Watching(agent, path, since)
    await watch.ready()
    return watch


def at(path: str) -> Callable[[pb.FileChange], bool]:
    return lambda change: change.path == path


def seen(changes: list[pb.FileChange]) -> list[tuple[str, str, str, int, bool]]:
    """(kind, path, old path, size, directory) of each change, as a client reads them."""
    return [
        (K.Name(c.kind).removeprefix("FILE_CHANGE_KIND_"), c.path, c.old_path, c.size, c.directory) for c in changes
    ]


def put(root: Path, path: str, data: bytes | str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data.encode() if isinstance(data, str) else data)


async def test_create_modify_move_and_delete_are_seen_with_sizes(agent: AgentTarget) -> None:
    root = agent.root
    watch = await watching(agent)
    try:
        put(root, "src/a.txt", "hello")
        first = await watch.until(at("src/a.txt"))
        with open(root / "src/a.txt", "ab") as file:
            file.write(b", world")
        modified = await watch.until(at("src/a.txt"))
        os.rename(root / "src/a.txt", root / "src/b.txt")
        moved = await watch.until(at("src/b.txt"))
        os.unlink(root / "src/b.txt")
        deleted = await watch.until(at("src/b.txt"))
    finally:
        watch.close()

    assert seen(first) == [("CREATE", "src", "", 0, True), ("CREATE", "src/a.txt", "", 5, False)]
    assert seen(modified) == [("MODIFY", "src/a.txt", "", 12, False)]
    assert seen(moved) == [("MOVE", "src/b.txt", "src/a.txt", 12, False)]
    assert seen(deleted) == [("DELETE", "src/b.txt", "", 0, False)]
    sequences = [c.sequence for c in first + modified + moved + deleted]
    assert sequences == list(range(sequences[0], sequences[0] + 5))


async def test_a_burst_of_writes_is_one_modify_and_so_is_an_editors_save(agent: AgentTarget) -> None:
    root = agent.root
    put(root, "notes.md", "")
    put(root, "app.js", "old")
    watch = await watching(agent)
    try:
        with open(root / "notes.md", "ab") as file:
            for _ in range(200):
                file.write(b"x")
                file.flush()
        # An editor's atomic save: the new content in a temp file beside it, renamed over it.
        put(root, ".app.js.swp", "console.log('new');")
        os.rename(root / ".app.js.swp", root / "app.js")
        put(root, "done", "")
        changes = await watch.until(at("done"))
    finally:
        watch.close()

    assert seen(changes) == [
        ("MODIFY", "notes.md", "", 200, False),
        ("MODIFY", "app.js", "", 19, False),  # the hidden temp file itself is not watched
        ("CREATE", "done", "", 0, False),
    ]


async def test_what_search_ignores_produces_no_change(agent: AgentTarget) -> None:
    root = agent.root
    put(root, ".gitignore", "dist/\n*.log\n")
    (root / "dist").mkdir()
    (root / "node_modules").mkdir()
    watch = await watching(agent)
    try:
        put(root, "dist/bundle.js", "x")
        put(root, "debug.log", "x")
        put(root, "node_modules/react/index.js", "x")
        put(root, ".git/HEAD", "ref: refs/heads/main\n")
        put(root, ".env", "SECRET=1")
        put(root, ".workspace-agent/journal", "x")
        put(root, "src/kept.js", "x")
        changes = await watch.until(at("src/kept.js"))
        # An ignore file's change counts from then on, in every directory below it: logs are seen, .tmp files not.
        put(root, ".gitignore", "dist/\n*.tmp\n")
        put(root, "src/scratch.tmp", "x")
        put(root, "debug2.log", "x")
        changes += await watch.until(at("debug2.log"))
    finally:
        watch.close()

    assert seen(changes) == [
        ("CREATE", "src", "", 0, True),
        ("CREATE", "src/kept.js", "", 1, False),
        ("CREATE", "debug2.log", "", 1, False),
    ]


async def test_a_directory_created_and_filled_at_once_yields_its_files(agent: AgentTarget) -> None:
    root = agent.root
    watch = await watching(agent)
    try:
        # Written faster than a watch can be added to each new directory: the scan of each finds what is in it.
        put(root, "pkg/lib/deep/mod.js", "export {}")
        put(root, "pkg/lib/index.js", "1")
        put(root, "pkg/README", "readme")
        put(root, "last", "")
        changes = await watch.until(at("last"))
        # The new directories are watched: a change deep inside is seen too.
        put(root, "pkg/lib/deep/mod.js", "export default 1")
        changes_after = await watch.until(at("pkg/lib/deep/mod.js"))
    finally:
        watch.close()

    # A file found by its directory's scan and by its own event in another window would be told twice: as a set.
    assert set(seen(changes)) == {
        ("CREATE", "pkg", "", 0, True),
        ("CREATE", "pkg/lib", "", 0, True),
        ("CREATE", "pkg/lib/deep", "", 0, True),
        ("CREATE", "pkg/lib/deep/mod.js", "", 9, False),
        ("CREATE", "pkg/lib/index.js", "", 1, False),
        ("CREATE", "pkg/README", "", 6, False),
        ("CREATE", "last", "", 0, False),
    }  # fmt: skip
    assert seen(changes_after) == [("MODIFY", "pkg/lib/deep/mod.js", "", 16, False)]


async def test_a_file_created_and_moved_within_one_window_is_a_create_where_it_ends(agent: AgentTarget) -> None:
    root = agent.root
    put(root, "kept.txt", "old")
    watch = await watching(agent)
    try:
        put(root, "draft.txt", "new")
        (root / "draft.txt").rename(root / "final.txt")  # created, then moved: new where it is now
        put(root, "draft2.txt", "newer")
        (root / "draft2.txt").rename(root / "kept.txt")  # created, then moved over a file: that file changed
        put(root, "last", "")
        changes = await watch.until(at("last"))
    finally:
        watch.close()

    assert sorted(seen(changes)) == [
        ("CREATE", "final.txt", "", 3, False),
        ("CREATE", "last", "", 0, False),
        ("MODIFY", "kept.txt", "", 5, False),
    ]


async def test_a_renamed_directory_is_followed_under_its_new_name(agent: AgentTarget) -> None:
    root = agent.root
    put(root, "old/inner/a.txt", "a")
    watch = await watching(agent)
    try:
        os.rename(root / "old", root / "new")
        moved = await watch.until(at("new"))
        put(root, "new/inner/b.txt", "bb")
        created = await watch.until(at("new/inner/b.txt"))
    finally:
        watch.close()

    assert seen(moved) == [("MOVE", "new", "old", 0, True)]
    assert seen(created) == [("CREATE", "new/inner/b.txt", "", 2, False)]


async def test_a_watch_of_a_subdirectory_sees_moves_across_its_edge_as_creates_and_deletes(
    agent: AgentTarget,
) -> None:
    root = agent.root
    put(root, "src/a.js", "a")
    put(root, "other/b.js", "bb")
    watch = await watching(agent, "src")
    try:
        put(root, "other/ignored.js", "not in src")
        os.rename(root / "src/a.js", root / "other/a.js")
        os.rename(root / "other/b.js", root / "src/b.js")
        changes = await watch.until(at("src/b.js"))
    finally:
        watch.close()

    assert seen(changes) == [("DELETE", "src/a.js", "", 0, False), ("CREATE", "src/b.js", "", 2, False)]


async def test_reconnecting_with_the_last_sequence_gets_exactly_the_missed_changes(agent: AgentTarget) -> None:
    root = agent.root
    watch = await watching(agent)
    try:
        put(root, "one", "1")
        (last,) = await watch.until(at("one"))
    finally:
        watch.close()
    # While nobody watches:
    put(root, "two", "22")
    os.unlink(root / "one")
    put(root, "three", "333")

    again = Watching(agent, since=last.sequence)
    try:
        replayed, ready = await again.ready()
        live = [] if any(c.path == "three" for c in replayed) else await again.until(at("three"))
        put(root, "four", "4444")
        after = await again.until(at("four"))
    finally:
        again.close()

    missed = replayed + live
    assert seen(missed) == [
        ("CREATE", "two", "", 2, False),
        ("DELETE", "one", "", 0, False),
        ("CREATE", "three", "", 3, False),
    ]
    assert [c.sequence for c in missed] == [last.sequence + 1, last.sequence + 2, last.sequence + 3]
    assert ready.oldest_sequence <= last.sequence
    assert seen(after) == [("CREATE", "four", "", 4, False)]
    assert after[0].sequence == last.sequence + 4


@pytest.fixture(params=["inprocess", pytest.param("container", marks=pytest.mark.docker)])
async def small_journal_agent(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentTarget]:
    """An agent whose journal holds three changes."""
    root = tmp_path / "app"
    root.mkdir()
    if request.param == "container":
        container, target = await start_container_agent(
            request.getfixturevalue("docker_client"), request.getfixturevalue("core_image"), root,
            "--watch-journal-changes", "3",
        )  # fmt: skip
        try:
            yield target
        finally:
            await target.channel.close()
            container.remove(force=True)
        return
    server, target = await start_inprocess_agent(root, watch_journal_changes=3)
    try:
        yield target
    finally:
        await target.channel.close()
        await server.stop(None)


async def test_a_sequence_the_journal_no_longer_covers_gets_one_resync(small_journal_agent: AgentTarget) -> None:
    agent = small_journal_agent
    watch = Watching(agent)
    try:
        _, ready = await watch.ready()
        for name in ("a", "b", "c", "d", "e"):
            put(agent.root, name, name)
            await watch.until(at(name))  # each its own change, all in the journal in turn
    finally:
        watch.close()

    stale = Watching(agent, since=ready.sequence)
    try:
        replayed, stale_ready = await stale.ready()
        put(agent.root, "f", "f")
        live = await stale.until(at("f"))
    finally:
        stale.close()
    unknown = Watching(agent, since=12345)
    try:
        unknown_replayed, _ = await unknown.ready()
    finally:
        unknown.close()

    assert seen(replayed) == [("RESYNC", "", "", 0, False)]
    assert replayed[0].sequence == stale_ready.sequence == ready.sequence + 5
    assert stale_ready.oldest_sequence == ready.sequence + 2  # the last three changes are held
    assert seen(live) == [("CREATE", "f", "", 1, False)]
    assert seen(unknown_replayed) == [("RESYNC", "", "", 0, False)]


async def test_paths_outside_the_root_are_refused_as_read_refuses_them(agent: AgentTarget, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink("../outside", agent.root / "escape")
    put(agent.root, "src/a.txt", "a")

    async def watch_status(path: str) -> grpc.StatusCode:
        return (await status_of_stream(Watching(agent, path).call))[0]

    async def read_status(path: str) -> grpc.StatusCode:
        return (await status_of_stream(agent.stub.Read(pb.ReadRequest(path=path), metadata=agent.metadata)))[0]

    for path, status in [
        ("../outside", grpc.StatusCode.INVALID_ARGUMENT),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT),
        ("src/../..", grpc.StatusCode.INVALID_ARGUMENT),
        ("escape", grpc.StatusCode.PERMISSION_DENIED),
    ]:
        assert await watch_status(path) == status, path
        assert await read_status(path if path != "escape" else "escape/secret.txt") == status, path
    assert await watch_status("missing") == grpc.StatusCode.NOT_FOUND
    assert await watch_status("src/a.txt") == grpc.StatusCode.INVALID_ARGUMENT  # not a directory
    assert await watch_status("node_modules") == grpc.StatusCode.NOT_FOUND
    (agent.root / "node_modules").mkdir()
    code, details = await status_of_stream(Watching(agent, "node_modules").call)
    assert (code, "ignored" in details) == (grpc.StatusCode.INVALID_ARGUMENT, True), details


async def test_a_tree_past_the_directory_limit_is_refused_with_resource_exhausted(tmp_path: Path) -> None:
    root = tmp_path / "app"
    for index in range(5):
        (root / f"d{index}").mkdir(parents=True)
    server, agent = await start_inprocess_agent(root, watch_max_directories=3)
    try:
        code, details = await status_of_stream(Watching(agent).call)
    finally:
        await agent.channel.close()
        await server.stop(None)

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more than 3 directories" in details


def _inotify_instances() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
        except OSError:
            pass
    return count


async def test_the_watcher_is_released_when_its_last_client_has_gone(tmp_path: Path) -> None:
    root = tmp_path / "app"
    root.mkdir()
    before = _inotify_instances()
    server, agent = await start_inprocess_agent(root, watch_linger_seconds=0)
    try:
        watch = await watching(agent)
        second = await watching(agent, "")
        assert _inotify_instances() == before + 1  # one watcher, shared
        put(root, "a", "a")
        (change,) = await watch.until(at("a"))
        watch.close()
        second.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while _inotify_instances() != before and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert _inotify_instances() == before
        # Its journal went with it: the old cursor gets a resync, and the new numbers are above the old.
        again = Watching(agent, since=change.sequence)
        try:
            replayed, ready = await again.ready()
        finally:
            again.close()
    finally:
        await agent.channel.close()
        await server.stop(None)

    assert seen(replayed) == [("RESYNC", "", "", 0, False)]
    assert ready.sequence > change.sequence


async def test_an_unauthenticated_watch_is_refused(agent: AgentTarget) -> None:
    call = agent.stub.WatchFiles(pb.WatchFilesRequest(), metadata=(("authorization", "Bearer wrong"),))
    with pytest.raises(aio.AioRpcError) as error:
        await anext(aiter(call))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_edits_through_the_agent_are_the_changes_they_make(agent: AgentTarget) -> None:
    put(agent.root, "src/app.js", "old")
    watch = await watching(agent)

    async def edit(*operations: pb.EditOperation) -> None:
        await agent.stub.Edit(pb.EditRequest(operations=operations), metadata=agent.metadata)

    try:
        # Each is written beside the agent's own files and renamed into place, which inotify tells as a bare rename.
        await edit(pb.EditOperation(write=pb.WriteFile(path="src/app.js", content=b"console.log(1);")))
        modified = await watch.until(at("src/app.js"))
        await edit(pb.EditOperation(write=pb.WriteFile(path="src/new.js", content=b"new")))
        created = await watch.until(at("src/new.js"))
        await edit(pb.EditOperation(move=pb.MovePath(from_path="src/new.js", to_path="src/moved.js")))
        moved = await watch.until(at("src/moved.js"))
        await edit(pb.EditOperation(delete=pb.DeletePath(path="src/moved.js")))
        deleted = await watch.until(at("src/moved.js"))
    finally:
        watch.close()

    assert seen(modified) == [("MODIFY", "src/app.js", "", 15, False)]
    assert seen(created) == [("CREATE", "src/new.js", "", 3, False)]
    assert seen(moved) == [("MOVE", "src/moved.js", "src/new.js", 3, False)]
    assert seen(deleted) == [("DELETE", "src/moved.js", "", 0, False)]


async def test_the_kernels_watch_limit_is_refused_with_resource_exhausted_and_the_agent_serves_on(
    tmp_path: Path,
) -> None:
    """The agent in a user namespace of its own whose inotify limit is 3 watches (the limit is per user namespace,
    so nobody else's watches are affected), asked to watch a tree of 5 directories."""
    root = tmp_path / "app"
    for index in range(4):
        (root / f"d{index}").mkdir(parents=True)
    put(root, "a.txt", "a")
    port_file = tmp_path / "port"
    token = secrets.token_urlsafe(16)
    script = (
        "echo 3 > /proc/sys/user/max_inotify_watches && "
        f"exec {shlex.quote(sys.executable)} -m agent --root {shlex.quote(str(root))} --listen 127.0.0.1:0 "
        f"--port-file {shlex.quote(str(port_file))}"
    )
    agent_process = await asyncio.create_subprocess_exec(
        "unshare", "--user", "--map-root-user", "sh", "-c", script, cwd=REPO, env={**os.environ, TOKEN_ENV: token}
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        while not port_file.exists() and agent_process.returncode is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
        assert port_file.exists(), f"the agent did not start (exit status {agent_process.returncode})"
        async with aio.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            metadata = (("authorization", f"Bearer {token}"),)
            code, details = await status_of_stream(stub.WatchFiles(pb.WatchFilesRequest(), metadata=metadata))
            read = [r async for r in stub.Read(pb.ReadRequest(path="a.txt"), metadata=metadata)]
    finally:
        if agent_process.returncode is None:
            agent_process.terminate()
        await agent_process.wait()

    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "inotify watch limit is reached (3 watches" in details, details
    assert read[-1].chunk.data == b"a"


async def test_a_directory_moved_in_brings_its_files_and_one_moved_out_is_deleted(
    agent: AgentTarget, tmp_path: Path
) -> None:
    root = agent.root
    # Outside the watched tree but on the same filesystem (a rename, not a copy): an ignored directory.
    put(root, "node_modules/pkg/index.js", "module")
    put(root, "node_modules/pkg/lib/util.js", "u")
    put(root, "gone/a.txt", "a")
    watch = await watching(agent)
    try:
        os.rename(root / "node_modules/pkg", root / "vendored")
        arrived = await watch.until(at("vendored/lib/util.js"))
        os.rename(root / "gone", root / "node_modules/gone")
        left = await watch.until(at("gone"))
        put(root, "node_modules/gone/b.txt", "not watched any more")
        put(root, "vendored/lib/util.js", "still watched")
        after = await watch.until(at("vendored/lib/util.js"))
    finally:
        watch.close()

    assert set(seen(arrived)) == {
        ("CREATE", "vendored", "", 0, True),
        ("CREATE", "vendored/index.js", "", 6, False),
        ("CREATE", "vendored/lib", "", 0, True),
        ("CREATE", "vendored/lib/util.js", "", 1, False),
    }
    assert seen(left) == [("DELETE", "gone", "", 0, True)]
    assert seen(after) == [("MODIFY", "vendored/lib/util.js", "", 13, False)]


async def test_when_the_kernels_queue_overflows_every_stream_gets_one_resync_and_follows_on(tmp_path: Path) -> None:
    """More changes than the kernel queues for one inotify instance (fs.inotify.max_queued_events), made while the
    agent cannot read them: its event loop is this test's, busy creating the files."""
    root = tmp_path / "app"
    (root / "many").mkdir(parents=True)
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    server, agent = await start_inprocess_agent(root)
    try:
        watch = await watching(agent)
        for index in range(queued + 100):
            (root / "many" / str(index)).touch()
        changes = await watch.until(lambda change: change.kind == K.FILE_CHANGE_KIND_RESYNC)
        put(root, "after", "1")
        changes += await watch.until(at("after"))
        put(root, "many/0", "now known")  # the files are watched again after the overflow
        again = await watch.until(at("many/0"))
        watch.close()
    finally:
        await agent.channel.close()
        await server.stop(None)

    assert seen(changes) == [("RESYNC", "", "", 0, False), ("CREATE", "after", "", 1, False)]
    assert seen(again) == [("MODIFY", "many/0", "", 9, False)]
