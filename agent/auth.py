"""The agent's bearer-token check: calls without the token the orchestrator handed over are refused."""

from __future__ import annotations

import hmac
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import grpc
from grpc import aio

from common.interceptors import Continuation, wrap_handler

# Services anyone may call: health probes and the schema (the same as protos/, which is public).
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


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
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
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

        async def refuse_stream(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
            await refuse(request, context)
            yield  # pragma: no cover - makes this an async generator

        return wrap_handler(handler, lambda _: refuse, lambda _: refuse_stream)

    def _authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False
