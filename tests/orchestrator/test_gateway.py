"""The preview gateway through a real orchestrator (local runtime) and real HTTP: tokens and cookies, the path
form's bad input, the starting page, 404 after delete, WebSockets, streaming both ways, activity."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from google.protobuf.duration_pb2 import Duration
from yarl import URL

from common.startup import StartupError
from common.tools import ENV_BIN
from orchestrator.config import OrchestratorConfig
from orchestrator.gateway import PreviewSigner, load_signing_key
from orchestrator.gateway.proxy import COOKIE
from orchestrator.server import create_server
from tests.conftest import REPO
from tests.orchestrator.conftest import (
    OrchestratorUnderTest,
    start_orchestrator,
    stop_all_workspaces,
    watch_until_settled,
)
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

DEV_SERVER = Path(__file__).parent / "gateway_dev_server" / "server.py"
APP_TEXT = "gateway dev server"
IDLE_TTL_S = 0.5


def echo_template(templates: Path, name: str, dev_command: str) -> None:
    folder = templates / name
    folder.mkdir()
    shutil.copy(DEV_SERVER, folder / "server.py")
    metadata = {
        "name": name, "title": name, "install_command": "", "dev_command": dev_command, "dev_port": 4321,
        "readiness": {"path": "/", "timeout_seconds": 60},
    }  # fmt: skip
    (folder / "template.json").write_text(json.dumps(metadata))


@pytest.fixture
def orchestrator_config(orchestrator_config: OrchestratorConfig, templates: Path) -> OrchestratorConfig:
    python = sys.executable  # the venv's: it has aiohttp
    echo_template(templates, "echo", f"exec {python} server.py")
    # Starts its dev server only once a file `go` appears in the workspace: a session held before READY.
    echo_template(templates, "gated", f"while [ ! -e go ]; do sleep 0.05; done; exec {python} server.py")
    return OrchestratorConfig(
        **{
            **vars(orchestrator_config),
            "preview_address": "127.0.0.1:0",
            "preview_domain": "localhost",
            "idle_ttl_s": IDLE_TTL_S,
        }
    )


class Browser:
    """HTTP to the gateway as a browser would send it to `<session>.localhost` (or the path form), with
    the cookies it was given kept per host and path by hand, so a test can also send them where they do not
    belong."""

    def __init__(
        self,
        client: aiohttp.ClientSession,
        port: int,
        scheme: str = "http",
        ssl: ssl.SSLContext | None = None,
        domain: str = "localhost",
    ) -> None:
        self.client = client
        self.domain = domain
        self.port = port
        self.base = f"{scheme}://127.0.0.1:{port}"
        self.ssl = ssl

    def host(self, session_id: str) -> str:
        return f"{session_id}.{self.domain}"

    def get(self, host: str, target: str, cookie: str = "", **options) -> aiohttp.client._RequestContextManager:
        headers = {"Host": f"{host}:{self.port}", **options.pop("headers", {})}
        if cookie:
            headers["Cookie"] = f"{COOKIE}={cookie}"
        # `encoded`: the target as written, `..` and all (a browser would resolve it; an attacker's client does not).
        url = URL(self.base + target, encoded=True)
        if self.ssl is not None:  # the certificate is checked against the host the browser would ask for
            options.update(ssl=self.ssl, server_hostname=host)
        return self.client.request(options.pop("method", "GET"), url, headers=headers, allow_redirects=False, **options)

    async def exchange(self, url: str) -> tuple[str, str]:
        """Opens the URL CreatePreviewToken gave; returns the cookie the gateway set and its attributes."""
        parts = urlsplit(url)
        async with self.get(parts.hostname or "", f"{parts.path}?{parts.query}") as response:
            assert response.status == 303, await response.text()
            assert COOKIE not in response.headers["Location"] and "preview_token" not in response.headers["Location"]
            morsel = response.cookies[COOKIE]
            return morsel.value, response.headers["Set-Cookie"]


@pytest.fixture
async def browser(orchestrator: OrchestratorUnderTest) -> AsyncIterator[Browser]:
    gateway = orchestrator.orchestrator.gateway
    assert gateway is not None
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False) as client:
        yield Browser(client, gateway.address.port)


async def ready(o: OrchestratorUnderTest, template: str = "echo", **fields) -> pb.Session:
    created = await o.stub.CreateSession(pb.CreateSessionRequest(template=template, **fields))
    session = (await watch_until_settled(o.stub, created.session.id))[-1].session
    assert session.state == pb.SESSION_STATE_READY, session.failure
    return session


async def token(o: OrchestratorUnderTest, session_id: str, ttl_s: int = 600) -> pb.CreatePreviewTokenResponse:
    return await o.stub.CreatePreviewToken(pb.CreatePreviewTokenRequest(id=session_id, ttl=Duration(seconds=ttl_s)))


async def test_a_token_opens_the_preview_once_traded_for_a_host_cookie_and_nothing_else_does(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    session = await ready(orchestrator)
    minted = await token(orchestrator, session.id)
    assert minted.url.startswith(f"http://{session.id}.localhost:{browser.port}/?preview_token=")
    host = browser.host(session.id)

    async with browser.get(host, "/") as response:
        assert response.status == 401 and APP_TEXT not in await response.text()
    forged = PreviewSigner(b"another orchestrator's key!").mint(session.id, 600)[0]
    # Signed with the orchestrator's own key (the data directory's), expired a second ago.
    expired = PreviewSigner(load_signing_key(orchestrator.config.preview_signing_key)).mint(session.id, -1)[0]
    # The real token with a later expiry written in: the signature no longer matches.
    _, _, expiry, signature = minted.token.split(".")
    extended = f"p1.{session.id}.{int(expiry) + 86400}.{signature}"
    for bad, status in ((forged, 403), (expired, 401), (extended, 403), ("not-a-token", 403)):
        async with browser.get(host, f"/?preview_token={bad}") as response:
            assert response.status == status and APP_TEXT not in await response.text()
        async with browser.get(host, "/", cookie=bad) as response:
            assert response.status == status and APP_TEXT not in await response.text()

    cookie, attributes = await browser.exchange(minted.url)
    assert "HttpOnly" in attributes and "Path=/;" in attributes + ";" and "Domain" not in attributes
    assert "SameSite=Lax" in attributes and "Secure" not in attributes
    async with browser.get(host, "/", cookie=cookie) as response:
        page = await response.text()
        assert response.status == 200 and APP_TEXT in page
    async with browser.get(host, "/", cookie=cookie, method="HEAD") as response:
        assert response.status == 200 and await response.read() == b""
    seen = json.loads(page.split("<pre>")[1].split("</pre>")[0])
    # The dev server sees itself as localhost (what every host check accepts), never the gateway's cookie.
    assert seen["Host"] == f"localhost:{urlsplit(session.preview_url).port}"
    assert seen["X-Forwarded-Host"] == f"{host}:{browser.port}" and COOKIE not in seen["Cookie"]


async def test_another_sessions_cookie_or_token_is_refused(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    mine, theirs = await ready(orchestrator), await ready(orchestrator)
    cookie, _ = await browser.exchange((await token(orchestrator, mine.id)).url)
    their_token = (await token(orchestrator, theirs.id)).token

    async with browser.get(browser.host(theirs.id), "/", cookie=cookie) as response:
        assert response.status == 403 and APP_TEXT not in await response.text()
    async with browser.get(browser.host(mine.id), f"/?preview_token={their_token}") as response:
        assert response.status == 403
    async with browser.get("localhost", f"/preview/{theirs.id}/", cookie=cookie) as response:
        assert response.status == 403 and APP_TEXT not in await response.text()


async def test_the_path_form_is_scoped_to_its_path_and_refuses_escapes(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    mine, other = await ready(orchestrator), await ready(orchestrator)
    minted = await token(orchestrator, mine.id)
    assert minted.path_url.startswith(f"http://localhost:{browser.port}/preview/{mine.id}/?preview_token=")
    cookie, attributes = await browser.exchange(minted.path_url)
    assert f"Path=/preview/{mine.id}/" in attributes

    async with browser.get("localhost", f"/preview/{mine.id}", cookie=cookie) as response:
        assert response.status == 302 and response.headers["Location"] == f"/preview/{mine.id}/"
    async with browser.get("localhost", f"/preview/{mine.id}/", cookie=cookie) as response:
        page = await response.text()
        assert response.status == 200 and APP_TEXT in page and f'"X-Forwarded-Prefix": "/preview/{mine.id}"' in page
    # The dev server's redirect to itself comes back through the preview.
    async with browser.get("localhost", f"/preview/{mine.id}/redirect", cookie=cookie) as response:
        assert response.headers["Location"] == f"http://localhost:{browser.port}/preview/{mine.id}/landed"

    escapes = [
        f"/preview/{mine.id}/../{other.id}/",
        f"/preview/{mine.id}/%2e%2e/{other.id}/",
        f"/preview/{mine.id}/.%2E/{other.id}/",
        f"/preview/{mine.id}/..%2f{other.id}/",
        f"/preview/{mine.id}/x%2F..%2F..%2F{other.id}/",
        f"/preview/{mine.id}/%252e%252e/{other.id}/",
        f"/preview/{mine.id}/..%5c{other.id}/",
        f"/preview/..%2f{other.id}/",
    ]
    for target in escapes:
        async with browser.get("localhost", target, cookie=cookie) as response:
            assert response.status == 400, (target, response.status)
            assert APP_TEXT not in await response.text()


async def test_a_session_not_ready_gets_a_starting_page_that_waits_then_the_app(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    created = (await orchestrator.stub.CreateSession(pb.CreateSessionRequest(template="gated"))).session
    cookie, _ = await browser.exchange((await token(orchestrator, created.id)).url)
    host = browser.host(created.id)

    async with browser.get(host, "/", cookie=cookie) as response:
        page = await response.text()
        assert response.status == 503 and "Starting…" in page and "/.workspace-preview/ready" in page
        assert response.headers["Cache-Control"] == "no-store"
    waiting = asyncio.create_task(_json(browser, host, "/.workspace-preview/ready", cookie))
    # The wait is answered once the session is READY: the dev server starts once `go` exists.
    done, _ = await asyncio.wait({waiting}, timeout=0.3)
    assert not done, waiting.result()
    root = orchestrator.config.workspaces_dir / created.id / "app"
    (root / "go").write_text("")
    assert (await waiting) == {"state": "READY"}
    async with browser.get(host, "/", cookie=cookie) as response:
        assert response.status == 200 and APP_TEXT in await response.text()


async def _json(browser: Browser, host: str, target: str, cookie: str) -> dict:
    async with browser.get(host, target, cookie=cookie) as response:
        assert response.status == 200
        return await response.json()


async def test_a_deleted_or_unknown_session_is_404(orchestrator: OrchestratorUnderTest, browser: Browser) -> None:
    session = await ready(orchestrator)
    cookie, _ = await browser.exchange((await token(orchestrator, session.id)).url)
    async with browser.get(browser.host(session.id), "/", cookie=cookie) as response:
        assert response.status == 200
    await orchestrator.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))

    async with browser.get(browser.host(session.id), "/", cookie=cookie) as response:
        assert response.status == 404 and APP_TEXT not in await response.text()
    async with browser.get(browser.host("ws-0000000000"), "/", cookie=cookie) as response:
        assert response.status == 404
    async with browser.get("localhost", f"/preview/{session.id}/", cookie=cookie) as response:
        assert response.status == 404


async def test_a_public_preview_needs_no_token(orchestrator: OrchestratorUnderTest, browser: Browser) -> None:
    public, private = await ready(orchestrator, public_preview=True), await ready(orchestrator)
    assert public.public_preview and not private.public_preview
    async with browser.get(browser.host(public.id), "/") as response:
        assert response.status == 200 and APP_TEXT in await response.text()
    async with browser.get(browser.host(private.id), "/") as response:
        assert response.status == 401


async def test_websockets_pass_through_with_subprotocol_origin_and_close_code(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    session = await ready(orchestrator)
    cookie, _ = await browser.exchange((await token(orchestrator, session.id)).url)
    host = f"{browser.host(session.id)}:{browser.port}"
    headers = {"Host": host, "Cookie": f"{COOKIE}={cookie}"}

    async with browser.client.ws_connect(
        f"{browser.base}/ws", protocols=("echo-protocol",), headers=headers, origin=f"http://{host}"
    ) as socket:
        assert socket.protocol == "echo-protocol"
        hello = json.loads((await socket.receive()).data)
        upstream = f"localhost:{urlsplit(session.preview_url).port}"
        assert hello == {"host": upstream, "origin": f"http://{upstream}"}
        await socket.send_str("hi")
        assert (await socket.receive()).data == "echo: hi"
        await socket.send_bytes(b"\x00\x01\x02")
        assert (await socket.receive()).data == b"\x02\x01\x00"
        await socket.send_str("close")
        closing = await socket.receive()
        assert closing.type == aiohttp.WSMsgType.CLOSE and socket.close_code == 4001

    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await browser.client.ws_connect(f"{browser.base}/ws", headers={"Host": host})
    assert refused.value.status == 401


async def test_responses_stream_unbuffered_and_request_bodies_stream(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    session = await ready(orchestrator)
    cookie, _ = await browser.exchange((await token(orchestrator, session.id)).url)
    host = browser.host(session.id)

    async with browser.get(host, "/stream", cookie=cookie) as response:
        # The dev server holds the second part until released: the first must arrive on its own.
        assert await response.content.readline() == b"first part\n"
        async with browser.get(host, "/release", cookie=cookie, method="POST") as released:
            assert released.status == 200
        assert await response.content.read() == b"second part\n"

    # A body the dev server breaks off reaches the browser broken off too, never as a complete (short) one.
    async with browser.get(host, "/broken", cookie=cookie) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()

    payload = os.urandom(3 * 1024 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 256 * 1024):
            yield payload[start : start + 256 * 1024]

    async with browser.get(host, "/body", cookie=cookie, method="POST", data=chunks()) as response:
        assert await response.json() == {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}


async def test_preview_traffic_counts_as_activity_for_the_idle_reaper(
    orchestrator: OrchestratorUnderTest, browser: Browser
) -> None:
    session = await ready(orchestrator)
    cookie, _ = await browser.exchange((await token(orchestrator, session.id)).url)
    live = orchestrator.orchestrator.sessions.live_session(session.id)
    assert live is not None
    agent_last = (await live.connected_agent.activity()).last_activity.ToNanoseconds() / 1e9
    await asyncio.sleep(IDLE_TTL_S)  # so that the agent's activity alone is older than the idle TTL
    async with browser.get(browser.host(session.id), "/", cookie=cookie) as response:
        assert response.status == 200
    browsed = time.time()
    assert browsed - agent_last > IDLE_TTL_S

    reaper = orchestrator.orchestrator.reaper
    # Within the TTL of the preview request (past it for the agent's last call): kept, its activity recorded.
    assert await reaper.reap_if_due(live, now=browsed + IDLE_TTL_S / 2) == ""
    recorded = (await orchestrator.stub.GetSession(pb.GetSessionRequest(id=session.id))).session
    assert recorded.last_activity_at.ToNanoseconds() / 1e9 >= browsed - 0.1 > agent_last
    assert "idle for" in await reaper.reap_if_due(live, now=browsed + IDLE_TTL_S * 4)


async def test_create_preview_token_bad_input(orchestrator: OrchestratorUnderTest) -> None:
    from grpc import StatusCode, aio

    for request, code in (
        (pb.CreatePreviewTokenRequest(id="ws-0000000000"), StatusCode.NOT_FOUND),
        (
            pb.CreatePreviewTokenRequest(id="ws-0000000000", ttl=Duration(seconds=8 * 24 * 3600)),
            StatusCode.INVALID_ARGUMENT,
        ),
    ):
        with pytest.raises(aio.AioRpcError) as raised:
            await orchestrator.stub.CreatePreviewToken(request)
        assert raised.value.code() == code
    session = await ready(orchestrator)
    minted = await orchestrator.stub.CreatePreviewToken(pb.CreatePreviewTokenRequest(id=session.id))
    assert 3590 < minted.expires_at.seconds - time.time() <= 3600
    assert parse_qs(urlsplit(minted.url).query)["preview_token"] == [minted.token]
    await orchestrator.stub.DeleteSession(pb.DeleteSessionRequest(id=session.id))
    with pytest.raises(aio.AioRpcError) as raised:
        await orchestrator.stub.CreatePreviewToken(pb.CreatePreviewTokenRequest(id=session.id))
    assert raised.value.code() == StatusCode.FAILED_PRECONDITION


async def test_the_readme_preview_lines_work_as_written(orchestrator: OrchestratorUnderTest, tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Previews") :]
    block = re.search(r"```sh\n(.*?)```", section[: section.index("\n## ", 1)], re.S)
    assert block, "no ```sh block under ## Previews in README.md"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert lines[0] == ". .venv/bin/activate"
    gateway = orchestrator.orchestrator.gateway
    assert gateway is not None
    # The environment running the tests, wherever it is, and the port this gateway got in place of the README's.
    script = [
        "set -euo pipefail",
        f". {ENV_BIN}/activate",
        *(line.replace(":8080", f":{gateway.address.port}") for line in lines[1:]),
    ]
    env = {**os.environ, "COLUMNS": "250", "WSCTL_SERVER": f"127.0.0.1:{orchestrator.orchestrator.port}"}
    shell = await asyncio.create_subprocess_exec(
        "bash", "-c", "\n".join(script), cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(120):
        stdout, stderr = await shell.communicate()

    assert shell.returncode == 0, stdout.decode() + stderr.decode()
    printed = stdout.decode().splitlines()
    assert printed[:3] == ["401", "303", "Hello from node-basic"] and printed[4:] == ["404"], printed
    assert re.fullmatch(rf"http://localhost:{gateway.address.port}/preview/ws-\w+/\?preview_token=p1\.\S+", printed[3])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a certificate")
async def test_the_gateway_speaks_https_with_a_certificate_and_sets_secure_cookies(
    orchestrator_config: OrchestratorConfig, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=preview.localhost", "-addext", "subjectAltName=DNS:*.preview.localhost", "-days", "1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(StartupError, match="--preview-tls-key"):
        await create_server(dataclasses.replace(orchestrator_config, preview_tls_cert=cert))
    # A wildcard needs two labels below it: *.localhost would match no host.
    config = dataclasses.replace(
        orchestrator_config, preview_tls_cert=cert, preview_tls_key=key, preview_domain="preview.localhost"
    )
    o = await start_orchestrator(config)
    try:
        session = await ready(o)
        minted = await token(o, session.id)
        assert minted.url.startswith(f"https://{session.id}.preview.localhost:")
        trusted = ssl.create_default_context(cafile=str(cert))
        gateway = o.orchestrator.gateway
        assert gateway is not None
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), trust_env=False) as client:
            browser = Browser(client, gateway.address.port, scheme="https", ssl=trusted, domain="preview.localhost")
            cookie, attributes = await browser.exchange(minted.url)
            assert all(word in attributes for word in ("Secure", "HttpOnly", "SameSite=None", "Partitioned"))
            async with browser.get(browser.host(session.id), "/", cookie=cookie) as response:
                assert response.status == 200 and APP_TEXT in await response.text()
    finally:
        await o.close()
        await stop_all_workspaces(config)
