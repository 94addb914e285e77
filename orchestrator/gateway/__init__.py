"""The preview gateway: session previews behind one address (proxy), the tokens that open them (tokens), and
which session a request is for (routing)."""

from orchestrator.gateway.access import PreviewAccess
from orchestrator.gateway.proxy import GatewayAddress, PreviewGateway
from orchestrator.gateway.tokens import PreviewSigner, load_signing_key

__all__ = ["GatewayAddress", "PreviewAccess", "PreviewGateway", "PreviewSigner", "load_signing_key"]
