"""All-or-nothing edits: every operation is checked against an in-memory view of the workspace first,
then the changes are applied on disk with a journal that undoes them all if one fails."""

from __future__ import annotations

import asyncio
import difflib
import errno
import functools
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, ClassVar

from agent.errors import AgentError, AlreadyExists, InvalidArgument, LimitExceeded, NotFound, PreconditionFailed
from agent.fs.paths import AGENT_DIR_NAME, WorkspaceRoot, os_error
from agent.fs.staging import make_private_directory, remove_private_directory
from common.serving import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

DEFAULT_FILE_MODE = 0o644
# Files larger than this are reported as differing rather than diffed line by line (difflib is quadratic).
DIFF_LIMIT = 1024 * 1024
ROOT = PurePosixPath(".")
# What an EditResponse may take of the message limit, leaving room for framing; and the bytes each
# EditedFile costs beyond its path and sha256 (tags, lengths, the deleted flag).
RESPONSE_BUDGET = MAX_MESSAGE_BYTES - 64 * 1024
PER_FILE_OVERHEAD = 16


# ------------------------------------------------------------------ operations


@dataclass(frozen=True)
class WriteFile:
    path: str
    content: bytes
    create_only: bool = False
    expected_sha256: str = ""
    mode: int = 0  # for a new file; 0 means DEFAULT_FILE_MODE


@dataclass(frozen=True)
class ReplaceText:
    path: str
    old_text: str
    new_text: str
    expected_occurrences: int = 0  # 0 means 1
    expected_sha256: str = ""


@dataclass(frozen=True)
class InsertText:
    path: str
    line: int  # 1-based line to insert before; 0 or one past the last line appends
    text: str
    expected_sha256: str = ""


@dataclass(frozen=True)
class DeletePath:
    path: str
    recursive: bool = False
    expected_sha256: str = ""


@dataclass(frozen=True)
class MovePath:
    from_path: str
    to_path: str
    overwrite: bool = False
    expected_sha256: str = ""


@dataclass(frozen=True)
class MakeDirectory:
    path: str


Operation = WriteFile | ReplaceText | InsertText | DeletePath | MovePath | MakeDirectory


@dataclass(frozen=True)
class EditedPath:
    path: str
    sha256: str  # of the new content; empty for directories, other non-files and deleted paths
    deleted: bool


@dataclass(frozen=True)
class EditResult:
    files: list[EditedPath]
    diff: str


# ------------------------------------------------------------------ the in-memory view


@dataclass
class _File:
    source: PurePosixPath | None  # the real root-relative path of the unchanged content; None once replaced
    mode: int
    loaded: bytes | None = None
    root: WorkspaceRoot | None = None
    owner: tuple[int, int] | None = None  # uid, gid of the file on disk (kept by a rewrite); None for new files

    def content(self) -> bytes:
        if self.loaded is None:
            assert self.source is not None and self.root is not None
            # Reopened beneath the root with no symlink allowed: the key is already the real path.
            fd = self.root.open(self.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, follow=False)
            with os.fdopen(fd, "rb") as file:
                self.loaded = file.read()
        return self.loaded


@dataclass
class _Dir:
    origin: PurePosixPath | None  # the real directory whose entries it holds; None for a new, empty one


@dataclass
class _Other:
    """A symlink, FIFO or other non-regular file: moved or deleted as it is, never read or written."""

    source: PurePosixPath


_Node = _File | _Dir | _Other


class _View:
    """The workspace as the operations so far left it: the disk, overlaid with their changes."""

    def __init__(self, root: WorkspaceRoot) -> None:
        self.root = root
        # Root-relative path -> what is there now (None: nothing); paths not listed are as on disk
        # below their nearest listed ancestor.
        self.changes: dict[PurePosixPath, _Node | None] = {}

    def key(self, path: str, *, follow_symlinks: bool = True) -> PurePosixPath:
        key = PurePosixPath(self.root.relative(self.root.resolve(path, follow_symlinks=follow_symlinks)))
        if self.root.is_agent_path(key):
            raise InvalidArgument(f"{key}: is inside {AGENT_DIR_NAME}/, the agent's own working directory")
        return key

    def get(self, key: PurePosixPath) -> _Node | None:
        for ancestor in (key, *key.parents):
            if ancestor in self.changes:
                node = self.changes[ancestor]
                if ancestor == key:
                    return node
                if isinstance(node, _Dir) and node.origin is not None:
                    return self._on_disk(node.origin, key.relative_to(ancestor))
                return None
        return self._on_disk(ROOT, key)

    def _on_disk(self, base: PurePosixPath, relative: PurePosixPath) -> _Node | None:
        path = base / relative
        try:
            parent, name = self.root.os_open_parent(path, follow=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise os_error(error, str(path)) from None
            if base == ROOT:  # a symlink loop, or a link swapped in since the key was resolved: never followed
                raise PreconditionFailed(
                    f"{path}: goes through a symbolic link that loops or was swapped in meanwhile"
                ) from None
            # Keys are resolved against the disk as it was; inside a directory moved by an earlier
            # operation a symlink would be followed from its new place, so it is refused instead.
            raise InvalidArgument(
                f"{relative}: goes through a symbolic link inside a directory moved by this edit"
            ) from None
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(parent)
        if stat.S_ISREG(st.st_mode):
            return _File(path, stat.S_IMODE(st.st_mode), root=self.root, owner=(st.st_uid, st.st_gid))
        if stat.S_ISDIR(st.st_mode):
            return _Dir(path)
        return _Other(path)

    def set(self, key: PurePosixPath, node: _Node | None) -> None:
        for changed in [k for k in self.changes if key in k.parents]:
            del self.changes[changed]
        self.changes[key] = node

    def move(self, source: PurePosixPath, target: PurePosixPath) -> None:
        node = self.get(source)
        below = {target / k.relative_to(source): v for k, v in self.changes.items() if source in k.parents}
        self.set(source, None)
        self.set(target, node)
        self.changes.update(below)

    def make_parents(self, key: PurePosixPath) -> None:
        for ancestor in reversed(key.parents[:-1]):  # outermost first, without the root
            node = self.get(ancestor)
            if node is None:
                self.changes[ancestor] = _Dir(None)
            elif not isinstance(node, _Dir):
                raise PreconditionFailed(f"{ancestor}: is not a directory")


# ------------------------------------------------------------------ steps applied on disk


@dataclass(frozen=True)
class _Write:
    key: PurePosixPath
    content: bytes
    mode: int
    owner: tuple[int, int] | None  # kept from the file it replaces


@dataclass(frozen=True)
class _Delete:
    key: PurePosixPath


@dataclass(frozen=True)
class _Move:
    source: PurePosixPath
    target: PurePosixPath


@dataclass(frozen=True)
class _MakeDirectory:
    key: PurePosixPath


_Step = _Write | _Delete | _Move | _MakeDirectory


class _Journal:
    """Applies steps, remembering how to undo each.

    To a file watcher every step looks like an ordinary save: new content is written to a temp file
    in the agent's own directory (`.workspace-agent/edit-*`, same filesystem) and renamed over the
    target in one rename; a replaced or deleted file is kept for undo as a *copy* there, made by
    reading it, so its inode is never linked, renamed or touched before the one rename or unlink a
    plain save or `rm` would do. (Hard-link backups changed the link count: an attribute event that
    watchers such as Vite's throttle together with the real change, missing it.) Directories and
    files the agent could not recreate with their owner are moved aside there instead. Every path is
    opened beneath the root with no symlink followed, so nothing swapped in mid-edit leads outside.
    """

    def __init__(self, root: WorkspaceRoot) -> None:
        self.root = root
        self.undo: list[Callable[[], None]] = []
        self._fds: list[int] = []
        self._work: tuple[int, PurePosixPath] | None = None
        self._names = 0

    def apply(self, step: _Step) -> None:
        if isinstance(step, _Write):
            self._make_directories(step.key.parent)
            parent, name = self._parent(step.key)
            temp = self._write_temp(step.content, step.mode, step.owner)
            existing = _lstat(parent, name)
            backup = self._copy(parent, name, existing) if existing is not None else None
            os.rename(temp, name, src_dir_fd=self._work_fd(), dst_dir_fd=parent)
            if backup is not None:
                self.undo.append(functools.partial(self._restore, backup, name, parent))
            else:
                self.undo.append(lambda: os.unlink(name, dir_fd=parent))
        elif isinstance(step, _Delete):
            parent, name = self._parent(step.key)
            existing = _lstat(parent, name)
            backup = self._copy_if_room(parent, name, existing)
            if backup is not None:
                os.unlink(name, dir_fd=parent)
                self.undo.append(functools.partial(self._restore, backup, name, parent))
            else:
                self._set_aside(parent, name)
        elif isinstance(step, _Move):
            source, source_name = self._parent(step.source)
            self._make_directories(step.target.parent)
            target, target_name = self._parent(step.target)
            existing = _lstat(target, target_name)
            backup = self._copy_if_room(target, target_name, existing)
            if backup is not None:
                # As `mv -f` does: one rename over the file it replaces.
                self.undo.append(lambda: os.rename(backup, target_name, src_dir_fd=self._work_fd(), dst_dir_fd=target))
            elif existing is not None:
                self._set_aside(target, target_name)
            os.rename(source_name, target_name, src_dir_fd=source, dst_dir_fd=target)
            self.undo.append(lambda: os.rename(target_name, source_name, src_dir_fd=target, dst_dir_fd=source))
        else:
            self._make_directories(step.key)

    def commit(self) -> None:
        self._finish()

    def roll_back(self) -> None:
        for undo in reversed(self.undo):
            try:
                undo()
            except OSError:
                log.exception("rolling back an edit step failed")
        self._finish()

    def _finish(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self._work is not None:
            os.close(self._work[0])
            try:
                remove_private_directory(self.root, self._work[1])
            except OSError:
                log.warning(
                    "edit done, but its working files could not be removed", extra={"directory": str(self._work[1])}
                )
            self._work = None

    def _work_fd(self) -> int:
        if self._work is None:
            self._work = make_private_directory(self.root, "edit-")
        return self._work[0]

    def _restore(self, backup: str, name: str, parent: int) -> None:
        """Moves a set-aside entry back to `name` in `parent` (an undo step)."""
        os.rename(backup, name, src_dir_fd=self._work_fd(), dst_dir_fd=parent)

    def _new_name(self) -> str:
        self._names += 1
        return str(self._names)

    def _parent(self, key: PurePosixPath) -> tuple[int, str]:
        parent, name = self.root.os_open_parent(key, follow=False)
        self._fds.append(parent)
        return parent, name

    def _write_temp(self, content: bytes, mode: int, owner: tuple[int, int] | None) -> str:
        """A new file in the working directory with `content`, `mode` and `owner`, flushed to disk."""
        name = self._new_name()
        fd = os.open(
            name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=self._work_fd()
        )
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            _set_owner(file.fileno(), owner)
            os.fchmod(file.fileno(), mode)  # exact bits, whatever the umask (after fchown, which may clear setgid)
            os.fsync(file.fileno())
        return name

    def _copy(self, parent: int, name: str, status: os.stat_result) -> str:
        """A copy of a regular file or symlink in the working directory, owner, mode and mtime kept;
        the original is only read."""
        backup = self._new_name()
        if stat.S_ISLNK(status.st_mode):
            os.symlink(os.readlink(name, dir_fd=parent), backup, dir_fd=self._work_fd())
            return backup
        source = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=parent)
        try:
            target = os.open(
                backup,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self._work_fd(),
            )
            try:
                _copy_content(source, target, status.st_size)
                _set_owner(target, (status.st_uid, status.st_gid))
                os.fchmod(target, stat.S_IMODE(status.st_mode))
                os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns))
            finally:
                os.close(target)
        finally:
            os.close(source)
        return backup

    def _copy_if_room(self, parent: int, name: str, status: os.stat_result | None) -> str | None:
        """A backup copy of a regular file about to be deleted or replaced by a move, or None when a
        copy cannot be made faithfully (another owner) or there is no room for one (a full disk,
        which deleting is often meant to relieve): the file is then moved aside instead."""
        if status is None or not stat.S_ISREG(status.st_mode) or not _can_own(status):
            return None
        try:
            return self._copy(parent, name, status)
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            return None  # the partial copy goes with the working directory

    def _set_aside(self, parent: int, name: str) -> None:
        backup = self._new_name()
        os.rename(name, backup, src_dir_fd=parent, dst_dir_fd=self._work_fd())
        self.undo.append(functools.partial(self._restore, backup, name, parent))

    def _make_directories(self, key: PurePosixPath) -> None:
        # One fd at a time (a path may be thousands of directories deep); undone by root-relative path.
        current = self.root.os_open(ROOT, os.O_PATH | os.O_DIRECTORY, follow=False)
        try:
            for depth, part in enumerate(key.parts, 1):
                try:
                    os.mkdir(part, dir_fd=current)
                    self.undo.append(functools.partial(self._remove_directory, PurePosixPath(*key.parts[:depth])))
                except FileExistsError:
                    pass
                following = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
                os.close(current)
                current = following
        finally:
            os.close(current)

    def _remove_directory(self, key: PurePosixPath) -> None:
        parent, name = self.root.os_open_parent(key, follow=False)
        try:
            os.rmdir(name, dir_fd=parent)
        finally:
            os.close(parent)


def _lstat(parent: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _can_own(status: os.stat_result) -> bool:
    """True if the agent can give a file it writes the owner and group of `status`."""
    if os.geteuid() == 0:
        return True
    return status.st_uid == os.geteuid() and (status.st_gid == os.getegid() or status.st_gid in os.getgroups())


def _set_owner(fd: int, owner: tuple[int, int] | None) -> None:
    if owner is None:
        return
    current = os.fstat(fd)
    if (current.st_uid, current.st_gid) != owner:
        os.fchown(fd, *owner)


def _copy_content(source: int, target: int, size: int) -> None:
    try:
        copied = 0
        while True:  # in the kernel, without passing the bytes through the agent (a reflink where supported)
            step = os.copy_file_range(source, target, max(size - copied, 1 << 20))
            if step == 0:
                return
            copied += step
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    os.lseek(source, 0, os.SEEK_SET)
    os.lseek(target, 0, os.SEEK_SET)
    os.ftruncate(target, 0)
    while block := os.read(source, 1 << 20):
        while block:
            block = block[os.write(target, block) :]


# ------------------------------------------------------------------ planning


class EditPlan:
    """A validated list of operations: what they will change (`result`) and how to `apply` it."""

    def __init__(self, root: WorkspaceRoot, operations: Sequence[Operation]) -> None:
        if not operations:
            raise InvalidArgument("an edit needs at least one operation")
        self._root = root
        self._view = _View(root)
        self._steps: list[_Step] = []
        self._before: dict[PurePosixPath, _Node | None] = {}
        for number, operation in enumerate(operations, 1):
            try:
                self._plan(operation)
            except AgentError as error:
                raise type(error)(f"operation {number} ({_describe(operation)}): {error}") from None
            except OSError as error:
                translated = os_error(error, _describe(operation).partition(" ")[2])
                raise type(translated)(f"operation {number} ({_describe(operation)}): {translated}") from None
        # Bounded before anything changes: a change that happened is never reported as failed
        # because its description did not fit in the response.
        self.result = _bounded(self._edited_paths(), self._diff())

    def apply(self) -> None:
        """Applies the steps in order; if one fails, undoes those done and raises the error of `os_error`
        for what failed (PreconditionFailed, LimitExceeded for a full disk, ...)."""
        journal = _Journal(self._root)
        step: _Step | None = None
        try:
            for step in self._steps:
                journal.apply(step)
        except (OSError, AgentError) as error:
            journal.roll_back()
            where = str(step.source if isinstance(step, _Move) else step.key) if step is not None else "."
            translated = os_error(error, where) if isinstance(error, OSError) else error
            raise type(translated)(
                f"the edit could not be applied ({translated}); every change was rolled back"
            ) from None
        except BaseException:
            journal.roll_back()
            raise
        journal.commit()

    # Each operation: check it against the view, update the view, and record the step.

    def _plan(self, op: Operation) -> None:
        planner = self._PLANNERS.get(type(op))
        if planner is None:  # pragma: no cover - the servicer only builds the operations below
            raise InvalidArgument(f"unknown operation {op!r}")
        planner(self, op)

    def _plan_write(self, op: WriteFile) -> None:
        key = self._file_key(op.path)
        node = self._view.get(key)
        if isinstance(node, _File) and op.create_only:
            raise AlreadyExists(f"{key}: already exists (create_only is set)")
        if node is not None and not isinstance(node, _File):
            raise PreconditionFailed(f"{key}: is {_kind(node)}, not a file")
        if op.mode > 0o777:
            raise InvalidArgument(f"mode {op.mode:#o} has more than permission bits")
        if op.expected_sha256:
            self._check_sha256(key, node, op.expected_sha256)
        mode = node.mode if node is not None else (op.mode or DEFAULT_FILE_MODE)
        owner = _kept_owner(key, node)
        self._view.make_parents(key)
        self._change(key, _File(None, mode, op.content, owner=owner), _Write(key, op.content, mode, owner))

    def _plan_replace(self, op: ReplaceText) -> None:
        key = self._file_key(op.path)
        node = self._existing_file(key, op.expected_sha256)
        content = node.content()
        _require_text(key, content)
        if not op.old_text:
            raise InvalidArgument("old_text is empty")
        old = op.old_text.encode()
        expected = op.expected_occurrences or 1
        found = content.count(old)
        if found != expected:
            raise PreconditionFailed(f"{key}: old_text occurs {found} times, expected {expected}; file unchanged")
        new = content.replace(old, op.new_text.encode())
        owner = _kept_owner(key, node)
        self._change(key, _File(None, node.mode, new, owner=owner), _Write(key, new, node.mode, owner))

    def _plan_insert(self, op: InsertText) -> None:
        key = self._file_key(op.path)
        node = self._existing_file(key, op.expected_sha256)
        content = node.content()
        at = _line_offset(key, content, op.line)
        new = content[:at] + op.text.encode() + content[at:]
        owner = _kept_owner(key, node)
        self._change(key, _File(None, node.mode, new, owner=owner), _Write(key, new, node.mode, owner))

    def _plan_delete(self, op: DeletePath) -> None:
        key = self._movable_key(op.path)
        node = self._view.get(key)
        if node is None:
            raise NotFound(f"{key}: no such file or directory")
        if isinstance(node, _Dir) and not op.recursive:
            raise PreconditionFailed(f"{key}: is a directory; set recursive to delete it and its content")
        if op.expected_sha256:
            self._check_sha256(key, node, op.expected_sha256)
        self._change(key, None, _Delete(key))

    def _plan_move(self, op: MovePath) -> None:
        source, target = self._movable_key(op.from_path), self._movable_key(op.to_path)
        node = self._view.get(source)
        if node is None:
            raise NotFound(f"{source}: no such file or directory")
        if source == target:
            raise InvalidArgument(f"{source}: moving a path onto itself")
        if source in target.parents:
            raise InvalidArgument(f"cannot move {source} into itself ({target})")
        if op.expected_sha256:
            self._check_sha256(source, node, op.expected_sha256)
        existing = self._view.get(target)
        if isinstance(existing, _Dir):
            raise AlreadyExists(f"{target}: is a directory; a move never replaces a directory")
        if existing is not None and not op.overwrite:
            raise AlreadyExists(f"{target}: already exists (set overwrite to replace it)")
        if existing is not None and isinstance(node, _Dir):
            raise AlreadyExists(f"{target}: already exists; a directory cannot replace a file")
        self._view.make_parents(target)
        self._touch(source)
        self._touch(target)
        self._view.move(source, target)
        self._steps.append(_Move(source, target))

    def _plan_make_directory(self, op: MakeDirectory) -> None:
        key = self._view.key(op.path)
        node = self._view.get(key)
        if isinstance(node, _Dir):
            self._touch(key)
            return
        if node is not None:
            raise AlreadyExists(f"{key}: exists and is {_kind(node)}")
        self._view.make_parents(key)
        self._change(key, _Dir(None), _MakeDirectory(key))

    _PLANNERS: ClassVar[dict[type, Callable[[EditPlan, Any], None]]] = {
        WriteFile: _plan_write,
        ReplaceText: _plan_replace,
        InsertText: _plan_insert,
        DeletePath: _plan_delete,
        MovePath: _plan_move,
        MakeDirectory: _plan_make_directory,
    }

    def _file_key(self, path: str) -> PurePosixPath:
        key = self._view.key(path)
        if key == ROOT:
            raise PreconditionFailed("the workspace root is a directory, not a file")
        return key

    def _movable_key(self, path: str) -> PurePosixPath:
        # The last component is not followed: a symlink itself is deleted or moved, not its target.
        key = self._view.key(path, follow_symlinks=False)
        if key == ROOT:
            raise InvalidArgument("the workspace root itself cannot be deleted or moved")
        return key

    def _existing_file(self, key: PurePosixPath, expected_sha256: str) -> _File:
        node = self._view.get(key)
        if node is None:
            raise NotFound(f"{key}: no such file")
        if not isinstance(node, _File):
            raise PreconditionFailed(f"{key}: is {_kind(node)}, not a file")
        if expected_sha256:
            self._check_sha256(key, node, expected_sha256)
        return node

    @staticmethod
    def _check_sha256(key: PurePosixPath, node: _Node | None, expected: str) -> None:
        if node is None:
            raise NotFound(f"{key}: no such file (expected sha256 {expected})")
        if not isinstance(node, _File):
            raise PreconditionFailed(f"{key}: is {_kind(node)}; expected_sha256 applies to files")
        actual = hashlib.sha256(node.content()).hexdigest()
        if actual != expected.lower():
            raise PreconditionFailed(f"{key}: sha256 is {actual}, expected {expected}; file unchanged")

    def _touch(self, key: PurePosixPath) -> None:
        if key not in self._before:
            self._before[key] = self._view.get(key)

    def _change(self, key: PurePosixPath, node: _Node | None, step: _Step) -> None:
        self._touch(key)
        self._view.set(key, node)
        self._steps.append(step)

    def _edited_paths(self) -> list[EditedPath]:
        edited = []
        for key in self._before:
            node = self._view.get(key)
            sha256 = hashlib.sha256(node.content()).hexdigest() if isinstance(node, _File) else ""
            edited.append(EditedPath(str(key), sha256, deleted=node is None))
        return edited

    def _diff(self) -> str:
        parts = []
        for key, before in self._before.items():
            after = self._view.get(key)
            old = before.content() if isinstance(before, _File) else None
            new = after.content() if isinstance(after, _File) else None
            if old != new:
                parts.append(_unified_diff(str(key), old, new))
        return "".join(parts)


class Editor:
    """Runs edits one at a time (each is validated against the disk as it is when it starts)."""

    def __init__(self, root: WorkspaceRoot, on_write: Callable[[], None]) -> None:
        self.root = root
        self._on_write = on_write
        self._lock = asyncio.Lock()

    async def edit(self, operations: Sequence[Operation], *, dry_run: bool = False) -> EditResult:
        """Validates and (unless `dry_run`) applies the operations, all or none.

        Raises InvalidArgument/InvalidPath, PathEscapesRoot, NotFound, AlreadyExists and
        PreconditionFailed (sha256 or occurrence count mismatch, wrong file type, or a failure
        while applying, which is rolled back); the workspace is then unchanged.
        """
        async with self._lock:
            return await asyncio.to_thread(self._edit, operations, dry_run)

    def _edit(self, operations: Sequence[Operation], dry_run: bool) -> EditResult:
        plan = EditPlan(self.root, operations)
        if not dry_run:
            plan.apply()
            self._on_write()
        return plan.result


# ------------------------------------------------------------------ helpers


def _kept_owner(key: PurePosixPath, node: _Node | None) -> tuple[int, int] | None:
    """The owner a rewritten file keeps; refuses (before anything changes) one the agent cannot give it."""
    if not isinstance(node, _File) or node.owner is None:
        return None
    uid, gid = node.owner
    if os.geteuid() != 0 and (uid != os.geteuid() or (gid != os.getegid() and gid not in os.getgroups())):
        raise PreconditionFailed(
            f"{key}: is owned by uid {uid} gid {gid}, which the agent (uid {os.geteuid()}) cannot keep when "
            "rewriting it; file unchanged"
        )
    return node.owner


def _bounded(files: list[EditedPath], diff: str) -> EditResult:
    """The result, cut to fit one response message: the diff is truncated with a marker; a list of
    changed paths too long for any response refuses the edit (LimitExceeded) before it is applied."""
    listed = sum(len(f.path.encode()) + len(f.sha256) + PER_FILE_OVERHEAD for f in files)
    if listed > RESPONSE_BUDGET // 2:
        raise LimitExceeded(
            f"this edit changes {len(files)} paths, too many to report in one response; split it into smaller edits"
        )
    room = RESPONSE_BUDGET - listed
    encoded = diff.encode()
    if len(encoded) <= room:
        return EditResult(files, diff)
    cut = encoded[: room - 200]
    cut = cut[: cut.rfind(b"\n") + 1]  # whole lines
    shown = cut.decode(errors="ignore")
    marker = f"... diff truncated: {len(encoded) - len(cut)} more bytes not shown (the response size limit)\n"
    return EditResult(files, shown + marker)


def _describe(op: Operation) -> str:
    name = type(op).__name__
    return f"{name} {op.from_path} -> {op.to_path}" if isinstance(op, MovePath) else f"{name} {op.path}"


def _kind(node: _Node) -> str:
    return "a directory" if isinstance(node, _Dir) else "a file" if isinstance(node, _File) else "not a regular file"


def _require_text(key: PurePosixPath, content: bytes) -> None:
    try:
        content.decode()
    except UnicodeDecodeError as error:
        raise PreconditionFailed(
            f"{key}: is not UTF-8 text (byte {error.start}); replace works on text files"
        ) from None


def _line_offset(key: PurePosixPath, content: bytes, line: int) -> int:
    """Byte offset where line `line` (1-based) starts; 0 or one past the last line is the end."""
    lines = content.count(b"\n") + (1 if content and not content.endswith(b"\n") else 0)
    if line == 0 or line == lines + 1:
        return len(content)
    if line > lines + 1:
        raise InvalidArgument(f"line {line} is past the end of {key}, which has {lines} lines")
    offset = 0
    for _ in range(line - 1):
        offset = content.index(b"\n", offset) + 1
    return offset


def _unified_diff(path: str, old: bytes | None, new: bytes | None) -> str:
    a = f"a/{path}" if old is not None else "/dev/null"
    b = f"b/{path}" if new is not None else "/dev/null"
    old, new = old or b"", new or b""
    if len(old) > DIFF_LIMIT or len(new) > DIFF_LIMIT or b"\0" in old or b"\0" in new:
        return f"Binary or large files {a} and {b} differ\n"
    try:
        old_lines = old.decode().splitlines(keepends=True)
        new_lines = new.decode().splitlines(keepends=True)
    except UnicodeDecodeError:
        return f"Binary or large files {a} and {b} differ\n"
    lines = []
    for line in difflib.unified_diff(old_lines, new_lines, a, b):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(lines)
