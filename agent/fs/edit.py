"""All-or-nothing edits: every operation is checked against an in-memory view of the workspace first,
then the changes are applied on disk with a journal that undoes them all if one fails."""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from agent.errors import AgentError, AlreadyExists, InvalidArgument, NotFound, PreconditionFailed
from agent.fs.paths import WorkspaceRoot

log = logging.getLogger(__name__)

DEFAULT_FILE_MODE = 0o644
# Files larger than this are reported as differing rather than diffed line by line (difflib is quadratic).
DIFF_LIMIT = 1024 * 1024
ROOT = PurePosixPath(".")


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
    source: Path | None  # where the unchanged content is on disk; None once replaced
    mode: int
    loaded: bytes | None = None

    def content(self) -> bytes:
        if self.loaded is None:
            assert self.source is not None
            self.loaded = self.source.read_bytes()
        return self.loaded


@dataclass
class _Dir:
    origin: Path | None  # the real directory whose entries it holds; None for a new, empty one


@dataclass
class _Other:
    """A symlink, FIFO or other non-regular file: moved or deleted as it is, never read or written."""

    source: Path


_Node = _File | _Dir | _Other


class _View:
    """The workspace as the operations so far left it: the disk, overlaid with their changes."""

    def __init__(self, root: WorkspaceRoot) -> None:
        self.root = root
        # Root-relative path -> what is there now (None: nothing); paths not listed are as on disk
        # below their nearest listed ancestor.
        self.changes: dict[PurePosixPath, _Node | None] = {}

    def key(self, path: str, *, follow_symlinks: bool = True) -> PurePosixPath:
        return PurePosixPath(self.root.relative(self.root.resolve(path, follow_symlinks=follow_symlinks)))

    def get(self, key: PurePosixPath) -> _Node | None:
        for ancestor in (key, *key.parents):
            if ancestor in self.changes:
                node = self.changes[ancestor]
                if ancestor == key:
                    return node
                if isinstance(node, _Dir) and node.origin is not None:
                    return self._on_disk(node.origin, key.relative_to(ancestor))
                return None
        return self._on_disk(self.root.path, key)

    def _on_disk(self, base: Path, relative: PurePosixPath) -> _Node | None:
        path = base.joinpath(*relative.parts)
        # Keys are resolved against the disk as it was; inside a directory moved by an earlier
        # operation a symlink would be followed from its new place, so it is refused instead.
        if base != self.root.path and len(relative.parts) > 1 and Path(os.path.realpath(path.parent)) != path.parent:
            raise InvalidArgument(f"{relative}: goes through a symbolic link inside a directory moved by this edit")
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISREG(st.st_mode):
            return _File(path, stat.S_IMODE(st.st_mode))
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


@dataclass
class _Journal:
    """Applies steps, remembering how to undo each; replaced and deleted paths are kept as
    hidden backups beside them (same directory, so same filesystem) until the edit commits."""

    root: Path
    token: str = field(default_factory=lambda: secrets.token_hex(4))
    undo: list[Callable[[], None]] = field(default_factory=list)
    backups: list[Path] = field(default_factory=list)

    def apply(self, step: _Step) -> None:
        if isinstance(step, _Write):
            path = self.root / step.key
            self._make_directories(path.parent)
            if os.path.lexists(path):
                backup = self._backup_name(path)
                os.link(path, backup)
                self.backups.append(backup)
                _write_atomically(path, step.content, step.mode)
                self.undo.append(lambda: os.replace(backup, path))
            else:
                _write_atomically(path, step.content, step.mode)
                self.undo.append(lambda: os.unlink(path))
        elif isinstance(step, _Delete):
            self._set_aside(self.root / step.key)
        elif isinstance(step, _Move):
            source, target = self.root / step.source, self.root / step.target
            self._make_directories(target.parent)
            if os.path.lexists(target):
                self._set_aside(target)
            os.rename(source, target)
            self.undo.append(lambda: os.rename(target, source))
        else:
            self._make_directories(self.root / step.key)

    def commit(self) -> None:
        for backup in self.backups:
            try:
                if backup.is_dir() and not backup.is_symlink():
                    shutil.rmtree(backup)
                else:
                    backup.unlink()
            except OSError:
                log.warning("edit applied, but its backup could not be removed", extra={"backup": str(backup)})

    def roll_back(self) -> None:
        for undo in reversed(self.undo):
            try:
                undo()
            except OSError:
                log.exception("rolling back an edit step failed")

    def _backup_name(self, path: Path) -> Path:
        return path.with_name(f".agent-edit-{self.token}-{len(self.backups)}")

    def _set_aside(self, path: Path) -> None:
        backup = self._backup_name(path)
        os.rename(path, backup)
        self.backups.append(backup)
        self.undo.append(lambda: os.rename(backup, path))

    def _make_directories(self, directory: Path) -> None:
        missing = []
        while not os.path.lexists(directory):
            missing.append(directory)
            directory = directory.parent
        for created in reversed(missing):
            os.mkdir(created)
            self.undo.append(lambda created=created: os.rmdir(created))


def _write_atomically(path: Path, content: bytes, mode: int) -> None:
    """Writes a temp file in the same directory, fsyncs it and renames it over `path`."""
    temp = path.with_name(f".agent-edit-{secrets.token_hex(8)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(content)
            file.flush()
            os.fchmod(file.fileno(), mode)  # exact bits, whatever the umask
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


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
            except PermissionError as error:
                raise PreconditionFailed(
                    f"operation {number} ({_describe(operation)}): the agent's user may not read {error.filename}"
                ) from None
        self.result = EditResult(self._edited_paths(), self._diff())

    def apply(self) -> None:
        """Applies the steps in order; if one fails, undoes those done and raises PreconditionFailed."""
        journal = _Journal(self._root.path)
        try:
            for step in self._steps:
                journal.apply(step)
        except OSError as error:
            journal.roll_back()
            raise PreconditionFailed(f"the edit could not be applied ({error}); every change was rolled back") from error
        journal.commit()

    # Each operation: check it against the view, update the view, and record the step.

    def _plan(self, op: Operation) -> None:
        if isinstance(op, WriteFile):
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
            self._view.make_parents(key)
            self._change(key, _File(None, mode, op.content), _Write(key, op.content, mode))
        elif isinstance(op, ReplaceText):
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
            self._change(key, _File(None, node.mode, new), _Write(key, new, node.mode))
        elif isinstance(op, InsertText):
            key = self._file_key(op.path)
            node = self._existing_file(key, op.expected_sha256)
            content = node.content()
            at = _line_offset(key, content, op.line)
            new = content[:at] + op.text.encode() + content[at:]
            self._change(key, _File(None, node.mode, new), _Write(key, new, node.mode))
        elif isinstance(op, DeletePath):
            key = self._movable_key(op.path)
            node = self._view.get(key)
            if node is None:
                raise NotFound(f"{key}: no such file or directory")
            if isinstance(node, _Dir) and not op.recursive:
                raise PreconditionFailed(f"{key}: is a directory; set recursive to delete it and its content")
            if op.expected_sha256:
                self._check_sha256(key, node, op.expected_sha256)
            self._change(key, None, _Delete(key))
        elif isinstance(op, MovePath):
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
        elif isinstance(op, MakeDirectory):
            key = self._view.key(op.path)
            node = self._view.get(key)
            if isinstance(node, _Dir):
                self._touch(key)
                return
            if node is not None:
                raise AlreadyExists(f"{key}: exists and is {_kind(node)}")
            self._view.make_parents(key)
            self._change(key, _Dir(None), _MakeDirectory(key))
        else:  # pragma: no cover - the servicer only builds the operations above
            raise InvalidArgument(f"unknown operation {op!r}")

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


def _describe(op: Operation) -> str:
    name = type(op).__name__
    return f"{name} {op.from_path} -> {op.to_path}" if isinstance(op, MovePath) else f"{name} {op.path}"


def _kind(node: _Node) -> str:
    return "a directory" if isinstance(node, _Dir) else "a file" if isinstance(node, _File) else "not a regular file"


def _require_text(key: PurePosixPath, content: bytes) -> None:
    try:
        content.decode()
    except UnicodeDecodeError as error:
        raise PreconditionFailed(f"{key}: is not UTF-8 text (byte {error.start}); replace works on text files") from None


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
