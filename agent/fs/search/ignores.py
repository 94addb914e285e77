"""Which paths a walk of the workspace leaves out, as ripgrep decides: the Python search engine's walk and
the file watcher (agent/fs/watch.py) both ask here, so a watch sees exactly what a search would."""

from __future__ import annotations

import os
from pathlib import PurePosixPath

from pathspec.patterns.gitwildmatch import GitWildMatchPatternError

from agent.errors import InvalidArgument
from agent.fs.paths import WorkspaceRoot
from agent.fs.search.globs import Globs
from agent.fs.search.query import IGNORE_FILES, SearchQuery, override_globs

# The ignore files of the directories from the root down to one: (directory's root-relative path, or ""
# for the root; its specs in IGNORE_FILES order, None for a file that is absent or unused).
Chain = list[tuple[str, list[Globs | None]]]


def read_beneath(root: WorkspaceRoot, path: str) -> bytes:
    """A file's bytes, opened beneath the root without following any link (OSError otherwise)."""
    fd = root.os_open(PurePosixPath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, follow=False)
    with os.fdopen(fd, "rb") as file:
        return file.read()


class IgnoreRules:
    """Ripgrep's `ignore` crate: override globs decide first, then ignore files (.rgignore over .ignore over
    .gitignore, the deepest directory's verdict first), then the hidden rule."""

    def __init__(self, root: WorkspaceRoot, query: SearchQuery) -> None:
        self.root = root
        self.query = query
        globs = override_globs(query)
        try:
            self.overrides = Globs(globs) if globs else None
        except GitWildMatchPatternError as error:
            raise InvalidArgument(f"bad glob: {error}") from None
        self.has_includes = bool(query.include_globs)

    def chain_above(self, directory: str) -> Chain:
        """The chain of the directories above `directory` ("." or a root-relative path), the root's first."""
        parts = [] if directory in (".", "") else directory.split("/")
        return [self.ignore_files("/".join(parts[:depth])) for depth in range(len(parts))]

    def ignore_files(self, prefix: str) -> tuple[str, list[Globs | None]]:
        """The ignore files of the directory `prefix` ("" for the root), as one link of a chain."""
        specs: list[Globs | None] = []
        for name in IGNORE_FILES:
            spec = None
            if not self.query.no_ignore:
                try:
                    text = read_beneath(self.root, f"{prefix}/{name}" if prefix else name).decode(errors="replace")
                    spec = Globs(text.splitlines())
                except OSError:
                    pass
                except GitWildMatchPatternError:
                    pass  # rg skips a pattern it cannot parse; an unparsable file is dropped whole here
            specs.append(spec)
        return prefix, specs

    def skipped(self, path: str, name: str, is_dir: bool, chain: Chain) -> bool:
        """Whether the entry `path` (root-relative; `name` its last component) is left out, `chain` being
        its directory's (that directory's own ignore files last)."""
        probe = path + "/" if is_dir else path
        if self.overrides is not None:
            verdict = self.overrides.verdict(probe)
            if verdict is not None:
                return not verdict  # a `!glob` excludes, a plain glob whitelists
            if self.has_includes and not is_dir:
                return True
        for category in range(len(IGNORE_FILES)):
            for prefix, specs in reversed(chain):
                spec = specs[category]
                if spec is None:
                    continue
                verdict = spec.verdict(probe[len(prefix) + 1 :] if prefix else probe)
                if verdict is not None:
                    return verdict  # ignored, or whitelisted by a `!pattern` (hidden or not)
        return name.startswith(".") and not self.query.hidden
