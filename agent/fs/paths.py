"""Path confinement: every filesystem operation of the agent turns a caller's path into a real one, or an
open file descriptor beneath the root, here."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path, PurePosixPath

from agent.errors import (
    AgentError,
    FilesystemFailure,
    InvalidArgument,
    InvalidPath,
    LimitExceeded,
    NotFound,
    PathEscapesRoot,
    PreconditionFailed,
)

# Linux limits every path given to a system call to PATH_MAX bytes and each name to NAME_MAX.
PATH_MAX = 4096
NAME_MAX = 255
# The directory the agent keeps its own working files in (edit journals, extraction staging). It is
# never archived, searched or edited, and whatever a crash leaves in it is removed when the agent starts.
AGENT_DIR_NAME = ".workspace-agent"

# openat2(2): the kernel resolves the whole path beneath a directory fd in one call, refusing `..`,
# absolute symlinks and symlinks that lead out (EXDEV), so nothing can be swapped in mid-resolution.
_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after 5.1)
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
# Set to False when the kernel (or a seccomp filter) answers ENOSYS: a component-by-component walk
# with O_NOFOLLOW directory fds then gives the same guarantee.
openat2_available = True


def _openat2(dir_fd: int, path: str, flags: int, mode: int, resolve: int) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0, resolve)
    while True:
        fd = _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
        )  # fmt: skip
        if fd >= 0:
            return fd
        code = ctypes.get_errno()
        if code not in (errno.EAGAIN, errno.EINTR):  # EAGAIN: a rename raced a `..` check; retry
            raise OSError(code, os.strerror(code))


def os_error(error: OSError, path: str) -> AgentError:
    """The domain error for an operating-system error on a workspace path, in workspace terms: the
    message names `path` as the caller gave it and never one of the agent's own absolute paths."""
    shown = path or "."
    code = error.errno
    reason = os.strerror(code) if code else str(error)
    if code in (errno.ENOENT,):
        return NotFound(f"{shown}: no such file or directory")
    if code == errno.ENAMETOOLONG:
        return InvalidPath(
            f"{shown}: a name is longer than the filesystem allows ({NAME_MAX} bytes a name, {PATH_MAX} a path)"
        )
    if code == errno.ELOOP:
        return PreconditionFailed(
            f"{shown}: too many levels of symbolic links (a symlink loop, or a link where none may be)"
        )
    if code == errno.EXDEV:
        return PreconditionFailed(f"{shown}: crosses a mount point inside the workspace, which this operation cannot")
    if code == errno.EMLINK:
        return PreconditionFailed(
            f"{shown}: too many links (hard links to one file, or subdirectories in one directory)"
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return LimitExceeded(f"{shown}: the workspace's disk is full")
    if code in (errno.EACCES, errno.EPERM):
        return PreconditionFailed(f"{shown}: permission denied to the agent's user")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.EROFS, errno.ETXTBSY, errno.EBUSY):
        return PreconditionFailed(f"{shown}: {reason}")
    if code == errno.EINVAL:
        return InvalidArgument(f"{shown}: {reason}")
    return FilesystemFailure(f"{shown}: {reason}")


def _realpath(path: Path, shown: str) -> Path:
    # os.path.realpath lstat()s then readlink()s each link: a link swapped for a directory in between
    # makes readlink fail (EINVAL). Resolving again sees the new state; a path that keeps changing is refused.
    for _ in range(8):
        try:
            return Path(os.path.realpath(path))
        except OSError:
            continue
    raise PreconditionFailed(f"{shown or '.'}: kept changing while being resolved; try again")


class WorkingDirectory(os.PathLike):
    """An open directory as a path for a child process's cwd: chdir(2) through /proc/self/fd/N enters
    exactly the directory opened, whatever its path has become since (no symlink swapped in can
    redirect it). The fd is closed with `close`, or when the object is dropped after the spawn."""

    def __init__(self, fd: int, relative: str) -> None:
        self.fd = fd
        self.relative = relative  # for display: the root-relative path it had when opened

    def __fspath__(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class WorkspaceRoot:
    """The directory a workspace lives in (`/app` in the core image).

    Callers name paths relative to it, `/`-separated. `check` refuses absolute paths, `..`
    components, NUL bytes and names too long for the filesystem outright. `open` and `open_parent`
    hand out file descriptors resolved atomically beneath the root (openat2 RESOLVE_BENEATH), so a
    directory swapped for a symlink mid-operation can never lead an operation outside; symlinks
    inside the root that stay inside are followed unless the caller asks for none at all.
    `resolve` (a real path, for display and for callers that spawn processes) checks the same rules
    but is not atomic: operations open what they touch through the fd methods.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(os.path.realpath(root))  # once, at start: nothing races it
        self._fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def __repr__(self) -> str:
        return f"WorkspaceRoot({str(self.path)!r})"

    def __del__(self) -> None:
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            os.close(fd)

    @staticmethod
    def check(relative: str) -> PurePosixPath:
        """Validates a caller's path without touching the disk; raises InvalidPath."""
        if "\x00" in relative:
            raise InvalidPath(f"path {relative!r} contains a NUL byte")
        if relative.startswith(("/", "\\")):
            raise InvalidPath(f"path {relative!r} is absolute; give a path relative to the workspace root")
        pure = PurePosixPath(relative)
        if ".." in pure.parts:
            raise InvalidPath(f"path {relative!r} contains '..'; paths must stay inside the workspace root")
        encoded = os.fsencode(relative)
        if len(encoded) >= PATH_MAX or any(len(os.fsencode(part)) > NAME_MAX for part in pure.parts):
            shown = relative if len(relative) <= 80 else relative[:60] + "..."
            raise InvalidPath(
                f"path {shown!r} is longer than the filesystem allows ({NAME_MAX} bytes a name, {PATH_MAX} a path)"
            )
        return pure

    # ------------------------------------------------------------ atomic, fd-based access

    def open(self, relative: str | PurePosixPath, flags: int, mode: int = 0o600, *, follow: bool = True) -> int:
        """An fd for a root-relative path, opened with `flags` (O_CLOEXEC is added).

        With `follow`, symlinks on the way that stay inside the root are followed (and the last one
        too, unless `flags` has O_NOFOLLOW); without, no component may be a symlink at all (ELOOP),
        which is how paths already resolved to their real, root-relative form are reopened.
        Raises InvalidPath, PathEscapesRoot, NotFound and the other errors of `os_error`.
        """
        try:
            return self.os_open(relative, flags, mode, follow=follow)
        except OSError as error:
            raise os_error(error, str(relative)) from None

    def open_parent(self, relative: str | PurePosixPath, *, follow: bool = True) -> tuple[int, str]:
        """An O_PATH fd of a path's parent directory, and the last component's name (for the *at calls
        that act on a name itself: rename, unlink, mkdir, lstat). The root itself has no parent."""
        try:
            return self.os_open_parent(relative, follow=follow)
        except OSError as error:
            raise os_error(error, str(relative)) from None

    def os_open(self, relative: str | PurePosixPath, flags: int, mode: int = 0o600, *, follow: bool = True) -> int:
        """`open`, but raising the OSError itself (for callers that undo work before reporting it)."""
        shown = str(relative)
        pure = self.check(shown) if isinstance(relative, str) else relative
        name = pure.as_posix() if pure.parts else "."
        if not follow:
            return self._open_strict(name, flags, mode)
        if openat2_available:
            try:
                return self._openat2(name, flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.ENOSYS):
                    raise
                # An absolute symlink, or one that leaves: allowed only if it lands back inside.
        real = _realpath(self.path / name, shown)
        if not self.contains(real):
            raise PathEscapesRoot(f"path {shown!r} leads outside the workspace root through a symlink")
        # Reopened with no symlink allowed: a link swapped in since realpath makes it fail, never escape.
        return self._open_strict(self.relative(real), flags, mode)

    def os_open_parent(self, relative: str | PurePosixPath, *, follow: bool = True) -> tuple[int, str]:
        """`open_parent`, but raising the OSError itself."""
        pure = self.check(str(relative)) if isinstance(relative, str) else relative
        if not pure.parts:
            raise InvalidArgument("the workspace root itself has no parent directory")
        return self.os_open(pure.parent, os.O_PATH | os.O_DIRECTORY, follow=follow), pure.name

    def _openat2(self, name: str, flags: int, mode: int, resolve: int) -> int:
        global openat2_available
        try:
            return _openat2(self._fd, name, flags, mode, resolve)
        except OSError as error:
            if error.errno == errno.ENOSYS:
                openat2_available = False
            raise

    def _open_strict(self, name: str, flags: int, mode: int) -> int:
        if openat2_available:
            try:
                return self._openat2(name, flags, mode, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS)
            except OSError as error:
                if error.errno != errno.ENOSYS:
                    raise
        return self._walk(name, flags, mode)

    def _walk(self, name: str, flags: int, mode: int) -> int:
        """The fallback without openat2: one openat per component from the root's fd, each with
        O_NOFOLLOW, so no symlink is followed anywhere (a link gives ELOOP or ENOTDIR)."""
        parts = [part for part in name.split("/") if part not in ("", ".")]
        if not parts:
            return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=self._fd)
        current = self._fd
        try:
            for part in parts[:-1]:
                following = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
                if current != self._fd:
                    os.close(current)
                current = following
            return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=current)
        finally:
            if current != self._fd:
                os.close(current)

    def working_directory(self, relative: str) -> WorkingDirectory:
        """The directory a command runs in, opened beneath the root; raises as `open` does, and
        InvalidArgument if it is not a directory."""
        fd = self.open(relative, os.O_PATH)
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidArgument(f"cwd {relative!r} is not a directory")
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return WorkingDirectory(fd, self.relative(real) if self.contains(real) else relative or ".")

    def directory(self, relative: str, not_a_directory: str) -> str:
        """The real, root-relative path of the directory `relative` names, opened beneath the root in one step
        (a directory swapped for a symlink cannot lead outside). Raises as `open` does, InvalidArgument
        (`not_a_directory`) for anything but a directory, and NotFound when it moved out of the root meanwhile."""
        fd = self.open(relative, os.O_PATH)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise InvalidArgument(not_a_directory)
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)
        if not self.contains(real):
            raise NotFound(f"{relative}: no such directory")
        return self.relative(real)

    # ------------------------------------------------------------ paths

    def resolve(self, relative: str, *, must_exist: bool = False, follow_symlinks: bool = True) -> Path:
        """The real path for a caller's root-relative path ("" or "." is the root itself).

        With `follow_symlinks=False` the last component is not followed (to delete or move
        a link itself); its parent still must resolve inside the root.
        Raises InvalidArgument/InvalidPath, PathEscapesRoot, and NotFound when `must_exist` and it does not.
        """
        pure = self.check(relative)
        joined = self.path.joinpath(*pure.parts) if pure.parts else self.path
        if follow_symlinks or joined == self.path:
            real = _realpath(joined, relative)
        else:
            real = _realpath(joined.parent, relative) / joined.name
        if not self.contains(real):
            raise PathEscapesRoot(f"path {relative!r} leads outside the workspace root through a symlink")
        if len(os.fsencode(str(real))) >= PATH_MAX:
            raise InvalidPath(f"path {relative!r} is longer than the filesystem allows once its symlinks are followed")
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

    def is_agent_path(self, relative: str | PurePosixPath) -> bool:
        """True for the agent's own directory and anything in it (a real, root-relative path)."""
        parts = PurePosixPath(relative).parts
        return bool(parts) and parts[0] == AGENT_DIR_NAME
