"""Builds the orchestrator's gRPC server (OrchestratorService, health, reflection) and runs it until SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import signal
import socket
from dataclasses import dataclass

import sqlalchemy
from grpc import aio

from common import telemetry
from common.interceptors import ErrorMappingInterceptor
from common.serving import add_health_and_reflection, bind, new_server
from common.startup import StartupError, check_bindable, unbindable, writable_directory
from orchestrator import demo
from orchestrator.archives import ArchiveStore
from orchestrator.blobs import S3Blobs, open_blobs
from orchestrator.config import OrchestratorConfig
from orchestrator.errors import STATUS_CODES, OrchestratorError
from orchestrator.gateway import PreviewAccess, PreviewGateway, PreviewSigner, load_signing_key
from orchestrator.pool import pool_size_problem
from orchestrator.runtime import Runtime, make_runtime
from orchestrator.service import OrchestratorServicer
from orchestrator.sessions import SessionManager, SessionReaper
from orchestrator.store import Store
from orchestrator.templates import TemplateCatalog
from workspace.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
# One 1 MiB archive chunk plus framing, in both directions.


@dataclass
class Orchestrator:
    """A built orchestrator: the server (not started yet) and what it runs on, for `serve` and tests."""

    server: aio.Server
    port: int
    sessions: SessionManager
    reaper: SessionReaper
    runtime: Runtime
    store: Store
    # The preview gateway, when --preview-address asks for one.
    gateway: PreviewGateway | None = None
    _reaping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reconciles the records with the runtime, then serves (gRPC and the gateway) and starts the reaper."""
        await self.sessions.reconcile()
        await self.server.start()
        if self.gateway is not None:
            await self.gateway.start()
        self._reaping = asyncio.create_task(self.reaper.run(), name="session reaper")
        self.sessions.cluster.start()

    async def stop(self, grace: float | None) -> None:
        """Stops serving. Sessions keep running: the next start adopts them."""
        if self._reaping is not None:
            self._reaping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaping
        if self.gateway is not None:
            await self.gateway.close()
        await self.server.stop(grace)
        await self.sessions.close()
        await self.runtime.close()
        self.store.close()


async def create_server(config: OrchestratorConfig) -> Orchestrator:
    """The orchestrator bound to `config.listen`, not yet started. Raises StartupError when the address
    cannot be bound, the data directory is not writable or the templates folder is missing, InvalidArgument
    for an unknown runtime or unreadable CA bundle."""
    if problem := pool_size_problem(config.warm_pool, config.max_sessions, dict(config.hot_pool)):
        raise StartupError(problem)
    writable_directory(config.data_dir, "the data directory", "--data-dir")
    if not config.templates_dir.is_dir():
        raise StartupError(
            f"the templates folder {config.templates_dir} is not a directory: pick one with --templates-dir"
        )
    store = open_store(config)
    if store.shared and not config.instance_id:
        # The replicas of one database are one instance: they share its workspaces and keep apart from others'.
        config = dataclasses.replace(config, instance_id=await store.instance_id(f"orch-{secrets.token_hex(6)}"))
    try:
        blobs = open_blobs(config.archive_store, "archives", config.archives_dir)
        if isinstance(blobs, S3Blobs):
            blobs.check()
    except OrchestratorError as error:
        raise StartupError(f"--archive-store {config.archive_store}: {error}") from error
    archives = ArchiveStore(blobs, store, config.max_archive_bytes)
    catalog = TemplateCatalog(config.templates_dir, config.template_cache_dir)
    for template, _ in config.hot_pool:
        try:
            catalog.get(template)
        except OrchestratorError as error:
            raise StartupError(f"--hot-pool {template}: {error}") from error
    runtime = make_runtime(config.runtime, config)
    sessions = SessionManager(config, store, archives, catalog, runtime)
    try:
        signer = PreviewSigner(load_signing_key(config.preview_signing_key))
    except (OSError, ValueError) as error:
        raise StartupError(f"preview signing key: {error} (--preview-signing-key-file)") from error
    gateway = (
        PreviewGateway(
            sessions, signer, config.preview_address, config.preview_domain,
            config.preview_tls_cert, config.preview_tls_key,
        )
        if config.preview_address
        else None
    )  # fmt: skip
    try:
        # Tracing first (empty while off), so its span sees the mapped status.
        server = new_server([*telemetry.server_interceptors(), ErrorMappingInterceptor(STATUS_CODES)])
        previews = PreviewAccess(sessions, signer, gateway.address if gateway is not None else None)
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(
            OrchestratorServicer(sessions, archives, catalog, previews), server
        )
        await add_health_and_reflection(server, SERVICE_NAME)
        check_bindable(config.listen)
        try:
            port = bind(server, config.listen)
        except RuntimeError as error:
            raise unbindable(config.listen) from error
        sessions.cluster.address = config.advertise_address or advertised(config.listen, port)
    except BaseException:
        if gateway is not None:
            await gateway.close()
        raise
    reaper = SessionReaper(sessions, config.reap_interval_s)
    return Orchestrator(server, port, sessions, reaper, runtime, store, gateway)


def open_store(config: OrchestratorConfig) -> Store:
    """The state database, its schema brought up to date. Raises StartupError when it cannot be opened."""
    try:
        return Store(config.database or config.state_db, lease_ttl_s=config.lease_ttl_s)
    except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as error:
        # Shown without its password; the driver's reason on one line.
        where = sqlalchemy.engine.make_url(config.database).render_as_string() if config.database else config.state_db
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        raise StartupError(f"the state database {where} cannot be used: {reason}") from error


def advertised(listen: str, port: int) -> str:
    """Where other replicas reach one listening on `listen` (bound to `port`): its host, or this machine's name
    when it listens on every address."""
    if listen.startswith("unix:"):
        return listen
    host = listen.rpartition(":")[0]
    if host in ("", "0.0.0.0", "[::]"):
        host = socket.gethostname()
    return f"{host}:{port}"


async def serve(config: OrchestratorConfig, grace: float = 5.0, *, demo_template: str = "") -> None:
    """Runs the orchestrator until SIGTERM or SIGINT, then stops serving within `grace` seconds;
    sessions keep running. With `demo_template`, a demo session from it lives as long as the server
    (see orchestrator.demo)."""
    orchestrator = await create_server(config)
    await orchestrator.start()
    log.info("orchestrator serving on %s (runtime %s, data %s)", config.listen, config.runtime, config.data_dir)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if demo_template:
            tcp = not config.listen.startswith("unix:")
            address = f"{config.listen.rpartition(':')[0]}:{orchestrator.port}" if tcp else config.listen
            await demo.run(orchestrator.sessions, demo_template, address, stop)
        else:
            await stop.wait()
    finally:
        log.info("orchestrator stopping; sessions keep running")
        await orchestrator.stop(grace)
