"""`python -m orchestrator`: serve the workspace orchestrator (workspace.orchestrator.v1)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from agent import telemetry
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import OrchestratorError
from orchestrator.server import serve


def parse_args(argv: list[str] | None = None) -> OrchestratorConfig:
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
    parser.add_argument("--instance-id", default=d.instance_id, help="label separating orchestrators on one engine")
    parser.add_argument("--max-sessions", type=int, default=d.max_sessions)
    parser.add_argument("--idle-ttl", type=float, default=d.idle_ttl_s, help="seconds idle before a session is stopped (0: never)")
    parser.add_argument("--max-lifetime", type=float, default=d.max_lifetime_s, help="seconds a session may live (0: no limit)")
    parser.add_argument("--reap-interval", type=float, default=d.reap_interval_s, help="seconds between reaper sweeps")
    parser.add_argument("--save-before-reap", action="store_true", help="save a session's workspace before reaping it")
    parser.add_argument("--install-timeout", type=float, default=d.install_timeout_s)
    parser.add_argument("--max-archive-bytes", type=int, default=d.max_archive_bytes)
    parser.add_argument("--log-level", default=os.environ.get("WORKSPACE_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    telemetry.configure_logging(args.log_level)
    return OrchestratorConfig(
        listen=args.listen,
        data_dir=args.data_dir,
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
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    telemetry.configure_from_env()
    try:
        asyncio.run(serve(config))
    except OrchestratorError as error:
        # E.g. the engine is unreachable at start-up: the message says what to do.
        print(f"orchestrator: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
