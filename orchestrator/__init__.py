"""The orchestrator: owns workspace sessions (containers from the core image, templates injected at runtime)."""
