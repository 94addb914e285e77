"""The Docker runtime against a real engine and the real core image: the container's labels, loopback-only
ports, limits and hardening, its agent through AgentClient, removal, and the errors a person acts on."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import subprocess
from pathlib import Path

import docker
import docker.errors
import pytest
from docker.models.containers import Container

from core_image.build import NODE_VERSION
from orchestrator.agent_client import AgentClient
from orchestrator.errors import EngineUnavailable, FailedPrecondition, ImageMissing
from orchestrator.runtime.base import MANAGED_LABEL, ORCHESTRATOR_LABEL, SESSION_LABEL, write_trust_bundle
from orchestrator.runtime.docker import CONTAINER_CA_BUNDLE, DockerRuntime
from orchestrator.templates import ResourceHints

TOKEN = "docker-test-token"
HINTS = ResourceHints(memory_mb=512, cpus=0.5, pids=200)


@pytest.fixture
def runtime(docker_runtime: DockerRuntime) -> DockerRuntime:
    return docker_runtime


async def output_of(client: AgentClient, shell: str) -> list[str]:
    lines: list[str] = []
    assert await client.run(shell, on_line=lambda text, _: lines.append(text)) == 0
    return lines


@pytest.mark.docker
async def test_a_workspace_container_is_labelled_locked_down_and_serves_its_agent(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    workspace = await runtime.start("ws-docker", TOKEN, resources=HINTS, env={"GREETING": "hi"}, labels={"team": "a"})

    container = docker_client.containers.get(workspace.handle)
    assert container.labels == {
        "team": "a", MANAGED_LABEL: "true", ORCHESTRATOR_LABEL: runtime.instance_id, SESSION_LABEL: "ws-docker"
    }  # fmt: skip
    ports = container.attrs["NetworkSettings"]["Ports"]
    assert [binding["HostIp"] for binding in ports["3001/tcp"] + ports["4321/tcp"]] == ["127.0.0.1", "127.0.0.1"]
    assert workspace.agent_endpoint == f"127.0.0.1:{ports['3001/tcp'][0]['HostPort']}"
    assert workspace.preview_url == f"http://127.0.0.1:{ports['4321/tcp'][0]['HostPort']}/"
    host_config = container.attrs["HostConfig"]
    assert host_config["Memory"] == 512 * 1024 * 1024
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["PidsLimit"] == 200
    assert host_config["CapDrop"] == ["ALL"]
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert container.attrs["Config"]["User"] == "1000:1000"
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [runtime.network_name]

    client = AgentClient(workspace.agent_endpoint, TOKEN)
    try:
        await client.wait_healthy(timeout=30)
        assert await output_of(client, 'echo "$(id -u) $GREETING $PORT $PWD"; grep ^CapEff /proc/self/status') == [
            "1000 hi 4321 /app",
            "CapEff:\t0000000000000000",
        ]
    finally:
        await client.close()

    [listed] = await runtime.list()
    assert (listed.session_id, listed.handle, listed.running) == ("ws-docker", workspace.handle, True)
    with pytest.raises(FailedPrecondition, match="already in use"):
        await runtime.start("ws-docker", TOKEN, resources=HINTS, env={}, labels={})

    await runtime.stop("ws-docker")
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(workspace.handle)
    assert await runtime.list() == []
    await runtime.stop("ws-docker")  # idempotent


@pytest.mark.docker
async def test_an_extra_ca_bundle_is_trusted_by_the_workspace_tools(core_image: str, tmp_path: Path) -> None:
    extra = tmp_path / "proxy-ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=Test Proxy CA",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(extra)],
        check=True, capture_output=True,
    )  # fmt: skip
    bundle = write_trust_bundle(extra, tmp_path / "trust")
    runtime = DockerRuntime(image=core_image, instance_id=f"test-{secrets.token_hex(4)}", trust_bundle=bundle)
    workspace = await runtime.start("ws-ca", TOKEN, resources=HINTS, env={}, labels={})
    client = AgentClient(workspace.agent_endpoint, TOKEN)
    try:
        await client.wait_healthy(timeout=30)
        [env] = await output_of(client, 'echo "$NODE_EXTRA_CA_CERTS $npm_config_cafile $PIP_CERT $SSL_CERT_FILE"')
        assert env.split() == [CONTAINER_CA_BUNDLE] * 4
        # The mounted bundle holds the proxy's CA after the public roots, and node loads it without complaint.
        mounted = await output_of(client, f"cat {CONTAINER_CA_BUNDLE}")
        proxy_ca = extra.read_text().splitlines()
        assert mounted[-len(proxy_ca) :] == proxy_ca
        assert sum(line == "-----BEGIN CERTIFICATE-----" for line in mounted) > 100
        lines: list[str] = []
        await client.run("node -e 'require(\"https\")'", on_line=lambda text, _: lines.append(text))
        assert not [line for line in lines if "extra certs" in line.lower()]
        # Read-only: the workspace cannot swap in another CA.
        assert await client.run(f"echo x >> {CONTAINER_CA_BUNDLE}", on_line=lambda *_: None) != 0
    finally:
        await client.close()
        await runtime.stop("ws-ca")
        await runtime.remove_network()
        await runtime.close()


@pytest.mark.docker
async def test_a_missing_image_names_the_build_command(docker_client: docker.DockerClient) -> None:
    runtime = DockerRuntime(image="workspace-core:no-such-tag", instance_id=f"test-{secrets.token_hex(4)}")
    with pytest.raises(ImageMissing, match=r"python -m core_image\.build"):
        await runtime.start("ws-noimage", TOKEN, resources=HINTS, env={}, labels={})
    assert await runtime.list() == []
    assert docker_client.networks.list(names=[runtime.network_name]) == []
    await runtime.close()


async def test_an_unreachable_engine_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    runtime = DockerRuntime(image="workspace-core:latest", instance_id="test")
    with pytest.raises(EngineUnavailable, match=r"start the Docker engine \(dockerd\) or run with --runtime local"):
        await runtime.start("ws-noengine", TOKEN, resources=HINTS, env={}, labels={})
    with pytest.raises(EngineUnavailable):
        await runtime.list()


@pytest.mark.docker
async def test_a_workspace_reports_the_exact_image_it_runs_even_when_started_from_latest(
    core_image: str, docker_client: docker.DockerClient
) -> None:
    # A `:latest` of this test's own for this build's image: the shared workspace-core:latest may be another
    # checkout's build by now (every build tags it).
    latest = f"workspace-core-test-{secrets.token_hex(4)}:latest"
    docker_client.images.get(core_image).tag(latest)
    runtime = DockerRuntime(image=latest, instance_id=f"test-{secrets.token_hex(4)}")
    try:
        workspace = await runtime.start("ws-pinned", TOKEN, resources=HINTS, env={}, labels={})
        assert workspace.image == core_image  # the content-derived tag, which a later session can pin
        assert [w.image for w in await runtime.list()] == [core_image]
    finally:
        await runtime.stop("ws-pinned")
        await runtime.remove_network()
        await runtime.close()
        docker_client.images.remove(latest)


# A package-free npm project with a script, and a git repository with one commit: what workspaces do.
WORKSPACE_CHORES = """
set -e
cd /app && mkdir chores && cd chores
npm init -y >/dev/null && npm pkg set scripts.hello='node -p process.version' && npm run --silent hello
git init -q && git config user.email w@example.com && git config user.name w
echo hi > file && git add file && git commit -qm first && git log --format=%s
echo cached > ~/.npm-probe && cat ~/.npm-probe && echo scratch > /tmp/probe && cat /tmp/probe
"""


@pytest.mark.docker
async def test_the_root_filesystem_is_read_only_but_app_home_and_tmp_are_writable(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    workspace = await runtime.start("ws-readonly", TOKEN, resources=HINTS, env={}, labels={})
    client = AgentClient(workspace.agent_endpoint, TOKEN)
    try:
        await client.wait_healthy(timeout=30)
        assert docker_client.containers.get(workspace.handle).attrs["HostConfig"]["ReadonlyRootfs"] is True
        lines: list[str] = []
        assert await client.run("touch /var/tmp/x /etc/x", on_line=lambda text, _: lines.append(text)) != 0
        assert lines == ["touch: cannot touch '/etc/x': Read-only file system"]  # /var/tmp is a tmpfs
        version, *rest = await output_of(client, WORKSPACE_CHORES)
        assert version == f"v{NODE_VERSION}" and rest == ["first", "cached", "scratch"]
    finally:
        await client.close()


def volumes_of(container: Container) -> set[str]:
    return {mount["Name"] for mount in container.attrs["Mounts"] if mount["Type"] == "volume"}


@pytest.mark.docker
async def test_exits_report_a_container_removed_behind_the_runtimes_back_but_not_one_it_stopped(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    exits = runtime.exits()
    stopped = await runtime.start("ws-stopped", TOKEN, resources=HINTS, env={}, labels={})
    removed = await runtime.start("ws-removed", TOKEN, resources=HINTS, env={}, labels={})
    await runtime.stop("ws-stopped")
    container = docker_client.containers.get(removed.handle)
    volumes = volumes_of(container)
    container.remove(force=True)  # as `docker rm -f` does: not its volumes
    try:
        async with asyncio.timeout(60):  # bounds a hang only
            first = await anext(exits)
    finally:
        await exits.aclose()
    # The stop's events came first: had they been taken for an exit, that would be the first one.
    assert (first.session_id, first.handle) == ("ws-removed", removed.handle)
    assert first.reason == "the container was removed outside the orchestrator"
    # Its code, home and token, left behind by the removal, went after it.
    assert len(volumes) == 3 and not volumes & {volume.name for volume in docker_client.volumes.list()}
    assert stopped.handle != removed.handle


@pytest.mark.docker
async def test_volumes_of_a_container_removed_while_no_orchestrator_watched_go_at_the_next_start(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    removed = await runtime.start("ws-removed", TOKEN, resources=HINTS, env={}, labels={})
    container = docker_client.containers.get(removed.handle)
    volumes = volumes_of(container)
    container.remove(force=True)
    assert volumes <= {volume.name for volume in docker_client.volumes.list()}
    # The next orchestrator process of the instance, at its first start; its own new workspace's volumes stay.
    restarted = DockerRuntime(image=runtime.image, instance_id=runtime.instance_id)
    try:
        kept = await restarted.start("ws-kept", TOKEN, resources=HINTS, env={}, labels={})
        left = {volume.name for volume in docker_client.volumes.list()}
        assert len(volumes) == 3 and not volumes & left
        assert volumes_of(docker_client.containers.get(kept.handle)) <= left
    finally:
        await restarted.close()


@pytest.mark.docker
async def test_exits_tell_an_oom_killed_container(runtime: DockerRuntime, docker_client: docker.DockerClient) -> None:
    exits = runtime.exits()
    workspace = await runtime.start(
        "ws-oom", TOKEN, resources=ResourceHints(memory_mb=256, cpus=0.5, pids=200), env={}, labels={}
    )
    client = AgentClient(workspace.agent_endpoint, TOKEN)
    try:
        await client.wait_healthy(timeout=30)
        # A command grows slowly towards the memory limit; once it runs, the agent (tini's child) is offered to
        # the OOM killer, so the kernel kills the agent and the container ends. Raising a score needs no
        # capability, but the agent is non-dumpable, so its /proc files belong to root: the container's root
        # user raises it. (Raised before the command started, the command would inherit the score.)
        allocating = asyncio.Event()
        hog = "node -e 'console.log(\"allocating\"); const a = []; setInterval(() => a.push(Buffer.alloc(1 << 20, 1)), 20)'"
        command = asyncio.create_task(
            client.run(hog, on_line=lambda text, _: text == "allocating" and allocating.set(), timeout=120)
        )
        async with asyncio.timeout(60):  # bounds a hang only
            await allocating.wait()
        offer = "echo 1000 > /proc/$(cut -d' ' -f1 /proc/1/task/1/children)/oom_score_adj"
        container = docker_client.containers.get(workspace.handle)
        result = await asyncio.to_thread(container.exec_run, ["sh", "-c", offer], user="0")
        assert result.exit_code == 0, result.output
        with contextlib.suppress(Exception):
            await command
        async with asyncio.timeout(60):  # bounds a hang only
            exited = await anext(exits)
    finally:
        await client.close()
        await exits.aclose()
    assert exited.session_id == "ws-oom"
    assert exited.reason.startswith("the container was OOM-killed"), exited.reason


async def test_replicas_that_created_the_workspace_network_at_once_settle_on_one(
    runtime: DockerRuntime, docker_client: docker.DockerClient
) -> None:
    # What two processes of one instance leave when they start at once: the engine's duplicate check is best effort.
    labels = {MANAGED_LABEL: "true", ORCHESTRATOR_LABEL: runtime.instance_id}
    options = {"com.docker.network.bridge.enable_icc": "false"}
    twins = [docker_client.networks.create(runtime.network_name, options=options, labels=labels) for _ in range(2)]
    try:
        workspace = await runtime.start("ws-twins", TOKEN, resources=HINTS, env={}, labels={})
        container = docker_client.containers.get(workspace.handle)

        kept = min(twins, key=lambda network: network.id)
        assert list(container.attrs["NetworkSettings"]["Networks"]) == [runtime.network_name]
        assert container.attrs["NetworkSettings"]["Networks"][runtime.network_name]["NetworkID"] == kept.id
        remaining = [n.id for n in docker_client.networks.list(names=[runtime.network_name])]
        assert remaining == [kept.id], "the empty twin is removed"
        await runtime.stop("ws-twins")
    finally:
        await runtime.remove_network()
        for network in twins:
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()
    assert docker_client.networks.list(names=[runtime.network_name]) == []
