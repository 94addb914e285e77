"""The preview gateway: one HTTP(S) address in front of every session's dev server, an aiohttp proxy in the
orchestrator's own process that checks the preview token or cookie, streams both ways and passes WebSockets.

Why in process and not Caddy or nginx driven through an API: the route of a request is the session record
itself (its state and preview URL, in the state database every replica reads) and its access check is the
HMAC of a token with a key every replica shares, so any number of orchestrator replicas behind one address
each serve any session's preview, with nothing to push to a proxy's configuration when a session is created,
moved or deleted, and no second process to keep in step (a deleted session is refused on the next request,
not after a reload). An external proxy would have to call back into the orchestrator to check each cookie and
session (nginx's auth_request, Caddy's forward_auth), adding a hop per request, or be handed routes that go
stale. For speed, what a preview carries is a dev server's traffic: many small module requests and an HMR
socket, where aiohttp's C parser and one copy of each chunk (never buffering a whole body) cost well under a
millisecond per request on loopback; a workspace on another host of a swarm is reached the same way, at the
preview URL the runtime reports for it."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from common.startup import StartupError, check_bindable
from orchestrator.errors import (
    NotFound,
    OrchestratorError,
    PreviewDenied,
    PreviewForbidden,
    PreviewPathRefused,
    PreviewUnauthorized,
)
from orchestrator.gateway.routing import Route, route
from orchestrator.gateway.tokens import PreviewSigner
from orchestrator.sessions.live import PENDING, READY, SETTLED, STARTING
from orchestrator.sessions.manager import SessionManager
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

log = logging.getLogger(__name__)

# The query parameter a token arrives in (not `token`: Vite's own HMR socket carries `?token=`).
TOKEN_PARAMETER = "preview_token"
COOKIE = "workspace_preview"
# The gateway's own path under every preview, for the starting page's wait (outside any app's routes).
READY_PATH = "/.workspace-preview/ready"
# How long one wait of the starting page is held open before the page asks again.
READY_WAIT_S = 25.0
# An answer from the domain errors the gateway meets, one table as for gRPC (orchestrator.errors.STATUS_CODES).
HTTP_STATUS: dict[type[Exception], int] = {
    PreviewUnauthorized: HTTPStatus.UNAUTHORIZED,
    PreviewForbidden: HTTPStatus.FORBIDDEN,
    PreviewPathRefused: HTTPStatus.BAD_REQUEST,
    NotFound: HTTPStatus.NOT_FOUND,
}
# Headers of one connection, not of the message (RFC 9110 7.6.1), never forwarded either way.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-connection"}
)  # fmt: skip
# Set by the WebSocket handshake of each hop itself.
WEBSOCKET_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
     "sec-websocket-accept"}
)  # fmt: skip


@dataclass(frozen=True)
class GatewayAddress:
    """Where browsers reach the gateway: scheme, preview domain and port, for the URLs of a token."""

    scheme: str
    domain: str
    port: int

    def _netloc(self, host: str) -> str:
        default = {"http": 80, "https": 443}[self.scheme]
        return host if self.port == default else f"{host}:{self.port}"

    def host_url(self, session_id: str) -> str:
        return f"{self.scheme}://{self._netloc(f'{session_id}.{self.domain}')}/"

    def path_url(self, session_id: str) -> str:
        return f"{self.scheme}://{self._netloc(self.domain)}/preview/{session_id}/"


class PreviewGateway:
    """The gateway's server: bound at construction (so a taken address fails the start-up), serving once started."""

    def __init__(
        self,
        sessions: SessionManager,
        signer: PreviewSigner,
        address: str,
        domain: str,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self._sessions = sessions
        self._signer = signer
        self._domain = domain
        self._tls = _tls_context(tls_cert, tls_key)
        check_bindable(address, "--preview-address")
        host, _, port = address.rpartition(":")
        family = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM)[0][0]
        self._socket = socket.create_server((host.strip("[]"), int(port)), family=family)
        self.address = GatewayAddress("https" if self._tls else "http", domain, self._socket.getsockname()[1])
        self._runner: web.ServerRunner | None = None
        self._client: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        # No decompression (bodies pass as the dev server encoded them), no cookie jar (cookies are the
        # browser's), no automatic Accept-Encoding or User-Agent (the browser's are forwarded), no timeout
        # on a whole response (an event stream may last all day), no proxy from the environment.
        self._client = aiohttp.ClientSession(
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            trust_env=False,
        )
        self._runner = web.ServerRunner(
            web.Server(self._handle), handle_signals=False, access_log=None, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.SockSite(self._runner, self._socket, ssl_context=self._tls)
        await site.start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        else:
            self._socket.close()
        if self._client is not None:
            await self._client.close()

    # ------------------------------------------------------------------ one request

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            found = route(request.host, request.raw_path, self._domain)
            if found is None:
                raise NotFound("no preview here: open /preview/<session>/ or <session>." + self._domain)
            session = await self._sessions.get(found.session_id)
            if session.state not in (PENDING, STARTING, READY, pb.SESSION_STATE_FAILED):
                raise NotFound(f"session {session.id} is {pb.SessionState.Name(session.state)}: no preview")
            exchanged = self._exchange(request, found, session)
            if exchanged is not None:
                return exchanged
            if not found.target:
                return _redirect(HTTPStatus.FOUND, found.prefix + "/")
            self._touch(session.id)
            if _path_of(found.target) == READY_PATH:
                return await self._wait_ready(session.id)
            if session.state != READY:
                return _starting_page(session, found)
            try:
                if request.headers.get("Upgrade", "").lower() == "websocket":
                    return await self._relay_websocket(request, found, session)
                return await self._relay_http(request, found, session)
            finally:
                self._touch(session.id)
        except (PreviewDenied, PreviewPathRefused, NotFound) as error:
            return _error_page(error)

    def _exchange(self, request: web.BaseRequest, found: Route, session: pb.Session) -> web.StreamResponse | None:
        """Checks the request's access; with a valid `?preview_token=`, the redirect that trades it for the
        cookie (HttpOnly, for the session's host only, or in the path form for its path only), to the same URL
        without it. None when the request may go on. Raises PreviewUnauthorized, PreviewForbidden."""
        query = request.query
        if TOKEN_PARAMETER in query:
            claim = self._signer.check(query[TOKEN_PARAMETER], session.id)
            kept = [(key, value) for key, value in parse_qsl(request.query_string, True) if key != TOKEN_PARAMETER]
            location = (found.prefix + _path_of(found.target) if found.target else found.prefix + "/") + (
                "?" + urlencode(kept) if kept else ""
            )
            response = _redirect(HTTPStatus.SEE_OTHER, location)
            # Over HTTPS the cookie also works in an IDE's iframe on another site: SameSite=None (which browsers
            # take only with Secure), Partitioned (CHIPS: kept per embedding site, as browsers without third-party
            # cookies require). Plain HTTP cannot: Lax, for top-level pages and their own requests only. Written
            # out here: Python 3.11's http.cookies knows no Partitioned; a token needs no quoting (base64url, dots).
            attributes = (
                ["HttpOnly", "Secure", "SameSite=None", "Partitioned"] if self._tls else ["HttpOnly", "SameSite=Lax"]
            )
            max_age = max(0, int(claim.expires_at - time.time()))
            response.headers.add(
                "Set-Cookie",
                "; ".join(
                    [f"{COOKIE}={query[TOKEN_PARAMETER]}", f"Path={found.prefix}/", f"Max-Age={max_age}", *attributes]
                ),
            )
            return response
        if session.public_preview:
            return None
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            raise PreviewUnauthorized(
                f"the preview of session {session.id} needs a token: open the URL CreatePreviewToken returns"
            )
        self._signer.check(cookie, session.id)
        return None

    def _touch(self, session_id: str) -> None:
        """Gateway traffic is activity for the idle reaper (see SessionReaper.reap_if_due)."""
        live = self._sessions.live_session(session_id)
        if live is not None:
            live.preview_activity = time.time()

    async def _wait_ready(self, session_id: str) -> web.Response:
        """The starting page's wait: answers once the session settled (or after READY_WAIT_S) with its state."""
        state = pb.SESSION_STATE_UNSPECIFIED
        with contextlib.suppress(TimeoutError, NotFound):
            async with asyncio.timeout(READY_WAIT_S):
                while state not in SETTLED:
                    async for event in self._sessions.watch(session_id):  # ends once it settled, here
                        if event.HasField("session"):
                            state = event.session.state
                    if state not in SETTLED:  # another replica holds it: its record, read again shortly
                        await asyncio.sleep(0.5)
        body = json.dumps({"state": pb.SessionState.Name(state).removeprefix("SESSION_STATE_")})
        return web.Response(text=body, content_type="application/json", headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ proxying

    async def _relay_http(self, request: web.BaseRequest, found: Route, session: pb.Session) -> web.StreamResponse:
        assert self._client is not None
        upstream = _upstream(session)
        headers = self._forwarded_headers(request, found, upstream)
        body = request.content if request.body_exists else None
        try:
            answer = await self._client.request(
                request.method, _upstream_url(upstream, found.target), headers=headers, data=body,
                allow_redirects=False, compress=None, chunked=None,
            )  # fmt: skip
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            return _page(
                HTTPStatus.BAD_GATEWAY, "The dev server does not answer",
                f"Session {session.id}'s dev server did not answer ({type(error).__name__}): is it still running?"
                " (wsctl logs shows its output)",
            )  # fmt: skip
        try:
            response = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                lowered = name.lower()
                if lowered in HOP_BY_HOP:
                    continue
                if lowered == "location":
                    value = self._outward_location(value, request, found, upstream)
                response.headers.add(name, value)
            await response.prepare(request)
            try:
                # Each chunk as it arrives: an event stream or a long download is never held back.
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                    self._touch(session.id)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError):
                # The dev server broke off mid-body (or the browser left): cut the browser's connection too, so
                # a partial body is never taken for a whole one.
                if request.transport is not None:
                    request.transport.abort()
                answer.close()
                return response
            await response.write_eof()
            return response
        finally:
            answer.release()

    async def _relay_websocket(self, request: web.BaseRequest, found: Route, session: pb.Session) -> web.StreamResponse:
        """Connects to the dev server's socket first, with the browser's subprotocols, and only then accepts the
        browser's with the one the dev server chose (Vite's `vite-hmr`); then relays frames both ways until
        either side closes, with its close code."""
        assert self._client is not None
        upstream = _upstream(session)
        headers = self._forwarded_headers(request, found, upstream)
        protocols = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip()]
        url = _upstream_url(upstream, found.target).with_scheme("wss" if upstream.scheme == "https" else "ws")
        try:
            inner = await self._client.ws_connect(url, protocols=protocols, headers=headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as error:
            return web.Response(status=error.status, text=f"the dev server refused the WebSocket: {error.message}")
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            return _page(HTTPStatus.BAD_GATEWAY, "The dev server does not answer", f"WebSocket: {error}")
        outer = web.WebSocketResponse(protocols=[inner.protocol] if inner.protocol else (), max_msg_size=0)
        try:
            await outer.prepare(request)

            async def pump(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, sink) -> None:
                async for message in source:
                    self._touch(session.id)
                    if message.type == aiohttp.WSMsgType.TEXT:
                        await sink.send_str(message.data)
                    elif message.type == aiohttp.WSMsgType.BINARY:
                        await sink.send_bytes(message.data)
                await sink.close(code=source.close_code or aiohttp.WSCloseCode.OK)

            tasks = [asyncio.create_task(pump(inner, outer)), asyncio.create_task(pump(outer, inner))]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await inner.close()
        return outer

    def _forwarded_headers(self, request: web.BaseRequest, found: Route, upstream: _Upstream) -> CIMultiDict[str]:
        """The browser's headers as the dev server expects them: Host `localhost:<port>` (see
        _Upstream.presented_host), an Origin of this preview rewritten the same way (other origins stay what they
        are, for the dev server's CORS check), the gateway's cookie and hop-by-hop headers left out, and where the
        request really came from in X-Forwarded-Host/-Proto/-For (and the path form's X-Forwarded-Prefix)."""
        connection_named = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in request.headers.items():
            lowered = name.lower()
            if lowered in HOP_BY_HOP or lowered in connection_named or lowered in WEBSOCKET_HANDSHAKE:
                continue
            if lowered == "host":
                continue
            if lowered == "cookie":
                value = _without_cookie(value, COOKIE)
                if not value:
                    continue
            if lowered == "origin" and value == self._origin(request):
                value = upstream.presented_origin
            headers.add(name, value)
        headers["Host"] = upstream.presented_host
        headers["X-Forwarded-Host"] = request.host
        headers["X-Forwarded-Proto"] = request.scheme
        if request.remote:
            headers["X-Forwarded-For"] = request.remote
        if found.prefix:
            headers["X-Forwarded-Prefix"] = found.prefix
        return headers

    def _origin(self, request: web.BaseRequest) -> str:
        return f"{request.scheme}://{request.host}"

    def _outward_location(self, location: str, request: web.BaseRequest, found: Route, upstream: _Upstream) -> str:
        """A redirect of the dev server's to itself, as the browser must follow it: through this preview."""
        parts = urlsplit(location)
        if parts.netloc and parts.netloc not in (upstream.netloc, upstream.presented_host):
            return location  # elsewhere: left alone
        if not parts.netloc and not location.startswith("/"):
            return location  # relative: resolves against the preview's own URL already
        rest = location[len(f"{parts.scheme}://{parts.netloc}") :] if parts.netloc else location
        return (self._origin(request) if parts.netloc else "") + found.prefix + (rest or "/")


@dataclass(frozen=True)
class _Upstream:
    """The dev server: where it is reached (the session's preview URL) and the name it is shown as."""

    scheme: str
    netloc: str
    port: int

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.netloc}"

    @property
    def presented_host(self) -> str:
        # `localhost`, whatever address reaches it (a published loopback port, a container on another host of a
        # swarm): the one name every dev server's host check accepts by default (Vite's `server.allowedHosts`,
        # webpack-dev-server's `allowedHosts`, Next's and Astro's), so no template has to list preview domains.
        return f"localhost:{self.port}"

    @property
    def presented_origin(self) -> str:
        return f"{self.scheme}://{self.presented_host}"


def _upstream(session: pb.Session) -> _Upstream:
    parts = urlsplit(session.preview_url)
    scheme = parts.scheme or "http"
    return _Upstream(scheme, parts.netloc, parts.port or {"http": 80, "https": 443}[scheme])


def _upstream_url(upstream: _Upstream, target: str) -> URL:
    # `encoded=True`: the target goes to the dev server byte for byte, never re-quoted or normalized.
    return URL(f"{upstream.origin}{target}", encoded=True)


def _path_of(target: str) -> str:
    return target.partition("?")[0]


def _without_cookie(header: str, name: str) -> str:
    kept = [part for part in (p.strip() for p in header.split(";")) if part and part.partition("=")[0] != name]
    return "; ".join(kept)


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise StartupError("give both --preview-tls-cert and --preview-tls-key, or neither (plain HTTP)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as error:
        raise StartupError(f"cannot load the preview TLS certificate {cert} and key {key}: {error}") from error
    return context


# ---------------------------------------------------------------- pages


def _page(
    status: int, title: str, text: str, script: str = "", headers: Iterable[tuple[str, str]] = ()
) -> web.Response:
    body = (
        "<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        f"<title>{html.escape(title)}</title><style>body{{font:16px system-ui,sans-serif;margin:3em auto;"
        f"max-width:40em;color:#333}}</style></head><body><h1>{html.escape(title)}</h1><p id=detail>"
        f"{html.escape(text)}</p>{script}</body></html>"
    )
    response = web.Response(status=status, text=body, content_type="text/html")
    response.headers["Cache-Control"] = "no-store"
    for name, value in headers:
        response.headers[name] = value
    return response


def _redirect(status: int, location: str) -> web.Response:
    return web.Response(status=status, headers={"Location": location, "Cache-Control": "no-store"})


def _error_page(error: OrchestratorError) -> web.Response:
    status = next(code for kind, code in HTTP_STATUS.items() if isinstance(error, kind))
    return _page(status, HTTPStatus(status).phrase, str(error))


def _starting_page(session: pb.Session, found: Route) -> web.Response:
    """503 with a page that waits for the session to settle, then loads the app (or shows why it failed)."""
    if session.state == pb.SESSION_STATE_FAILED:
        failure = session.failure
        return _page(
            HTTPStatus.SERVICE_UNAVAILABLE, "The workspace failed",
            f"Session {session.id} failed in {pb.Phase.Name(failure.phase)}: {failure.reason}",
        )  # fmt: skip
    wait = json.dumps(found.prefix + READY_PATH)
    script = (
        "<script>(async()=>{for(;;){try{const r=await fetch(" + wait + ",{cache:'no-store'});"
        "const s=(await r.json()).state;if(s==='READY'||s==='FAILED'||s==='STOPPED'){location.reload();return}}"
        "catch(e){await new Promise(f=>setTimeout(f,1000))}}})()</script>"
    )
    phase = pb.Phase.Name(session.phase).removeprefix("PHASE_").lower().replace("_", " ")
    return _page(
        HTTPStatus.SERVICE_UNAVAILABLE, "Starting…",
        f"Session {session.id} is starting ({phase}); this page loads the app once it is ready.",
        script, headers=[("Retry-After", "1")],
    )  # fmt: skip
