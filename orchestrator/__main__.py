"""`python -m orchestrator`: serve the workspace orchestrator (workspace.orchestrator.v1)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import typing
from collections.abc import Callable

from common import telemetry
from common.startup import EXIT_STARTUP, StartupError
from orchestrator.config import OPTION, WARM_POOL_DEFAULT, OrchestratorConfig
from orchestrator.errors import OrchestratorError
from orchestrator.server import serve


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """An option for every OrchestratorConfig field that declares one (config.option): its flag, type, default
    and help come from the field, so the command line cannot drift from the configuration."""
    hints = typing.get_type_hints(OrchestratorConfig)
    for spec in dataclasses.fields(OrchestratorConfig):
        declared = spec.metadata.get(OPTION)
        if declared is None:
            continue
        flag = "--" + spec.name.removesuffix("_s").replace("_", "-")
        kind = next((t for t in typing.get_args(hints[spec.name]) if t is not type(None)), hints[spec.name])
        help_text = declared.help.format(default=spec.default) or None
        if declared.each is not None:
            parser.add_argument(
                flag, dest=spec.name, metavar=declared.metavar, type=_said(declared.each), action="append",
                help=help_text,
            )  # fmt: skip
            continue
        if kind is bool:
            if spec.default:
                flag = "--no-" + flag.removeprefix("--")
            action = "store_false" if spec.default else "store_true"
            parser.add_argument(flag, dest=spec.name, action=action, help=help_text)
            continue
        # The metavar argparse would derive from the flag (not from the field's name), or the choices.
        metavar = None if declared.choices else flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(
            flag, dest=spec.name, metavar=metavar, type=kind,
            choices=declared.choices, default=spec.default, help=help_text,
        )  # fmt: skip


def _said(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` with its ValueError's message shown by argparse (it shows only the function's name otherwise)."""

    def parsed(text: str) -> object:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    return parsed


def parse_args(argv: list[str] | None = None) -> tuple[OrchestratorConfig, str]:
    """The configuration, and the template of the demo session ("" without --demo)."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator", description=__doc__)
    add_config_options(parser)
    # Told apart from an explicit value: a demo's default is no reaping behind the watching person's back.
    parser.set_defaults(idle_ttl_s=None)
    # The command line's user expects the fast path (see OrchestratorConfig.warm_pool).
    parser.set_defaults(warm_pool=WARM_POOL_DEFAULT)
    parser.add_argument("--log-level", help="default $WORKSPACE_LOG_LEVEL, else INFO (WARNING with --demo)")
    parser.add_argument(
        "--demo", metavar="TEMPLATE", default="",
        help="also create a session from TEMPLATE, print its preview URL, and delete it on exit",
    )  # fmt: skip
    args = vars(parser.parse_args(argv))
    demo, log_level = args.pop("demo"), args.pop("log_level")
    # A demo is watched by a person: its progress lines, not the JSON log.
    telemetry.configure_logging(log_level or os.environ.get("WORKSPACE_LOG_LEVEL") or ("WARNING" if demo else "INFO"))
    if args["idle_ttl_s"] is None:
        args["idle_ttl_s"] = 0.0 if demo else OrchestratorConfig.idle_ttl_s
    for spec in dataclasses.fields(OrchestratorConfig):
        if (declared := spec.metadata.get(OPTION)) is not None and declared.each is not None:
            default = spec.default if isinstance(spec.default, tuple) else ()
            args[spec.name] = tuple(args[spec.name] or default)
    # Absolute: paths below it are handed to Docker as bind mounts (the trust bundle), which must be.
    args["data_dir"] = args["data_dir"].absolute()
    return OrchestratorConfig(**args), demo


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
