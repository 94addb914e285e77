"""Server interceptors both services use: domain errors mapped through a service's status table, requests that
do not decode refused; and `wrap_handler` for interceptors of their own."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, cast

import grpc
from grpc import aio

log = logging.getLogger(__name__)

UnaryBehavior = Callable[[Any, aio.ServicerContext], Awaitable[Any]]
StreamBehavior = Callable[[Any, aio.ServicerContext], AsyncGenerator[Any, None]]
# What an interceptor's continuation returns (None: no such method).
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]
# A service's domain errors and their status codes (its errors.py's STATUS_CODES).
StatusTable = dict[type[Exception], grpc.StatusCode]


def status_code_for(error: BaseException, table: StatusTable) -> grpc.StatusCode:
    """The status code for a domain error from `table` (INTERNAL when the table has no entry)."""
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return grpc.StatusCode.INTERNAL


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
    # grpc's stubs type a handler's behaviors as a synchronous server's; on an aio server they are coroutine
    # functions (unary responses) and async generator functions (streamed responses).
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(cast(UnaryBehavior, handler.unary_unary)), request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(cast(UnaryBehavior, handler.stream_unary)), request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(_closed_at_end(cast(StreamBehavior, handler.unary_stream))),
            request_deserializer,
            handler.response_serializer,
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(_closed_at_end(cast(StreamBehavior, handler.stream_stream))),
        request_deserializer,
        handler.response_serializer,
    )


def _closed_at_end(behavior: StreamBehavior) -> StreamBehavior:
    """`behavior` whose response generator is closed as soon as the call ends. gRPC cancels a call (deadline,
    caller gone) between two messages without closing the handler's generator: its `finally` blocks (killing
    a command, counting a stream down) would wait for the garbage collector, forever if it is in a cycle."""

    def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
        responses = behavior(request, context)

        def close(_: object) -> None:
            # A generator still running is being unwound by the cancellation itself.
            if not getattr(responses, "ag_running", True):
                closing = asyncio.ensure_future(_close(responses))
                _closing.add(closing)  # the loop holds tasks weakly: keep it until it is done
                closing.add_done_callback(_closing.discard)

        # grpc's stubs want a `_DoneCallback` instance here; the runtime calls any callable with the context.
        context.add_done_callback(close)  # type: ignore[arg-type]
        return responses

    return call


_closing: set[asyncio.Future[None]] = set()


async def _close(responses: AsyncGenerator[Any, None]) -> None:
    with contextlib.suppress(RuntimeError):  # it started running again meanwhile: that run unwinds it
        await responses.aclose()


class ErrorMappingInterceptor(aio.ServerInterceptor):
    """Turns domain errors raised by servicers into their status code from one table.

    Anything not in the table becomes INTERNAL with a generic message, and is logged.
    """

    def __init__(self, table: StatusTable) -> None:
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
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
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
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
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
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
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
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
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
