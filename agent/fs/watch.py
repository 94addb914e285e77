"""WatchFiles: one inotify watcher per workspace root, shared by every stream, that coalesces changes and numbers
them into a bounded journal a returning caller resumes from.

inotify comes through `inotify_simple`, a literal ctypes wrapper (already the test suite's): a move is reported as
IN_MOVED_FROM and IN_MOVED_TO with the same cookie, and pairing them into one move with its old and new path needs
that cookie, which it hands over as the kernel gives it (watchfiles' Rust watcher pairs nothing and reports a
rename as a delete and a create). The watcher keeps its own map of watch descriptors to paths, as it must anyway to
follow directories that are renamed (asyncinotify's paths go stale then); the event loop reads the descriptor.

One watcher per root rather than per stream: inotify watches count against a per-user kernel limit shared by every
workspace on the host (fs.inotify.max_user_watches), and the journal must outlive a stream for a caller to resume.
It starts with the first stream and stays `linger` seconds after the last, so a caller that reconnects within them
misses nothing; then its watches and journal are released (a later cursor gets a resync).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import Literal

from inotify_simple import INotify, flags

from agent.config import AgentConfig
from agent.errors import AgentError, FilesystemFailure, InvalidArgument, LimitExceeded
from agent.fs.paths import WorkspaceRoot
from agent.fs.search.ignores import Chain, IgnoreRules
from agent.fs.search.query import IGNORE_FILES, SearchQuery

log = logging.getLogger(__name__)

Kind = Literal["create", "modify", "delete", "move", "resync"]

# Content changes only: not IN_ATTRIB (chmod, chown and touch change no content), not reads. ONLYDIR: a watch is
# only ever added to a directory (through /proc/self/fd of one opened beneath the root).
_MASK = (
    flags.CREATE | flags.MODIFY | flags.DELETE | flags.MOVED_FROM | flags.MOVED_TO | flags.ONLYDIR | flags.EXCL_UNLINK
)
# What a journal entry is taken to cost besides its paths' bytes (the object, its fields, the deque's slot).
_ENTRY_BYTES = 200


@dataclass(frozen=True)
class Change:
    """One coalesced change, as numbered in the journal."""

    sequence: int
    kind: Kind
    path: str = ""
    old_path: str = ""
    size: int = 0
    directory: bool = False


@dataclass(frozen=True)
class Ready:
    """Sent once per stream when it follows live changes: `sequence` is its cursor, `oldest` the oldest cursor the
    journal still covers."""

    sequence: int
    oldest: int


WatchEvent = Change | Ready


class Journal:
    """The latest changes, numbered one apart: at most `max_changes` of them and about `max_bytes` in all (paths and
    per-entry overhead); the oldest leave first. Every change after `floor` is still held."""

    def __init__(self, first_sequence: int, max_changes: int, max_bytes: int) -> None:
        self.max_changes = max_changes
        self.max_bytes = max_bytes
        self.changes: deque[Change] = deque()
        self.floor = self.last = first_sequence - 1
        self.bytes = 0

    def append(self, kind: Kind, path: str = "", old_path: str = "", size: int = 0, directory: bool = False) -> None:
        self.last += 1
        change = Change(self.last, kind, path, old_path, size, directory)
        self.changes.append(change)
        self.bytes += _cost(change)
        while len(self.changes) > self.max_changes or (self.bytes > self.max_bytes and len(self.changes) > 1):
            dropped = self.changes.popleft()
            self.bytes -= _cost(dropped)
            self.floor = dropped.sequence

    def after(self, sequence: int) -> list[Change] | None:
        """The changes after `sequence`, or None when the journal does not hold them all (they left it, or the
        number is not one of this journal's)."""
        if not self.floor <= sequence <= self.last:
            return None
        return list(itertools.islice(self.changes, sequence - self.floor, None))


def _cost(change: Change) -> int:
    return _ENTRY_BYTES + len(change.path) + len(change.old_path)


@dataclass
class _Directory:
    wd: int
    chain: Chain  # the ignore files from the root down to this directory's own


@dataclass
class _Pending:
    kind: Kind  # create, modify, delete or move
    directory: bool
    old_path: str = ""


def _join(directory: str, name: str) -> str:
    return f"{directory}/{name}" if directory else name


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


def _under(path: str, top: str) -> bool:
    """Whether `path` is the directory `top` or below it ("" or "." being the root)."""
    return top in ("", ".") or path == top or path.startswith(top + "/")


class Watcher:
    """Watches every directory of the root that Search would enter, turns inotify's events into coalesced changes
    (`window` seconds of quiet, at most `max_delay` after the first) and appends them to its journal."""

    def __init__(
        self, root: WorkspaceRoot, journal: Journal, *, window: float, max_delay: float, max_directories: int
    ) -> None:
        self.root = root
        self.rules = IgnoreRules(root, SearchQuery())  # Search's defaults
        self.journal = journal
        self.window = window
        self.max_delay = max_delay
        self.max_directories = max_directories
        self.dirs: dict[str, _Directory] = {}  # watched directory ("" the root) -> its watch
        self.paths: dict[int, str] = {}  # watch descriptor -> directory
        # The files watched (what is not a directory), by directory: a file renamed onto one of them (an editor's
        # save, every Edit of the agent's) replaced it, which inotify reports as a bare IN_MOVED_TO. About 100 bytes a
        # file; by directory, so that a directory's move or delete costs its directories, not its files.
        self.files = _Files()
        self.pending: dict[str, _Pending] = {}  # path -> its change since the last flush, in first-touched order
        self.moved_from: dict[int, tuple[str, bool, bool]] = {}  # cookie -> (path, directory, visible)
        self.failure: AgentError | None = None
        self.closed = False
        self.changed = asyncio.Event()  # set (and replaced) whenever the journal grows or the watcher ends
        self._inotify: INotify | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first = self._latest = 0.0

    # ------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Watches the tree; raises LimitExceeded (inotify's limits or `max_directories`) or FilesystemFailure."""
        self._inotify = _new_inotify()
        # The first scan may be long: in a thread (nothing else touches the maps before the reader is added).
        scan = asyncio.ensure_future(asyncio.to_thread(self._scan, "", False))
        try:
            await asyncio.shield(scan)
        except BaseException:
            self.closed = True  # the scan stops at its next directory
            scan.add_done_callback(lambda _: self.close())
            raise
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), self._readable)

    def close(self) -> None:
        """Releases the watches; streams following it end."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._inotify is not None and not self._inotify.closed:
            try:
                asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            except RuntimeError:
                pass  # no running loop: the agent is shutting down
            self._inotify.close()
        self._wake()

    def _fail(self, error: AgentError) -> None:
        log.warning("file watching stopped", extra={"reason": str(error)})
        self.failure = error
        self.close()

    def _wake(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    # ------------------------------------------------------------ following

    async def follow(self, directory: str, since: int) -> AsyncGenerator[WatchEvent, None]:
        """The journal's changes after `since` (a resync when it does not hold them all), Ready, then live changes,
        those below `directory` ("." the whole root) only. Raises the watcher's failure."""
        cursor = self.journal.last
        if since:
            replay = self.journal.after(since)
            if replay is None:
                yield Change(cursor, "resync")
            for change in replay or ():
                if (scoped := _scoped(change, directory)) is not None:
                    yield scoped
        yield Ready(cursor, self.journal.floor)
        while True:
            changed = self.changed
            if self.failure is not None:
                raise self.failure
            if self.closed:
                return
            if cursor == self.journal.last:
                await changed.wait()
                continue
            changes = self.journal.after(cursor)
            cursor = self.journal.last
            if changes is None:  # this stream fell so far behind that the journal moved on
                yield Change(cursor, "resync")
                continue
            for change in changes:
                if (scoped := _scoped(change, directory)) is not None:
                    yield scoped

    def ignored(self, directory: str) -> bool:
        """Whether the directory `directory` (real, root-relative) or one above it is left out of the watch."""
        if directory == ".":
            return False
        parts = directory.split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if self.rules.skipped(path, parts[depth - 1], True, self.rules.chain_above(path)):
                return True
        return False

    # ------------------------------------------------------------ watches

    def _add_watch(self, path: str) -> bool:
        """Watches the directory `path` (opened beneath the root, no link followed): False when it is gone, or
        not a directory any more. Raises LimitExceeded."""
        assert self._inotify is not None
        if len(self.dirs) >= self.max_directories:
            raise LimitExceeded(
                f"the watch would cover more than {self.max_directories} directories (the agent's limit; one watcher "
                "covers the whole workspace for every stream): ignore generated trees in .gitignore"
            )
        try:
            fd = self.root.os_open(PurePosixPath(path or "."), os.O_PATH | os.O_DIRECTORY, follow=False)
        except OSError:
            return False
        try:
            wd = self._inotify.add_watch(f"/proc/self/fd/{fd}", _MASK)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise LimitExceeded(
                    f"the kernel's inotify watch limit is reached ({_limit('watches')} watches, shared by every process"
                    " of this user on the host: sysctl fs.inotify.max_user_watches): raise it, or ignore generated trees"
                ) from None
            return False
        finally:
            os.close(fd)
        if self.paths.get(wd, path) != path:
            return False  # the same directory under a second path (a bind mount): watched once
        self.paths[wd] = path
        self.dirs[path] = _Directory(wd, [*self._chain(_parent(path), path), self.rules.ignore_files(path)])
        return True

    def _chain(self, parent: str, path: str) -> Chain:
        return [] if not path else self.dirs[parent].chain

    def _forget(self, top: str) -> None:
        """Stops watching `top` and every directory below it."""
        for path in [p for p in self.dirs if _under(p, top)]:
            watched = self.dirs.pop(path)
            self.paths.pop(watched.wd, None)
            if self._inotify is not None and not self._inotify.closed:
                try:
                    self._inotify.rm_watch(watched.wd)
                except OSError:
                    pass  # the kernel dropped it already (the directory is gone)

    def _scan(self, top: str, emit: bool, known: bool = True) -> None:
        """Watches the directory `top` and every directory below it that Search would enter, each before it is
        listed (so nothing created meanwhile is missed); with `emit`, what they hold is noted as created, else
        (with `known`) its files are taken as known."""
        stack = [top]
        while stack and not self.closed:
            directory = stack.pop()
            if directory not in self.dirs and not self._add_watch(directory):
                continue
            chain = self.dirs[directory].chain
            try:
                fd = self.root.os_open(PurePosixPath(directory or "."), os.O_RDONLY | os.O_DIRECTORY, follow=False)
            except OSError:
                continue
            try:
                with os.scandir(fd) as scan:
                    entries = sorted((entry.name, entry.is_dir(follow_symlinks=False)) for entry in scan)
            except OSError:
                continue
            finally:
                os.close(fd)
            for name, is_dir in entries:
                path = _join(directory, name)
                if self.rules.skipped(path, name, is_dir, chain):
                    continue
                if emit:
                    self._note_create(path, is_dir)
                elif known and not is_dir:
                    self.files.add(path)
                if is_dir:
                    stack.append(path)

    def _reload_ignores(self, directory: str) -> None:
        """An ignore file of `directory` changed: the watched directories below it are judged again (left ones
        unwatched, newly visible ones watched)."""
        for path in sorted((p for p in self.dirs if _under(p, directory)), key=lambda p: p.count("/")):
            watched = self.dirs.get(path)
            if watched is None:
                continue  # forgotten with a directory above it
            parent_chain = self._chain(_parent(path), path)
            own = self.rules.ignore_files(path) if path == directory else watched.chain[-1]
            watched.chain = [*parent_chain, own]
            if path != directory and self.rules.skipped(path, path.rpartition("/")[2], True, parent_chain):
                self._forget(path)
        # Newly visible files are not taken as known: their own events may be queued still.
        self._scan(directory, emit=False, known=False)

    def _renamed(self, old: str, new: str) -> None:
        """The watched directory `old` is now `new`: its watches (inotify follows the inodes) are filed anew."""
        moved = sorted((p for p in self.dirs if _under(p, old)), key=lambda p: p.count("/"))
        entries = [(p, self.dirs.pop(p)) for p in moved]
        for path, watched in entries:
            now = new + path[len(old) :]
            self.paths[watched.wd] = now
            watched.chain = [*self._chain(_parent(now), now), self.rules.ignore_files(now)]
            self.dirs[now] = watched

    # ------------------------------------------------------------ inotify's events

    def _readable(self) -> None:
        assert self._inotify is not None
        try:
            events = self._inotify.read(timeout=0)
            for event in events:
                self._event(event.wd, event.mask, event.cookie, event.name)
        except AgentError as error:
            self._fail(error)
            return
        except OSError as error:
            self._fail(FilesystemFailure(f"reading file changes failed: {error.strerror}"))
            return
        if self.pending or self.moved_from:
            self._schedule()

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if self.moved_from and not (mask & flags.MOVED_TO and cookie in self.moved_from):
            self._moved_out()  # the kernel queues a rename's two halves together: this one has no second
        if mask & flags.Q_OVERFLOW:
            self._overflowed()
            return
        directory = self.paths.get(wd)
        if directory is None:
            return  # a watch already forgotten
        if mask & flags.IGNORED:  # the directory is gone
            self.paths.pop(wd, None)
            if directory in self.dirs and self.dirs[directory].wd == wd:
                del self.dirs[directory]
            return
        path = _join(directory, name)
        is_dir = bool(mask & flags.ISDIR)
        if name in IGNORE_FILES:
            self._reload_ignores(directory)
        visible = not self.rules.skipped(path, name, is_dir, self.dirs[directory].chain)
        if mask & flags.MOVED_FROM:
            self.moved_from[cookie] = (path, is_dir, visible)
            return
        if mask & flags.MOVED_TO and cookie in self.moved_from:
            old, _, old_visible = self.moved_from.pop(cookie)
            self._moved(old, old_visible, path, visible, is_dir)
            return
        if not visible:
            return
        if mask & (flags.CREATE | flags.MOVED_TO):
            self._note_create(path, is_dir)
            if is_dir:
                self._scan(path, emit=True)  # what was put in it before its watch was added
        elif mask & flags.MODIFY:
            self._note_modify(path, is_dir)
        elif mask & flags.DELETE:
            self._note_delete(path, is_dir)

    def _moved(self, old: str, old_visible: bool, new: str, visible: bool, is_dir: bool) -> None:
        if is_dir:
            if old in self.dirs:
                self._renamed(old, new)
            if not visible:
                self._forget(new)
        if old_visible and visible:
            self._note_move(old, new, is_dir)
        elif visible:
            self._note_create(new, is_dir)
            if is_dir:
                self._scan(new, emit=True)
        elif old_visible:
            self._note_delete(old, is_dir)

    def _moved_out(self) -> None:
        """Renames whose other half never came: moved out of the watched tree (or into an ignored directory)."""
        for path, is_dir, visible in self.moved_from.values():
            if visible:
                self._note_delete(path, is_dir)
            if is_dir:
                self._forget(path)
                self._files_under(path, None)
        self.moved_from.clear()

    def _overflowed(self) -> None:
        """The kernel's queue overflowed and events were lost: one resync for everyone, and the tree watched anew."""
        log.warning("inotify's event queue overflowed; watching the tree anew")
        self.pending.clear()
        self.moved_from.clear()
        self.journal.append("resync")
        self._wake()
        self._forget("")
        self.files = _Files()
        self._scan("", emit=False)

    # ------------------------------------------------------------ coalescing

    def _note_create(self, path: str, directory: bool) -> None:
        replaced = not directory and path in self.files
        if not directory:
            self.files.add(path)
        entry = self.pending.get(path)
        if entry is None:
            self.pending[path] = _Pending("modify" if replaced else "create", directory)
        elif entry.kind == "delete":  # deleted and created again: replaced
            del self.pending[path]
            same = not directory and not entry.directory
            self.pending[path] = _Pending("modify" if same else "create", directory)
        # already created, modified or moved here in this window: the client will be told it exists

    def _note_modify(self, path: str, directory: bool) -> None:
        if path not in self.pending:
            self.pending[path] = _Pending("modify", directory)

    def _note_delete(self, path: str, directory: bool) -> None:
        self.files.discard(path)
        if directory:
            self._files_under(path, None)
        entry = self.pending.pop(path, None)
        if entry is None or entry.kind in ("modify", "delete"):
            self.pending[path] = _Pending("delete", directory)
        elif entry.kind == "move":  # moved here then deleted: the original path is what is gone
            self.pending.setdefault(entry.old_path, _Pending("delete", directory))
        # created then deleted within the window: nobody needs to hear of it

    def _note_move(self, old: str, new: str, directory: bool) -> None:
        entry = self.pending.pop(old, None)
        replaced = not directory and new in self.files  # what the move put a file over, before it is noted
        if directory:
            for key in [k for k in self.pending if k.startswith(old + "/")]:
                self.pending[new + key[len(old) :]] = self.pending.pop(key)
            self._files_under(old, new)
        else:
            self.files.discard(old)
            self.files.add(new)
        if entry is not None and entry.kind == "create":  # created then moved: created where it is now
            self.pending.pop(new, None)
            self.pending[new] = _Pending("modify" if replaced else "create", directory)
            return
        source = entry.old_path if entry is not None and entry.kind == "move" else old
        self.pending.pop(new, None)
        if source == new:  # moved away and back (an editor's save through a backup name)
            self.pending[new] = _Pending("modify", directory)
        else:
            self.pending[new] = _Pending("move", directory, source)

    def _files_under(self, old: str, new: str | None) -> None:
        """The files below the directory `old` are now below `new`, or gone (None)."""
        self.files.move(old, new)

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._latest = now
        if self._timer is None:
            self._first = now
            self._timer = loop.call_later(self.window, self._due)

    def _due(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        quiet = now - self._latest
        if quiet >= self.window or now - self._first >= self.max_delay:
            self._timer = None
            self._flush()
        else:
            self._timer = loop.call_later(self.window - quiet, self._due)

    def _flush(self) -> None:
        if self.moved_from:
            self._moved_out()
        pending, self.pending = self.pending, {}
        for path, entry in pending.items():
            size = 0 if entry.directory or entry.kind == "delete" else self._size(path)
            self.journal.append(entry.kind, path, entry.old_path, size, entry.directory)
        if pending:
            self._wake()

    def _size(self, path: str) -> int:
        try:
            fd, name = self.root.os_open_parent(PurePosixPath(path), follow=False)
        except OSError:
            return 0  # gone again: its delete is on the way
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False).st_size
        except OSError:
            return 0
        finally:
            os.close(fd)


class _Files:
    """A set of root-relative file paths, kept by directory."""

    def __init__(self) -> None:
        self.names: dict[str, set[str]] = {}

    def __contains__(self, path: str) -> bool:
        directory, _, name = path.rpartition("/")
        return name in self.names.get(directory, ())

    def add(self, path: str) -> None:
        directory, _, name = path.rpartition("/")
        self.names.setdefault(directory, set()).add(name)

    def discard(self, path: str) -> None:
        directory, _, name = path.rpartition("/")
        names = self.names.get(directory)
        if names is not None:
            names.discard(name)
            if not names:
                del self.names[directory]

    def move(self, old: str, new: str | None) -> None:
        """The files below the directory `old` are now below `new`, or gone (None)."""
        for directory in [d for d in self.names if _under(d, old)]:
            names = self.names.pop(directory)
            if new is not None:
                self.names[new + directory[len(old) :]] = names


def _scoped(change: Change, directory: str) -> Change | None:
    """`change` as a stream of `directory` sees it: a move across its edge is a create or a delete."""
    if change.kind == "resync":
        return change
    if change.kind != "move":
        return change if _under(change.path, directory) else None
    inside_old, inside_new = _under(change.old_path, directory), _under(change.path, directory)
    if inside_old and inside_new:
        return change
    if inside_new:
        return replace(change, kind="create", old_path="")
    if inside_old:
        return replace(change, kind="delete", path=change.old_path, old_path="", size=0)
    return None


def _new_inotify() -> INotify:
    try:
        return INotify(nonblocking=True)
    except OSError as error:
        if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            raise LimitExceeded(
                f"no inotify instance can be had (the limit is {_limit('instances')}, shared by every process of this"
                " user on the host: sysctl fs.inotify.max_user_instances)"
            ) from None
        raise FilesystemFailure(f"inotify is not available: {error.strerror}") from None


def _limit(what: str) -> str:
    """inotify's per-user limit on watches or instances, as it applies to this process's user namespace."""
    try:
        with open(f"/proc/sys/user/max_inotify_{what}") as file:
            return file.read().strip()
    except OSError:
        return "an unknown number of"


class FileWatch:
    """The WatchFiles service of one root: its watcher starts with the first stream and stays `linger` seconds
    after the last (a caller that reconnects within them resumes from the journal), then it is released."""

    def __init__(self, root: WorkspaceRoot, config: AgentConfig) -> None:
        self.root = root
        self.journal_changes = config.watch_journal_changes
        self.journal_bytes = config.watch_journal_bytes
        self.window = config.watch_coalesce_seconds
        self.max_delay = config.watch_max_delay_seconds
        self.linger = config.watch_linger_seconds
        self.max_directories = config.watch_max_directories
        self._watcher: Watcher | None = None
        self._lock = asyncio.Lock()
        self._streams = 0
        self._idle: asyncio.TimerHandle | None = None
        self._last_sequence = 0

    async def watch(self, path: str, since: int) -> AsyncGenerator[WatchEvent, None]:
        """Changes below the directory `path` from `since` on (see Watcher.follow). Raises InvalidPath,
        PathEscapesRoot and NotFound as Read does, InvalidArgument for an ignored directory, LimitExceeded."""
        directory = self.root.directory(path, f"{path}: is not a directory; WatchFiles takes a directory")
        self._streams += 1
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            watcher = await self._running()
            if watcher.ignored(directory):
                raise InvalidArgument(f"{path}: is ignored (as Search ignores it), so nothing in it is watched")
            async for event in watcher.follow(directory, since):
                yield event
        finally:
            self._streams -= 1
            if not self._streams:
                self._idle = asyncio.get_running_loop().call_later(self.linger, self._release)

    async def _running(self) -> Watcher:
        async with self._lock:
            if self._watcher is not None and self._watcher.failure is None:
                return self._watcher
            if self._watcher is not None:
                self._release_watcher()
            # Above every number given before, also by an earlier agent on this root (microseconds of the clock):
            # an old cursor is never mistaken for one of this journal's.
            first = max(self._last_sequence + 1, time.time_ns() // 1000)
            journal = Journal(first, self.journal_changes, self.journal_bytes)
            watcher = Watcher(
                self.root, journal, window=self.window, max_delay=self.max_delay, max_directories=self.max_directories
            )
            await watcher.start()
            self._watcher = watcher
            return watcher

    def _release(self) -> None:
        self._idle = None
        if not self._streams and self._watcher is not None:
            self._release_watcher()

    def _release_watcher(self) -> None:
        assert self._watcher is not None
        self._last_sequence = self._watcher.journal.last
        self._watcher.close()
        self._watcher = None

    def close(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        if self._watcher is not None:
            self._release_watcher()
