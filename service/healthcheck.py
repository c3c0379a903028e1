"""The gRPC health service (``grpc.health.v1.Health``), bounded.

Health is open to callers without a token (probes and load balancers use it), so what it
holds per call must be bounded: grpcio's servicer keeps every ``Watch`` open, with its request
(up to the server's message limit, 4 MiB) and its service name as a key, for any name at all,
so a few hundred watches of made-up 4 MiB names filled the gateway's memory. Here:

- a request longer than :data:`MAX_REQUEST_BYTES` (names are short) is INVALID_ARGUMENT;
- ``Watch`` of a service this gateway does not serve answers SERVICE_UNKNOWN once and ends:
  the gateway's services are fixed when it starts, so none can appear later (the standard
  keeps such a watch open for that);
- at most ``max_watches`` watches are open per process; one more is RESOURCE_EXHAUSTED.

``Check`` is the standard's: the status, or NOT_FOUND for an unknown service.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2

MAX_REQUEST_BYTES = 1024
MAX_WATCHES = 1024  # per process: a load balancer's health checking holds one per connection


class HealthServicer(health.aio.HealthServicer):
    def __init__(self, max_watches: int = MAX_WATCHES) -> None:
        super().__init__()
        self.max_watches = max_watches
        self.watching = 0

    async def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext):
        await _check_size(request, context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
        await _check_size(request, context)
        if request.service not in self._server_status:
            await context.write(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN))
            return
        if self.watching >= self.max_watches:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"too many health watches open on this gateway (the limit is {self.max_watches})")
        self.watching += 1
        try:
            await super().Watch(request, context)
        finally:
            self.watching -= 1


async def _check_size(request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:
    if request.ByteSize() > MAX_REQUEST_BYTES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"health request is {request.ByteSize()} bytes; the limit is {MAX_REQUEST_BYTES}")
