"""The agent's settings and limits, with the defaults of the core image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.constants import AGENT_PORT, MAX_CONTENT_BYTES, MAX_MEMBERS, MiB

if TYPE_CHECKING:  # the search code loads on first use
    from agent.fs.search.query import Engine


@dataclass(frozen=True)
class AgentConfig:
    """Everything `python -m agent` can be told; the defaults are the architecture's."""

    root: Path = Path("/app")
    listen: str = f"0.0.0.0:{AGENT_PORT}"
    # Where to write the port actually bound once serving (for `--listen HOST:0`: the kernel picks it, so no
    # other process can take it between being chosen and bound); None writes nothing.
    port_file: Path | None = None
    # Bearer token every RPC but health and reflection must carry; None disables auth.
    token: str | None = None
    # Archives: refused past these (RESOURCE_EXHAUSTED), the workspace left unchanged.
    max_archive_bytes: int = MAX_CONTENT_BYTES  # uncompressed size of the members
    max_archive_files: int = MAX_MEMBERS
    # Largest chunk Read and CreateArchive send (and Read accepts as chunk_size).
    max_chunk_size: int = 1 * MiB
    # Read computes a file's sha256 up to this size.
    hash_limit: int = 8 * MiB
    # Exec: commands running at once, and the replay buffer each named process keeps.
    max_concurrent_commands: int = 64
    process_buffer_bytes: int = 4 * MiB
    # Search: the default and the largest result cap.
    default_max_results: int = 1000
    max_results_limit: int = 100_000
    # Search engine: "ripgrep" or "python"; None picks ripgrep when `rg` is found (common/tools.py).
    search_engine: Engine | None = None
    # WatchFiles: the journal a returning stream resumes from holds the latest this many changes, and about this many
    # bytes of them at most (entries of ~200 bytes plus their paths: 10,000 changes with short paths are ~2.5 MB).
    watch_journal_changes: int = 10_000
    watch_journal_bytes: int = 4 * MiB
    # Changes to one path are coalesced until it has been quiet this long, but are sent this long after the first.
    watch_coalesce_seconds: float = 0.1
    watch_max_delay_seconds: float = 1.0
    # The watcher stays this long after its last stream ended, so a caller that reconnects misses nothing.
    watch_linger_seconds: float = 300.0
    # Directories one watch may cover (one inotify watch each, from the host's per-user fs.inotify.max_user_watches).
    watch_max_directories: int = 8192
