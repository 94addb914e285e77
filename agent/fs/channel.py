"""A bounded byte channel between the event loop and one worker thread, for streaming archives both ways."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from agent.errors import Cancelled

T = TypeVar("T")


class ByteChannel:
    """A FIFO of byte chunks holding at most `capacity` bytes, with one side on the event loop and the
    other in a worker thread, in either direction.

    A full channel makes the producer wait (the loop side awaits, the thread side blocks), so a slow
    consumer slows the producer down instead of letting memory grow: backpressure. `close()` marks the
    end of the data; `abort()` makes both sides give up (the thread side raises `Cancelled`).
    """

    def __init__(self, capacity: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._capacity = capacity
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._closed = False
        self._aborted = False
        self._changed = threading.Condition()
        # The loop side waits on this future for the thread side to make room or add data.
        self._loop_waiter: asyncio.Future[None] | None = None

    # ---------------------------------------------------------------- either side

    def close(self) -> None:
        """No more chunks will be put; the consumer gets the rest, then the end."""
        with self._changed:
            self._closed = True
            self._notify()

    def abort(self) -> None:
        """Both sides stop: waiting and later calls return at once (thread side: raise Cancelled)."""
        with self._changed:
            self._aborted = True
            self._notify()

    @property
    def aborted(self) -> bool:
        return self._aborted

    def _notify(self) -> None:
        # Called with the lock held.
        self._changed.notify_all()
        waiter, self._loop_waiter = self._loop_waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    # ---------------------------------------------------------------- event-loop side

    async def put(self, chunk: bytes) -> bool:
        """Adds a chunk, waiting while the channel is full. False if the channel was aborted."""
        while True:
            with self._changed:
                if self._aborted:
                    return False
                if self._size < self._capacity:
                    self._chunks.append(chunk)
                    self._size += len(chunk)
                    self._notify()
                    return True
                waiter = self._loop_waiter = self._loop.create_future()
            await waiter

    async def get(self) -> bytes | None:
        """The next chunk, waiting for one; None at the end (after `close`) or after `abort`."""
        while True:
            with self._changed:
                if self._aborted:
                    return None
                if self._chunks:
                    return self._take()
                if self._closed:
                    return None
                waiter = self._loop_waiter = self._loop.create_future()
            await waiter

    # ---------------------------------------------------------------- worker-thread side

    def put_blocking(self, chunk: bytes) -> None:
        """Adds a chunk, blocking while the channel is full. Raises Cancelled once aborted."""
        with self._changed:
            while self._size >= self._capacity and not self._aborted:
                self._changed.wait()
            if self._aborted:
                raise Cancelled("the caller went away before the archive was complete")
            self._chunks.append(chunk)
            self._size += len(chunk)
            self._notify()

    def get_blocking(self) -> bytes | None:
        """The next chunk, blocking for one; None at the end. Raises Cancelled once aborted."""
        with self._changed:
            while not self._chunks and not self._closed and not self._aborted:
                self._changed.wait()
            if self._aborted:
                raise Cancelled("the upload was cancelled before the archive was complete")
            return self._take() if self._chunks else None

    def _take(self) -> bytes:
        chunk = self._chunks.popleft()
        self._size -= len(chunk)
        self._notify()
        return chunk


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def run_in_own_thread(function: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Runs `function` in a new thread and returns a future of its result.

    An archive stream blocks its thread for as long as the client takes; a thread of its own keeps it
    from occupying the shared executor that short file operations (`asyncio.to_thread`) rely on.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()  # keeps the caller's trace context in the thread

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = context.run(function)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
