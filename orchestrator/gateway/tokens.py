"""Preview tokens: HMAC-signed (session, expiry) strings every orchestrator sharing the signing key can check,
and the key itself, made once in the data directory (or read from a file all replicas are given)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import PreviewForbidden, PreviewUnauthorized

# The token's version, signed with the rest: a later format cannot be mistaken for this one.
VERSION = "p1"
KEY_BYTES = 32
MIN_KEY_BYTES = 16


@dataclass(frozen=True)
class PreviewClaim:
    """What a valid token says: the session it opens and when it stops opening it (Unix seconds)."""

    session_id: str
    expires_at: int


class PreviewSigner:
    """Mints and checks preview tokens `p1.<session>.<expiry>.<signature>` (HMAC-SHA256 over the rest). A token
    holds no secret and nothing but its claim: a replica checks it with the key alone, no shared session table."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"a preview signing key needs at least {MIN_KEY_BYTES} bytes, got {len(key)}")
        self._key = key

    def mint(self, session_id: str, ttl_s: float, now: float | None = None) -> tuple[str, PreviewClaim]:
        claim = PreviewClaim(session_id, int((time.time() if now is None else now) + ttl_s))
        body = f"{VERSION}.{claim.session_id}.{claim.expires_at}"
        return f"{body}.{self._signature(body)}", claim

    def check(self, token: str, session_id: str, now: float | None = None) -> PreviewClaim:
        """The claim of `token` if it is signed with this key, opens `session_id` and has not expired.
        Raises PreviewForbidden (not ours, forged, another session's) or PreviewUnauthorized (expired)."""
        body, _, signature = token.rpartition(".")
        version, _, rest = body.partition(".")
        claimed, _, expiry = rest.rpartition(".")
        if version != VERSION or not claimed or not expiry.isdigit():
            raise PreviewForbidden("not a preview token")
        if not hmac.compare_digest(signature.encode(), self._signature(body).encode()):
            raise PreviewForbidden("the preview token's signature does not match")
        if claimed != session_id:
            raise PreviewForbidden(f"this preview token opens session {claimed}, not {session_id}")
        if int(expiry) <= (time.time() if now is None else now):
            raise PreviewUnauthorized("the preview token expired: ask for a new one (CreatePreviewToken)")
        return PreviewClaim(claimed, int(expiry))

    def _signature(self, body: str) -> str:
        digest = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def load_signing_key(path: Path) -> bytes:
    """The key in `path` (hex, as made here, or any other text of at least 16 bytes), made there first if
    missing: random, written aside and linked into place, so of several orchestrators starting on one data
    directory at once all end up with the first one's key."""
    try:
        return _parse_key(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(secrets.token_hex(KEY_BYTES) + "\n")
        file.flush()
        os.fsync(file.fileno())
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink()
    return _parse_key(path)


def _parse_key(path: Path) -> bytes:
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = text.encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the preview signing key in {path} is shorter than {MIN_KEY_BYTES} bytes")
    return key
