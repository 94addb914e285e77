"""`python -m agent`: serve the workspace agent (defaults: port 3001, root /app)."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import sys
from pathlib import Path

from agent.config import AgentConfig
from agent.server import serve
from common import telemetry
from common.constants import TOKEN_ENV
from common.startup import EXIT_STARTUP, StartupError

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def parse_args(argv: list[str] | None = None) -> AgentConfig:
    defaults = AgentConfig()
    parser = argparse.ArgumentParser(prog="python -m agent", description="The workspace agent (workspace.agent.v1).")
    parser.add_argument("--listen", default=defaults.listen, help="HOST:PORT or unix:PATH (default %(default)s)")
    parser.add_argument(
        "--port-file",
        type=Path,
        help="write the bound port here (atomically) once serving; with --listen HOST:0 the kernel picks the port",
    )
    parser.add_argument("--root", type=Path, default=defaults.root, help="workspace root (default %(default)s)")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token, removed once read (else ${TOKEN_ENV}; neither: no auth)",
    )
    parser.add_argument(
        "--token-secret",
        type=Path,
        help="file holding the bearer token that the engine mounted read-only (a Swarm secret): read, not removed",
    )
    parser.add_argument("--max-archive-bytes", type=int, default=defaults.max_archive_bytes)
    parser.add_argument("--max-archive-files", type=int, default=defaults.max_archive_files)
    parser.add_argument("--max-chunk-size", type=int, default=defaults.max_chunk_size)
    parser.add_argument("--max-concurrent-commands", type=int, default=defaults.max_concurrent_commands)
    parser.add_argument("--process-buffer-bytes", type=int, default=defaults.process_buffer_bytes)
    parser.add_argument("--watch-journal-changes", type=int, default=defaults.watch_journal_changes)
    parser.add_argument("--log-level", default=os.environ.get("WORKSPACE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    telemetry.configure_logging(args.log_level)

    token = take_token(parser, args.token_file)
    if args.token_secret is not None:
        token = read_token_secret(parser, args.token_secret)
    if not args.root.is_dir():
        parser.error(f"--root {args.root} is not a directory")
    return AgentConfig(
        root=args.root,
        listen=args.listen,
        port_file=args.port_file,
        token=token,
        max_archive_bytes=args.max_archive_bytes,
        max_archive_files=args.max_archive_files,
        max_chunk_size=min(args.max_chunk_size, defaults.max_chunk_size),
        max_concurrent_commands=args.max_concurrent_commands,
        process_buffer_bytes=args.process_buffer_bytes,
        watch_journal_changes=args.watch_journal_changes,
    )


def take_token(parser: argparse.ArgumentParser, token_file: Path | None) -> str | None:
    """The bearer token, taken so that no process started later can read it: the file is removed once read
    (it must be: workspace code runs as the same user), and the variable leaves the environment every command
    inherits. (The kernel's copy of the initial environment stays in /proc/<pid>/environ: protect_process()
    makes that unreadable.)"""
    token = os.environ.pop(TOKEN_ENV, "") or None
    if token_file is not None:
        try:
            token = token_file.read_text().strip() or None
            token_file.unlink()
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or error
            parser.error(f"--token-file {token_file}: cannot read it ({reason}); the agent reads and removes it")
    return token


def read_token_secret(parser: argparse.ArgumentParser, path: Path) -> str | None:
    """The bearer token from a file the engine mounted read-only (a Swarm secret, for the workspace user only).
    It cannot be removed, so workspace code can read it too: a pooled workspace's claim replaces it."""
    try:
        return path.read_text().strip() or None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        parser.error(f"--token-secret {path}: cannot read it ({reason})")


def protect_process() -> None:
    """Marks the agent non-dumpable: its /proc/<pid>/environ, mem, fd and the like become unreadable to other
    processes of the same user (workspace code), and they cannot ptrace it. Its children are dumpable again
    after exec, as usual. Linux only; elsewhere the local runtime is no boundary anyway."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def main(argv: list[str] | None = None) -> int:
    # Before the token is read, so that not even a moment exists in which another process could read it.
    protect_process()
    config = parse_args(argv)
    telemetry.configure_from_env()
    if config.token is None:
        logging.getLogger("agent").warning("no token configured: every RPC is open to anyone who can connect")
    try:
        asyncio.run(serve(config))
    except StartupError as error:
        print(f"agent: {error}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


if __name__ == "__main__":
    sys.exit(main())
