"""Claiming a pooled workspace: the session's token replaces the pool credential, once, and the session's
environment is added to every command started afterwards."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import grpc
from grpc import aio

from agent.auth import BearerTokenInterceptor
from agent.errors import InvalidArgument, PreconditionFailed
from agent.process.manager import ProcessManager
from common.interceptors import Continuation, StreamBehavior, UnaryBehavior, wrap_handler
from common.telemetry import SESSION_ATTRIBUTE

log = logging.getLogger(__name__)


class PoolClaim:
    """The one claim a pooled agent accepts. `auth` is the agent's token check (None: it runs without a
    token, so there is no credential to hand over and nothing to claim)."""

    def __init__(self, auth: BearerTokenInterceptor | None) -> None:
        self._auth = auth
        self.session_id = ""

    def claim(self, token: str, env: Mapping[str, str], session_id: str, processes: ProcessManager) -> str:
        """Binds the workspace to `session_id`; returns it. Raises PreconditionFailed (claimed already, or no
        token configured), InvalidArgument (no token, a bad variable name)."""
        if self.session_id:
            raise PreconditionFailed(f"this workspace was claimed already (by session {self.session_id})")
        if self._auth is None:
            raise PreconditionFailed("this agent runs without a token: it is no pooled workspace to claim")
        if not token:
            raise InvalidArgument("a claim must carry the session's token")
        for key, value in env.items():
            if not key or "=" in key or "\x00" in key or "\x00" in value:
                raise InvalidArgument(
                    f"environment variable {key!r}: names must be non-empty without '=', and no NUL bytes"
                )
        self.session_id = session_id or "(unnamed)"
        # No await in between: the environment is in place for the first call the new token makes.
        processes.environment = dict(env)
        self._auth.replace(token)
        log.info("claimed by session %s", self.session_id, extra={"session_id": self.session_id})
        return session_id


class SessionSpanInterceptor(aio.ServerInterceptor):
    """Names the claiming session (SESSION_ATTRIBUTE) on the span of every call after the claim: a pooled
    agent's trace resource was made before any session existed. Goes after the tracing interceptor."""

    def __init__(self, claim: PoolClaim) -> None:
        # Imported here: this interceptor exists only while tracing is on, and an idle agent loads no tracing.
        from opentelemetry import trace

        self._claim = claim
        self._current_span = trace.get_current_span

    async def intercept_service(
        self,
        continuation: Continuation,
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        session_id = self._claim.session_id
        if handler is None or not session_id:
            return handler

        def unary(behavior: UnaryBehavior) -> UnaryBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> Any:
                self._current_span().set_attribute(SESSION_ATTRIBUTE, session_id)
                return await behavior(request, context)

            return call

        def streaming(behavior: StreamBehavior) -> StreamBehavior:
            async def call(request: Any, context: aio.ServicerContext) -> AsyncGenerator[Any, None]:
                self._current_span().set_attribute(SESSION_ATTRIBUTE, session_id)
                async for response in behavior(request, context):
                    yield response

            return call

        return wrap_handler(handler, unary, streaming)
