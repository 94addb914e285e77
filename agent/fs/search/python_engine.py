"""The Python engine, for when ripgrep is not installed: walks, filters and matches as ripgrep does
(with RE2, which like ripgrep's regex runs in linear time)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import PurePosixPath
from typing import Any, TypeVar

import re2

from agent.errors import InvalidArgument
from agent.fs.paths import WorkspaceRoot
from agent.fs.search.ignores import IgnoreRules, read_beneath
from agent.fs.search.query import BATCH_WAIT, RawLine, SearchQuery

# The Python engine hands results to the event loop in batches of at most this many files.
PYTHON_BATCH_FILES = 64
_Item = TypeVar("_Item")


class PythonEngine:
    """Walks the tree like ripgrep's `ignore` crate: override globs decide first, then ignore files
    (.rgignore over .ignore over .gitignore, the deepest directory's verdict first), then the
    hidden rule; symlinks are never followed. Work runs in a thread, batches at a time."""

    def __init__(self, root: WorkspaceRoot, query: SearchQuery) -> None:
        self.root = root
        self.query = query
        self.ignores = IgnoreRules(root, query)
        self.regex: re2._Regexp | None = None  # matches one line (bytes)
        self.anywhere: re2._Regexp | None = None  # false when no line of a file (bytes) can match
        if query.pattern:
            options = re2.Options()
            options.case_sensitive = not query.ignore_case
            options.log_errors = False
            pattern = _unicode_classes(query.pattern) if query.regex else re2.escape(query.pattern)
            try:
                self.regex = re2.compile(pattern, options)
                # \A and \z anchor at a line's ends for rg, at the file's for a whole-file search: no shortcut then.
                whole_file = "" if query.regex and ("\\A" in pattern or "\\z" in pattern) else pattern
                self.anywhere = re2.compile(f"(?m:{whole_file})", options)
            except re2.error as error:
                message = error.args[0].decode(errors="replace") if error.args else str(error)
                raise InvalidArgument(
                    f"bad regex (ripgrep's syntax, without look-around or backreferences): {message}"
                ) from None
        # Set when the search ends: the worker thread stops at the next file.
        self.stopped = threading.Event()

    def files(self, directory: str) -> AsyncGenerator[list[tuple[str, int]], None]:
        """(path, size) of the files to search, in ripgrep's order, in chunks."""
        return _in_thread(self._walk(directory), self.stopped)

    def matches(self, directory: str, limit: int) -> AsyncGenerator[list[tuple[str, list[RawLine]]], None]:
        """Each file's lines up to its `limit`-th match, in ripgrep's order, in chunks of files."""
        return _in_thread(self._match_files(directory, limit), self.stopped)

    def _match_files(self, directory: str, limit: int) -> Iterator[tuple[str, list[RawLine]] | None]:
        for path, _ in self._walk(directory):
            if self.stopped.is_set():
                return
            lines = self._match_file(path, limit)
            yield (path, lines) if lines else None  # None still lets _in_thread read the clock

    def _walk(self, directory: str) -> Iterator[tuple[str, int]]:
        """(root-relative path, size) of every regular file to search, in ripgrep's order."""
        chain = self.ignores.chain_above(directory)  # ignore files of the directories above the searched one
        yield from self._walk_directory("" if directory == "." else directory, chain)

    def _walk_directory(self, prefix: str, chain: list) -> Iterator[tuple[str, int]]:
        # Depth-first with an explicit stack (a tree may be deeper than Python's recursion limit).
        stack = [self._listing(prefix, chain)]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif isinstance(item, tuple):
                yield item
            else:
                stack.append(self._listing(*item))

    def _listing(self, prefix: str, chain: list) -> Iterator[tuple[str, int] | list[Any]]:
        """A directory's files as (path, size), and its subdirectories to descend into as [path, chain]."""
        chain = [*chain, self.ignores.ignore_files(prefix)]
        try:
            # Opened beneath the root with no link followed; closed before descending (one fd at a time).
            fd = self.root.os_open(PurePosixPath(prefix), os.O_RDONLY | os.O_DIRECTORY, follow=False)
        except OSError:
            return  # unreadable (or vanished) directory: skipped, as rg --no-messages does
        try:
            with os.scandir(fd) as scan:
                listed = [
                    (entry.name, entry.is_dir(follow_symlinks=False), entry.is_file(follow_symlinks=False), entry)
                    for entry in sorted(scan, key=lambda e: os.fsencode(e.name))
                ]
                entries = []
                for name, is_dir, is_file, entry in listed:
                    try:
                        size = entry.stat(follow_symlinks=False).st_size if is_file else 0
                    except OSError:
                        continue  # deleted since listed
                    entries.append((name, is_dir, is_file, size))
        except OSError:
            return
        finally:
            os.close(fd)
        for name, is_dir, is_file, size in entries:
            path = f"{prefix}/{name}" if prefix else name
            if not is_dir and not is_file:
                continue  # symlinks, FIFOs, sockets
            if self.ignores.skipped(path, name, is_dir, chain):
                continue
            if is_dir:
                yield [path, chain]
            else:
                yield path, size

    def _match_file(self, path: str, limit: int) -> list[RawLine]:
        assert self.regex is not None and self.anywhere is not None
        try:
            data = read_beneath(self.root, path)
        except OSError:
            return []
        if b"\0" in data or not self.anywhere.search(data):
            return []
        # Bytes throughout, as rg: spans are byte offsets, and invalid UTF-8 matches no character.
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        before, after = self.query.context_before, self.query.context_after
        found: list[RawLine] = []
        last_sent = 0  # line number of the last line sent
        matched = 0
        pending_after = 0
        for index, line in enumerate(lines):
            number = index + 1
            spans = _spans(self.regex, line)
            if spans:
                for context in range(max(last_sent + 1, number - before), number):
                    found.append((context, lines[context - 1], None))
                found.append((number, line, spans))
                matched += 1
                if matched == limit:
                    break
                last_sent, pending_after = number, after
            elif pending_after:
                found.append((number, line, None))
                last_sent, pending_after = number, pending_after - 1
        return found


def _spans(regex: re2._Regexp, line: bytes) -> list[tuple[int, int]]:
    """The matches in `line`, as Rust's regex iterates them: an empty match right where the previous match
    ended is not one."""
    spans: list[tuple[int, int]] = []
    for match in regex.finditer(line):
        start, end = match.span()
        if start == end and spans and spans[-1][1] == start:
            continue
        spans.append((start, end))
    return spans


# Rust's regex (so rg's) gives \d, \s and \w their Unicode meaning, RE2 its ASCII one: the Unicode
# classes, spelled for RE2 (White_Space; Alphabetic, marks, digits, connectors and joiners).
_UNICODE_CLASSES = {"d": r"\p{Nd}", "s": r"\t-\r\x{85}\p{Z}", "w": r"\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}"}


def _unicode_classes(pattern: str) -> str:
    """`pattern` with \\d, \\s, \\w (and, outside brackets, \\D, \\S, \\W) written as Unicode classes for RE2."""
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped = pattern[i + 1]
            spelled = _UNICODE_CLASSES.get(escaped.lower())
            if spelled and in_class and escaped.islower():
                out.append(spelled)
            elif spelled and not in_class:
                out.append(f"[{'^' if escaped.isupper() else ''}{spelled}]")
            else:
                out.append(pattern[i : i + 2])
            i += 2
            continue
        if char == "[" and not in_class:
            in_class = True
            out.append(char)
            # A `]` (after an optional `^`) right after the opening bracket is a literal.
            i += 1
            if pattern.startswith("^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i):
                out.append("]")
                i += 1
            continue
        if char == "]" and in_class:
            in_class = False
        out.append(char)
        i += 1
    return "".join(out)


async def _in_thread(items: Iterator[_Item | None], stopped: threading.Event) -> AsyncGenerator[list[_Item], None]:
    """Runs a blocking iterator in a worker thread, handing over up to PYTHON_BATCH_FILES items per hop, and
    what it has (maybe nothing) after BATCH_WAIT. None items are skipped; they only let the clock be read.
    When the consumer leaves (the search ended or was cancelled), `stopped` is set, for the worker to stop."""

    def take() -> tuple[list[_Item], bool]:
        chunk: list[_Item] = []
        deadline = time.monotonic() + BATCH_WAIT
        for item in items:
            if item is not None:
                chunk.append(item)
            if len(chunk) == PYTHON_BATCH_FILES or time.monotonic() >= deadline or stopped.is_set():
                return chunk, stopped.is_set()
        return chunk, True

    done = False
    try:
        while not done:
            chunk, done = await asyncio.to_thread(take)
            yield chunk
    finally:
        stopped.set()
