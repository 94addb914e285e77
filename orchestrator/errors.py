"""Domain errors of the orchestrator, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class OrchestratorError(Exception):
    """Base of every error the orchestrator reports to a caller; the message is shown to the caller."""


class NotFound(OrchestratorError):
    """A session, template or archive does not exist."""


class TemplateNotFound(NotFound):
    """No folder with that name under the templates directory."""


class SessionNotFound(NotFound):
    """No session with that id."""


class ArchiveNotFound(NotFound):
    """No archive with that id in the archive store."""


class WorkspaceMissing(NotFound):
    """The session's workspace is not in the runtime any more (e.g. removed while the session was paused)."""


class FailedPrecondition(OrchestratorError):
    """The target is not in a state that allows the request (e.g. saving a stopped session)."""


class InvalidTemplate(FailedPrecondition):
    """The template folder exists but its template.json is invalid; the message carries the reason."""


class ImageMissing(FailedPrecondition):
    """The core image is not present on the engine; the message names the build command."""


class EngineUnavailable(OrchestratorError):
    """The container engine cannot be reached; the message says what to do."""


class ArchiveStoreUnavailable(OrchestratorError):
    """The S3 archive store cannot be reached or failed a request; the message names it."""


class AlreadyExists(OrchestratorError):
    """An archive or cache entry of that name was written already (by another replica): never replaced."""


class InvalidArgument(OrchestratorError):
    """The request is malformed: a bad field, page token, label or archive."""


class ChecksumMismatch(OrchestratorError):
    """Received bytes do not match the checksum announced for them."""


class LimitExceeded(OrchestratorError):
    """A configured limit was reached (sessions, archive size)."""


class InitializationFailed(OrchestratorError):
    """A phase ran but did not do its job (a non-zero exit, a dev server that died)."""


class NotReady(InitializationFailed):
    """The dev server gave no 2xx/3xx answer before the deadline; the message says what it saw last."""


class WorkspaceGone(OrchestratorError):
    """The session's workspace stopped running by itself or was removed behind the orchestrator's back."""


class ReplicaUnavailable(OrchestratorError):
    """The replica that owns the session does not answer (its sessions are taken over once its lease expires)."""


class PreviewDenied(OrchestratorError):
    """The preview gateway refuses the request's credentials (see orchestrator.gateway)."""


class PreviewUnauthorized(PreviewDenied):
    """No preview token or cookie, or an expired one: the browser needs a fresh token."""


class PreviewForbidden(PreviewDenied):
    """A token or cookie that is not the gateway's (forged, another key) or opens another session."""


class PreviewPathRefused(InvalidArgument):
    """A path-form preview request whose path could lead elsewhere (`..`, encoded slashes or dots)."""


class DemoFailed(OrchestratorError):
    """The demo session did not become READY; the message says in which phase and why."""


# The one table from domain errors to status codes. Lookup walks the exception's MRO,
# so the most specific class listed wins.
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
    ArchiveStoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    ReplicaUnavailable: grpc.StatusCode.UNAVAILABLE,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    ChecksumMismatch: grpc.StatusCode.DATA_LOSS,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    # The gateway answers these over HTTP (its own table, orchestrator.gateway.proxy.HTTP_STATUS).
    PreviewUnauthorized: grpc.StatusCode.UNAUTHENTICATED,
    PreviewForbidden: grpc.StatusCode.PERMISSION_DENIED,
    # Recorded as a session's failure (or, for the demo, printed at start-up), never raised to a caller:
    # INTERNAL, as for any error outside the table, should one ever reach it.
    InitializationFailed: grpc.StatusCode.INTERNAL,
    WorkspaceGone: grpc.StatusCode.INTERNAL,
    DemoFailed: grpc.StatusCode.INTERNAL,
}


def error_for_status(code: grpc.StatusCode, details: str) -> OrchestratorError:
    """The domain error that `code` stands for in STATUS_CODES (the first class listed with it), carrying
    `details`: another replica's answer, passed on as if this one had given it."""
    kind = next((kind for kind, listed in STATUS_CODES.items() if listed == code), OrchestratorError)
    return kind(details) if issubclass(kind, OrchestratorError) else OrchestratorError(details)
