"""What the workspace is doing, for the orchestrator's idle reaper: last activity, open streams."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import grpc
from grpc import aio

from common.interceptors import Continuation, StreamBehavior, UnaryBehavior, wrap_handler

# Calls that do not count as activity: probes, schema look-ups (grpcurl's reflection stream), and the
# activity query itself.
PASSIVE_METHODS = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/workspace.agent.v1.AgentService/GetActivity",
)


class ActivityTracker:
    """Counts calls in flight now (streams and unary alike) and remembers the wall time of the last call or file write."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.last_activity = self.started_at
        self.open_streams = 0

    def touch(self) -> None:
        self.last_activity = time.time()

    @contextlib.contextmanager
    def call(self, context: aio.ServicerContext) -> Iterator[None]:
        """Counts a call as open from here until it ends, whichever comes first: its handler finishing,
        or gRPC finishing the call (a stream cancelled between two messages leaves the handler's
        generator suspended, to be closed whenever it is collected). Counted down exactly once."""
        self.touch()
        self.open_streams += 1
        ended = False

        def end(_: object = None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self.open_streams -= 1
                self.touch()

        # grpc's stubs want a `_DoneCallback` instance here; the runtime calls any callable with the context.
        context.add_done_callback(end)  # type: ignore[arg-type]
        try:
            yield
        finally:
            end()


class ActivityInterceptor(aio.ServerInterceptor):
    """Records every non-passive call's start and end, and keeps count of open streams."""

    def __init__(self, tracker: ActivityTracker) -> None:
        self._tracker = tracker

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(PASSIVE_METHODS):
            return handler
        tracker = self._tracker

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                with tracker.call(context):
                    return await behavior(request, context)

            return call

        def streaming(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                with tracker.call(context):
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response

            return call

        return wrap_handler(handler, unary, streaming)
