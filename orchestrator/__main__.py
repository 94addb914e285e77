"""`python -m orchestrator`: serve the workspace orchestrator (workspace.orchestrator.v1)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from common import telemetry
from common.startup import EXIT_STARTUP, StartupError
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import OrchestratorError
from orchestrator.server import serve


def parse_args(argv: list[str] | None = None) -> tuple[OrchestratorConfig, str]:
    """The configuration, and the template of the demo session ("" without --demo)."""
    d = OrchestratorConfig()
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    parser.add_argument("--listen", default=d.listen, help="HOST:PORT or unix:PATH (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=d.data_dir, help="state, archives, caches (default %(default)s)")
    parser.add_argument("--templates-dir", type=Path, default=d.templates_dir, help="template folders (default: the repo's)")
    parser.add_argument(
        "--runtime", choices=("docker", "local"), default=d.runtime,
        help="docker: containers from the core image; local: agent subprocesses, NO isolation (default %(default)s)",
    )  # fmt: skip
    parser.add_argument("--host-address", default=d.host_address, help="loopback address ports are published on")
    parser.add_argument("--image", default=d.image, help="the core image (default %(default)s)")
    parser.add_argument("--extra-ca-bundle", type=Path, help="PEM file workspaces trust in addition to the public roots")
    parser.add_argument(
        "--instance-id", default=d.instance_id,
        help="label separating orchestrators on one engine (default: an id kept in the data dir, unique to it)",
    )  # fmt: skip
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions)
    parser.add_argument(
        "--idle-ttl", type=float,
        help=f"seconds idle before a session is stopped (0: never; default {d.idle_ttl_s:g}, with --demo 0)",
    )  # fmt: skip
    parser.add_argument("--max-lifetime", type=float, default=d.max_lifetime_s, help="seconds a session may live (0: no limit)")
    parser.add_argument("--reap-interval", type=float, default=d.reap_interval_s, help="seconds between reaper sweeps")
    parser.add_argument("--save-before-reap", action="store_true", help="save a session's workspace before reaping it")
    parser.add_argument("--install-timeout", type=float, default=d.install_timeout_s)
    parser.add_argument("--max-archive-bytes", type=int, default=d.max_archive_bytes)
    parser.add_argument(
        "--no-install-cache", dest="install_cache", action="store_false",
        help="run every install from scratch instead of starting from a cached node_modules",
    )  # fmt: skip
    parser.add_argument("--max-install-cache-bytes", type=int, default=d.max_install_cache_bytes)
    parser.add_argument("--log-level", help="default $WORKSPACE_LOG_LEVEL, else INFO (WARNING with --demo)")
    parser.add_argument(
        "--demo", metavar="TEMPLATE", default="",
        help="also create a session from TEMPLATE, print its preview URL, and delete it on exit",
    )  # fmt: skip
    args = parser.parse_args(argv)
    # A demo is watched by a person: its progress lines, not the JSON log, and no reaping behind their back.
    log_level = args.log_level or os.environ.get("WORKSPACE_LOG_LEVEL") or ("WARNING" if args.demo else "INFO")
    telemetry.configure_logging(log_level)
    if args.idle_ttl is None:
        args.idle_ttl = 0.0 if args.demo else d.idle_ttl_s
    config = OrchestratorConfig(
        listen=args.listen,
        # Absolute: paths below it are handed to Docker as bind mounts (the trust bundle), which must be.
        data_dir=args.data_dir.absolute(),
        templates_dir=args.templates_dir,
        runtime=args.runtime,
        host_address=args.host_address,
        image=args.image,
        extra_ca_bundle=args.extra_ca_bundle,
        instance_id=args.instance_id,
        max_sessions=args.max_sessions,
        idle_ttl_s=args.idle_ttl,
        max_lifetime_s=args.max_lifetime,
        reap_interval_s=args.reap_interval,
        save_before_reap=args.save_before_reap,
        install_timeout_s=args.install_timeout,
        max_archive_bytes=args.max_archive_bytes,
        install_cache=args.install_cache,
        max_install_cache_bytes=args.max_install_cache_bytes,
    )
    return config, args.demo


def main(argv: list[str] | None = None) -> int:
    config, demo_template = parse_args(argv)
    telemetry.configure_from_env()
    try:
        asyncio.run(serve(config, demo_template=demo_template))
    except StartupError as error:
        print(f"orchestrator: {error}", file=sys.stderr)
        return EXIT_STARTUP
    except OrchestratorError as error:
        # E.g. the engine is unreachable at start-up: the message says what to do.
        print(f"orchestrator: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
