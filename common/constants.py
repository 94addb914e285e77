"""Values both services must agree on: the workspace's ports, the token variable, sizes, and what a saved
workspace leaves out."""

from __future__ import annotations

MiB = 1024 * 1024

# The agent's gRPC port and the dev server's port inside a workspace (templates read $PORT, default 4321).
AGENT_PORT = 3001
DEV_PORT = 4321

# The environment variable `python -m agent` reads its bearer token from when no --token-file is given. Never
# set for a workspace (every process of the workspace user could read it, e.g. from the init process's
# /proc/1/environ); runtimes hand the token over in a file that the agent removes once read, before any
# workspace code runs, and keep the orchestrator's own value out of what a workspace inherits.
TOKEN_ENV = "WORKSPACE_AGENT_TOKEN"

# What an archive of a workspace (SaveSession, a template's files) leaves out unless asked not to: the
# dependencies an install recreates. Searches skip these and `.git` too.
DEFAULT_EXCLUDES = ("node_modules",)

# The default limits of an extraction (the agent's, unless configured otherwise), which the orchestrator's
# upload check applies too (common/tarball.py), so an upload no default agent would take is refused at once.
MAX_CONTENT_BYTES = 2048 * 1024 * 1024  # uncompressed size of the members
MAX_MEMBERS = 200_000
