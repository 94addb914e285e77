"""Sessions: the SessionManager and the SessionReaper (see manager)."""

from orchestrator.sessions.manager import READY, SessionManager, SessionReaper

__all__ = ["READY", "SessionManager", "SessionReaper"]
