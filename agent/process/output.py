"""A command's output as sequence-numbered chunks in a byte-bounded buffer, and the readers that follow it."""

from __future__ import annotations

import asyncio
import enum
import weakref
from collections import deque
from dataclasses import dataclass


class OutputStream(enum.IntEnum):
    """Where a chunk came from; the values are those of `workspace.agent.v1.OutputStream`."""

    STDOUT = 1
    STDERR = 2
    PTY = 3


@dataclass(frozen=True, slots=True)
class OutputChunk:
    sequence: int
    stream: OutputStream
    data: bytes


class OutputBuffer:
    """The output of one command, numbered from 0 in the order it was read, at most about `limit` bytes held.

    Two overflow policies:
    - replay (`evict_oldest=True`, named processes): the oldest chunks are dropped, so the process
      never stalls on a slow or absent reader; readers that fall behind skip what was dropped.
    - backpressure (`evict_oldest=False`, one-shot commands): `append` waits until the one reader
      has taken enough, so the pipe is not read and the writing command blocks. Chunks are dropped
      as soon as that reader has them.
    A chunk is never split, so the buffer may exceed `limit` by one chunk.
    """

    def __init__(self, limit: int, *, evict_oldest: bool) -> None:
        self.limit = limit
        self.evict_oldest = evict_oldest
        self.next_sequence = 0
        self.finished = False
        self._chunks: deque[OutputChunk] = deque()
        self._bytes = 0
        self._space = asyncio.Event()
        self._followers: weakref.WeakSet[OutputFollower] = weakref.WeakSet()

    @property
    def first_sequence(self) -> int:
        """The oldest sequence number still held (`next_sequence` when nothing is)."""
        return self._chunks[0].sequence if self._chunks else self.next_sequence

    @property
    def full(self) -> bool:
        """With backpressure: the next `append` waits for the reader."""
        return not self.evict_oldest and self._bytes >= self.limit

    async def append(self, stream: OutputStream, data: bytes) -> None:
        """Adds a chunk; with backpressure, first waits until the buffer is below its limit."""
        while self.full:
            self._space.clear()
            await self._space.wait()
        self._chunks.append(OutputChunk(self.next_sequence, stream, data))
        self.next_sequence += 1
        self._bytes += len(data)
        if self.evict_oldest:
            while self._bytes > self.limit and len(self._chunks) > 1:
                self._bytes -= len(self._chunks.popleft().data)
        self._wake_followers()

    def finish(self) -> None:
        """No more output will come: followers end once they have read what is held."""
        self.finished = True
        self._wake_followers()

    def abandon(self) -> None:
        """The reader left for good: drop what is held and stop making writers wait, so the command can be drained."""
        self.evict_oldest = True
        self._chunks.clear()
        self._bytes = 0
        self._space.set()

    def follow(self, from_sequence: int) -> OutputFollower:
        """A reader of the chunks from `from_sequence` on, through live output, until `finish`."""
        follower = OutputFollower(self, from_sequence)
        self._followers.add(follower)
        return follower

    def _chunk_at(self, sequence: int) -> OutputChunk:
        return self._chunks[sequence - self.first_sequence]

    def _release(self, before_sequence: int) -> None:
        while self._chunks and self._chunks[0].sequence < before_sequence:
            self._bytes -= len(self._chunks.popleft().data)
        if self._bytes < self.limit:
            self._space.set()

    def _wake_followers(self) -> None:
        for follower in self._followers:
            follower._wakeup.set()


class OutputFollower:
    """Async iterator over a buffer's chunks; `missed` counts chunks that were dropped before it got them."""

    def __init__(self, buffer: OutputBuffer, from_sequence: int) -> None:
        self._buffer = buffer
        self._next = from_sequence
        self._error: BaseException | None = None
        self._wakeup = asyncio.Event()
        self.missed = 0
        self._skip_dropped()

    def abort(self, error: BaseException) -> None:
        """Ends the iteration by raising `error` in the reader (e.g. the caller sent a bad request)."""
        self._error = error
        self._wakeup.set()

    def _skip_dropped(self) -> None:
        first = self._buffer.first_sequence
        if self._next < first:
            self.missed += first - self._next
            self._next = first

    def __aiter__(self) -> OutputFollower:
        return self

    async def __anext__(self) -> OutputChunk:
        buffer = self._buffer
        while True:
            if self._error is not None:
                raise self._error
            self._skip_dropped()
            if self._next < buffer.next_sequence:
                chunk = buffer._chunk_at(self._next)
                self._next += 1
                if not buffer.evict_oldest:
                    buffer._release(self._next)
                return chunk
            if buffer.finished:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
