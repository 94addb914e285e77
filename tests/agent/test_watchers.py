"""Edits as a file watcher (inotify, as Vite's chokidar uses it) sees them: each kind of edit must produce
exactly the events of the ordinary save, delete or move an editor or shell would do, nothing more."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from grpc import aio
from inotify_simple import INotify, flags

from tests.agent.test_edit import delete, edit, insert, move, replace, write
from tests.conftest import AgentTarget
from tests.docker_support import hand_over_to_workspace_user
from workspace.agent.v1 import agent_pb2_grpc

# What watchers subscribe to (libuv's fs.watch mask, plus close-after-write): reads are not events to them.
WATCHED = (
    flags.ATTRIB | flags.CREATE | flags.MODIFY | flags.CLOSE_WRITE | flags.DELETE | flags.DELETE_SELF
    | flags.MOVE_SELF | flags.MOVED_FROM | flags.MOVED_TO
)  # fmt: skip
EDITS_PER_KIND = 20


class Watch:
    """Watches a directory and the files in it that exist now (their inodes, as a watcher of each file does)."""

    def __init__(self, directory: Path, names: tuple[str, ...]) -> None:
        self.inotify = INotify()
        self.names = names
        self.labels = {self.inotify.add_watch(directory, WATCHED): "dir"}
        for name in names:
            if (directory / name).exists():
                self.labels[self.inotify.add_watch(directory / name, WATCHED)] = name

    def events(self) -> list[tuple[str, str, list[str]]]:
        """(watch, entry name, event flags) of what happened to the watched names, in order. The
        kernel queues events before the system call returns, so everything the edit did is here."""
        seen = []
        for event in self.inotify.read(timeout=0):
            if event.mask & flags.IGNORED:
                continue
            label = self.labels[event.wd]
            if label == "dir" and event.name not in self.names:
                continue  # a save's own temp file (the agent's is not in this directory at all)
            seen.append((label, event.name, sorted(f.name for f in flags.from_mask(event.mask))))
        self.inotify.close()
        return seen


def _replace_over(directory: Path, name: str, content: bytes) -> None:
    """An editor's atomic save: a temp file beside the target, renamed over it."""
    temp = directory / f".{name}.swp"
    temp.write_bytes(content)
    os.rename(temp, directory / name)


async def _compare(
    agent: AgentTarget, tmp_path: Path, names: tuple[str, ...], existing: dict[str, bytes],
    by_agent: Callable[[], Awaitable[object]], ordinary: Callable[[Path], None],
) -> None:  # fmt: skip
    """The events of `by_agent` on `src/` in the workspace against those of `ordinary` on a twin directory."""
    results = []
    for directory, action in ((agent.root / "src", None), (tmp_path / "twin", ordinary)):
        directory.mkdir(exist_ok=True)
        for name in names:
            if (directory / name).exists():
                (directory / name).unlink()
        for name, content in existing.items():
            (directory / name).write_bytes(content)
        if action is None:
            # Before the watch starts: the container target's hand-over chowns what the test wrote.
            hand_over_to_workspace_user(agent.root)
        watch = Watch(directory, names)
        if action is None:
            await by_agent()
        else:
            action(directory)
        results.append(watch.events())
    by_the_agent, by_an_editor = results
    assert by_the_agent == by_an_editor
    assert by_the_agent  # the change itself was seen
    assert not os.listdir(agent.root / ".workspace-agent") if (agent.root / ".workspace-agent").exists() else True


@pytest.fixture
async def plain(agent: AgentTarget) -> AsyncIterator[AgentTarget]:
    """The agent reached without the container target's hand-over interceptor, whose chown before
    each call would be an attribute event of the test's own."""
    channel = aio.insecure_channel(agent.address)
    try:
        yield dataclasses.replace(agent, channel=channel, stub=agent_pb2_grpc.AgentServiceStub(channel))
    finally:
        await channel.close()


@pytest.mark.parametrize("round_", range(EDITS_PER_KIND))
async def test_edits_look_like_ordinary_saves_to_a_file_watcher(
    plain: AgentTarget, tmp_path: Path, round_: int
) -> None:
    agent = plain
    text = f"export const value = {round_};\n".encode()
    changed = text.replace(b"value", b"answer")

    await _compare(agent, tmp_path, ("app.js",), {"app.js": text},
                   lambda: edit(agent, replace("src/app.js", "value", "answer")),
                   lambda d: _replace_over(d, "app.js", changed))  # fmt: skip
    await _compare(agent, tmp_path, ("app.js",), {"app.js": text},
                   lambda: edit(agent, insert("src/app.js", 1, "// top\n")),
                   lambda d: _replace_over(d, "app.js", b"// top\n" + text))  # fmt: skip
    await _compare(agent, tmp_path, ("app.js",), {"app.js": text},
                   lambda: edit(agent, write("src/app.js", changed)),
                   lambda d: _replace_over(d, "app.js", changed))  # fmt: skip
    await _compare(agent, tmp_path, ("new.js",), {},
                   lambda: edit(agent, write("src/new.js", changed)),
                   lambda d: _replace_over(d, "new.js", changed))  # fmt: skip
    await _compare(agent, tmp_path, ("app.js",), {"app.js": text},
                   lambda: edit(agent, delete("src/app.js")),
                   lambda d: os.unlink(d / "app.js"))  # fmt: skip
    await _compare(agent, tmp_path, ("app.js", "moved.js"), {"app.js": text},
                   lambda: edit(agent, move("src/app.js", "src/moved.js")),
                   lambda d: os.rename(d / "app.js", d / "moved.js"))  # fmt: skip
    await _compare(agent, tmp_path, ("app.js", "old.js"), {"app.js": text, "old.js": changed},
                   lambda: edit(agent, move("src/app.js", "src/old.js", overwrite=True)),
                   lambda d: os.rename(d / "app.js", d / "old.js"))  # fmt: skip
