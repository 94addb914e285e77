"""The readiness probe: answers once the dev server does, and a nudge (its output) ends a wait between attempts."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator import readiness
from orchestrator.errors import NotReady


async def _serve_http(status: int) -> tuple[asyncio.Server, int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_the_probe_returns_the_first_2xx_answer() -> None:
    server, port = await _serve_http(204)
    async with server:
        assert await readiness.wait_until_ready(f"http://127.0.0.1:{port}/", 10) == 204


async def test_a_nudge_makes_the_probe_try_again_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the nudge the second attempt would come an hour later: the test would hit its own timeout.
    monkeypatch.setattr(readiness, "FIRST_INTERVAL_S", 3600.0)
    monkeypatch.setattr(readiness, "PROBE_INTERVAL_S", 3600.0)
    nudge = asyncio.Event()
    placeholder, port = await _serve_http(200)
    placeholder.close()  # the port is free: the first attempt is refused, as before a dev server listens
    await placeholder.wait_closed()
    probe = asyncio.create_task(readiness.wait_until_ready(f"http://127.0.0.1:{port}/", 7200, nudge=nudge))
    await asyncio.sleep(0.2)
    assert not probe.done()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async with await asyncio.start_server(answer, "127.0.0.1", port):
        nudge.set()  # what the dev server's "listening" line does
        async with asyncio.timeout(30):
            assert await probe == 200


async def test_no_answer_within_the_timeout_is_not_ready() -> None:
    placeholder, port = await _serve_http(200)
    placeholder.close()
    await placeholder.wait_closed()
    with pytest.raises(NotReady, match="gave no 2xx/3xx answer"):
        await readiness.wait_until_ready(f"http://127.0.0.1:{port}/", 0.3)


async def test_an_error_status_is_not_ready() -> None:
    server, port = await _serve_http(503)
    async with server:
        with pytest.raises(NotReady, match="last: HTTP 503"):
            await readiness.wait_until_ready(f"http://127.0.0.1:{port}/", 0.3)
