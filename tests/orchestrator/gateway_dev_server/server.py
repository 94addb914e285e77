"""A dev server for the gateway's tests (run by the local runtime on $PORT with the venv's Python): it shows
the Host and Origin it was sent, echoes WebSocket messages and request bodies, and streams a response in two
parts, the second only once asked for (so a test sees whether the first got through alone)."""

import asyncio
import hashlib
import json
import os

from aiohttp import web

released = asyncio.Event()


async def index(request: web.Request) -> web.Response:
    seen = {
        name: request.headers.get(name, "")
        for name in ("Host", "Origin", "Cookie", "X-Forwarded-Host", "X-Forwarded-Prefix")
    }
    return web.Response(text=f"<h1>gateway dev server</h1><pre>{json.dumps(seen)}</pre>", content_type="text/html")


async def echo_ws(request: web.Request) -> web.WebSocketResponse:
    socket = web.WebSocketResponse(protocols=("echo-protocol",))
    await socket.prepare(request)
    await socket.send_str(json.dumps({"host": request.headers["Host"], "origin": request.headers.get("Origin", "")}))
    async for message in socket:
        if message.type == web.WSMsgType.TEXT:
            if message.data == "close":
                await socket.close(code=4001, message=b"asked to")
                break
            await socket.send_str("echo: " + message.data)
        elif message.type == web.WSMsgType.BINARY:
            await socket.send_bytes(message.data[::-1])
    return socket


async def stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    await response.prepare(request)
    await response.write(b"first part\n")
    await released.wait()
    released.clear()
    await response.write(b"second part\n")
    return response


async def release(request: web.Request) -> web.Response:
    released.set()
    return web.Response(text="released")


async def body(request: web.Request) -> web.Response:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return web.json_response({"sha256": digest.hexdigest(), "size": size})


async def broken(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})  # chunked: no length to check against
    await response.prepare(request)
    await response.write(b"the start of a body")
    assert request.transport is not None
    request.transport.abort()
    return response


async def redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": f"http://{request.host}/landed"})


app = web.Application()
app.add_routes(
    [
        web.get("/", index),
        web.get("/ws", echo_ws),
        web.get("/stream", stream),
        web.post("/release", release),
        web.post("/body", body),
        web.get("/redirect", redirect),
        web.get("/broken", broken),
        web.get("/landed", index),
    ]
)
web.run_app(app, host="127.0.0.1", port=int(os.environ["PORT"]), print=None)
