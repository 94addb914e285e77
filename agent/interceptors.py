"""Server interceptors shared by the agent and the orchestrator: bearer-token auth, domain-error mapping,
malformed requests."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc import aio

from agent.errors import STATUS_CODES, status_code_for

log = logging.getLogger(__name__)

# Services anyone may call: health probes and the schema (the same as protos/, which is public).
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

UnaryBehavior = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    streaming: Callable[[StreamBehavior], StreamBehavior],
    deserializer: Callable[[Callable[[bytes], Any] | None], Callable[[bytes], Any] | None] = lambda d: d,
) -> grpc.RpcMethodHandler:
    """Returns `handler` with its behavior wrapped: `unary` for unary responses, `streaming` for streamed ones
    (whose wrapped generator is closed when the call ends, see `_closed_at_end`), and its request
    deserializer replaced by `deserializer(old)`."""
    request_deserializer = deserializer(handler.request_deserializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(_closed_at_end(handler.unary_stream)), request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(_closed_at_end(handler.stream_stream)), request_deserializer, handler.response_serializer
    )


def _closed_at_end(behavior: StreamBehavior) -> StreamBehavior:
    """`behavior` whose response generator is closed as soon as the call ends. gRPC cancels a call (deadline,
    caller gone) between two messages without closing the handler's generator: its `finally` blocks (killing
    a command, counting a stream down) would wait for the garbage collector, forever if it is in a cycle."""

    def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        responses = behavior(request, context)

        def close(_: object) -> None:
            # A generator still running is being unwound by the cancellation itself.
            if not getattr(responses, "ag_running", True):
                asyncio.ensure_future(_close(responses))

        context.add_done_callback(close)
        return responses

    return call


async def _close(responses: AsyncIterator[Any]) -> None:
    with contextlib.suppress(RuntimeError):  # it started running again meanwhile: that run unwinds it
        await responses.aclose()  # type: ignore[attr-defined]


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (constant-time compare), except OPEN_SERVICES."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def replace(self, token: str) -> None:
        """Expects `token` from now on; the old one is refused from the next call on (one assignment: no call
        ever sees a mix of the two)."""
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(OPEN_SERVICES) or self._authorized(details.invocation_metadata):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return handler

        async def refuse(request: Any, context: aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token: send metadata 'authorization: Bearer <token>'",
            )

        async def refuse_stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            await refuse(request, context)
            yield  # pragma: no cover - makes this an async generator

        return wrap_handler(handler, lambda _: refuse, lambda _: refuse_stream)

    def _authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Turns domain errors raised by servicers into their status code from one table.

    Anything not in the table becomes INTERNAL with a generic message, and is logged.
    """

    def __init__(self, table: dict[type[Exception], grpc.StatusCode] = STATUS_CODES) -> None:
        self._table = table
        self._domain = tuple(table)

    async def _abort(self, error: BaseException, context: aio.ServicerContext) -> None:
        if isinstance(error, self._domain):
            await context.abort(status_code_for(error, self._table), str(error))
        log.exception("unexpected error in RPC", exc_info=error)
        # An OSError's text names the files involved by the server's own absolute paths: only its reason goes out.
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {reason}")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                try:
                    return await behavior(request, context)
                except aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 - mapped or logged in _abort
                    await self._abort(error, context)

            return call

        def streaming(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async with contextlib.aclosing(behavior(request, context)) as responses:
                        async for response in responses:
                            yield response
                except aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 - mapped or logged in _abort
                    await self._abort(error, context)

            return call

        return wrap_handler(handler, unary, streaming)


class MalformedRequest:
    """What a request that cannot be decoded is handed on as, so that the call can end with INVALID_ARGUMENT:
    grpc.aio answers UNKNOWN for a unary request whose deserializer raises, and hands the error of a
    streamed one to the servicer (which makes it INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.details = f"the request is not a valid protobuf message of this method: {error}"


class RequestDecodingInterceptor(aio.ServerInterceptor):
    """Ends a call whose request (or any streamed request) fails to decode, with INVALID_ARGUMENT: bytes
    that are no protobuf, a truncated message, invalid UTF-8 in a `string` field."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler

        def deserializer(decode: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
            if decode is None:
                return None

            def tolerant(data: bytes) -> Any:
                try:
                    return decode(data)
                except Exception as error:  # noqa: BLE001 - DecodeError, and whatever else a decoder raises
                    return MalformedRequest(error)

            return tolerant

        def checked_request(request: Any, context: aio.ServicerContext) -> Any:
            if handler.request_streaming:
                return _checked_stream(request, context)
            return request

        async def refuse(context: aio.ServicerContext, request: MalformedRequest) -> None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                if isinstance(request, MalformedRequest):
                    await refuse(context, request)
                return await behavior(checked_request(request, context), context)

            return call

        def streaming(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, MalformedRequest):
                    await refuse(context, request)
                async with contextlib.aclosing(behavior(checked_request(request, context), context)) as responses:
                    async for response in responses:
                        yield response

            return call

        async def _checked_stream(requests: AsyncIterator[Any], context: aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, MalformedRequest):
                    await refuse(context, request)
                yield request

        return wrap_handler(handler, unary, streaming, deserializer)
