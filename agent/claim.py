"""Claiming a pooled workspace: the session's token replaces the pool credential, once, and the session's
environment is added to every command started afterwards."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from agent.errors import InvalidArgument, PreconditionFailed
from agent.interceptors import BearerTokenInterceptor
from agent.process.manager import ProcessManager

log = logging.getLogger(__name__)


class PoolClaim:
    """The one claim a pooled agent accepts. `auth` is the agent's token check (None: it runs without a
    token, so there is no credential to hand over and nothing to claim)."""

    def __init__(self, auth: BearerTokenInterceptor | None, processes: ProcessManager) -> None:
        self._auth = auth
        self._processes = processes
        self.session_id = ""

    def claim(self, token: str, env: Mapping[str, str], session_id: str) -> str:
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
                raise InvalidArgument(f"environment variable {key!r}: names must be non-empty without '=', and no NUL bytes")
        self.session_id = session_id or "(unnamed)"
        # No await in between: the environment is in place for the first call the new token makes.
        self._processes.environment = dict(env)
        self._auth.replace(token)
        log.info("claimed by session %s", self.session_id, extra={"session_id": self.session_id})
        return session_id
