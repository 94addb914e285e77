"""The agent's filesystem operations, all confined to the workspace root by `paths.WorkspaceRoot`."""
