"""The template catalog: folders under templates/ with a template.json checked against
templates/template.schema.json, and their byte-for-byte reproducible tar.gz archives, cached by content hash."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from jsonschema import Draft202012Validator
from pathspec import GitIgnoreSpec

from common.constants import DEFAULT_EXCLUDES, DEV_PORT
from common.durable import write_atomically
from common.tarball import TarGzWriter
from orchestrator.errors import InvalidArgument, InvalidTemplate, TemplateNotFound

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "templates" / "template.schema.json"
METADATA_FILE = "template.json"
# Never part of a template archive or a saved workspace (as directories): the install step recreates them.
ALWAYS_EXCLUDED = tuple(f"{name}/" for name in DEFAULT_EXCLUDES)
DEFAULT_INSTALL_COMMAND = "npm install"
# install_on_cache_hit: run the install over the restored node_modules (it verifies them), or skip it on an
# exact hit.
VERIFY, SKIP = "verify", "skip"
# Every member gets this mtime (2000-01-01T00:00:00Z) so an archive depends on content only; a fixed date
# rather than 0 because some tools treat the epoch as "unset".
ARCHIVE_MTIME = 946_684_800
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class ResourceHints:
    """What a workspace needs; the runtime turns these into container limits."""

    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 512


@dataclass(frozen=True)
class TemplateSpec:
    """One template folder as read from its template.json; `valid` False means `invalid_reason` says why."""

    name: str
    valid: bool
    invalid_reason: str = ""
    title: str = ""
    description: str = ""
    install_command: str = ""  # "" = no install step
    # VERIFY or SKIP: whether the install still runs on an exact install-cache hit.
    install_on_cache_hit: str = VERIFY
    dev_command: str = ""
    # The dev server applies edits of the files by itself (a file watcher, HMR): a hot entry brought up to an
    # edit keeps it running rather than restarting it.
    dev_server_reloads: bool = False
    dev_port: int = DEV_PORT
    readiness_path: str = "/"
    readiness_timeout_s: float = 120.0
    env: dict[str, str] = field(default_factory=dict)
    # gitignore-style; SaveSession leaves these out in addition to node_modules.
    archive_excludes: tuple[str, ...] = ()
    # template.json is the orchestrator's metadata, left out of the archive (and /app) unless the author opts in.
    archive_template_json: bool = False
    resources: ResourceHints = ResourceHints()
    # Workspaces kept READY for new sessions of this template (the orchestrator's --hot-pool overrides it).
    hot_pool: int = 0


@dataclass(frozen=True)
class TemplateArchive:
    """A built template archive: a file in the cache directory that readers stream in chunks."""

    name: str
    sha256: str  # of the archive bytes
    size: int
    files: int  # regular files
    path: Path

    async def chunks(self, chunk_size: int = 1024 * 1024) -> AsyncIterator[bytes]:
        """The archive's bytes, read off the event loop."""
        with open(self.path, "rb") as file:
            while chunk := await asyncio.to_thread(file.read, chunk_size):
                yield chunk


@dataclass(frozen=True)
class PinnedTemplate:
    """A template at one content hash: what a hot pool entry was made from, and what a session claiming one
    must ask for (TemplateCatalog.pinned)."""

    spec: TemplateSpec
    archive: TemplateArchive
    content_hash: str  # hex sha256 of the metadata and the archive


@dataclass(frozen=True)
class _Member:
    path: str  # relative, POSIX separators
    is_dir: bool
    mode: int  # normalized: 0o755 for directories and executables, 0o644 otherwise
    data: bytes


class TemplateCatalog:
    """The templates under one folder. Reads the folder on every call, so new and edited templates need no restart."""

    def __init__(self, directory: Path, cache_dir: Path) -> None:
        self._directory = directory
        self._cache_dir = cache_dir
        schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
        Draft202012Validator.check_schema(schema)
        self._validator = Draft202012Validator(schema)
        # Content hash -> archive built by this process; files built by an earlier one are found on disk.
        self._built: dict[str, TemplateArchive] = {}
        self._build_locks: dict[str, asyncio.Lock] = {}

    def list(self) -> list[TemplateSpec]:
        """Every template folder, valid or not, sorted by name (hidden folders are skipped)."""
        if not self._directory.is_dir():
            return []
        folders = (p for p in self._directory.iterdir() if p.is_dir() and not p.name.startswith("."))
        return [self._load(folder) for folder in sorted(folders, key=lambda p: p.name)]

    async def listing(self) -> builtins.list[tuple[TemplateSpec, TemplateArchive | None]]:
        """list() with each valid template's archive. A template that changed into an invalid one between the
        check and the build is listed as invalid with the reason."""
        listed: list[tuple[TemplateSpec, TemplateArchive | None]] = []
        for spec in await asyncio.to_thread(self.list):
            if not spec.valid:
                listed.append((spec, None))
                continue
            try:
                listed.append((spec, await self.archive(spec.name)))
            except InvalidTemplate as error:
                listed.append((replace(spec, valid=False, invalid_reason=str(error)), None))
        return listed

    def get(self, name: str) -> TemplateSpec:
        """The valid template `name`, judged exactly as list() judges it (template.json and the files). Raises
        InvalidArgument (not a template name), TemplateNotFound, InvalidTemplate (with the reason)."""
        spec = self._load(self._folder(name))
        if not spec.valid:
            raise InvalidTemplate(f"template {name!r} is invalid: {spec.invalid_reason}")
        return spec

    async def archive(self, name: str) -> TemplateArchive:
        """The template's reproducible tar.gz, built off the event loop unless an identical one is cached.
        Raises as get(), and InvalidTemplate when the folder holds a symlink or special file."""
        members = await asyncio.to_thread(self._members, name)
        key = _content_hash(members)
        # Concurrent requests for the same content wait for one build instead of each writing the file.
        async with self._build_locks.setdefault(key, asyncio.Lock()):
            cached = self._built.get(key)
            if cached is None or not cached.path.exists():
                cached = await asyncio.to_thread(self._build, name, key, members)
                self._built[key] = cached
            return cached

    async def pinned(self, name: str) -> PinnedTemplate:
        """The template as it is now: its metadata, its archive and a hash of both (any edit of template.json or
        of a file changes it). Cheap when the archive is cached: the files are read and hashed, not packed.
        Raises as archive()."""
        spec = await asyncio.to_thread(self.get, name)
        built = await self.archive(name)
        digest = hashlib.sha256(f"{replace(spec, hot_pool=0)!r}\0{built.sha256}".encode()).hexdigest()
        return PinnedTemplate(spec, built, digest)

    def _members(self, name: str) -> builtins.list[_Member]:
        spec = self.get(name)
        try:
            return _read_members(self._folder(name), spec.archive_excludes, with_metadata=spec.archive_template_json)
        except InvalidTemplate as error:  # changed since get() judged it
            raise InvalidTemplate(f"template {name!r} is invalid: {error}") from error

    def _folder(self, name: str) -> Path:
        if not _NAME.match(name):
            raise InvalidArgument(
                f"{name!r} is not a template name (lowercase letters, digits and '-', at most 63 characters)"
            )
        folder = self._directory / name
        if not folder.is_dir():
            raise TemplateNotFound(f"no template {name!r} in {self._directory}")
        return folder

    def _load(self, folder: Path) -> TemplateSpec:
        """The one validity check, used by list() and get() alike: template.json against the schema, then
        the files (plain files and directories only), so CreateSession refuses what ListTemplates reports."""
        spec = self._load_metadata(folder)
        if not spec.valid:
            return spec
        try:
            _walk(folder, spec.archive_excludes)
        except InvalidTemplate as error:
            return replace(spec, valid=False, invalid_reason=str(error))
        return spec

    def _load_metadata(self, folder: Path) -> TemplateSpec:
        name = folder.name
        try:
            document = json.loads((folder / METADATA_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return TemplateSpec(name, False, f"{METADATA_FILE} is missing")
        except UnicodeDecodeError as error:
            return TemplateSpec(name, False, f"{METADATA_FILE} is not UTF-8: {error.reason}")
        except json.JSONDecodeError as error:
            where = f"line {error.lineno}, column {error.colno}"
            return TemplateSpec(name, False, f"{METADATA_FILE} is not valid JSON: {error.msg} ({where})")
        problems = schema_errors(self._validator, document)
        if not problems and document["name"] != name:
            problems = [f"$.name: {document['name']!r} does not match the folder name {name!r}"]
        if problems:
            return TemplateSpec(name, False, f"{METADATA_FILE}: " + "; ".join(problems))
        readiness = document.get("readiness", {})
        resources = document.get("resources", {})
        return TemplateSpec(
            name=name,
            valid=True,
            title=document["title"],
            description=document.get("description", ""),
            install_command=document.get("install_command", DEFAULT_INSTALL_COMMAND),
            install_on_cache_hit=document.get("install_on_cache_hit", VERIFY),
            dev_command=document["dev_command"],
            dev_server_reloads=document.get("dev_server_reloads", False),
            dev_port=document.get("dev_port", DEV_PORT),
            readiness_path=readiness.get("path", "/"),
            readiness_timeout_s=float(readiness.get("timeout_seconds", 120)),
            env=dict(document.get("env", {})),
            archive_excludes=tuple(document.get("archive_excludes", ())),
            archive_template_json=document.get("archive_template_json", False),
            hot_pool=document.get("hot_pool", 0),
            resources=ResourceHints(
                memory_mb=resources.get("memory_mb", 1024),
                cpus=float(resources.get("cpus", 1.0)),
                pids=resources.get("pids", 512),
            ),
        )

    def _build(self, name: str, key: str, members: builtins.list[_Member]) -> TemplateArchive:
        path = self._cache_dir / f"{name}-{key[:32]}.tar.gz"
        files = sum(1 for m in members if not m.is_dir)
        if path.exists():  # built by an earlier run of the orchestrator
            data = path.read_bytes()
        else:
            data = _tar_gz(members)
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed, so a reader never sees a partial archive.
            write_atomically(path, data)
        return TemplateArchive(name, hashlib.sha256(data).hexdigest(), len(data), files, path)


def schema_errors(validator: Draft202012Validator, document: object) -> list[str]:
    """Every violation as `<JSON path>: <message>`, in document order."""
    errors = sorted(validator.iter_errors(document), key=lambda e: (e.json_path, e.message))
    return [f"{error.json_path}: {error.message}" for error in errors]


def _read_members(folder: Path, excludes: tuple[str, ...], *, with_metadata: bool = False) -> list[_Member]:
    """The folder's directories and files with their content, sorted, without node_modules, the template's
    exclusions, and template.json unless `with_metadata` (then it is kept whatever the exclusions say).
    Raises InvalidTemplate as _walk()."""
    members = []
    for relative, path, info in _walk(folder, excludes, with_metadata=with_metadata):
        if stat.S_ISDIR(info.st_mode):
            members.append(_Member(relative, True, 0o755, b""))
        else:
            mode = 0o755 if info.st_mode & 0o111 else 0o644
            members.append(_Member(relative, False, mode, path.read_bytes()))
    # Sorting by path components keeps a directory's members right after it.
    members.sort(key=lambda m: m.path.split("/"))
    return members


def _walk(
    folder: Path, excludes: tuple[str, ...], *, with_metadata: bool = False
) -> list[tuple[str, Path, os.stat_result]]:
    """Every directory and file a template's archive would hold (relative path, path, lstat), without
    node_modules and the template's exclusions. Raises InvalidTemplate naming the first member that is not a
    plain directory or regular file (a symlink, FIFO, socket or device)."""
    ignored = GitIgnoreSpec.from_lines([*ALWAYS_EXCLUDED, *excludes])
    found: list[tuple[str, Path, os.stat_result]] = []
    for directory, subdirectories, filenames in os.walk(folder):
        base = Path(directory).relative_to(folder)
        kept = []
        for sub in subdirectories:
            relative = (base / sub).as_posix()
            if ignored.match_file(relative + "/"):
                continue
            path = Path(directory) / sub
            if path.is_symlink():
                raise InvalidTemplate(f"{relative} is a symlink; templates hold plain files")
            kept.append(sub)
            found.append((relative, path, os.lstat(path)))
        subdirectories[:] = kept
        for filename in filenames:
            relative = (base / filename).as_posix()
            if relative == METADATA_FILE:
                if not with_metadata:
                    continue
            elif ignored.match_file(relative):
                continue
            path = Path(directory) / filename
            info = os.lstat(path)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidTemplate(f"{relative} is not a regular file; templates hold plain files")
            found.append((relative, path, info))
    return found


def _content_hash(members: list[_Member]) -> str:
    """sha256 over each member's path, kind, normalized mode and content: equal for equal templates."""
    digest = hashlib.sha256()
    for member in members:
        header = f"{'d' if member.is_dir else 'f'} {member.mode:o} {len(member.data)} {member.path}\0"
        digest.update(header.encode())
        digest.update(member.data)
    return digest.hexdigest()


def _tar_gz(members: list[_Member]) -> bytes:
    """The archive bytes: members in the given order, a fixed mtime, written reproducibly (common.tarball)."""
    buffer = io.BytesIO()
    with TarGzWriter(buffer) as tar:
        for member in members:
            if member.is_dir:
                tar.add_directory(member.path, member.mode, ARCHIVE_MTIME)
            else:
                tar.add_file(member.path, member.mode, ARCHIVE_MTIME, len(member.data), io.BytesIO(member.data))
    return buffer.getvalue()
