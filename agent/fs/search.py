"""Searching the workspace: file contents (literal or regex) or file names, with ripgrep when it is installed
(beside the interpreter or on PATH) and a Python engine otherwise that walks, filters and matches as ripgrep
does (with RE2, which like ripgrep's regex runs in linear time)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal, TypeVar

import pathspec
import re2
from pathspec.patterns.gitwildmatch import GitWildMatchPatternError

from agent.errors import InvalidArgument, NotFound
from agent.fs.paths import AGENT_DIR_NAME, WorkspaceRoot
from common import constants
from common.tools import ENV_BIN, find_tool

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
# The Python engine hands results to the event loop in batches of at most this many files.
PYTHON_BATCH_FILES = 64
# Bytes of rg output buffered ahead of the consumer.
RG_READ_AHEAD = 16 * 1024 * 1024

Engine = Literal["ripgrep", "python"]
_Item = TypeVar("_Item")


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
_RawLine = tuple[int, bytes, list[tuple[int, int]] | None]


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

    async def search(self, query: SearchQuery) -> AsyncIterator[SearchEvent]:
        """Streams batches of hits, Match and Context (content search) or FoundFile (discovery), then one
        Summary. Raises InvalidPath, PathEscapesRoot, NotFound (no such directory) and InvalidArgument
        (not a directory, bad pattern, glob, context or cap)."""
        started = time.monotonic()
        cap = self._cap(query)
        directory = self._directory(query.path)
        if "\n" in query.pattern:
            raise InvalidArgument("the pattern has a newline; searches match one line at a time")
        if query.context_before > MAX_CONTEXT_LINES or query.context_after > MAX_CONTEXT_LINES:
            raise InvalidArgument(f"at most {MAX_CONTEXT_LINES} context lines before and after a match")
        engine = _Ripgrep(self.rg, self.root, query) if self.rg else _PythonEngine(self.root, query)
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
            async with contextlib.aclosing(engine.matches(directory, cap + 1)) as chunks:
                async for chunk in chunks:
                    for path, lines in chunk:
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
        # Opened beneath the root in one step; the engines then open everything below it without
        # following any symlink, so a directory swapped for a link cannot lead the search outside.
        fd = self.root.open(path, os.O_PATH)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise InvalidArgument(f"{path}: is not a directory; Search takes a directory")
            real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        finally:
            os.close(fd)
        if not self.root.contains(real):
            raise NotFound(f"{path}: no such directory")  # moved out meanwhile
        relative = self.root.relative(real)
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


def _override_globs(query: SearchQuery) -> list[str]:
    """Globs in ripgrep's override syntax (`!` excludes), the last match winning: so exclusions
    come after inclusions, and the default exclusions last."""
    globs = [*query.include_globs, *(f"!{g}" for g in query.exclude_globs)]
    if not query.include_default_excludes:
        globs += [f"!{name}" for name in DEFAULT_EXCLUDES]
    # Last, so that no include glob brings the agent's own working files into a search.
    return [*globs, f"!/{AGENT_DIR_NAME}"]


# ------------------------------------------------------------------ ripgrep


class _Ripgrep:
    """Runs `rg` in the root (so globs and printed paths are root-relative), reading its output as
    it comes and killing it when the caller stops early.

    `--sort path` makes rg single-threaded; measured on a 10,000-file tree it costs about 1.5x a
    parallel rg when every match is wanted, but results stream in order and a capped search stops
    rg early, which is faster than any parallel run followed by sorting.
    """

    def __init__(self, rg: str, root: WorkspaceRoot, query: SearchQuery) -> None:
        self.root = root
        self.query = query
        self.args = [
            rg, "--no-config", "--sort", "path", "--no-messages",
            # .gitignore applies without a git repository, and only the workspace's own ignore files.
            "--no-require-git", "--no-ignore-global", "--no-ignore-exclude",
            # No UTF-16 transcoding: a file is bytes, and one with NUL bytes is binary and skipped.
            "--encoding", "none",
        ]  # fmt: skip
        if query.hidden:
            self.args.append("--hidden")
        if query.no_ignore:
            self.args.append("--no-ignore")
        for glob in _override_globs(query):
            self.args += ["--glob", glob]

    async def files(self, directory: str) -> AsyncIterator[list[tuple[str, int]]]:
        """(path, size) of the files listed, in rg's order, a chunk per piece of rg's output."""
        run = self._run(["--files", "--null", "--", directory], separator=b"\0")
        async with contextlib.aclosing(run) as output:
            async for piece in output:
                yield await asyncio.to_thread(self._sizes, piece.split(b"\0"))

    def _sizes(self, names: list[bytes]) -> list[tuple[str, int]]:
        found = []
        for name in names:
            if not name:
                continue
            path = _strip_dot(os.fsdecode(name))
            try:
                parent, base = self.root.os_open_parent(PurePosixPath(path), follow=False)
                try:
                    found.append((path, os.stat(base, dir_fd=parent, follow_symlinks=False).st_size))
                finally:
                    os.close(parent)
            except OSError:
                continue  # deleted since rg listed it, or listed through a link swapped in meanwhile
        return found

    def _confirmed(self, path: str, lines: list[_RawLine]) -> bool:
        """True if the file at `path`, opened beneath the root without following any link, holds the
        lines rg reported: rg opens the search directory by its path, so one swapped for a link to the
        outside during the search could feed it outside content, which is then dropped here."""
        try:
            fd = self.root.os_open(PurePosixPath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, follow=False)
        except OSError:
            return False
        with os.fdopen(fd, "rb") as file:
            content = file.read().split(b"\n")
        return all(number <= len(content) and content[number - 1] == raw for number, raw, _ in lines)

    async def matches(self, directory: str, limit: int) -> AsyncIterator[list[tuple[str, list[_RawLine]]]]:
        """Each file's lines up to its `limit`-th match, once rg has finished the file (so that a file
        found binary after some matches is dropped whole), in rg's order: a chunk of files per piece
        of rg's output."""
        q = self.query
        args = ["--json"] + (["--fixed-strings"] if not q.regex else [])
        args += ["--ignore-case" if q.ignore_case else "--case-sensitive"]
        args += ["--before-context", str(q.context_before), "--after-context", str(q.context_after)]
        lines: list[_RawLine] = []
        found = 0
        path = ""
        run = self._run([*args, "--regexp", q.pattern, "--", directory], separator=b"\n")
        async with contextlib.aclosing(run) as output:
            async for piece in output:
                finished: list[tuple[str, list[_RawLine]]] = []
                for message in piece.split(b"\n"):
                    kind = message[9:14]  # {"type":"match"... ; rg writes "type" first
                    if (kind == b"match" or kind == b"conte") and found < limit:
                        data = json.loads(message)["data"]
                        spans = None
                        if kind == b"match":
                            spans = [(s["start"], s["end"]) for s in data["submatches"]]
                            found += 1
                        raw = _json_bytes(data["lines"])
                        lines.append((data["line_number"], raw[:-1] if raw.endswith(b"\n") else raw, spans))
                        path = _strip_dot(os.fsdecode(_json_bytes(data["path"])))
                        if found == limit and not await asyncio.to_thread(_has_nul, self.root, path):
                            # Nothing past this match is ever sent: no need to wait for rg to finish the file.
                            finished.append((path, lines))
                            yield [f for f in finished if await asyncio.to_thread(self._confirmed, *f)]
                            return
                    elif kind == b"end\",":
                        # A NUL byte found after some matches: rg stops, and the file counts as binary.
                        if lines and found < limit and b'"binary_offset":null' in message:
                            finished.append((path, lines))
                        lines, found = [], 0
                yield [f for f in finished if await asyncio.to_thread(self._confirmed, *f)]

    async def _run(self, args: list[str], separator: bytes) -> AsyncIterator[bytes]:
        """rg's stdout in pieces of whole records (the last separator of each piece left out), and an
        empty piece whenever rg has been silent for BATCH_WAIT."""
        process = await asyncio.create_subprocess_exec(
            *self.args, *args,
            cwd=self.root.path, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            # rg may run ahead of a slow gRPC consumer this far instead of stalling on a full pipe.
            limit=RG_READ_AHEAD // 2,
        )  # fmt: skip
        assert process.stdout is not None and process.stderr is not None
        try:
            pending = b""
            while True:
                try:
                    async with asyncio.timeout(BATCH_WAIT):
                        block = await process.stdout.read(256 * 1024)
                except TimeoutError:
                    yield b""  # so that the caller can send the hits it holds
                    continue
                if not block:
                    break
                cut = block.rfind(separator) + 1
                if not cut:
                    pending += block
                    continue
                yield pending + block[:cut - 1]
                pending = block[cut:]
            if pending:
                yield pending
            error = (await process.stderr.read()).decode(errors="replace").strip()
            # 1 is "nothing found"; 2 with a message is a bad pattern or glob (others are silenced).
            if await process.wait() == 2 and error:
                raise InvalidArgument(f"ripgrep refused the search: {error}")
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


def _strip_dot(path: str) -> str:
    return path[2:] if path.startswith("./") else path


def _json_bytes(field: dict[str, str]) -> bytes:
    """rg's JSON for arbitrary bytes: {"text": ...} when valid UTF-8, else {"bytes": base64}."""
    return field["text"].encode() if "text" in field else base64.b64decode(field["bytes"])


def _has_nul(root: WorkspaceRoot, path: str) -> bool:
    try:
        fd = root.os_open(PurePosixPath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, follow=False)
        with os.fdopen(fd, "rb") as file:
            return any(b"\0" in block for block in iter(lambda: file.read(1 << 20), b""))
    except OSError:
        return True  # gone or unreadable: rg's verdict at the end of the file decides


# ------------------------------------------------------------------ Python


def _read_beneath(root: WorkspaceRoot, path: str) -> bytes:
    """A file's bytes, opened beneath the root without following any link (OSError otherwise)."""
    fd = root.os_open(PurePosixPath(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, follow=False)
    with os.fdopen(fd, "rb") as file:
        return file.read()


class _PythonEngine:
    """Walks the tree like ripgrep's `ignore` crate: override globs decide first, then ignore files
    (.rgignore over .ignore over .gitignore, the deepest directory's verdict first), then the
    hidden rule; symlinks are never followed. Work runs in a thread, batches at a time."""

    def __init__(self, root: WorkspaceRoot, query: SearchQuery) -> None:
        self.root = root
        self.query = query
        globs = _override_globs(query)
        try:
            self.overrides = _Globs(globs) if globs else None
        except GitWildMatchPatternError as error:
            raise InvalidArgument(f"bad glob: {error}") from None
        self.has_includes = bool(query.include_globs)
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

    def files(self, directory: str) -> AsyncIterator[list[tuple[str, int]]]:
        """(path, size) of the files to search, in ripgrep's order, in chunks."""
        return _in_thread(self._walk(directory), self.stopped)

    def matches(self, directory: str, limit: int) -> AsyncIterator[list[tuple[str, list[_RawLine]]]]:
        """Each file's lines up to its `limit`-th match, in ripgrep's order, in chunks of files."""
        return _in_thread(self._match_files(directory, limit), self.stopped)

    def _match_files(self, directory: str, limit: int) -> Iterator[tuple[str, list[_RawLine]] | None]:
        for path, _ in self._walk(directory):
            if self.stopped.is_set():
                return
            lines = self._match_file(path, limit)
            yield (path, lines) if lines else None  # None still lets _in_thread read the clock

    def _walk(self, directory: str) -> Iterator[tuple[str, int]]:
        """(root-relative path, size) of every regular file to search, in ripgrep's order."""
        chain: list[tuple[str, list[_Globs | None]]] = []
        parts = [] if directory == "." else directory.split("/")
        for depth in range(len(parts)):  # ignore files of the directories above the searched one
            chain.append(self._ignore_files("/".join(parts[:depth])))
        yield from self._walk_directory(directory if parts else "", chain)

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

    def _listing(self, prefix: str, chain: list) -> Iterator[tuple[str, int] | tuple[str, list]]:
        """A directory's files as (path, size), and its subdirectories to descend into as [path, chain]."""
        chain = [*chain, self._ignore_files(prefix)]
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
            if self._skipped(path, name, is_dir, chain):
                continue
            if is_dir:
                yield [path, chain]
            else:
                yield path, size

    def _ignore_files(self, prefix: str) -> tuple[str, list[_Globs | None]]:
        specs: list[_Globs | None] = []
        for name in IGNORE_FILES:
            spec = None
            if not self.query.no_ignore:
                try:
                    text = _read_beneath(self.root, f"{prefix}/{name}" if prefix else name).decode(errors="replace")
                    spec = _Globs(text.splitlines())
                except OSError:
                    pass
                except GitWildMatchPatternError:
                    pass  # rg skips a pattern it cannot parse; an unparsable file is dropped whole here
            specs.append(spec)
        return prefix, specs

    def _skipped(self, path: str, name: str, is_dir: bool, chain: list) -> bool:
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

    def _match_file(self, path: str, limit: int) -> list[_RawLine]:
        assert self.regex is not None and self.anywhere is not None
        try:
            data = _read_beneath(self.root, path)
        except OSError:
            return []
        if b"\0" in data or not self.anywhere.search(data):
            return []
        # Bytes throughout, as rg: spans are byte offsets, and invalid UTF-8 matches no character.
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        before, after = self.query.context_before, self.query.context_after
        found: list[_RawLine] = []
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


class _Globs:
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
            found = pattern.regex.match(probe)
            # `ps_d` is the slash after a directory the pattern named; short of the end, it matched a parent.
            if found and not (found.groupdict().get("ps_d") and found.start("ps_d") + 1 < len(probe)):
                return pattern.include
        return None


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


async def _in_thread(items: Iterator[_Item | None], stopped: threading.Event) -> AsyncIterator[list[_Item]]:
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
