"""The Swarm runtime: one single-task Swarm service per workspace, from the core image, hardened and limited like
the Docker runtime's containers (whose engine client, limits and error translation it shares)."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from pathlib import Path
from typing import Any

from docker.errors import APIError, NotFound

from common.constants import AGENT_PORT, DEV_PORT
from orchestrator.errors import FailedPrecondition, ImageMissing, InvalidArgument
from orchestrator.runtime.base import (
    MANAGED_LABEL,
    ORCHESTRATOR_LABEL,
    POOL_LABEL,
    SESSION_LABEL,
    Workspace,
    WorkspaceExit,
    check_session_id,
    pool_labels,
    workspace_agent_env,
    workspace_labels,
)
from orchestrator.runtime.docker import (
    BUILD_COMMAND,
    CAP_DROP,
    CONTAINER_CA_BUNDLE,
    REMOVED_MEMORY_S,
    WORKSPACE_UID,
    WORKSPACE_USER,
    WRITABLE_VOLUMES,
    DockerRuntime,
    Limits,
)
from orchestrator.templates import ResourceHints

log = logging.getLogger(__name__)

# A pool member's id (a claim adds SESSION_LABEL: service labels, unlike a container's, can change).
POOL_ID_LABEL = "workspace-core.pool.id"
# How the orchestrator reaches agents: "published" (it runs outside the swarm: host-mode ports on the task's node,
# which bind every address of that node; the agent's token is what protects it) or "overlay" (it runs as a service
# on the workspace network: the service's DNS name there, nothing published).
AGENT_ADDRESS_MODES = ("published", "overlay")
# Where the agent's token (a Swarm secret, one per workspace, removed with it) appears; for the workspace user only.
TOKEN_SECRET_PATH = "/run/secrets/workspace-agent-token"
# Scratch space as volumes, not tmpfs: the engine's API (1.41) mounts a service's tmpfs noexec, and builds run
# binaries from /tmp. Volumes belong to the task's container and go with it.
SCRATCH_VOLUMES = ("/tmp", "/var/tmp")
# The image's HEALTHCHECK probes every 30 s, so a task would be reported healthy late; services probe every second.
HEALTHCHECK = {
    "Test": ["CMD", "/tools/venv/bin/python", "/tools/healthcheck.py"],
    "Interval": 1_000_000_000,
    "Timeout": 5_000_000_000,
    "Retries": 3,
    "StartPeriod": 10_000_000_000,
}
STOP_GRACE_NS = 1_000_000_000
# How long stop() waits for a removed service's task to be gone (a node that is down never reports it).
REMOVAL_WAIT_S = 20.0
# How long the workspace network's removal waits for removed services' containers to leave it.
NETWORK_REMOVAL_WAIT_S = 30.0
# How long start() waits for the service's task to run (scheduled, container created, ports published).
TASK_START_TIMEOUT_S = 60.0
# How often start() makes a service whose task never started (see _never_started) before it gives up.
START_ATTEMPTS = 3
# Seconds between looks at the services' tasks for exits (Swarm reports no task events).
EXITS_POLL_S = 1.0
# Task states after which a task runs no more.
ENDED_STATES = frozenset({"complete", "failed", "shutdown", "rejected", "orphaned", "remove"})
# Service names are DNS labels (at most 63 characters): derived from the instance and the session (or pool) id,
# which the labels carry in full.
SERVICE_PREFIX = "workspace-core-"


def service_name(instance_id: str, kind: str, ident: str) -> str:
    """The service of session (kind "s") or pool member (kind "p") `ident` of orchestrator `instance_id`."""
    digest = hashlib.sha256(f"{instance_id}\0{kind}\0{ident}".encode()).hexdigest()[:24]
    return f"{SERVICE_PREFIX}{kind}-{digest}"


class SwarmRuntime(DockerRuntime):
    """Workspaces as Swarm services on the swarm whose manager DOCKER_HOST (or the default socket) points to."""

    name = "swarm"
    token_stays_readable = True  # a Swarm secret, mounted read-only for as long as the service runs

    def __init__(
        self,
        *,
        image: str,
        instance_id: str,
        host_address: str = "127.0.0.1",
        trust_bundle: Path | None = None,
        network: str = "",
        agent_address: str = "published",
    ) -> None:
        super().__init__(image=image, instance_id=instance_id, host_address=host_address, trust_bundle=trust_bundle)
        if agent_address not in AGENT_ADDRESS_MODES:
            raise InvalidArgument(f"--swarm-agent-address {agent_address!r}: use published or overlay")
        self._network_name = network or f"workspace-core-{instance_id}"
        self.agent_address = agent_address
        self._network_id = ""
        self._trust_config: dict[str, str] | None = None
        self._reported: set[str] = set()  # ended tasks reported already, not reported again by a later exits()

    @property
    def network_name(self) -> str:
        return self._network_name

    # ------------------------------------------------------------------ Runtime

    async def start(
        self, session_id: str, token: str, *, resources: ResourceHints, env: dict[str, str], labels: dict[str, str]
    ) -> Workspace:
        """Creates the session's service and waits for its task to run (not for its agent). Raises
        EngineUnavailable, ImageMissing, FailedPrecondition (the engine refused, or the task did not run),
        InvalidArgument (bad session id)."""
        check_session_id(session_id)
        environment = {**workspace_agent_env(session_id), **env}
        name = service_name(self.instance_id, "s", session_id)
        all_labels = workspace_labels(self.instance_id, session_id, labels)
        return await self._call(
            "start the workspace service", self._start_service, name, all_labels, token, resources, environment
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
        """Creates a pool member's service with `resources` (the defaults when None) and waits for its task to
        run. Raises EngineUnavailable, ImageMissing, FailedPrecondition, InvalidArgument (bad pool id)."""
        check_session_id(pool_id)
        environment = workspace_agent_env(f"pool-{pool_id}")
        all_labels = {**pool_labels(self.instance_id, kind, labels), POOL_ID_LABEL: pool_id}
        return await self._call(
            "start a pool service", self._start_service, service_name(self.instance_id, "p", pool_id), all_labels,
            credential, resources or ResourceHints(), environment,
        )  # fmt: skip

    async def claim(self, workspace: Workspace, session_id: str, *, resources: ResourceHints) -> Workspace:
        """Labels the pool member's service as the session's (an update at the version read: of two claims, the
        later is refused as out of sequence), then applies `resources` to its running container in place (a
        change of the service's spec would replace the task, and the warm agent with it). Raises
        FailedPrecondition (claimed already or gone; the limits could not be applied: its task runs on another
        node and `resources` are not the pool's), EngineUnavailable, InvalidArgument (bad session id)."""
        check_session_id(session_id)
        return await self._call(
            "claim a pool service", self._claim_service, workspace.handle, session_id, resources,
            workspace.resources or ResourceHints(),
        )  # fmt: skip

    async def discard(self, pool_id: str) -> None:
        """Removes the unclaimed pool member `pool_id` (a claimed one is a session's: it stays)."""
        await self._call("remove a pool service", self._discard_service, pool_id)

    async def stop(self, session_id: str) -> None:
        """Removes the session's service (its task's container and volumes go with it) and its secret; no
        service is not an error. Raises EngineUnavailable."""
        await self._call("remove the workspace service", self._stop_service, session_id)

    async def list(self) -> list[Workspace]:
        """This instance's services, running or not. Raises EngineUnavailable."""
        return await self._call("list workspace services", self._list_services)

    async def remove_network(self) -> None:
        """Removes this instance's workspace network (for tests and uninstalling). Raises EngineUnavailable,
        FailedPrecondition (services use it)."""
        await self._call("remove the workspace network", self._remove_overlay)

    def exits(self) -> AsyncIterator[WorkspaceExit]:
        """This instance's services whose task stops running other than through stop(): the task ended (with
        its error or exit code), its node went down, or the service was removed outside the orchestrator;
        found by looking at the services' tasks every EXITS_POLL_S."""
        return self._poll_exits()

    # ------------------------------------------------------------------ blocking parts (run in threads)

    def _start_service(
        self, name: str, labels: dict[str, str], token: str, resources: ResourceHints, env: dict[str, str]
    ) -> Workspace:
        """Creates the service and waits for its task to run; a task whose container never started is tried
        afresh (service and secret), up to START_ATTEMPTS times: nothing of the workspace existed yet."""
        attempt = 1
        while True:
            try:
                return self._start_service_once(name, labels, token, resources, env)
            except _TaskNeverRan as failure:
                if attempt == START_ATTEMPTS:
                    raise FailedPrecondition(
                        f"the workspace's task did not run ({attempt} attempts): {failure}"
                    ) from None
                attempt += 1
                log.warning("swarm: %s: %s; starting it afresh (attempt %d)", name, failure, attempt)

    def _start_service_once(
        self, name: str, labels: dict[str, str], token: str, resources: ResourceHints, env: dict[str, str]
    ) -> Workspace:
        image = self._pinned_image()
        network_id = self._overlay()
        api = self._docker().api
        secret_labels = {key: labels[key] for key in (MANAGED_LABEL, ORCHESTRATOR_LABEL) if key in labels}
        secret_labels["workspace-core.service"] = name
        # Not in the environment (the spec shows it, and every process could read tini's /proc/1/environ).
        # Named afresh each time: a secret a crash left behind never blocks the session's next start.
        secret_name = f"{name}-token-{secrets.token_hex(4)}"
        secret = api.create_secret(secret_name, token.encode(), labels=secret_labels)
        try:
            service = api.create_service(
                self._task_template(image, network_id, secret["ID"], secret_name, resources, labels, env),
                name=name,
                labels=labels,
                endpoint_spec=self._endpoint_spec(),
            )
            return self._await_running(service["ID"])
        except BaseException:
            self._remove_service(name, secret_id=secret["ID"])
            raise

    def _task_template(
        self, image: str, network_id: str, secret_id: str, secret_name: str, resources: ResourceHints,
        labels: dict[str, str], env: dict[str, str],
    ) -> dict[str, Any]:  # fmt: skip
        limits = Limits.of(resources)
        mounts: builtins.list[dict[str, Any]] = [
            {"Type": "volume", "Target": target} for target in (*WRITABLE_VOLUMES, *SCRATCH_VOLUMES)
        ]
        configs = []
        if self.trust_bundle is not None:
            configs.append(self._trust_bundle_config())
        return {
            "ContainerSpec": {
                "Image": image,
                # Added to the image's entrypoint (`python -m agent --listen 0.0.0.0:3001 --root /app`).
                "Args": ["--token-secret", TOKEN_SECRET_PATH],
                "Env": [f"{key}={value}" for key, value in self._agent_environment(env).items()],
                "Labels": labels,
                "User": WORKSPACE_USER,
                "ReadOnly": True,
                "CapabilityDrop": CAP_DROP,
                # No NoNewPrivileges: services have it from API 1.46 on; the core image has no setuid or setgid
                # file (its build strips them), so there is no privilege to gain by exec.
                "Mounts": mounts,
                "Secrets": [{
                    "SecretID": secret_id, "SecretName": secret_name,
                    "File": {"Name": TOKEN_SECRET_PATH, "UID": str(WORKSPACE_UID), "GID": str(WORKSPACE_UID), "Mode": 0o400},
                }],
                "Configs": configs,
                "Healthcheck": HEALTHCHECK,
                # Removal is a kill, as the Docker runtime's is: nothing in a workspace waits for a clean stop.
                "StopGracePeriod": STOP_GRACE_NS,
            },
            "Resources": {"Limits": {"MemoryBytes": limits.memory_bytes, "NanoCPUs": limits.nano_cpus, "Pids": limits.pids}},
            # A task that ends stays ended: the orchestrator makes the session's workspace again from its last save
            # (a restarted task would come back empty, with nobody restoring it).
            "RestartPolicy": {"Condition": "none"},
            "Networks": [{"Target": network_id}],
        }  # fmt: skip

    def _endpoint_spec(self) -> dict[str, Any]:
        # No virtual IP (the kernel has no IPVS for one): the service name resolves to its task's address.
        spec: dict[str, Any] = {"Mode": "dnsrr"}
        if self.agent_address == "published":
            spec["Ports"] = [
                {"Protocol": "tcp", "TargetPort": port, "PublishMode": "host"} for port in (AGENT_PORT, DEV_PORT)
            ]
        return spec

    def _pinned_image(self) -> str:
        """The core image by its content tag when it has one: a task started later (elsewhere) runs the same."""
        try:
            image = self._docker().images.get(self.image)
        except NotFound as error:
            raise ImageMissing(
                f"the core image {self.image} is not on the Docker engine: build it with `{BUILD_COMMAND}`"
            ) from error
        pinned = sorted(tag for tag in image.tags if not tag.endswith(":latest"))
        return pinned[0] if pinned else self.image

    def _overlay(self) -> str:
        """The id of the workspace network: an attachable overlay, found by name or created. Workspaces reach the
        outside through their node's gateway bridge (host-mode ports need it: an --internal overlay has none)."""
        with self._network_lock:
            if not self._network_id:
                found = [
                    n for n in self._docker().networks.list(names=[self.network_name]) if n.name == self.network_name
                ]
                if found:
                    network = found[0]
                    if network.attrs.get("Driver") != "overlay" or network.attrs.get("Scope") != "swarm":
                        raise FailedPrecondition(f"the network {self.network_name} is not a swarm overlay network")
                else:
                    try:
                        network = self._docker().networks.create(
                            self.network_name, driver="overlay", attachable=True, check_duplicate=True,
                            labels=self._labels,
                        )  # fmt: skip
                    except APIError:  # another orchestrator of this instance was first
                        found = self._docker().networks.list(names=[self.network_name])
                        network = next(n for n in found if n.name == self.network_name)
                self._network_id = network.id or ""
            return self._network_id

    def _trust_bundle_config(self) -> dict[str, Any]:
        """The trust bundle as a Swarm config (so every node has it), named by its content."""
        assert self.trust_bundle is not None
        if self._trust_config is None:
            data = self.trust_bundle.read_bytes()
            name = f"workspace-core-ca-{hashlib.sha256(data).hexdigest()[:16]}"
            api = self._docker().api
            found = api.configs(filters={"name": name})
            config_id = next((c["ID"] for c in found if c["Spec"]["Name"] == name), None)
            if config_id is None:
                config_id = api.create_config(name, data, labels=self._labels)["ID"]
            self._trust_config = {"ConfigID": config_id, "ConfigName": name}
        return {**self._trust_config, "File": {"Name": CONTAINER_CA_BUNDLE, "UID": "0", "GID": "0", "Mode": 0o444}}

    def _await_running(self, service_id: str) -> Workspace:
        deadline = time.monotonic() + TASK_START_TIMEOUT_S
        while True:
            service = self._docker().api.inspect_service(service_id)
            task = self._current_task(service_id)
            if task is not None:
                state = task["Status"]["State"]
                if state == "running":
                    return self._service_workspace(service, task)
                if state in ENDED_STATES:
                    node = self._docker().api.inspect_node(task["NodeID"]) if task.get("NodeID") else {}
                    if _never_started(task):
                        raise _TaskNeverRan(_task_reason(task, node))
                    raise FailedPrecondition(f"the workspace's task did not run: {_task_reason(task, node)}")
            if time.monotonic() > deadline:
                state = task["Status"]["State"] if task else "not scheduled"
                raise FailedPrecondition(
                    f"the workspace's task is {state} after {TASK_START_TIMEOUT_S:g} s"
                    f"{': ' + task['Status'].get('Err', '') if task and task['Status'].get('Err') else ''}"
                )
            time.sleep(0.2)

    def _current_task(self, service_id: str) -> dict[str, Any] | None:
        return self._latest_tasks({service_id}).get(service_id)

    def _claim_service(
        self, service_id: str, session_id: str, resources: ResourceHints, current: ResourceHints
    ) -> Workspace:
        api = self._docker().api
        try:
            service = api.inspect_service(service_id)
        except NotFound as error:
            raise FailedPrecondition("the pool member is gone") from error
        spec = service["Spec"]
        labels = spec.get("Labels") or {}
        task = self._current_task(service_id)
        if (
            labels.get(SESSION_LABEL)
            or not labels.get(POOL_LABEL)
            or task is None
            or task["Status"]["State"] != "running"
        ):
            raise FailedPrecondition(f"the pool service {spec['Name']} is claimed already or not running")
        spec["Labels"] = {**labels, SESSION_LABEL: session_id}
        # The raw endpoint: docker-py's update_service rebuilds the spec from its arguments. Swarm refuses an
        # update at a version that is no longer the service's ("update out of sequence"): one claim wins.
        response = api._post_json(  # type: ignore[attr-defined]
            api._url("/services/{0}/update", service_id),  # type: ignore[attr-defined]
            data=spec, params={"version": service["Version"]["Index"]},
        )  # fmt: skip
        api._raise_for_status(response)  # type: ignore[attr-defined]
        if resources != current:
            container_id = task["Status"].get("ContainerStatus", {}).get("ContainerID", "")
            if task.get("NodeID") != self._local_node_id() or not container_id:
                raise FailedPrecondition(
                    f"the pool service {spec['Name']} runs on another node: its limits cannot change in place"
                )
            self._update_limits(container_id, resources)
        return self._service_workspace(api.inspect_service(service_id), task)

    def _local_node_id(self) -> str:
        return self._docker().info().get("Swarm", {}).get("NodeID", "")

    def _discard_service(self, pool_id: str) -> None:
        for service in self._services(f"{POOL_ID_LABEL}={pool_id}"):
            if not service["Spec"]["Labels"].get(SESSION_LABEL):
                self._remove_service(service["ID"])

    def _stop_service(self, session_id: str) -> None:
        for service in self._services(f"{SESSION_LABEL}={session_id}"):
            self._remove_service(service["ID"])

    def _remove_service(self, service: str, *, secret_id: str = "") -> None:
        """Removes a service and its token's secret (by the secret's label, or `secret_id` when the service was
        never created)."""
        now = time.monotonic()
        api = self._docker().api
        name = service
        with suppress(NotFound):
            info = api.inspect_service(service)
            name = info["Spec"]["Name"]
            with self._removed_lock:
                for old in [key for key, when in self._removed.items() if now - when > REMOVED_MEMORY_S]:
                    del self._removed[old]
                self._removed[info["ID"]] = now
            api.remove_service(info["ID"])
            # The task's container stops (and its dev server stops answering) once its node got to it: removed
            # means gone, as for a container, so wait for Swarm to drop the tasks.
            deadline = now + REMOVAL_WAIT_S
            while time.monotonic() < deadline and self._tasks_alive(info["ID"]):
                time.sleep(0.2)
        secrets = [secret_id] if secret_id else [
            secret["ID"] for secret in api.secrets(filters={"label": f"workspace-core.service={name}"})
        ]  # fmt: skip
        for secret in secrets:
            with suppress(NotFound):
                api.remove_secret(secret)

    def _tasks_alive(self, service_id: str) -> bool:
        """Whether a task of the service is still there on a node that is up (one that is down never reports
        its task gone; its containers go with the node)."""
        api = self._docker().api
        down = {node["ID"] for node in api.nodes() if node["Status"]["State"] == "down"}
        # (All tasks, filtered here: a filter by a removed service's id is refused as not found.)
        return any(task["ServiceID"] == service_id and task.get("NodeID") not in down for task in api.tasks())

    def _services(self, *label_filters: str) -> builtins.list[dict[str, Any]]:
        labels = [*self._label_filter, *label_filters]
        return self._docker().api.services(filters={"label": labels})

    def _list_services(self) -> builtins.list[Workspace]:
        services = self._services()
        if not services:
            return []
        tasks = self._latest_tasks({service["ID"] for service in services})
        return [self._service_workspace(service, tasks.get(service["ID"])) for service in services]

    def _latest_tasks(self, service_ids: set[str]) -> dict[str, dict[str, Any]]:
        """The newest task of each of the services (all tasks filtered here: a filter naming a service removed
        meanwhile is refused as not found)."""
        latest: dict[str, dict[str, Any]] = {}
        for task in self._docker().api.tasks():
            known = latest.get(task["ServiceID"])
            if task["ServiceID"] in service_ids and (
                known is None or task["Version"]["Index"] > known["Version"]["Index"]
            ):
                latest[task["ServiceID"]] = task
        return latest

    def _service_workspace(self, service: dict[str, Any], task: dict[str, Any] | None) -> Workspace:
        spec = service["Spec"]
        labels = dict(spec.get("Labels") or {})
        running = task is not None and task["Status"]["State"] == "running" and task["DesiredState"] == "running"
        agent, preview = "", ""
        if running and task is not None:
            agent, preview = self._address(spec["Name"], task, AGENT_PORT), self._address(spec["Name"], task, DEV_PORT)
        session_id = labels.get(SESSION_LABEL, "")
        return Workspace(
            session_id=session_id,
            runtime=self.name,
            handle=service["ID"],
            agent_endpoint=agent,
            preview_port=int(preview.rpartition(":")[2]) if preview else 0,
            preview_url=f"http://{preview}/" if preview else "",
            image=spec["TaskTemplate"]["ContainerSpec"]["Image"].split("@")[0],
            running=running,
            labels=labels,
            pool_id="" if session_id else labels.get(POOL_ID_LABEL, ""),
            # A pool member's limits are its spec's; a claim changes a container's in place, not the spec.
            resources=None if session_id else _spec_resources(spec),
        )

    def _address(self, name: str, task: dict[str, Any], port: int) -> str:
        """HOST:PORT of a running task's `port`, as the orchestrator reaches it."""
        if self.agent_address == "overlay":
            return f"{name}:{port}"
        published = next(
            (p["PublishedPort"] for p in task["Status"].get("PortStatus", {}).get("Ports", []) if p["TargetPort"] == port), 0
        )  # fmt: skip
        node = self._docker().api.inspect_node(task["NodeID"])
        address = node.get("Status", {}).get("Addr", "")
        if address in ("", "0.0.0.0"):
            address = self.host_address
        return f"{address}:{published}" if published else ""

    def _remove_overlay(self) -> None:
        with self._network_lock:
            self._network_id = ""
            for network in self._docker().networks.list(names=[self.network_name]):
                if (
                    network.name == self.network_name
                    and (network.attrs.get("Labels") or {}).get(ORCHESTRATOR_LABEL) == self.instance_id
                ):
                    deadline = time.monotonic() + NETWORK_REMOVAL_WAIT_S
                    while True:
                        try:
                            network.remove()
                            break
                        except NotFound:
                            break
                        except APIError as error:  # removed services' containers are still leaving it
                            if "active endpoints" not in str(error) or time.monotonic() > deadline:
                                raise
                            time.sleep(0.5)

    def _sweep(self, seen: dict[str, tuple[str, str]]) -> builtins.list[WorkspaceExit]:
        """One look at the services: the exits since the last look. `seen`: service id -> (session, task id) of
        the services running at the last look (updated)."""
        exits = []
        services = {service["ID"]: service for service in self._services()}
        nodes = {node["ID"]: node for node in self._docker().api.nodes()}
        tasks = self._latest_tasks(set(services)) if services else {}
        for service_id, (session_id, _) in builtins.list(seen.items()):
            if service_id in self._removed:
                del seen[service_id]
            elif service_id not in services:
                del seen[service_id]
                exits.append(WorkspaceExit(session_id, service_id, "the service was removed outside the orchestrator"))
        for service_id, service in services.items():
            task = tasks.get(service_id)
            session_id = service["Spec"]["Labels"].get(SESSION_LABEL, "")
            if service_id in self._removed or task is None:
                continue
            node = nodes.get(task.get("NodeID", ""), {})
            # Swarm also sets a task on a node that is down to be shut down, while its last report says running.
            node_down = node.get("Status", {}).get("State") == "down"
            running = task["Status"]["State"] == "running" and task["DesiredState"] == "running" and not node_down
            previous = seen.get(service_id)
            if running:
                if previous is not None and previous[1] != task["ID"]:
                    exits.append(WorkspaceExit(session_id, service_id, "Swarm replaced its task", recoverable=True))
                seen[service_id] = (session_id, task["ID"])
            elif previous is not None or task["Status"]["State"] in ENDED_STATES or node_down:
                if previous is not None or task["ID"] not in self._reported:
                    reason = _node_down_reason(node) if node_down else _task_reason(task, node)
                    exits.append(WorkspaceExit(session_id, service_id, reason, recoverable=True))
                self._reported.add(task["ID"])
                seen.pop(service_id, None)
        return exits

    async def _poll_exits(self) -> AsyncIterator[WorkspaceExit]:
        seen: dict[str, tuple[str, str]] = {}
        warned = False
        while True:
            try:
                exits = await asyncio.to_thread(self._sweep, seen)
                warned = False
            except Exception as error:  # noqa: BLE001 - engine away: say so once, look again
                if not warned:
                    log.warning(
                        "swarm: cannot look at the workspace services (%s); trying every %g s", error, EXITS_POLL_S
                    )
                    warned = True
                exits = []
            for exit in exits:
                yield exit
            await asyncio.sleep(EXITS_POLL_S)


def _node_name(node: dict[str, Any]) -> str:
    description = node.get("Description", {})
    return f"{description.get('Hostname', node.get('ID', '?')[:12])} ({node.get('Status', {}).get('Addr', '')})"


def _node_down_reason(node: dict[str, Any]) -> str:
    return f"its node {_node_name(node)} is down"


class _TaskNeverRan(Exception):
    """A service's task ended before its container started (why, for a person, is the message)."""


def _never_started(task: dict[str, Any]) -> bool:
    """Whether a task that ended never had a running container: the node rejected it, or the engine failed to
    start its container. One such failure is the engine's own race (moby/moby#48783: two tasks starting at once,
    "unable to remount dir as readonly: mount tmpfs:.../mounts/secrets ... device or resource busy")."""
    status = task["Status"]
    return status["State"] == "rejected" or status.get("Err", "").startswith("starting container failed")


def _task_reason(task: dict[str, Any], node: dict[str, Any]) -> str:
    """Why a task ended, for a person."""
    status = task["Status"]
    code = status.get("ContainerStatus", {}).get("ExitCode")
    detail = status.get("Err") or status.get("Message") or status["State"]
    where = f" on node {_node_name(node)}" if node else ""
    exited = f", exit code {code}" if code else ""
    return f"the workspace's task {status['State']}{where} ({detail}{exited})"


def _spec_resources(spec: dict[str, Any]) -> ResourceHints | None:
    """The limits a service's spec gives its task, as ResourceHints (None without limits)."""
    limits = spec["TaskTemplate"].get("Resources", {}).get("Limits")
    if not limits:
        return None
    return Limits(limits.get("MemoryBytes", 0), limits.get("NanoCPUs", 0), limits.get("Pids", 0)).hints()
