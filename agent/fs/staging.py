"""The staging area archives are extracted into, and the all-or-nothing swap into the destination.

Staging lives in `<root>/.workspace-agent/` rather than next to the destination: the destination may be
the root itself, whose parent may not be writable, and a directory inside the root is on the same
filesystem as every destination (barring a mount point inside the root), so the swap is renames only.
That directory is the agent's own: REPLACE never moves it away and CreateArchive never includes it.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from agent.errors import PreconditionFailed
from agent.fs.paths import AGENT_DIR_NAME, WorkspaceRoot

log = logging.getLogger(__name__)

STAGING_DIR_NAME = AGENT_DIR_NAME


def is_staging_path(root: WorkspaceRoot, real: Path) -> bool:
    """True if a resolved path is the staging directory or inside it."""
    staging = root.path / STAGING_DIR_NAME
    return real == staging or staging in real.parents


class StagingArea:
    """One extraction's private directory: `tree/` receives the members, `old/` what a swap displaced.

    Several extractions may run at once, each in its own directory; the shared parent is removed when
    the last one leaves, so an idle workspace has no trace of it.
    """

    def __init__(self, root: WorkspaceRoot) -> None:
        """Raises PreconditionFailed if the staging directory's name is taken by something else."""
        self._parent = root.path / STAGING_DIR_NAME
        while True:
            try:
                os.mkdir(self._parent, 0o700)
            except FileExistsError:
                pass  # another extraction's, or a leftover of a crash: each uses its own subdirectory
            try:
                if not stat.S_ISDIR(os.lstat(self._parent).st_mode):
                    # A link planted there would move extraction outside the root.
                    raise PreconditionFailed(f"{STAGING_DIR_NAME} in the workspace root is not a directory; remove it")
                self.path = Path(tempfile.mkdtemp(prefix="extract-", dir=self._parent))
                break
            except FileNotFoundError:
                continue  # another extraction removed the parent between the two calls
        self.tree = self.path / "tree"
        self.displaced = self.path / "old"
        os.mkdir(self.tree, 0o700)
        os.mkdir(self.displaced, 0o700)

    def remove(self) -> None:
        remove_tree(self.path)
        try:
            os.rmdir(self._parent)
        except OSError:
            pass  # another extraction is using it, or someone else did already


def remove_tree(path: Path) -> None:
    """Deletes a directory tree (or a single entry), including directories an archive made read-only."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        remove_tree_at(parent, path.name)
    finally:
        os.close(parent)


def remove_tree_at(dir_fd: int, name: str) -> None:
    """Deletes `name` in the directory `dir_fd` and, if it is a directory, everything below it.

    Iterative and by file descriptors, so neither the depth (no recursion limit) nor the length of
    the paths inside (no PATH_MAX) can stop it; never follows a link; lends owner permissions to
    directories an archive made read-only.
    """
    try:
        status = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(status.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    current = _open_for_removal(dir_fd, name)
    below: list[str] = []  # names from `name` down to the directory `current` is
    try:
        while True:
            child = None
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        child = entry.name
                        break
                    _retry_writable(current, functools.partial(os.unlink, entry.name, dir_fd=current))
            if child is not None:
                opened = _open_for_removal(current, child)
                os.close(current)
                current = opened
                below.append(child)
                continue
            if not below:
                break
            parent = os.open("..", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = parent
            emptied = below.pop()
            _retry_writable(current, functools.partial(os.rmdir, emptied, dir_fd=current))
    finally:
        os.close(current)
    os.rmdir(name, dir_fd=dir_fd)  # the parent is not ours to lend permissions of


def _open_for_removal(dir_fd: int, name: str) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except PermissionError:
        os.chmod(name, stat.S_IRWXU, dir_fd=dir_fd)
        return os.open(name, flags, dir_fd=dir_fd)


def _retry_writable(dir_fd: int, remove: Callable[[], None]) -> None:
    try:
        remove()
    except PermissionError:
        # A read-only directory stops removing its entries: lend it owner permissions (it goes too).
        try:
            os.fchmod(dir_fd, stat.S_IRWXU)
        except OSError:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES)) from None
        remove()


def make_private_directory(root: WorkspaceRoot, prefix: str) -> tuple[int, PurePosixPath]:
    """Creates a fresh directory `.workspace-agent/<prefix><random>` for one operation's working files;
    returns an O_PATH fd of it and its root-relative path. Raises PreconditionFailed if the name
    `.workspace-agent` is taken by something other than a directory (a link there would lead outside)."""
    while True:
        root_fd = root.os_open(".", os.O_PATH | os.O_DIRECTORY, follow=False)
        try:
            try:
                os.mkdir(STAGING_DIR_NAME, 0o700, dir_fd=root_fd)
            except FileExistsError:
                pass  # another operation's, or a leftover: each uses its own subdirectory
            try:
                parent = os.open(
                    STAGING_DIR_NAME, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd
                )
            except FileNotFoundError:
                continue  # removed by the last user between the two calls
            except OSError:
                raise PreconditionFailed(
                    f"{STAGING_DIR_NAME} in the workspace root is not a directory; remove it"
                ) from None
        finally:
            os.close(root_fd)
        try:
            name = prefix + secrets.token_hex(6)
            os.mkdir(name, 0o700, dir_fd=parent)
            return (
                os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent),
                PurePosixPath(STAGING_DIR_NAME, name),
            )
        except FileNotFoundError:
            continue
        finally:
            os.close(parent)


def remove_private_directory(root: WorkspaceRoot, relative: PurePosixPath) -> None:
    """Removes a directory of `make_private_directory`, and `.workspace-agent` too once it is empty."""
    parent = root.os_open(relative.parent, os.O_RDONLY | os.O_DIRECTORY, follow=False)
    try:
        remove_tree_at(parent, relative.name)
    finally:
        os.close(parent)
    _remove_agent_directory_if_empty(root)


def _remove_agent_directory_if_empty(root: WorkspaceRoot) -> None:
    root_fd = root.os_open(".", os.O_PATH | os.O_DIRECTORY, follow=False)
    try:
        os.rmdir(STAGING_DIR_NAME, dir_fd=root_fd)
    except OSError:
        pass  # another operation is using it, or someone else did already
    finally:
        os.close(root_fd)


def remove_leftovers(root: WorkspaceRoot) -> None:
    """Removes whatever a crashed or killed agent left in `.workspace-agent/` (edit journals, extraction
    staging); called when the agent starts, before it serves any call."""
    root_fd = root.os_open(".", os.O_PATH | os.O_DIRECTORY, follow=False)
    try:
        if stat.S_ISDIR(os.stat(STAGING_DIR_NAME, dir_fd=root_fd, follow_symlinks=False).st_mode):
            remove_tree_at(root_fd, STAGING_DIR_NAME)
            log.info("removed the working files an earlier agent left behind", extra={"directory": STAGING_DIR_NAME})
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("could not remove the working files an earlier agent left behind")
    finally:
        os.close(root_fd)


class Swap:
    """Moves a staged tree into its destination by renames, remembering each one so that a failure
    part-way can put everything back (`roll_back`)."""

    def __init__(self, staging: StagingArea) -> None:
        self._tree = staging.tree
        self._displaced = staging.displaced
        # (where an entry is now, where it came from), or (a directory we created, None).
        self._undo: list[tuple[Path, Path | None]] = []

    def replace(self, destination: Path, *, is_root: bool) -> None:
        """Afterwards `destination` holds exactly the staged tree."""
        if is_root:
            # The root itself cannot be renamed: empty it (but for the staging area), then fill it.
            for name in sorted(os.listdir(destination)):
                if name != STAGING_DIR_NAME:
                    self._move_aside(destination / name)
            self._merge(self._tree, destination)
        elif os.path.lexists(destination):
            self._move_aside(destination)
            self._place(self._tree, destination)
        else:
            self._make_parents(destination)
            self._place(self._tree, destination)

    def merge(self, destination: Path) -> None:
        """Afterwards `destination` has every staged entry; entries the archive does not name stay."""
        if os.path.isdir(destination):
            self._merge(self._tree, destination)
        else:
            self._make_parents(destination)
            self._place(self._tree, destination)

    def roll_back(self) -> None:
        """Undoes every rename and directory creation so far, newest first; logs what it cannot undo."""
        for now, before in reversed(self._undo):
            try:
                if before is None:
                    os.rmdir(now)
                else:
                    _rename(now, before)
            except OSError:
                log.exception("could not roll back an archive swap", extra={"path": str(now)})
        self._undo.clear()

    def _merge(self, source: Path, destination: Path) -> None:
        # Whole subtrees the destination lacks move in with one rename; only shared directories are
        # descended into, iteratively (a tree deeper than Python's recursion limit merges too).
        pending = [(source, destination)]
        while pending:
            source, destination = pending.pop()
            with os.scandir(source) as entries:
                staged = sorted(entries, key=lambda e: e.name)
            shared = []
            for entry in staged:
                target = destination / entry.name
                try:
                    existing = os.lstat(target)
                except FileNotFoundError:
                    self._place(Path(entry.path), target)
                    continue
                if stat.S_ISDIR(existing.st_mode) and entry.is_dir(follow_symlinks=False):
                    shared.append((Path(entry.path), target))
                else:
                    self._move_aside(target)
                    self._place(Path(entry.path), target)
            pending += reversed(shared)

    def _move_aside(self, path: Path) -> None:
        backup = self._displaced / str(len(self._undo))
        _rename(path, backup)
        self._undo.append((backup, path))

    def _place(self, staged: Path, target: Path) -> None:
        _rename(staged, target)
        self._undo.append((target, staged))

    def _make_parents(self, destination: Path) -> None:
        missing = []
        for directory in (destination, *destination.parents):
            if os.path.isdir(directory):
                break
            missing.append(directory)
        for directory in reversed(missing[1:]):
            os.mkdir(directory)
            self._undo.append((directory, None))


def _rename(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
        return
    except PermissionError:
        pass
    # As the workspace user, read-only directories (an archive's or the user's) stop a rename: both
    # parents gain or lose an entry, and a directory moving to another parent rewrites its `..`.
    # Lend them owner write permission for the move.
    lent: list[tuple[Path, int]] = []
    moved = False
    try:
        for directory in (source.parent, target.parent, source):
            mode = os.lstat(directory).st_mode
            if stat.S_ISDIR(mode) and not mode & stat.S_IWUSR:
                os.chmod(directory, mode | stat.S_IWUSR)
                lent.append((directory, mode))
        os.rename(source, target)
        moved = True
    finally:
        for directory, mode in lent:
            os.chmod(target if moved and directory == source else directory, stat.S_IMODE(mode))
