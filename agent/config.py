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
