"""Headless Chromium (Debian's `chromium`) for the tests, driven over the DevTools protocol: a small CDP client
on aiohttp's WebSocket client (Chromium's own downloads, as Puppeteer's or Playwright's, are not reachable here)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

START_TIMEOUT_S = 60.0


class DevToolsError(RuntimeError):
    """Chromium answered a DevTools call with an error."""


class Page:
    """One tab, attached over the browser's DevTools socket with a flat session."""

    def __init__(self, browser: Chromium, session_id: str) -> None:
        self._browser = browser
        self._session_id = session_id

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        return await self._browser.call(method, params, session_id=self._session_id)

    def events(self, method: str) -> list[dict[str, Any]]:
        """The parameters of every event `method` of this tab so far (once its domain is enabled)."""
        return [event["params"] for event in self._browser.events if event.get("sessionId") == self._session_id
                and event["method"] == method]  # fmt: skip

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (awaited if it is a promise). Raises DevToolsError
        when it throws."""
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise DevToolsError(f"{expression}: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> Any:
        """Evaluates `expression` until it is truthy, then returns it. Raises TimeoutError with the last value."""
        last: Any = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    with contextlib.suppress(DevToolsError):  # e.g. while the document is being replaced
                        last = await self.evaluate(expression)
                        if last:
                            return last
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise TimeoutError(f"{expression} still {last!r} after {timeout:g}s") from None


class Chromium:
    """A headless Chromium with a fresh profile, its DevTools socket connected."""

    def __init__(self, process: subprocess.Popen[bytes], socket: aiohttp.ClientWebSocketResponse) -> None:
        self._process = process
        self._socket = socket
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Every event so far, in order (a test's few pages make few).
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def call(self, method: str, params: dict[str, Any] | None = None, session_id: str = "") -> dict[str, Any]:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        answer = self._pending[message_id] = asyncio.get_running_loop().create_future()
        await self._socket.send_str(json.dumps(message))
        return await answer

    async def new_page(self) -> Page:
        target = await self.call("Target.createTarget", {"url": "about:blank"})
        attached = await self.call("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
        page = Page(self, attached["sessionId"])
        await page.call("Runtime.enable")
        await page.call("Network.enable")
        return page

    async def _read(self) -> None:
        async for message in self._socket:
            if message.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(message.data)
            if "method" in data:
                self.events.append(data)
                continue
            future = self._pending.pop(data.get("id", 0), None)
            if future is None or future.done():
                continue
            if "error" in data:
                future.set_exception(DevToolsError(f"{data['error'].get('message')} ({data['error'].get('code')})"))
            else:
                future.set_result(data.get("result", {}))
        for future in self._pending.values():
            if not future.done():
                future.set_exception(DevToolsError("Chromium closed its DevTools socket"))

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._socket.close()


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.asynccontextmanager
async def chromium(profile: Path, *options: str) -> AsyncIterator[Chromium]:
    """Starts headless Chromium on a profile in `profile` with DevTools on a port it picks (told in the
    profile's DevToolsActivePort file), and `options` besides, connects, and stops it by its pid at the end."""
    executable = chromium_path()
    if executable is None:
        raise FileNotFoundError("no chromium on PATH: `make tools` installs Debian's package")
    profile.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--no-proxy-server", "--disable-extensions",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            *options, "about:blank",
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    client = aiohttp.ClientSession(trust_env=False)
    browser: Chromium | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        async with asyncio.timeout(START_TIMEOUT_S):
            while not (lines := port_file.read_text().split() if port_file.exists() else []) or len(lines) < 2:
                if process.poll() is not None:
                    raise RuntimeError(f"chromium exited with {process.returncode} before serving DevTools")
                await asyncio.sleep(0.1)
        socket = await client.ws_connect(f"ws://127.0.0.1:{lines[0]}{lines[1]}", max_msg_size=0)
        browser = Chromium(process, socket)
        yield browser
    finally:
        if browser is not None:
            await browser.close()
        await client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its own process group: the renderers and GPU process too
        process.wait()
