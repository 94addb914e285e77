#!/usr/bin/env bash
# Makes a Docker engine answer `docker info`: installs docker.io and starts dockerd when none does.
# It stops nothing; an engine it starts keeps running (its log: $DOCKERD_LOG).
set -euo pipefail

log=${DOCKERD_LOG:-/var/log/workspace-core-dockerd.log}

if docker info >/dev/null 2>&1; then
    exit 0
fi
if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ensure_docker: no Docker engine, and installing docker.io needs root (sudo apt-get install docker.io)" >&2
        exit 1
    fi
    echo "ensure_docker: installing docker.io" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ensure_docker: dockerd is installed but not running, and starting it needs root" >&2
    exit 1
fi

echo "ensure_docker: starting dockerd (log: $log)" >&2
# Its own session, so an interrupt of the caller (make, pytest) does not take the engine down with it.
# DOCKER_SERVICE_PREFER_OFFLINE_IMAGE: Swarm tasks use the local core image instead of pulling it first (there is
# no registry to pull from; the swarm runtime creates services without resolving the image).
DOCKER_SERVICE_PREFER_OFFLINE_IMAGE=1 setsid nohup dockerd >>"$log" 2>&1 </dev/null &
for _ in $(seq 1 120); do
    if docker info >/dev/null 2>&1; then
        exit 0
    fi
    sleep 0.5
done
echo "ensure_docker: dockerd did not answer within 60 s; the end of its log:" >&2
tail -n 30 "$log" >&2
exit 1
