"""Alembic's migrations of the state database (orchestrator/store.py runs them at start-up)."""
