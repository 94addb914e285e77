"""What a search asks and what it finds, shared by the searcher and its two engines."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agent.fs.paths import AGENT_DIR_NAME
from common import constants

MAX_CONTEXT_LINES = 20
# Matching and context lines are cut to this many bytes (SearchMatch.line_truncated).
MAX_LINE_BYTES = 4096
# Skipped unless include_default_excludes: what an archive leaves out (dependency trees), and git's own data.
DEFAULT_EXCLUDES = (*constants.DEFAULT_EXCLUDES, ".git")
# Ignore files by precedence, highest first, as ripgrep reads them.
IGNORE_FILES = (".rgignore", ".ignore", ".gitignore")
# A batch of hits (one response) is sent once it holds this many hits or about this many bytes of text...
BATCH_HITS = 1000
BATCH_BYTES = 64 * 1024
# ...or once its first hit has waited this long. Engines report at least this often while they work, so a hit
# waits at most about twice this: a slow search still streams, a fast one sends few large batches.
BATCH_WAIT = 0.025

Engine = Literal["ripgrep", "python"]


@dataclass(frozen=True)
class SearchQuery:
    path: str = ""
    pattern: str = ""  # empty: list files (discovery)
    regex: bool = False
    ignore_case: bool = False
    include_globs: Sequence[str] = ()
    exclude_globs: Sequence[str] = ()
    no_ignore: bool = False
    hidden: bool = False
    include_default_excludes: bool = False
    context_before: int = 0
    context_after: int = 0
    max_results: int = 0  # 0: the default cap


@dataclass(frozen=True)
class Match:
    path: str
    line_number: int
    line: str
    submatches: list[tuple[int, int]]  # byte offsets into line's UTF-8 encoding, end exclusive
    line_truncated: bool


@dataclass(frozen=True)
class Context:
    path: str
    line_number: int
    line: str


@dataclass(frozen=True)
class FoundFile:
    path: str
    size: int


@dataclass(frozen=True)
class Summary:
    results: int
    files_matched: int
    truncated: bool
    engine: Engine
    elapsed: float


Hit = Match | Context | FoundFile
# A batch of hits in search order, or the Summary that ends a search.
SearchEvent = list[Hit] | Summary
# One line of a file as an engine reports it: number, raw bytes without the newline, and the
# byte spans that matched (None for a context line).
RawLine = tuple[int, bytes, list[tuple[int, int]] | None]


def override_globs(query: SearchQuery) -> list[str]:
    """Globs in ripgrep's override syntax (`!` excludes), the last match winning: so exclusions
    come after inclusions, and the default exclusions last."""
    globs = [*query.include_globs, *(f"!{g}" for g in query.exclude_globs)]
    if not query.include_default_excludes:
        globs += [f"!{name}" for name in DEFAULT_EXCLUDES]
    # Last, so that no include glob brings the agent's own working files into a search.
    return [*globs, f"!/{AGENT_DIR_NAME}"]
