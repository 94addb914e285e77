"""The core image's HEALTHCHECK: exits 0 when the agent on its port (3001) reports SERVING over grpc.health.v1."""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.constants import AGENT_PORT

try:
    with grpc.insecure_channel(f"127.0.0.1:{AGENT_PORT}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
except grpc.RpcError as error:
    sys.exit(f"agent health check failed: {error.code().name} {error.details()}")
if reply.status != health_pb2.HealthCheckResponse.SERVING:
    sys.exit(f"agent health: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
