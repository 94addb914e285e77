"""Path confinement: every filesystem operation of the agent turns a caller's path into a real one here."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from agent.errors import InvalidPath, NotFound, PathEscapesRoot


class WorkspaceRoot:
    """The directory a workspace lives in (`/app` in the core image).

    Callers name paths relative to it, `/`-separated. `resolve` refuses absolute paths,
    `..` components and NUL bytes outright, and refuses a path whose symlinks lead
    outside the root; nothing outside the root is ever handed to an operation.
    (A symlink swapped in between the check and the use is not defended against:
    the container, not this module, is the security boundary.)
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.realpath(root))

    def __repr__(self) -> str:
        return f"WorkspaceRoot({str(self.path)!r})"

    @staticmethod
    def check(relative: str) -> PurePosixPath:
        """Validates a caller's path without touching the disk; raises InvalidPath."""
        if "\x00" in relative:
            raise InvalidPath(f"path {relative!r} contains a NUL byte")
        if relative.startswith("/") or relative.startswith("\\"):
            raise InvalidPath(f"path {relative!r} is absolute; give a path relative to the workspace root")
        pure = PurePosixPath(relative)
        if ".." in pure.parts:
            raise InvalidPath(f"path {relative!r} contains '..'; paths must stay inside the workspace root")
        return pure

    def resolve(self, relative: str, *, must_exist: bool = False, follow_symlinks: bool = True) -> Path:
        """The real path for a caller's root-relative path ("" or "." is the root itself).

        With `follow_symlinks=False` the last component is not followed (to delete or move
        a link itself); its parent still must resolve inside the root.
        Raises InvalidPath, PathEscapesRoot, and NotFound when `must_exist` and it does not.
        """
        pure = self.check(relative)
        joined = self.path.joinpath(*pure.parts) if pure.parts else self.path
        if follow_symlinks or joined == self.path:
            real = Path(os.path.realpath(joined))
        else:
            real = Path(os.path.realpath(joined.parent)) / joined.name
        if not self.contains(real):
            raise PathEscapesRoot(f"path {relative!r} leads outside the workspace root through a symlink")
        if must_exist and not (real.exists() or real.is_symlink()):
            raise NotFound(f"{relative or '.'}: no such file or directory")
        return real

    def contains(self, real: Path) -> bool:
        """True if an already-resolved path is the root or inside it."""
        return real == self.path or self.path in real.parents

    def relative(self, real: Path) -> str:
        """The caller-facing, `/`-separated path of a real path inside the root ("." for the root)."""
        rel = real.relative_to(self.path).as_posix()
        return rel or "."
