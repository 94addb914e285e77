"""The readiness probe: a plain HTTP GET of the preview URL, retried until the dev server answers."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from orchestrator.errors import NotReady

# Probing is one loopback connection: cheap enough to poll often, and every interval is added to time-to-ready.
# The first attempts follow each other quickly (a small dev server listens ~0.1 s after its start), then the
# interval doubles up to PROBE_INTERVAL_S (a slow start is not probed hundreds of times a second).
FIRST_INTERVAL_S = 0.005
PROBE_INTERVAL_S = 0.05
# One attempt may take this long before it counts as "no answer" (a dev server still compiling
# may hold the first request open for a while; the overall deadline still applies).
ATTEMPT_TIMEOUT_S = 5.0


async def http_status(url: str, timeout: float) -> int:
    """The status code of `GET url` (HTTP/1.1, no body read). Raises OSError or TimeoutError."""
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += f"?{parts.query}"
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
    fields = status_line.split(maxsplit=2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:80]!r}")
    return int(fields[1])


async def wait_until_ready(url: str, timeout: float, *, nudge: asyncio.Event | None = None) -> int:
    """Probes `url` until it answers 2xx or 3xx and returns that status. Raises NotReady after `timeout`.
    `nudge`, when set (by the dev server's output: it prints when it listens), ends a wait between attempts."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no attempt finished"
    interval = FIRST_INTERVAL_S
    while True:
        remaining = deadline - loop.time()
        try:
            status = await http_status(url, min(ATTEMPT_TIMEOUT_S, max(remaining, 0.1)))
            if 200 <= status < 400:
                return status
            last = f"HTTP {status}"
        except TimeoutError:
            last = "no answer within the attempt timeout"
        except OSError as error:
            last = error.strerror or str(error)
        if loop.time() + interval >= deadline:
            raise NotReady(f"{url} gave no 2xx/3xx answer within {timeout:g}s (last: {last})")
        await _pause(interval, nudge)
        interval = min(interval * 2, PROBE_INTERVAL_S)


async def _pause(seconds: float, nudge: asyncio.Event | None) -> None:
    """Sleeps `seconds`, or less if `nudge` is set meanwhile (then cleared for the next pause)."""
    if nudge is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await nudge.wait()
    nudge.clear()
