"""A real browser through the preview gateway: headless Chromium opens a vite-react workspace (Docker runtime,
real npm install) with a preview token, an Edit through the agent changes a visible string, and the same
document shows it without a reload (Vite's HMR socket through the gateway)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest
from grpc import aio

from orchestrator.config import OrchestratorConfig
from tests.chromium import Page, chromium, chromium_path
from tests.conftest import REPO
from tests.orchestrator.conftest import start_orchestrator, stop_all_workspaces, watch_until_settled
from workspace.agent.v1 import agent_pb2, agent_pb2_grpc
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

TITLE = "Vite + React on workspace-core"
EDITED = "Edited through the agent, shown by HMR"
# A first load waits for Vite to optimize the dependencies: generous, on a small machine shared with other work.
LOAD_TIMEOUT_S = 90
# Resolved by Chromium alone (--host-resolver-rules), with no DNS.
DOMAIN = "preview.test"
HEADING = "document.querySelector('h1') && document.querySelector('h1').textContent"


@pytest.fixture
def browser_available() -> None:
    if chromium_path() is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium on PATH: `make tools` installs it, and CI runs `make test`, which runs it")
        pytest.skip("no chromium on PATH (`make tools` installs Debian's package)")


@pytest.mark.docker
@pytest.mark.npm
@pytest.mark.skipif(os.environ.get("WORKSPACE_TEST_NPM") != "1", reason="opt-in: WORKSPACE_TEST_NPM=1")
@pytest.mark.timeout(600)
async def test_vite_hmr_through_the_gateway_in_headless_chromium(
    core_image: str, tmp_path: Path, browser_available: None
) -> None:
    templates = tmp_path / "templates"
    shutil.copytree(
        REPO / "templates" / "vite-react", templates / "vite-react", ignore=shutil.ignore_patterns("node_modules")
    )
    bundle = os.environ.get("WORKSPACE_TEST_CA_BUNDLE")
    config = OrchestratorConfig(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        templates_dir=templates,
        runtime="docker",
        image=core_image,
        instance_id=f"test-{secrets.token_hex(4)}",
        reap_interval_s=3600,
        extra_ca_bundle=Path(bundle) if bundle else None,
        preview_address="127.0.0.1:0",
        # Not *.localhost, which Vite's host check lets through anyway: a domain of its own, as in production,
        # whose hosts Vite refuses unless the gateway presents the request as Vite expects.
        preview_domain=DOMAIN,
    )
    orchestrator = await start_orchestrator(config)
    try:
        created = await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="vite-react"))
        session = (await watch_until_settled(orchestrator.stub, created.session.id, timeout=540))[-1].session
        assert session.state == pb.SESSION_STATE_READY, session.failure
        minted = await orchestrator.stub.CreatePreviewToken(pb.CreatePreviewTokenRequest(id=session.id))
        assert minted.url.startswith(f"http://{session.id}.{DOMAIN}:")

        async with chromium(tmp_path / "profile", f"--host-resolver-rules=MAP *.{DOMAIN} 127.0.0.1") as browser:
            page = await browser.new_page()
            assert await open_app(page, minted.url) == minted.url.partition("?")[0]  # the token gone from the URL
            # Set on this document only: a reload (or Vite's full-reload fallback) would lose it.
            await page.evaluate("window.__sameDocument = 'kept'")
            assert await page.evaluate("document.cookie") == ""  # the preview cookie is HttpOnly

            await edit(session, "src/App.jsx", TITLE, EDITED)
            try:
                await page.wait_for(f"({HEADING}) === {json.dumps(EDITED)}", LOAD_TIMEOUT_S)
            except TimeoutError as error:
                raise AssertionError(f"{error}\n{what_loaded(page)}") from None
            assert await page.evaluate("window.__sameDocument") == "kept", what_loaded(page)
            # The update came over Vite's socket through the gateway, the page's only way to the dev server.
            sockets = [event["url"] for event in page.events("Network.webSocketCreated")]
            assert any(url.startswith(f"ws://{session.id}.{DOMAIN}:") for url in sockets), sockets
    finally:
        await orchestrator.close()
        await stop_all_workspaces(config)


async def open_app(page: Page, url: str) -> str:
    """Opens `url` until the app's heading shows; returns the address then. Chromium aborts what is in flight
    when the host's network changes (ERR_NETWORK_CHANGED: containers starting on a shared engine add
    interfaces): such a load is tried again, up to three times; any other failure is the test's, reported with
    what the page loaded."""
    for attempt in range(3):
        await page.call("Page.navigate", url=url)
        try:
            return await page.wait_for(f"({HEADING}) === {json.dumps(TITLE)} && location.href", LOAD_TIMEOUT_S)
        except TimeoutError as error:
            if attempt == 2 or not network_changes(page):
                raise AssertionError(f"{error}\n{what_loaded(page)}") from None
    raise AssertionError("unreachable")


def network_changes(page: Page) -> list[str]:
    """The page's requests that Chromium gave up because the host's network changed."""
    return [
        e["requestId"] for e in page.events("Network.loadingFailed") if e["errorText"] == "net::ERR_NETWORK_CHANGED"
    ]


def what_loaded(page: Page) -> str:
    """Every request of the page with its status or failure, and what the page threw: for a failure's message."""
    urls = {e["requestId"]: e["request"]["url"] for e in page.events("Network.requestWillBeSent")}
    lines = [f"{e['response']['status']} {e['response']['url']}" for e in page.events("Network.responseReceived")]
    lines += [f"failed {e['errorText']} {urls.get(e['requestId'], '?')}" for e in page.events("Network.loadingFailed")]
    lines += [f"threw {e['exceptionDetails'].get('text')}" for e in page.events("Runtime.exceptionThrown")]
    return "\n".join(lines)


async def edit(session: pb.Session, path: str, old: str, new: str) -> None:
    async with aio.insecure_channel(session.agent_endpoint) as channel:
        await agent_pb2_grpc.AgentServiceStub(channel).Edit(
            agent_pb2.EditRequest(
                operations=[
                    agent_pb2.EditOperation(replace=agent_pb2.ReplaceText(path=path, old_text=old, new_text=new))
                ]
            ),
            metadata=(("authorization", f"Bearer {session.agent_token}"),),
        )
