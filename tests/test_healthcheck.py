"""The health service is open to callers without a token, so what a call may make it hold is
bounded (service/healthcheck.py). Served by a real gRPC server on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.healthcheck import MAX_REQUEST_BYTES, HealthServicer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
KNOWN = "robustgate.v1.ClassifierService"


def serve(main, max_watches: int = 3) -> None:
    async def run() -> None:
        servicer = HealthServicer(max_watches=max_watches)
        await servicer.set(KNOWN, SERVING)
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(main(servicer, health_pb2_grpc.HealthStub(channel), channel), 30)
        finally:
            await server.stop(None)
    asyncio.run(run())


def test_watch_of_an_unknown_service_answers_once_and_ends_holding_nothing() -> None:
    async def main(servicer: HealthServicer, stub, channel) -> None:
        answers = [r.status async for r in stub.Watch(health_pb2.HealthCheckRequest(service="made-up" * 100))]
        assert answers == [UNKNOWN]
        assert "made-up" * 100 not in servicer._server_watchers  # no name kept as a key
        assert servicer.watching == 0
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Check(health_pb2.HealthCheckRequest(service="made-up"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND  # Check: the standard's answer
    serve(main)


def test_a_request_longer_than_a_name_is_refused() -> None:
    async def main(servicer: HealthServicer, stub, channel) -> None:
        big = health_pb2.HealthCheckRequest(service=KNOWN + "x" * MAX_REQUEST_BYTES)
        for call in (lambda: stub.Check(big), lambda: stub.Watch(big).read()):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"the limit is {MAX_REQUEST_BYTES}" in e.value.details()
    serve(main)


def test_unknown_fields_count_toward_the_limit() -> None:
    """A known name with 2 KiB of a field HealthCheckRequest does not have (kept with the
    request, which an open watch holds), sent as raw bytes."""
    padded = health_pb2.HealthCheckRequest(service=KNOWN).SerializeToString() + b"\x12\x80\x10" + b"\0" * 2048

    async def main(servicer: HealthServicer, stub, channel) -> None:
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=lambda b: b,
                                     response_deserializer=health_pb2.HealthCheckResponse.FromString)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await watch(padded).read()
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    serve(main)


def test_watches_are_capped_and_a_closed_one_frees_its_place() -> None:
    async def main(servicer: HealthServicer, stub, channel) -> None:
        calls = [stub.Watch(health_pb2.HealthCheckRequest(service=KNOWN)) for _ in range(3)]
        assert [(await c.read()).status for c in calls] == [SERVING] * 3
        assert servicer.watching == 3
        extra = stub.Watch(health_pb2.HealthCheckRequest(service=KNOWN))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await extra.read()
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "the limit is 3" in e.value.details()
        calls[0].cancel()
        while servicer.watching > 2:
            await asyncio.sleep(0.01)
        again = stub.Watch(health_pb2.HealthCheckRequest(service=KNOWN))
        assert (await again.read()).status == SERVING
        await servicer.set(KNOWN, NOT_SERVING)  # an open watch still follows the status
        assert (await again.read()).status == NOT_SERVING
        for c in (*calls[1:], again):
            c.cancel()
    serve(main)
