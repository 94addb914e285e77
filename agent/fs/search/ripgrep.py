"""The ripgrep engine: `rg` run in the workspace root, its JSON output read as it comes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncGenerator
from pathlib import PurePosixPath

from agent.errors import InvalidArgument
from agent.fs.paths import WorkspaceRoot
from agent.fs.search.query import BATCH_WAIT, RawLine, SearchQuery, override_globs

# Bytes of rg output buffered ahead of the consumer.
RG_READ_AHEAD = 16 * 1024 * 1024


class Ripgrep:
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
        for glob in override_globs(query):
            self.args += ["--glob", glob]

    async def files(self, directory: str) -> AsyncGenerator[list[tuple[str, int]], None]:
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

    def _confirmed(self, path: str, lines: list[RawLine]) -> bool:
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

    async def matches(self, directory: str, limit: int) -> AsyncGenerator[list[tuple[str, list[RawLine]]], None]:
        """Each file's lines up to its `limit`-th match, once rg has finished the file (so that a file
        found binary after some matches is dropped whole), in rg's order: a chunk of files per piece
        of rg's output."""
        q = self.query
        args = ["--json"] + (["--fixed-strings"] if not q.regex else [])
        args += ["--ignore-case" if q.ignore_case else "--case-sensitive"]
        args += ["--before-context", str(q.context_before), "--after-context", str(q.context_after)]
        lines: list[RawLine] = []
        found = 0
        path = ""
        run = self._run([*args, "--regexp", q.pattern, "--", directory], separator=b"\n")
        async with contextlib.aclosing(run) as output:
            async for piece in output:
                finished: list[tuple[str, list[RawLine]]] = []
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
                    elif kind == b'end",':
                        # A NUL byte found after some matches: rg stops, and the file counts as binary.
                        if lines and found < limit and b'"binary_offset":null' in message:
                            finished.append((path, lines))
                        lines, found = [], 0
                yield [f for f in finished if await asyncio.to_thread(self._confirmed, *f)]

    async def _run(self, args: list[str], separator: bytes) -> AsyncGenerator[bytes, None]:
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
                yield pending + block[: cut - 1]
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
