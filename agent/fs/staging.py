"""The staging area archives are extracted into, and the all-or-nothing swap into the destination.

Staging lives in `<root>/.workspace-agent/` rather than next to the destination: the destination may be
the root itself, whose parent may not be writable, and a directory inside the root is on the same
filesystem as every destination (barring a mount point inside the root), so the swap is renames only.
That directory is the agent's own: REPLACE never moves it away and CreateArchive never includes it.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from agent.errors import PreconditionFailed
from agent.fs.paths import WorkspaceRoot

log = logging.getLogger(__name__)

STAGING_DIR_NAME = ".workspace-agent"


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
    """Deletes a directory tree, including directories an archive made read-only."""

    def make_writable_and_retry(function, failed_path, _exc_info) -> None:  # noqa: ANN001 - rmtree's hook
        if not os.path.lexists(failed_path):
            return  # removed by an earlier retry
        for path in (os.path.dirname(failed_path), failed_path):
            mode = os.lstat(path).st_mode
            if stat.S_ISDIR(mode):
                os.chmod(path, mode | stat.S_IRWXU)
        if function is os.rmdir or function is os.unlink:
            function(failed_path)
        else:
            shutil.rmtree(failed_path, onerror=make_writable_and_retry)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=make_writable_and_retry)


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
        # Whole subtrees the destination lacks move in with one rename; only shared directories recurse.
        with os.scandir(source) as entries:
            staged = sorted(entries, key=lambda e: e.name)
        for entry in staged:
            target = destination / entry.name
            try:
                existing = os.lstat(target)
            except FileNotFoundError:
                self._place(Path(entry.path), target)
                continue
            if stat.S_ISDIR(existing.st_mode) and entry.is_dir(follow_symlinks=False):
                self._merge(Path(entry.path), target)
            else:
                self._move_aside(target)
                self._place(Path(entry.path), target)

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
