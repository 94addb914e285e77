"""Searching the workspace: file contents (literal or regex) or file names, with ripgrep when it is installed
(beside the interpreter or on PATH) and a Python engine otherwise that walks, filters and matches as ripgrep
does (with RE2, which like ripgrep's regex runs in linear time)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING

from agent.errors import InvalidArgument
from agent.fs.paths import WorkspaceRoot
from agent.fs.search.query import (
    BATCH_BYTES,
    BATCH_HITS,
    BATCH_WAIT,
    MAX_CONTEXT_LINES,
    MAX_LINE_BYTES,
    Context,
    Engine,
    FoundFile,
    Hit,
    Match,
    SearchEvent,
    SearchQuery,
    Summary,
)
from agent.fs.search.ripgrep import Ripgrep
from common.tools import ENV_BIN, find_tool

if TYPE_CHECKING:
    from agent.fs.search.python_engine import PythonEngine

__all__ = ["Context", "FoundFile", "Hit", "Match", "SearchEvent", "SearchQuery", "Searcher", "Summary"]


class Searcher:
    """Searches below a workspace root with the engine chosen at construction.

    `engine=None` picks ripgrep when `rg` is found (beside the interpreter or on PATH), else the Python engine; both give the same
    results in the same order (files depth-first, each directory's entries sorted by name bytes).
    """

    def __init__(
        self, root: WorkspaceRoot, *, default_max_results: int, max_results_limit: int, engine: Engine | None = None
    ) -> None:
        self.root = root
        self.default_max_results = default_max_results
        self.max_results_limit = max_results_limit
        if engine not in (None, "ripgrep", "python"):
            raise ValueError(f"unknown search engine {engine!r}; use 'ripgrep' or 'python'")
        self.rg = find_tool("rg") if engine in (None, "ripgrep") else None
        if engine == "ripgrep" and self.rg is None:
            raise RuntimeError(f"the ripgrep engine was asked for, but rg is neither in {ENV_BIN} nor on PATH")
        self.engine: Engine = "ripgrep" if self.rg else "python"

    async def search(self, query: SearchQuery) -> AsyncGenerator[SearchEvent, None]:
        """Streams batches of hits, Match and Context (content search) or FoundFile (discovery), then one
        Summary. Raises InvalidPath, PathEscapesRoot, NotFound (no such directory) and InvalidArgument
        (not a directory, bad pattern, glob, context or cap)."""
        started = time.monotonic()
        cap = self._cap(query)
        directory = self._directory(query.path)
        if "\n" in query.pattern:
            raise InvalidArgument("the pattern has a newline; searches match one line at a time")
        if "\0" in query.pattern or any("\0" in glob for glob in (*query.include_globs, *query.exclude_globs)):
            raise InvalidArgument("the pattern or a glob has a NUL byte, which no file name or line of text can match")
        if query.context_before > MAX_CONTEXT_LINES or query.context_after > MAX_CONTEXT_LINES:
            raise InvalidArgument(f"at most {MAX_CONTEXT_LINES} context lines before and after a match")
        engine = Ripgrep(self.rg, self.root, query) if self.rg else _python_engine(self.root, query)
        batch = _Batch()
        results = files_matched = 0
        truncated = False
        if not query.pattern:
            async with contextlib.aclosing(engine.files(directory)) as chunks:
                async for chunk in chunks:
                    for path, size in chunk:
                        if results == cap:
                            truncated = True
                            break
                        results += 1
                        if batch.add(FoundFile(path, size), len(path)):
                            yield batch.take()
                    if truncated:
                        break
                    if batch.due():
                        yield batch.take()
        else:
            # One match past the cap tells whether the results were truncated.
            async with contextlib.aclosing(engine.matches(directory, cap + 1)) as match_chunks:
                async for file_hits in match_chunks:
                    for path, lines in file_hits:
                        last_match = 0
                        for number, raw, spans in lines:
                            if spans is None:
                                # Once the cap is reached only the after-context of the last match is sent.
                                if results < cap or (last_match and number <= last_match + query.context_after):
                                    line = _decode(raw, [])[0]
                                    if batch.add(Context(path, number, line), len(path) + len(line)):
                                        yield batch.take()
                                continue
                            if results == cap:
                                truncated = True
                                break
                            if not last_match:
                                files_matched += 1
                            results += 1
                            last_match = number
                            line, submatches, cut = _decode(raw, spans)
                            if batch.add(Match(path, number, line, submatches, cut), len(path) + len(line)):
                                yield batch.take()
                        if truncated:
                            break
                    if truncated:
                        break
                    if batch.due():
                        yield batch.take()
        if batch.hits:
            yield batch.take()
        yield Summary(results, files_matched, truncated, self.engine, time.monotonic() - started)

    def _cap(self, query: SearchQuery) -> int:
        if query.max_results > self.max_results_limit:
            raise InvalidArgument(f"max_results is {query.max_results}; at most {self.max_results_limit}")
        return query.max_results or self.default_max_results

    def _directory(self, path: str) -> str:
        # The engines open everything below it without following any symlink, so a directory swapped for a
        # link cannot lead the search outside.
        relative = self.root.directory(path, f"{path}: is not a directory; Search takes a directory")
        if self.root.is_agent_path(relative):
            raise InvalidArgument(f"{path}: is the agent's own working directory, which is never searched")
        return relative


class _Batch:
    """Hits gathered for one response, in order."""

    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self.size = 0
        self.started = 0.0

    def add(self, hit: Hit, size: int) -> bool:
        """Adds a hit of about `size` bytes; True when the batch is full."""
        if not self.hits:
            self.started = time.monotonic()
        self.hits.append(hit)
        self.size += size + 32  # and the hit's field tags, lengths and numbers
        return len(self.hits) == BATCH_HITS or self.size >= BATCH_BYTES

    def due(self) -> bool:
        """Whether the first hit has waited long enough to be sent without waiting for more."""
        return bool(self.hits) and time.monotonic() - self.started >= BATCH_WAIT

    def take(self) -> list[Hit]:
        hits, self.hits, self.size = self.hits, [], 0
        return hits


def _decode(raw: bytes, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]], bool]:
    """A line as sent: without its terminator, cut at MAX_LINE_BYTES, as UTF-8 with invalid bytes
    replaced, and the spans moved to byte offsets of that text."""
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    cut = len(raw) > MAX_LINE_BYTES
    if cut:
        raw = raw[:MAX_LINE_BYTES]
        spans = [(start, min(end, MAX_LINE_BYTES)) for start, end in spans if start < MAX_LINE_BYTES]
    else:
        spans = [(start, min(end, len(raw))) for start, end in spans]
    try:
        return raw.decode(), spans, cut
    except UnicodeDecodeError:
        text = raw.decode(errors="replace")

        def moved(offset: int) -> int:
            return len(raw[:offset].decode(errors="replace").encode())

        return text, [(moved(start), moved(end)) for start, end in spans], cut


def _python_engine(root: WorkspaceRoot, query: SearchQuery) -> PythonEngine:
    """The Python engine, imported on first use: RE2 and pathspec are no part of an agent that has rg."""
    from agent.fs.search.python_engine import PythonEngine

    return PythonEngine(root, query)
