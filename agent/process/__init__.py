"""Commands the agent runs: one-shot Exec calls and named long-running processes (the dev server)."""
