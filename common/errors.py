"""The errors of the shared code, which each service turns into its own domain errors."""


class ArchiveRefused(Exception):
    """An archive is corrupt or holds a member the tar policy does not allow (InvalidArgument)."""


class ArchiveTooLarge(ArchiveRefused):
    """An archive exceeds a limit: members, content bytes, header size (LimitExceeded)."""
