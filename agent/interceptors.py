"""Server interceptors shared by the agent and the orchestrator: bearer-token auth, domain-error mapping."""

from __future__ import annotations

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
) -> grpc.RpcMethodHandler:
    """Returns `handler` with its behavior wrapped: `unary` for unary responses, `streaming` for streamed ones."""
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            streaming(handler.unary_stream), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        streaming(handler.stream_stream), handler.request_deserializer, handler.response_serializer
    )


class BearerTokenInterceptor(aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (constant-time compare), except OPEN_SERVICES."""

    def __init__(self, token: str) -> None:
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
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}")

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
                    async for response in behavior(request, context):
                        yield response
                except aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 - mapped or logged in _abort
                    await self._abort(error, context)

            return call

        return wrap_handler(handler, unary, streaming)
