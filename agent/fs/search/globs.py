"""Gitignore-style globs with ripgrep's matching rules, for the Python engine's overrides and ignore files."""

from __future__ import annotations

from collections.abc import Sequence

import pathspec


class Globs:
    """Gitignore-style globs matched the way ripgrep matches them: the last matching glob wins, and
    a path is tested by itself. (pathspec, made for git, also reports a path whose parent directory
    matches; the walk prunes such directories before reaching their entries, except inside the
    directory searched, which rg searches even when a glob or ignore file names it.)"""

    def __init__(self, lines: Sequence[str]) -> None:
        self.patterns = [p for p in pathspec.GitIgnoreSpec.from_lines(lines).patterns if p.include is not None]

    def verdict(self, probe: str) -> bool | None:
        """True if a plain glob decides for `probe` (a directory ends with "/"), False if a `!glob`
        does, None if none matches."""
        for pattern in reversed(self.patterns):
            if pattern.regex is None:
                continue  # a blank line or a comment: matches nothing
            found = pattern.regex.match(probe)
            # `ps_d` is the slash after a directory the pattern named; short of the end, it matched a parent.
            if found and not (found.groupdict().get("ps_d") and found.start("ps_d") + 1 < len(probe)):
                return pattern.include
        return None
