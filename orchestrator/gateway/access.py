"""CreatePreviewToken's side of the gateway: tokens minted for existing sessions, with the URLs that carry them."""

from __future__ import annotations

from urllib.parse import urlencode

from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator.errors import FailedPrecondition, InvalidArgument
from orchestrator.gateway.proxy import TOKEN_PARAMETER, GatewayAddress
from orchestrator.gateway.tokens import PreviewSigner
from orchestrator.sessions.live import STOPPED, STOPPING
from orchestrator.sessions.manager import SessionManager
from workspace.orchestrator.v1 import orchestrator_pb2 as pb

DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 7 * 24 * 3600.0


class PreviewAccess:
    """Mints preview tokens; `address` is the gateway's (None: this orchestrator runs none, the URLs are empty)."""

    def __init__(self, sessions: SessionManager, signer: PreviewSigner, address: GatewayAddress | None) -> None:
        self._sessions = sessions
        self._signer = signer
        self._address = address

    async def create_token(self, session_id: str, ttl_s: float = 0.0) -> pb.CreatePreviewTokenResponse:
        """A token for the session's preview, valid `ttl_s` seconds (0: DEFAULT_TTL_S). Raises SessionNotFound,
        FailedPrecondition (stopped), InvalidArgument (ttl)."""
        ttl_s = ttl_s or DEFAULT_TTL_S
        if not 1 <= ttl_s <= MAX_TTL_S:
            raise InvalidArgument(f"ttl {ttl_s:g}s: a preview token lives 1 s to {MAX_TTL_S:g} s (7 days)")
        session = await self._sessions.get(session_id)
        if session.state in (STOPPING, STOPPED):
            raise FailedPrecondition(f"session {session_id} is {pb.SessionState.Name(session.state)}: no preview")
        token, claim = self._signer.mint(session.id, ttl_s)
        expires_at = Timestamp(seconds=claim.expires_at)
        query = "?" + urlencode({TOKEN_PARAMETER: token})
        urls = (
            (self._address.host_url(session.id) + query, self._address.path_url(session.id) + query)
            if self._address is not None
            else ("", "")
        )
        return pb.CreatePreviewTokenResponse(token=token, expires_at=expires_at, url=urls[0], path_url=urls[1])
