"""Start-up failures of either service (a taken port, an unwritable directory, ...) as one line for a person:
what failed, where, and what to do, instead of a traceback."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from pathlib import Path

# The exit status of a service that could not start (argparse uses 2 for bad arguments, too).
EXIT_STARTUP = 2


class StartupError(Exception):
    """The service cannot start; the message names the address or path and what to do."""


def check_bindable(address: str, option: str = "--listen") -> None:
    """Raises StartupError, with the system's reason and what to do, when `address` ("HOST:PORT" or
    "unix:PATH") cannot be bound. Asked before gRPC binds: gRPC only reports that binding failed (and logs
    a line of its own)."""
    reason = _bind_error(address)
    if reason is None:
        return
    advice = {
        errno.EADDRINUSE: f"another process listens there; stop it or pick another port with {option}",
        errno.EADDRNOTAVAIL: f"no interface of this machine has that address; use 127.0.0.1 or another with {option}",
        errno.EACCES: f"ports below 1024 need privileges; pick a port above 1023 with {option}",
        errno.ENOENT: f"its directory does not exist; create it or pick another path with {option}",
        errno.EINVAL: f"give {option} HOST:PORT (e.g. 127.0.0.1:50051) or unix:PATH",
    }.get(reason.errno or 0, f"pick another address with {option}")
    raise StartupError(f"cannot listen on {address} ({reason.strerror}): {advice}")


def unbindable(address: str, option: str = "--listen") -> StartupError:
    """The error for an address gRPC refused although check_bindable passed (e.g. taken in between)."""
    return StartupError(f"cannot listen on {address}: pick another address with {option}")


def _bind_error(address: str) -> OSError | None:
    """The OSError a plain socket gets binding `address` as gRPC would (SO_REUSEADDR: a port whose old
    connections linger in TIME_WAIT is free), None if it binds."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:").removeprefix("//")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            return OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (socket.gaierror, ValueError) as error:
        return OSError(errno.EINVAL, f"not HOST:PORT: {error}")
    family, _, _, _, target = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(target)
        except OSError as error:
            return error
    return None


def writable_directory(path: Path, what: str, option: str) -> None:
    """Creates `path` if needed and checks that files can be made in it; raises StartupError otherwise."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise StartupError(
            f"{what} {path} is not a writable directory ({error.strerror}): fix its permissions or pick another with {option}"
        ) from error
