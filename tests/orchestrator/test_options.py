"""`python -m orchestrator`'s options (the flags the README names): each lands in its OrchestratorConfig field."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.__main__ import parse_args
from orchestrator.config import WARM_POOL_DEFAULT, OrchestratorConfig

FLAGS = [
    (["--listen", "127.0.0.1:6000"], "listen", "127.0.0.1:6000"),
    (["--templates-dir", "mine"], "templates_dir", Path("mine")),
    (["--runtime", "local"], "runtime", "local"),
    (["--host-address", "127.0.0.2"], "host_address", "127.0.0.2"),
    (["--image", "workspace-core:test"], "image", "workspace-core:test"),
    (["--extra-ca-bundle", "ca.pem"], "extra_ca_bundle", Path("ca.pem")),
    (["--instance-id", "blue"], "instance_id", "blue"),
    (["--max-sessions", "3"], "max_sessions", 3),
    (["--warm-pool", "3"], "warm_pool", 3),
    (["--idle-ttl", "5"], "idle_ttl_s", 5.0),
    (["--max-lifetime", "7.5"], "max_lifetime_s", 7.5),
    (["--reap-interval", "2"], "reap_interval_s", 2.0),
    (["--save-before-reap"], "save_before_reap", True),
    (["--install-timeout", "9"], "install_timeout_s", 9.0),
    (["--max-archive-bytes", "11"], "max_archive_bytes", 11),
    (["--no-install-cache"], "install_cache", False),
    (["--max-install-cache-bytes", "12"], "max_install_cache_bytes", 12),
]


@pytest.mark.parametrize(("argv", "field", "value"), FLAGS, ids=[argv[0] for argv, _, _ in FLAGS])
def test_each_flag_sets_its_field(argv: list[str], field: str, value: object) -> None:
    config, demo = parse_args(argv)

    assert getattr(config, field) == value and demo == ""
    assert getattr(config, field) != getattr(OrchestratorConfig(), field)


def test_without_flags_the_defaults_are_the_configurations() -> None:
    config, _ = parse_args([])

    # But the warm pool: the configuration's default is off (embedders, tests), the command line's is on.
    assert config == OrchestratorConfig(data_dir=Path.cwd() / ".data", warm_pool=WARM_POOL_DEFAULT)
    assert parse_args(["--warm-pool", "0"])[0].warm_pool == 0


def test_a_demo_is_not_reaped_unless_told() -> None:
    assert parse_args(["--demo", "node-basic"])[0].idle_ttl_s == 0.0
    assert parse_args(["--demo", "node-basic", "--idle-ttl", "60"])[0].idle_ttl_s == 60.0
