"""Domain errors of the agent, and the one table that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """Base of every error the agent reports to a caller; the message is shown to the caller."""


class InvalidArgument(AgentError):
    """The request is malformed: a bad field, range, pattern or option."""


class InvalidPath(InvalidArgument):
    """A path is absolute, has `..` or a NUL byte, or is otherwise not a workspace path."""


class PathEscapesRoot(AgentError):
    """A path resolves (through a symlink) to somewhere outside the workspace root."""


class NotFound(AgentError):
    """A file, directory, executable or named process does not exist."""


class AlreadyExists(AgentError):
    """The target exists and the request said it must not."""


class PreconditionFailed(AgentError):
    """The workspace is not in the state the request expected (sha256, occurrence count, file type)."""


class LimitExceeded(AgentError):
    """A configured limit was reached (archive size, file count, concurrent commands)."""


class ChecksumMismatch(AgentError):
    """Received data does not match the checksum the caller announced."""


class Cancelled(AgentError):
    """The caller went away before the operation finished."""


class FilesystemFailure(AgentError):
    """An operating-system error with no more precise class, reported in workspace terms (no host paths)."""


# The one table from domain errors to status codes. Lookup walks the exception's MRO,
# so the most specific class listed wins.
STATUS_CODES: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    PathEscapesRoot: grpc.StatusCode.PERMISSION_DENIED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    PreconditionFailed: grpc.StatusCode.FAILED_PRECONDITION,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ChecksumMismatch: grpc.StatusCode.DATA_LOSS,
    Cancelled: grpc.StatusCode.CANCELLED,
    FilesystemFailure: grpc.StatusCode.INTERNAL,
}
