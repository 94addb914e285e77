"""The core image `workspace-core`: its Dockerfile, the build that stages it, and the engine it needs."""
