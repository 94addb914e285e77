"""The workspace agent: the gRPC tool API (`workspace.agent.v1`) served inside every workspace container."""
