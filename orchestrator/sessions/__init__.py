"""Sessions: live sessions and their watchers (live), initialization as phase steps (initialization), restart
reconciliation and exit following (reconciliation), idle reaping (reaper), the SessionManager (manager).

The orchestrator's records ARE the contract's messages: a session is a `pb.Session` (its phases
`pb.PhaseStatus`, an archive a `pb.Archive`), which the Store persists, watchers receive and the servicer
passes through unconverted. Below the session layer (runtime/, templates, install cache, readiness, the
agent client's interface) nothing knows the orchestrator contract."""

from orchestrator.sessions.initialization import Initialization
from orchestrator.sessions.live import (
    FAILED,
    LIVE_STATES,
    PENDING,
    READY,
    SETTLED,
    STARTING,
    STOPPED,
    STOPPING,
    LiveSession,
)
from orchestrator.sessions.manager import SessionManager
from orchestrator.sessions.reaper import SessionReaper

__all__ = [
    "FAILED",
    "LIVE_STATES",
    "PENDING",
    "READY",
    "SETTLED",
    "STARTING",
    "STOPPED",
    "STOPPING",
    "Initialization",
    "LiveSession",
    "SessionManager",
    "SessionReaper",
]
