"""The orchestrator's settings and limits, with their defaults."""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.constants import MiB

# The warm pool `python -m orchestrator` keeps unless told otherwise (--warm-pool).
WARM_POOL_DEFAULT = 2
# templates/ at the top of the repository: where template folders live unless told otherwise.
REPO_TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# The key of a field's metadata that makes it an option of `python -m orchestrator` (see `option`).
OPTION = "option"


@dataclass(frozen=True)
class Option:
    """How a field of OrchestratorConfig appears on the command line: as `--<field name>` (dashes for
    underscores, without a trailing `_s`), with `help` (`{default}` in it is the field's default) and `choices`.
    A bool field is a switch: `--name` turns on a field that defaults to off, `--no-name` one that defaults to on."""

    help: str = ""
    choices: tuple[str, ...] | None = None
    # A repeatable option (a tuple field): each occurrence parsed by this, the values collected in order.
    each: Callable[[str], Any] | None = None
    metavar: str | None = None


def option(
    help: str = "",
    *,
    choices: tuple[str, ...] | None = None,
    each: Callable[[str], Any] | None = None,
    metavar: str | None = None,
) -> dict[str, Option]:
    """A field's metadata making it a command-line option (`field(default=..., metadata=option(...))`)."""
    return {OPTION: Option(help, choices, each, metavar)}


def hot_pool_entry(text: str) -> tuple[str, int]:
    """`TEMPLATE=K` of --hot-pool as (template, K). Raises ValueError."""
    template, equals, count = text.partition("=")
    if not template or not equals or not count.isdigit():
        raise ValueError(f"{text!r} is not TEMPLATE=K (a template name and a count, e.g. node-basic=1)")
    return template, int(count)


@dataclass(frozen=True)
class OrchestratorConfig:
    """Everything `python -m orchestrator` can be told."""

    listen: str = field(default="127.0.0.1:50051", metadata=option("HOST:PORT or unix:PATH (default {default})"))
    # SQLite state, archives, template cache and the local runtime's workspaces live here.
    data_dir: Path = field(default=Path(".data"), metadata=option("state, archives, caches (default {default})"))
    templates_dir: Path = field(default=REPO_TEMPLATES, metadata=option("template folders (default: the repo's)"))
    # The state database: "" for SQLite in the data directory, or a postgresql:// URL, which several replicas
    # (orchestrator processes) can share: see orchestrator/sessions/cluster.py.
    database: str = field(
        default="",
        metadata=option(
            "postgresql://USER@HOST/DB for state shared by several replicas (default: SQLite in the data dir)"
        ),
    )
    # With a shared database: a replica's leases last this long unless renewed (every third of it); a dead
    # replica's sessions are taken over within lease_ttl_s and a third.
    lease_ttl_s: float = field(
        default=10.0, metadata=option("seconds a replica's leases last unrenewed (default {default:g})")
    )
    # Where the other replicas reach this one (HOST:PORT); default: the --listen host and the bound port.
    advertise_address: str = field(default="", metadata=option("HOST:PORT other replicas forward calls to"))
    # "docker" (containers from the core image) or "local" (the agent as a subprocess; no isolation).
    runtime: str = field(
        default="docker",
        metadata=option(
            "docker: containers from the core image; swarm: one Swarm service per workspace; local: agent"
            " subprocesses, NO isolation (default {default})",
            choices=("docker", "swarm", "local"),
        ),
    )
    # --runtime swarm: the overlay network workspaces join ("" : workspace-core-<instance id>, created on first
    # use), and how the orchestrator reaches their agents (see runtime/swarm.py).
    swarm_network: str = field(
        default="", metadata=option("overlay network of the workspaces (default: one per instance)")
    )
    swarm_agent_address: str = field(
        default="published",
        metadata=option(
            "published: host-mode ports on the task's node (orchestrator outside the swarm); overlay: the service's"
            " name on --swarm-network (orchestrator a service on it) (default {default})",
            choices=("published", "overlay"),
        ),
    )
    # The loopback address container ports are published on; never 0.0.0.0.
    host_address: str = field(default="127.0.0.1", metadata=option("loopback address ports are published on"))
    image: str = field(default="workspace-core:latest", metadata=option("the core image (default {default})"))
    # A PEM bundle mounted into workspaces so npm/pip/node trust a corporate proxy.
    extra_ca_bundle: Path | None = field(
        default=None, metadata=option("PEM file workspaces trust in addition to the public roots")
    )
    # Labels every container with this, so two orchestrators on one engine keep apart; stable across
    # restarts so a restarted orchestrator adopts its own containers. "" (the default): the data directory's
    # own id (see resolved_instance_id).
    instance_id: str = field(
        default="",
        metadata=option(
            "label separating orchestrators on one engine (default: an id kept in the data dir, unique to it)"
        ),
    )
    # Sessions: at most this many not STOPPED/FAILED at once (RESOURCE_EXHAUSTED beyond).
    max_sessions: int = field(default=100, metadata=option())
    # Warm pool: started workspaces with healthy agents and no session, claimed by CreateSession (a cold start
    # when it is empty) and refilled in the background; its members count against max_sessions. 0 turns it
    # off (the default here, for embedders and tests); `python -m orchestrator` asks for WARM_POOL_DEFAULT.
    warm_pool: int = field(
        default=0,
        metadata=option(
            f"started workspaces kept ready for new sessions, within --max-sessions (0: off; default {WARM_POOL_DEFAULT})"
        ),
    )
    # Hot pools: per template, workspaces kept READY (template injected, installed, dev server answering) for
    # new sessions of it; they count against max_sessions too. A template.json's `hot_pool` asks for one as well;
    # an entry here overrides it (0 turns it off).
    hot_pool: tuple[tuple[str, int], ...] = field(
        default=(),
        metadata=option(
            "keep K workspaces of TEMPLATE READY for new sessions, within --max-sessions (repeatable; overrides"
            " the template's hot_pool)",
            each=hot_pool_entry, metavar="TEMPLATE=K",
        ),
    )  # fmt: skip
    agent_health_timeout_s: float = 30.0
    install_timeout_s: float = field(default=600.0, metadata=option())
    # Reaper: stop sessions idle this long or alive this long (0 disables either); check every interval.
    idle_ttl_s: float = field(
        default=1800.0,
        metadata=option("seconds idle before a session is stopped (0: never; default {default:g}, with --demo 0)"),
    )
    max_lifetime_s: float = field(default=0.0, metadata=option("seconds a session may live (0: no limit)"))
    reap_interval_s: float = field(default=30.0, metadata=option("seconds between reaper sweeps"))
    save_before_reap: bool = field(default=False, metadata=option("save a session's workspace before reaping it"))
    # Where archives and install-cache entries are kept: "" (the data dir's archives/ and install-cache/) or an
    # S3-compatible bucket shared by replicas, its endpoint and credentials from the standard AWS variables.
    archive_store: str = field(
        default="",
        metadata=option(
            "s3://BUCKET[/PREFIX]: archives and the install cache in S3 (endpoint, credentials: AWS_ENDPOINT_URL,"
            " AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION); default: the data dir",
            metavar="URL",
        ),
    )
    # What the reaper does with a READY session idle past the idle TTL: delete it, or pause it (its files kept,
    # its CPU and memory released; ResumeSession brings it back). The max lifetime always deletes.
    idle_action: str = field(
        default="delete",
        metadata=option("what happens to an idle READY session (default {default})", choices=("delete", "pause")),
    )
    # Archives: uploads and saves larger than this are refused.
    max_archive_bytes: int = field(default=2048 * MiB, metadata=option())
    # Install cache: node_modules after an install, reused by sessions with the same package.json, lockfile
    # and install command; at most this many bytes of entries (least recently used go first). A template
    # without a lockfile is cached too, with the lockfile its first install wrote, for at most
    # install_cache_unlocked_max_age_s (registries move on: a later install might resolve newer versions).
    install_cache: bool = field(
        default=True,
        metadata=option("run every install from scratch instead of starting from a cached node_modules"),
    )
    max_install_cache_bytes: int = field(default=4096 * MiB, metadata=option())
    install_cache_unlocked_max_age_s: float = 24 * 3600.0
    # The preview gateway (orchestrator/gateway): one address for every session's dev server, behind preview
    # tokens. Off unless given an address.
    preview_address: str = field(
        default="", metadata=option("HOST:PORT of the preview gateway (default: none; e.g. 127.0.0.1:8080)")
    )
    preview_domain: str = field(
        default="localhost",
        metadata=option(
            "previews are <session>.DOMAIN (wildcard DNS) and DOMAIN/preview/<session>/ (default {default})"
        ),
    )
    preview_tls_cert: Path | None = field(default=None, metadata=option("PEM certificate: the gateway speaks HTTPS"))
    preview_tls_key: Path | None = field(default=None, metadata=option("PEM private key of --preview-tls-cert"))
    # The HMAC key of preview tokens. Every replica behind one gateway address needs the same: a shared data
    # directory has it, or point each at one file (a Docker secret, say). Made in the data dir when missing.
    preview_signing_key_file: Path | None = field(
        default=None, metadata=option("the preview tokens' signing key (default: <data-dir>/preview-signing-key)")
    )
    # Output lines kept per session for late watchers and failure reports.
    output_history_lines: int = 200

    def hot_pool_sizes(self, declared: dict[str, int]) -> dict[str, int]:
        """The hot pool of each template: `declared` (the templates' own hot_pool) overridden by --hot-pool,
        the ones of size 0 left out."""
        sizes = {**declared, **dict(self.hot_pool)}
        return {template: size for template, size in sizes.items() if size > 0}

    @property
    def state_db(self) -> Path:
        return self.data_dir / "orchestrator.sqlite3"

    @property
    def archives_dir(self) -> Path:
        return self.data_dir / "archives"

    @property
    def template_cache_dir(self) -> Path:
        return self.data_dir / "template-cache"

    @property
    def install_cache_dir(self) -> Path:
        return self.data_dir / "install-cache"

    @property
    def preview_signing_key(self) -> Path:
        return self.preview_signing_key_file or self.data_dir / "preview-signing-key"

    @property
    def instance_id_file(self) -> Path:
        return self.data_dir / "instance-id"

    def resolved_instance_id(self) -> str:
        """`instance_id` when given, else the data directory's own id: random, made once and kept in
        `<data-dir>/instance-id`, so it is stable across restarts and differs between data directories (two
        orchestrators on one engine never take each other's workspaces for their own). A data directory whose
        state database has sessions from before ids were kept keeps "default", the id its workspaces carry."""
        if self.instance_id:
            return self.instance_id
        path = self.instance_id_file
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            pass
        legacy = _has_sessions(self.state_db)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        chosen = "default" if legacy else f"orch-{secrets.token_hex(6)}"
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        temp.write_text(chosen + "\n")
        try:
            # A hard link publishes the whole file or fails if one exists: of two processes starting on a new
            # data directory at once, both end up with the first one's id.
            os.link(temp, path)
        except FileExistsError:
            return path.read_text().strip()
        finally:
            temp.unlink()
        return chosen

    @property
    def workspaces_dir(self) -> Path:
        """The local runtime's per-session roots and pid files."""
        return self.data_dir / "workspaces"


def _has_sessions(state_db: Path) -> bool:
    """Whether the state database at `state_db` exists and holds session records."""
    if not state_db.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)) as db:
            return bool(db.execute("SELECT EXISTS (SELECT 1 FROM sessions)").fetchone()[0])
    except sqlite3.Error:  # not (yet) a state database
        return False
