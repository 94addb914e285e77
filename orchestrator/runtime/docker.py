"""The Docker runtime: one locked-down container per workspace, from the core image. The one module that uses
the Docker SDK: blocking calls run in threads, every container is labelled, SDK errors become domain errors."""

from __future__ import annotations

import asyncio
import builtins
import io
import logging
import signal
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import docker
import requests
from docker.errors import APIError, ContainerError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.models.networks import Network
from docker.types import CancellableStream, Mount

from common.constants import AGENT_PORT, DEV_PORT
from orchestrator.errors import EngineUnavailable, FailedPrecondition, ImageMissing, WorkspaceMissing
from orchestrator.runtime.base import (
    MANAGED_LABEL,
    ORCHESTRATOR_LABEL,
    POOL_LABEL,
    SESSION_LABEL,
    Workspace,
    WorkspaceExit,
    check_session_id,
    pool_labels,
    trust_env,
    workspace_agent_env,
    workspace_labels,
)
from orchestrator.templates import ResourceHints

T = TypeVar("T")

log = logging.getLogger(__name__)

# Where the trust bundle (public roots + the extra CA) appears inside the container.
CONTAINER_CA_BUNDLE = "/etc/workspace/extra-ca.pem"
# The workspace user of the core image.
WORKSPACE_USER = "1000:1000"
WORKSPACE_UID = 1000
# Where the agent's token is written into the created container, before it starts: a directory of the image
# that only the workspace user can enter; the agent reads and removes the file before any workspace code runs.
TOKEN_DIR = "/run/workspace-agent"
TOKEN_PATH = f"{TOKEN_DIR}/token"
BUILD_COMMAND = "python -m core_image.build"
# The root filesystem is read-only; these are the workspace's writable places. Volumes (removed with the
# container) for what may grow large, where a tmpfs would count against the memory limit: the code (/app),
# the home directory (npm's cache, git's config), the token's directory (written before the start, where a
# tmpfs does not exist yet); each starts as a copy of the image's directory (owner, mode). Scratch space
# (/tmp, /var/tmp) is tmpfs.
WRITABLE_VOLUMES = ("/app", "/home/workspace", TOKEN_DIR)
TMPFS = {"/tmp": "rw,nosuid,nodev,exec,mode=1777,size=512m", "/var/tmp": "rw,nosuid,nodev,exec,mode=1777,size=64m"}
# Workspaces of one orchestrator instance share a bridge network with inter-container traffic off (the engine
# drops packets between its containers): they reach the outside (package registries) through NAT, and the host
# through published ports' replies only (see _shut_off_host).
NETWORK_ICC_OPTION = "com.docker.network.bridge.enable_icc"
# Seconds the SDK waits for one engine API call (container creation can take a few seconds on a busy host).
API_TIMEOUT = 60
# `docker rm -f` is a kill (a "die" event) then a removal ("destroy"): a die is reported once no destroy
# followed within this many seconds, so a removal is told as one.
DESTROY_GRACE_S = 1.0
# An "oom" event this shortly before a "die" is what killed the container (one long before was a process
# inside that the kernel killed, which the container survived).
OOM_WINDOW_S = 10.0
# How long the ids of containers stop() removed are remembered, so their events are not taken for exits.
REMOVED_MEMORY_S = 600.0
# Seconds `docker stop` waits after SIGTERM before SIGKILL: the agent ends its commands (SIGKILL 2 s after their
# SIGTERM) and then its server (grace 5 s).
STOP_GRACE_S = 10
# A die event up to this long after pause() returned is still its own, unless a resume came first (the engine's
# clock and ours may differ a little; it sends the event once the container is down, before the call returns).
PAUSE_EVENT_SLACK_NS = 2 * 10**9
# Seconds between attempts to re-subscribe to the engine's events after losing them.
EVENTS_RETRY_S = 2.0
# Container names: a session's workspace, and a pool member until a claim renames it to its session's (the
# engine gives a name to one container only, so a member is never bound twice, even by two orchestrators).
CONTAINER_PREFIX = "workspace-core-"
POOL_PREFIX = f"{CONTAINER_PREFIX}pool-"


# Every capability goes (the workspace user needs none); the Swarm runtime drops them the same way.
CAP_DROP = ["ALL"]


@dataclass(frozen=True)
class Limits:
    """A workspace's ResourceHints as the engine's limits; one reading for containers and services."""

    memory_bytes: int  # swap is never allowed beyond it
    nano_cpus: int
    pids: int

    @classmethod
    def of(cls, resources: ResourceHints) -> Limits:
        return cls(resources.memory_mb * 1024 * 1024, int(resources.cpus * 1e9), resources.pids)

    def hints(self) -> ResourceHints:
        """The ResourceHints these limits were made of (the inverse of `of`)."""
        return ResourceHints(memory_mb=self.memory_bytes // (1024 * 1024), cpus=self.nano_cpus / 1e9, pids=self.pids)


class DockerRuntime:
    """Workspaces as containers on the Docker engine that DOCKER_HOST (or the default socket) points to."""

    name = "docker"
    token_stays_readable = False  # put in a file the agent removes once read
    # Claims of pool members in this process, one at a time (see _claim); shared by every instance.
    _claiming = threading.Lock()

    def __init__(
        self,
        *,
        image: str,
        instance_id: str,
        host_address: str = "127.0.0.1",
        trust_bundle: Path | None = None,
    ) -> None:
        self.image = image
        self.instance_id = instance_id
        self.host_address = host_address
        self.trust_bundle = trust_bundle
        # What marks this instance's containers, networks and volumes, and the filter that finds them.
        self._labels = {MANAGED_LABEL: "true", ORCHESTRATOR_LABEL: instance_id}
        self._label_filter = [f"{key}={value}" for key, value in self._labels.items()]
        # Connected on first use, so the orchestrator starts (and reports UNAVAILABLE per call) without an engine.
        self._client: docker.DockerClient | None = None
        self._connect_lock = threading.Lock()
        # Containers stop() (or a failed start) removed lately, and when: their die and destroy events are not
        # exits. Kept for a while rather than until their destroy event, so every exits() iterator skips them.
        self._removed: dict[str, float] = {}
        self._removed_lock = threading.Lock()  # removals run in several threads at once
        # Containers pause() stopped, with the window (ns) their die events are the pause's and no exit: from the
        # stop's start to a little after its end (None while it runs), closed by a resume. By time rather than by
        # id alone: the same container dies for real after a resume. Guarded by _removed_lock.
        self._paused: dict[str, tuple[int, int | None]] = {}
        # The workspace network once it exists and is shut off from the host (per process: rules are re-checked).
        self._network: Network | None = None
        self._network_lock = threading.Lock()

    @property
    def network_name(self) -> str:
        return f"workspace-core-{self.instance_id}"

    # ------------------------------------------------------------------ Runtime

    async def start(
        self, session_id: str, token: str, *, resources: ResourceHints, env: dict[str, str], labels: dict[str, str]
    ) -> Workspace:
        """Creates and starts the session's container; does not wait for its agent. Raises EngineUnavailable,
        ImageMissing, FailedPrecondition (the engine refused, e.g. the session's container exists),
        InvalidArgument (bad session id)."""
        check_session_id(session_id)
        environment = {**workspace_agent_env(session_id), **env}
        name, all_labels = f"{CONTAINER_PREFIX}{session_id}", workspace_labels(self.instance_id, session_id, labels)
        return await self._call(
            "start the workspace container", self._start, name, all_labels, token, resources, environment
        )

    async def start_pooled(
        self,
        pool_id: str,
        credential: str,
        *,
        kind: str = "warm",
        labels: dict[str, str] | None = None,
        resources: ResourceHints | None = None,
    ) -> Workspace:
        """Creates and starts a pool member `workspace-core-pool-<pool_id>` with `resources` (the defaults when
        None; a claim applies the session's); does not wait for its agent. Raises EngineUnavailable, ImageMissing,
        FailedPrecondition (the engine refused), InvalidArgument (bad pool id)."""
        check_session_id(pool_id)
        environment = workspace_agent_env(f"pool-{pool_id}")
        return await self._call(
            "start a pool container", self._start, f"{POOL_PREFIX}{pool_id}", pool_labels(self.instance_id, kind, labels),
            credential, resources or ResourceHints(), environment,
        )  # fmt: skip

    async def image_id(self) -> str:
        """The id of the image `image` names now (a rebuild moves the tag to a new id). Raises EngineUnavailable,
        ImageMissing."""
        return await self._call("look up the core image", self._image_id)

    def _image_id(self) -> str:
        image_id = self._docker().images.get(self.image).id
        if image_id is None:
            raise EngineUnavailable(f"the Docker engine gave no id for the image {self.image}")
        return image_id

    async def claim(self, workspace: Workspace, session_id: str, *, resources: ResourceHints) -> Workspace:
        """Renames the pool member to `workspace-core-<session_id>` (the engine's names are unique: of two
        claims one fails), then applies `resources` with the engine's update API. Raises FailedPrecondition
        (claimed already or gone; the limits refused, after which the container is the session's),
        EngineUnavailable, InvalidArgument (bad session id)."""
        check_session_id(session_id)
        return await self._call("claim a pool container", self._claim, workspace, session_id, resources)

    async def discard(self, pool_id: str) -> None:
        """Removes the unclaimed pool member `pool_id` (a claimed one has another name: it stays).
        Raises EngineUnavailable."""
        await self._call("remove a pool container", self._discard, pool_id)

    async def stop(self, session_id: str) -> None:
        """Removes the session's container (killing what runs in it); no container is not an error.
        Raises EngineUnavailable."""
        await self._call("remove the workspace container", self._stop, session_id)

    async def pause(self, session_id: str) -> None:
        """Stops the session's container (`docker stop`: SIGTERM to its init, which the agent passes on to its
        commands; SIGKILL after STOP_GRACE_S): no process left, memory and CPU released; its filesystem (the
        /app, home and token volumes) stays with the stopped container. Raises WorkspaceMissing,
        EngineUnavailable, FailedPrecondition."""
        await self._call("stop the workspace container", self._pause, session_id)

    async def resume(self, session_id: str, token: str, *, env: dict[str, str]) -> Workspace:
        """Writes `token` into the stopped container again (as start() does: the agent removed the file when it
        first read it) and starts it; the engine publishes its ports anew (maybe on other host ports). `env` is
        unused: the container keeps the environment it was created with. Raises WorkspaceMissing,
        EngineUnavailable, FailedPrecondition."""
        return await self._call("start the workspace container again", self._resume, session_id, token)

    async def list(self) -> list[Workspace]:
        """This instance's containers, running or not. Raises EngineUnavailable."""
        return await self._call("list workspace containers", self._list)

    async def remove_network(self) -> None:
        """Removes this instance's workspace network and its host firewall rule (for tests and uninstalling;
        the orchestrator itself keeps both). Raises EngineUnavailable, FailedPrecondition (containers use it)."""
        await self._call("remove the workspace network", self._remove_network)

    def exits(self) -> AsyncIterator[WorkspaceExit]:
        """This instance's containers that die or are removed other than through stop(), from the engine's
        events (replayed from the moment of this call, and from the last one seen after a lost connection),
        with the reason: removed outside the orchestrator, OOM-killed, or exited with code N."""
        return self._exits(time.time_ns())

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    # ------------------------------------------------------------------ blocking parts (run in threads)

    def _start(
        self, name: str, labels: dict[str, str], token: str, resources: ResourceHints, env: dict[str, str]
    ) -> Workspace:
        # The agent traces like the orchestrator (OTEL_* passed on, in `env`); the OTLP endpoint must be
        # reachable from the container: 127.0.0.1 is the container itself.
        environment = self._agent_environment(env)
        volumes = {}
        if self.trust_bundle is not None:
            volumes[str(self.trust_bundle)] = {"bind": CONTAINER_CA_BUNDLE, "mode": "ro"}
        limits = Limits.of(resources)
        network = self._workspace_network()
        # `create` never pulls (unlike `run`): a missing image is reported, not fetched from a registry.
        container = self._docker().containers.create(
            self.image,
            name=name,
            labels=labels,
            # Added to the image's entrypoint (`python -m agent --listen 0.0.0.0:3001 --root /app`).
            command=["--token-file", TOKEN_PATH],
            environment=environment,
            # Published on the host's loopback address only; docker picks free host ports, read back below.
            # (The stubs want a host port; docker-py passes None on to the engine, which then picks one.)
            ports={f"{AGENT_PORT}/tcp": (self.host_address, None), f"{DEV_PORT}/tcp": (self.host_address, None)},  # type: ignore[dict-item]
            mem_limit=limits.memory_bytes,
            memswap_limit=limits.memory_bytes,  # no swap beyond the memory limit
            nano_cpus=limits.nano_cpus,
            pids_limit=limits.pids,
            user=WORKSPACE_USER,
            cap_drop=CAP_DROP,
            security_opt=["no-new-privileges"],
            read_only=True,
            mounts=[Mount(target, None, labels=self._labels) for target in WRITABLE_VOLUMES],
            tmpfs=TMPFS,
            volumes=volumes,
            network=network.id,  # not its name: two networks may have it for a moment (see _find_network)
            detach=True,
        )
        try:
            # Not in the environment: every process in the container could read it from tini's /proc/1/environ.
            deliver_token(container, token)
            container.start()
            container.reload()
        except BaseException:
            self._network = None  # checked again next time (it may have been removed under us)
            # Never leave a created-but-dead container behind (e.g. the port could not be published).
            self._remove(container)
            raise
        return self._workspace(container)

    def _workspace_network(self) -> Network:
        """This instance's workspace network, created on first use, with the host shut off from it."""
        with self._network_lock:
            if self._network is None:
                # A missing image is ImageMissing before anything is created (the rule below needs it too).
                self._docker().images.get(self.image)
                network = self._find_network(tidy=True)
                self._remove_orphaned_volumes()  # of containers removed while no orchestrator watched
                if network is None:
                    try:
                        network = self._docker().networks.create(
                            self.network_name,
                            driver="bridge",
                            options={NETWORK_ICC_OPTION: "false"},
                            labels=self._labels,
                            check_duplicate=True,
                        )
                    except APIError as error:  # another orchestrator process of this instance was first
                        network = self._find_network()
                        if network is None:
                            raise error from None
                    # The engine's duplicate check is best effort: replicas of this instance starting at once can
                    # each create one. All settle on the same one; empty extras go.
                    network = self._find_network(tidy=True) or network
                network.reload()
                if network.attrs["Options"].get(NETWORK_ICC_OPTION) != "false":
                    raise FailedPrecondition(
                        f"the network {self.network_name} lets workspaces reach each other ({NETWORK_ICC_OPTION} is"
                        " not false): remove it (docker network rm) and the orchestrator recreates it"
                    )
                self._shut_off_host(network, "-I")
                self._network = network
            return self._network

    def _find_network(self, *, tidy: bool = False) -> Network | None:
        """This instance's workspace network: of several of its name (created at once by two processes), the one
        with the lowest id, as every process picks; with `tidy`, the others are removed unless in use (then
        their workspaces keep them, each network isolated on its own)."""
        found = self._networks()
        if tidy:
            for extra in found[1:]:
                log.warning("removing the duplicate workspace network %s (%s)", self.network_name, extra.short_id)
                with suppress(APIError):  # in use, or gone already
                    self._shut_off_host(extra, "-D")
                    extra.remove()
        return found[0] if found else None

    def _networks(self) -> builtins.list[Network]:
        filters = {"label": self._label_filter}
        # `names` matches substrings too.
        found = self._docker().networks.list(names=[self.network_name], filters=filters)
        return sorted((network for network in found if network.name == self.network_name), key=lambda n: n.id or "")

    def _shut_off_host(self, network: Network, action: str) -> None:
        """Drops (action "-I", idempotent) or stops dropping ("-D") every connection a workspace opens to the
        engine's host itself: its services listening on 0.0.0.0 answer on the network's gateway address, and the
        engine has no option against that. Replies to connections from the host (published ports) still pass.
        The rule goes in the host's INPUT chain through a one-off container on the host's network stack, from
        the core image (which has iptables): so it lands on the engine's host whatever machine and user the
        orchestrator runs as. Raises FailedPrecondition when the engine does not allow it."""
        interface = network.attrs["Options"].get("com.docker.network.bridge.name") or f"br-{network.short_id}"
        rule = f"INPUT -i {interface} -m conntrack ! --ctstate ESTABLISHED,RELATED -j DROP"
        if action == "-I":
            script = f"iptables -w -C {rule} 2>/dev/null || iptables -w -I {rule}"
        else:
            script = f"while iptables -w -C {rule} 2>/dev/null; do iptables -w -D {rule}; done"
        try:
            self._docker().containers.run(
                self.image,
                ["-c", script],
                entrypoint=["/bin/sh"],
                user="0:0",
                network_mode="host",
                cap_drop=["ALL"],
                cap_add=["NET_ADMIN", "NET_RAW"],
                security_opt=["no-new-privileges"],
                # Not MANAGED_LABEL: it is no workspace.
                labels={ORCHESTRATOR_LABEL: self.instance_id},
                remove=True,
            )
        except ContainerError as error:
            stderr = error.stderr or b""  # bytes from containers.run; the stubs allow str too
            output = (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr).strip()
            if error.exit_status == 127:  # sh: command not found
                raise FailedPrecondition(
                    f"the core image {self.image} has no iptables (an older build): rebuild it with `{BUILD_COMMAND}`"
                ) from error
            raise FailedPrecondition(
                f"could not shut the host off from the workspace network {self.network_name} ({output or error}):"
                " the Docker engine must allow a container with NET_ADMIN on the host network"
            ) from error

    def _remove_network(self) -> None:
        with self._network_lock:
            self._network = None
            for network in self._networks():
                try:
                    self._shut_off_host(network, "-D")
                finally:  # a rule left behind names an interface that is gone: it matches nothing
                    with suppress(NotFound):
                        network.remove()

    def _claim(self, workspace: Workspace, session_id: str, resources: ResourceHints) -> Workspace:
        # One engine call, two when the limits differ: on a session's path. Whether the member still runs is its
        # agent's to say (the pool checks its health as it hands it out, and the agent's Claim follows).
        name = f"{POOL_PREFIX}{workspace.pool_id}"
        with DockerRuntime._claiming:
            # Renamed by its pool name, not its id: once renamed, that name finds nothing (404), so a late claim
            # fails; the new name fails with 409 when a container has it. The engine looks the name up and renames
            # in two steps, so only the lock makes them one (in this process; another process could not claim
            # the agent anyway: its credential is in ours only).
            try:
                self._docker().api.rename(name, f"{CONTAINER_PREFIX}{session_id}")
            except NotFound as error:
                raise FailedPrecondition(f"the pool container {name} is claimed already or gone") from error
        if workspace.resources != resources:
            self._update_limits(workspace.handle, resources)
        return replace(workspace, session_id=session_id, pool_id="", resources=resources)

    def _update_limits(self, container_id: str, resources: ResourceHints) -> None:
        """Applies `resources` to a running container in place."""
        limits = Limits.of(resources)
        # docker-py's update() knows neither NanoCpus nor PidsLimit: the engine's endpoint, with the very
        # fields create sets, so a claimed container is limited exactly as a cold-started one. (APIClient's
        # request helpers are private: not in the stubs.)
        api = self._docker().api
        response = api._post_json(  # type: ignore[attr-defined]
            api._url("/containers/{0}/update", container_id),  # type: ignore[attr-defined]
            data={
                "Memory": limits.memory_bytes,
                "MemorySwap": limits.memory_bytes,
                "NanoCpus": limits.nano_cpus,
                "PidsLimit": limits.pids,
            },
        )
        api._raise_for_status(response)  # type: ignore[attr-defined]

    def _agent_environment(self, env: dict[str, str]) -> dict[str, str]:
        """A workspace's environment: `env`, the dev server's port, and the trust bundle's variables."""
        environment = {**env, "PORT": str(DEV_PORT)}
        if self.trust_bundle is not None:
            environment.update(trust_env(CONTAINER_CA_BUNDLE))
        return environment

    def _discard(self, pool_id: str) -> None:
        with suppress(NotFound):
            container = self._docker().containers.get(f"{POOL_PREFIX}{pool_id}")
            if self._ours(container) and container.labels.get(POOL_LABEL):
                self._remove(container)

    def _stop(self, session_id: str) -> None:
        for container in self._containers(f"{SESSION_LABEL}={session_id}"):
            self._remove(container)
        # A claimed pool member: its session is in its name.
        with suppress(NotFound):
            container = self._docker().containers.get(f"{CONTAINER_PREFIX}{session_id}")
            if self._ours(container) and _session_of(_name_of(container), container.labels) == session_id:
                self._remove(container)

    def _session_container(self, session_id: str) -> Container:
        """The session's container (its own, or the pool member a claim renamed). Raises WorkspaceMissing."""
        for container in self._containers(f"{SESSION_LABEL}={session_id}"):
            return container
        with suppress(NotFound):
            container = self._docker().containers.get(f"{CONTAINER_PREFIX}{session_id}")
            if self._ours(container) and _session_of(_name_of(container), container.labels) == session_id:
                return container
        raise WorkspaceMissing(f"session {session_id} has no container (removed outside the orchestrator?)")

    def _pause(self, session_id: str) -> None:
        container = self._session_container(session_id)
        began = time.time_ns()
        with self._removed_lock:
            self._paused[_id_of(container)] = (began, None)
        try:
            container.stop(timeout=STOP_GRACE_S)
        except NotFound:
            raise WorkspaceMissing(f"session {session_id}'s container was removed while it was being paused") from None
        finally:
            with self._removed_lock:
                self._paused[_id_of(container)] = (began, time.time_ns() + PAUSE_EVENT_SLACK_NS)

    def _resume(self, session_id: str, token: str) -> Workspace:
        container = self._session_container(session_id)
        try:
            if container.status == "running":  # started by hand meanwhile: its agent has no token we know of
                self._pause(session_id)
            with self._removed_lock:  # what dies from now on is no longer the pause's
                if (window := self._paused.get(_id_of(container))) is not None:
                    self._paused[_id_of(container)] = (window[0], min(window[1] or 0, time.time_ns()))
            deliver_token(container, token)
            container.start()
            container.reload()
        except NotFound:
            raise WorkspaceMissing(f"session {session_id}'s container was removed while it was being resumed") from None
        return self._workspace(container)

    def _pause_died(self, container_id: str, time_ns: int) -> bool:
        """Whether a die event of `container_id` at `time_ns` came from pause() stopping it."""
        with self._removed_lock:
            window = self._paused.get(container_id)
        if window is None:
            return False
        began, until = window
        return began <= time_ns and (until is None or time_ns <= until)

    def _ours(self, container: Container) -> bool:
        labels = container.labels
        return labels.get(MANAGED_LABEL) == "true" and labels.get(ORCHESTRATOR_LABEL) == self.instance_id

    def _remove(self, container: Container) -> None:
        now = time.monotonic()
        with self._removed_lock:
            for old in [key for key, when in self._removed.items() if now - when > REMOVED_MEMORY_S]:
                del self._removed[old]
            self._removed[_id_of(container)] = now
            self._paused.pop(_id_of(container), None)
        with suppress(NotFound):
            container.remove(force=True, v=True)

    def _remove_orphaned_volumes(self) -> None:
        """Removes this instance's workspace volumes no container has: left by a container removed outside the
        orchestrator without its volumes. The engine counts a volume as used from its container's creation on,
        so one of a workspace being created is not taken."""
        try:
            pruned = self._docker().volumes.prune(filters={"label": self._label_filter})
        except (DockerException, requests.exceptions.RequestException) as error:  # busy or gone: tried again later
            log.warning("could not remove orphaned workspace volumes: %s", error)
            return
        if pruned.get("VolumesDeleted"):
            log.info("removed %d orphaned workspace volumes", len(pruned["VolumesDeleted"]))

    def _list(self) -> builtins.list[Workspace]:
        return [self._workspace(container) for container in self._containers()]

    def _containers(self, *label_filters: str) -> builtins.list[Container]:
        labels = [*self._label_filter, *label_filters]
        return self._docker().containers.list(all=True, filters={"label": labels}, ignore_removed=True)

    def _workspace(self, container: Container) -> Workspace:
        running = container.status == "running"
        agent_host, agent_port = _published(container, AGENT_PORT)
        preview_host, preview_port = _published(container, DEV_PORT)
        name = _name_of(container)
        session_id = _session_of(name, container.labels)
        pooled = not session_id and name.startswith(POOL_PREFIX)
        return Workspace(
            session_id=session_id,
            runtime=self.name,
            handle=_id_of(container),
            agent_endpoint=f"{agent_host}:{agent_port}" if running else "",
            preview_port=preview_port if running else 0,
            preview_url=f"http://{preview_host}:{preview_port}/" if running else "",
            image=_exact_image(container),
            running=running,
            labels=dict(container.labels),
            pool_id=name.removeprefix(POOL_PREFIX) if pooled else "",
            resources=_resources_of(container),
        )

    def _docker(self) -> docker.DockerClient:
        with self._connect_lock:
            if self._client is None:
                # from_env asks the engine for its API version, so an unreachable engine fails here.
                self._client = docker.from_env(timeout=API_TIMEOUT)
            return self._client

    # ------------------------------------------------------------------ engine events

    async def _exits(self, since_ns: int) -> AsyncIterator[WorkspaceExit]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict] = asyncio.Queue()
        stop = threading.Event()
        streams: list[CancellableStream[dict[str, Any]]] = []  # the reader's current stream, closed to end it
        reader = threading.Thread(
            target=self._read_events, args=(since_ns, loop, events, stop, streams), name="docker events", daemon=True
        )
        reader.start()
        died: dict[str, tuple[float, dict]] = {}  # container id -> (when to report it, its die event's attributes)
        oom_at: dict[str, float] = {}  # container id -> its last oom event
        try:
            while True:
                event = None
                try:
                    if died:
                        wait = min(deadline for deadline, _ in died.values()) - loop.time()
                        event = await asyncio.wait_for(events.get(), max(wait, 0))
                    else:
                        event = await events.get()
                except TimeoutError:
                    pass
                now = loop.time()
                if event is not None:
                    container_id = event.get("Actor", {}).get("ID") or event.get("id", "")
                    action = event.get("Action") or event.get("status", "")
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    if container_id in self._removed:
                        pass
                    elif action == "oom":
                        for old in [key for key, when in oom_at.items() if now - when > OOM_WINDOW_S]:
                            del oom_at[old]
                        oom_at[container_id] = now
                    elif action == "die" and self._pause_died(container_id, int(event.get("timeNano", 0))):
                        pass
                    elif action == "die":
                        died[container_id] = (now + DESTROY_GRACE_S, attributes)
                    elif action == "destroy":
                        died.pop(container_id, None)
                        oom_at.pop(container_id, None)
                        # `docker rm` without --volumes left the workspace's code, home and token behind.
                        await asyncio.to_thread(self._remove_orphaned_volumes)
                        yield WorkspaceExit(
                            _session_of(attributes.get("name", ""), attributes), container_id,
                            "the container was removed outside the orchestrator",
                        )  # fmt: skip
                for container_id, (deadline, attributes) in list(died.items()):
                    if deadline <= now:
                        del died[container_id]
                        oom = oom_at.pop(container_id, None)
                        oomed = oom is not None and (deadline - DESTROY_GRACE_S) - oom < OOM_WINDOW_S
                        yield WorkspaceExit(
                            _session_of(attributes.get("name", ""), attributes),
                            container_id,
                            _die_reason(attributes, oomed),
                        )
        finally:
            stop.set()
            for stream in streams:
                with suppress(Exception):
                    stream.close()

    def _read_events(
        self,
        since_ns: int,
        loop: asyncio.AbstractEventLoop,
        events: asyncio.Queue,
        stop: threading.Event,
        streams: builtins.list[CancellableStream[dict[str, Any]]],
    ) -> None:
        """Runs in a thread: the engine's events for our containers into `events`, re-subscribing (from the
        last event seen) whenever the connection is lost, until `stop` is set."""
        filters = {"type": "container", "label": self._label_filter}
        warned = False  # once per outage, not every retry
        while not stop.is_set():
            client = None
            try:
                # A client of its own: the stream holds its connection for as long as it runs.
                client = docker.from_env(timeout=API_TIMEOUT)
                # `since` to the nanosecond, as the engine takes it ("seconds.nanos"); the stubs allow only an
                # int or a datetime, which docker-py would round to the second.
                stream = client.api.events(  # type: ignore[call-overload]
                    decode=True, filters=filters, since=f"{since_ns // 10**9}.{since_ns % 10**9:09d}"
                )
                streams[:] = [stream]
                if stop.is_set():
                    break
                if warned:
                    log.info("docker events: subscribed again")
                    warned = False
                for event in stream:
                    since_ns = max(since_ns, int(event.get("timeNano", 0)))
                    loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is closed: nobody listens any more
                return
            except Exception as error:  # noqa: BLE001 - lost or refused: say so, then subscribe again
                if not stop.is_set() and not warned:
                    log.warning("docker events: %s; subscribing again every %g s", error, EVENTS_RETRY_S)
                    warned = True
            finally:
                if client is not None:
                    with suppress(Exception):
                        client.close()
            stop.wait(EVENTS_RETRY_S)

    # ------------------------------------------------------------------ error translation

    async def _call(self, action: str, function: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(self._translated, action, function, *args)

    def _translated(self, action: str, function: Callable[..., T], *args: object) -> T:
        try:
            return function(*args)
        except ImageNotFound as error:
            raise ImageMissing(
                f"the core image {self.image} is not on the Docker engine: build it with `{BUILD_COMMAND}`"
            ) from error
        except APIError as error:
            raise FailedPrecondition(f"the Docker engine refused to {action}: {error.explanation or error}") from error
        except (DockerException, requests.exceptions.ConnectionError) as error:
            raise self._unavailable(error) from error

    def _unavailable(self, error: Exception) -> EngineUnavailable:
        # A broken connection invalidates the client; the next call reconnects (the engine may be back).
        self._client = None
        return EngineUnavailable(
            f"cannot reach the Docker engine ({error}): start the Docker engine (dockerd) or run with --runtime local"
        )


def deliver_token(container: Container, token: str, *, path: str = TOKEN_PATH, uid: int = WORKSPACE_UID) -> None:
    """Writes `token` to `path` in a created, not yet started container (for its agent's `--token-file`),
    readable by `uid` (the container's user) only."""
    directory, name = path.rsplit("/", 1)
    data = token.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid = len(data), 0o400, uid, uid
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.addfile(info, io.BytesIO(data))
    if not container.put_archive(directory, buffer.getvalue()):
        raise FailedPrecondition(f"the Docker engine did not write the agent's token to {path}")


def _session_of(name: str, labels: dict[str, str]) -> str:
    """The session a container (or a container's event) belongs to: its label, or for a pool member, its
    name once a claim renamed it ("" for an unclaimed member)."""
    if labels.get(SESSION_LABEL):
        return labels[SESSION_LABEL]
    name = name.lstrip("/")
    if labels.get(POOL_LABEL) and name.startswith(CONTAINER_PREFIX) and not name.startswith(POOL_PREFIX):
        return name.removeprefix(CONTAINER_PREFIX)
    return ""


def _die_reason(attributes: dict[str, str], oomed: bool) -> str:
    """Why a container died, from its die event's attributes."""
    code = attributes.get("exitCode", "")
    if oomed:
        return f"the container was OOM-killed (over its memory limit; exit code {code})"
    detail = ""
    if code.isdigit() and 128 < int(code) < 128 + signal.NSIG:
        with suppress(ValueError):
            detail = f" ({signal.Signals(int(code) - 128).name})"
    return f"the container exited with code {code}{detail}"


def _exact_image(container: Container) -> str:
    """The image a container runs, pinned: its content-derived tag (`python -m core_image.build` tags every
    build `workspace-core:<digest>` besides `:latest`), else its image id."""
    try:
        image = container.image
        tags = sorted(image.tags) if image is not None else []
    except NotFound:  # the image was removed under a container that still runs
        return container.attrs.get("Image", "")
    pinned = [tag for tag in tags if not tag.endswith(":latest")]
    return (pinned or tags or [container.attrs.get("Image", "")])[0]


def _name_of(container: Container) -> str:
    """The container's name; the stubs allow None (a model not loaded), the engine always gives one."""
    if container.name is None:
        raise EngineUnavailable(f"the Docker engine described container {container.short_id} without a name")
    return container.name


def _id_of(container: Container) -> str:
    """The container's id; the stubs allow None (a model not loaded), the engine always gives one."""
    if container.id is None:
        raise EngineUnavailable(f"the Docker engine described a container {container.attrs.get('Name')} without an id")
    return container.id


def _resources_of(container: Container) -> ResourceHints:
    """The limits the engine holds for the container, as ResourceHints."""
    host = container.attrs.get("HostConfig") or {}
    return Limits(host.get("Memory") or 0, host.get("NanoCpus") or 0, host.get("PidsLimit") or 0).hints()


def _published(container: Container, port: int) -> tuple[str, int]:
    """The host address and port the engine published `port` on (("", 0) when it is not published)."""
    for binding in container.ports.get(f"{port}/tcp") or ():
        return binding["HostIp"], int(binding["HostPort"])
    return "", 0
