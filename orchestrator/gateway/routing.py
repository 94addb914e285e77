"""Which session a preview request is for: `<session>.<preview-domain>` (host form) or `/preview/<session>/...`
(path form), and the path the dev server is asked for; path-form paths that could lead elsewhere are refused."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from orchestrator.errors import PreviewPathRefused

PATH_PREFIX = "/preview/"
# Session ids are `ws-` and hex; a DNS label either way (so the host form can carry any of them).
SESSION_ID = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Decoding this often leaves nothing encoded in any path a browser sends; one still encoded after it is refused.
MAX_DECODINGS = 3


@dataclass(frozen=True)
class Route:
    """A preview request's session, the prefix its URLs carry on the gateway ("" in the host form) and the raw
    target (path and query, as received) to ask its dev server for ("": the path form's bare prefix)."""

    session_id: str
    prefix: str
    target: str

    @property
    def host_form(self) -> bool:
        return not self.prefix


def route(host: str, raw_target: str, domain: str) -> Route | None:
    """The route of a request with Host `host` and request target `raw_target` (undecoded), None when it names
    no session. Raises PreviewPathRefused for a path-form target with `..`, `.` or encoded separators."""
    if not raw_target.startswith("/"):  # an absolute-form or `*` target: a proxy request, not a preview's
        return None
    name = host.rpartition(":")[0] if host.rpartition(":")[2].isdigit() else host
    label, dot, rest = name.lower().rstrip(".").partition(".")
    if dot and rest == domain.lower() and SESSION_ID.fullmatch(label):
        return Route(label, "", raw_target)
    if not raw_target.startswith(PATH_PREFIX):
        return None
    session_id, slash, below = raw_target.removeprefix(PATH_PREFIX).partition("/")
    if not slash:  # `/preview/<session>` or `/preview/<session>?...`: the gateway redirects to `.../<session>/`
        session_id = session_id.partition("?")[0]
        return Route(session_id, PATH_PREFIX + session_id, "") if SESSION_ID.fullmatch(session_id) else None
    if not SESSION_ID.fullmatch(session_id):
        _check_segment(session_id)  # `..`, `%2e%2e`, `%2f` in place of the session: refused, not just unknown
        return None
    for segment in below.partition("?")[0].split("/"):
        _check_segment(segment)
    return Route(session_id, PATH_PREFIX + session_id, "/" + below)


def _check_segment(segment: str) -> None:
    decoded = segment
    for _ in range(MAX_DECODINGS):
        decoded, previous = unquote(decoded), decoded
        if "/" in decoded or "\\" in decoded:
            raise PreviewPathRefused("a preview path may not hold encoded slashes or backslashes")
        if decoded in (".", ".."):
            raise PreviewPathRefused("a preview path may not hold `.` or `..` segments")
        if decoded == previous:
            return
    raise PreviewPathRefused("a preview path may not be encoded more than twice over")
