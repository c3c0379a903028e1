"""The gRPC server-metrics interceptor (service/interceptors.py) on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from service.interceptors import ServerMetricsInterceptor

CHECK = "/grpc.health.v1.Health/Check"


def test_each_method_is_wrapped_once_and_a_new_handler_anew() -> None:
    icpt = ServerMetricsInterceptor(CollectorRegistry())
    first = grpc.unary_unary_rpc_method_handler(lambda req, ctx: None)
    second = grpc.unary_unary_rpc_method_handler(lambda req, ctx: None)

    async def wrapped(handler, method: str = CHECK):
        async def continuation(details):
            return handler
        return await icpt.intercept_service(continuation, SimpleNamespace(method=method, invocation_metadata=()))

    async def main() -> None:
        a, b = await wrapped(first), await wrapped(first)
        assert a is b and a is not first  # one wrapper for every call of the method
        other = await wrapped(second)
        assert other is not a  # another handler for the method (a token's refusal): its own wrapper
        # the two alternate (callers with and without a token): neither evicts the other
        assert await wrapped(first) is a and await wrapped(second) is other
        third = grpc.unary_unary_rpc_method_handler(lambda req, ctx: None)
        assert await wrapped(third) is not a  # the method's handler replaced: wrapped anew
        assert await wrapped(first) is not a  # the oldest let go: bounded however often it changes
        assert await wrapped(None) is None  # no such method: nothing to count
        stream = grpc.unary_stream_rpc_method_handler(lambda req, ctx: iter(()))  # synchronous
        assert await wrapped(stream, "/x.Sync/Watch") is stream  # left to grpc, which runs it in a thread

        async def watch_servicer(request, context) -> None:  # health.aio's style: context.write
            await context.write(request)

        coroutine = grpc.unary_stream_rpc_method_handler(watch_servicer)
        watch = await wrapped(coroutine, "/grpc.health.v1.Health/Watch")  # not counted: its parse checked
        assert watch is not coroutine and watch is await wrapped(coroutine, "/grpc.health.v1.Health/Watch")
        assert watch.response_streaming and not watch.request_streaming

    asyncio.run(main())


@contextlib.asynccontextmanager
async def health_channel(registry: CollectorRegistry) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to a health server behind the interceptor, its service "up" SERVING."""
    server = grpc.aio.server(interceptors=[ServerMetricsInterceptor(registry)])
    servicer = health.aio.HealthServicer()
    await servicer.set("up", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            yield ch
    finally:
        await server.stop(None)


def test_calls_are_counted_by_method_and_code() -> None:
    registry = CollectorRegistry()

    async def main() -> None:
        async with health_channel(registry) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for _ in range(3):
                await stub.Check(health_pb2.HealthCheckRequest(service="up"))
            for _ in range(2):
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(service="unknown"))
                except grpc.aio.AioRpcError as e:
                    assert e.code() is grpc.StatusCode.NOT_FOUND

    asyncio.run(main())
    labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_type": "unary"}
    value = registry.get_sample_value
    assert value("grpc_server_started_total", labels) == 5
    assert value("grpc_server_handled_total", {**labels, "grpc_code": "OK"}) == 3
    assert value("grpc_server_handled_total", {**labels, "grpc_code": "NOT_FOUND"}) == 2
    assert value("grpc_server_handling_seconds_count", labels) == 5


def test_a_stream_cut_short_while_it_waits_to_send_is_counted_cancelled() -> None:
    """A client that stops reading and then cancels: gRPC closes the stream's generator where
    it waits to send (a GeneratorExit, not a CancelledError). That is the client's doing,
    counted CANCELLED, never UNKNOWN (a server fault on the dashboard)."""
    registry = CollectorRegistry()
    blocked = asyncio.Event()
    chunk = b"x" * (1 << 20)
    labels = {"grpc_service": "t.Flood", "grpc_method": "Flood", "grpc_type": "bidi_stream"}

    async def flood(requests, context):
        await anext(aiter(requests))
        for _ in range(1000):  # more than any flow-control window holds
            yield chunk
            blocked.set()  # once a few are out, the next send waits for the reader
        raise AssertionError("the client read nothing, yet every message went out")

    async def main() -> None:
        server = grpc.aio.server(interceptors=[ServerMetricsInterceptor(registry)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "t.Flood", {"Flood": grpc.stream_stream_rpc_method_handler(flood)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                call = ch.stream_stream("/t.Flood/Flood")()
                await call.write(b"go")
                await asyncio.wait_for(blocked.wait(), 10)
                await asyncio.sleep(0.5)  # the server now waits to send; the client reads nothing
                call.cancel()
                for _ in range(100):  # counted once the server has closed the generator
                    if registry.get_sample_value("grpc_server_handling_seconds_count", labels):
                        break
                    await asyncio.sleep(0.05)
        finally:
            await server.stop(None)

    asyncio.run(main())
    handled = {code: registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code})
               for code in ("CANCELLED", "UNKNOWN", "OK")}
    assert handled == {"CANCELLED": 1, "UNKNOWN": None, "OK": None}


def test_a_unary_request_that_does_not_parse_is_invalid_argument() -> None:
    """gRPC answers a request its deserializer raises on UNKNOWN, with the exception's type
    in the message: malformed bytes from a caller are INVALID_ARGUMENT, counted as such."""
    registry = CollectorRegistry()

    async def main() -> tuple:
        async with health_channel(registry) as ch:
            check = ch.unary_unary(CHECK)
            ok = health_pb2.HealthCheckResponse.FromString(
                await check(health_pb2.HealthCheckRequest(service="up").SerializeToString()))
            try:
                await check(b"\x0a\x02\xff\xfe")  # field 1, a string, not UTF-8
            except grpc.aio.AioRpcError as e:
                return ok.status, e.code(), e.details()
            return ok.status, None, None

    status, code, details = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.SERVING  # a request that parses goes through
    assert code is grpc.StatusCode.INVALID_ARGUMENT and details == "the Check request does not parse"
    labels = {"grpc_service": "grpc.health.v1.Health", "grpc_method": "Check", "grpc_type": "unary"}
    assert registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": "INVALID_ARGUMENT"}) == 1


def test_a_streaming_request_that_does_not_parse_is_invalid_argument() -> None:
    """Health's Watch (server streaming) and reflection (bidirectional), both open without a
    token: gRPC answered malformed bytes UNKNOWN, quoting the parser's exception (found by
    review). A message that parses still goes through."""
    from grpc_reflection.v1alpha import reflection, reflection_pb2

    async def main() -> dict[str, tuple]:
        server = grpc.aio.server(interceptors=[ServerMetricsInterceptor(CollectorRegistry())])
        servicer = health.aio.HealthServicer()
        await servicer.set("up", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        reflection.enable_server_reflection(("grpc.health.v1.Health", reflection.SERVICE_NAME), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: dict[str, tuple] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                watch = ch.unary_stream("/grpc.health.v1.Health/Watch")
                first = await watch(health_pb2.HealthCheckRequest(service="up").SerializeToString()).read()
                out["watch ok"] = (health_pb2.HealthCheckResponse.FromString(first).status,)
                reflect = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                good = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
                answer = [reflection_pb2.ServerReflectionResponse.FromString(r) async for r in reflect(iter([good]))]
                out["reflect ok"] = (len(answer[0].list_services_response.service),)
                for name, call in (("watch", lambda: watch(b"\x0a\x02\xff\xfe")),
                                   ("reflect", lambda: reflect(iter([b"\xff"])))):
                    try:
                        [r async for r in call()]
                        out[name] = (None, "")
                    except grpc.aio.AioRpcError as e:
                        out[name] = (e.code(), e.details())
        finally:
            await server.stop(None)
        return out

    out = asyncio.run(main())
    assert out["watch ok"] == (health_pb2.HealthCheckResponse.SERVING,) and out["reflect ok"] == (2,)
    assert out["watch"] == (grpc.StatusCode.INVALID_ARGUMENT, "the Watch request does not parse")
    assert out["reflect"] == (grpc.StatusCode.INVALID_ARGUMENT, "a ServerReflectionInfo message does not parse")


def test_a_token_refusal_is_one_handler_per_method() -> None:
    """Callers without the token get the same refusal handler each call, not one made anew
    (which the metrics interceptor outside would then wrap anew too), of the method's kind."""
    from service.server import BearerTokenInterceptor, CallerTokens
    from service.settings import Settings

    icpt = BearerTokenInterceptor(CallerTokens(Settings(auth_token="s3cret")))
    unary = grpc.unary_unary_rpc_method_handler(lambda req, ctx: None, response_serializer=bytes)
    stream = grpc.stream_stream_rpc_method_handler(lambda it, ctx: iter(()), response_serializer=bytes)

    async def handler(h, method: str, metadata=()):
        async def continuation(details):
            return h
        return await icpt.intercept_service(continuation, SimpleNamespace(method=method, invocation_metadata=metadata))

    async def main() -> None:
        m, s = "/robustgate.v1.ClassifierService/Classify", "/robustgate.v1.ClassifierService/ClassifyStream"
        refused = await handler(unary, m)
        assert refused is not unary and refused.unary_unary is not None and refused.request_deserializer is None
        assert await handler(unary, m, (("authorization", "Bearer nope"),)) is refused
        assert await handler(unary, m, (("authorization", "Bearer s3cret"),)) is unary
        refused_stream = await handler(stream, s)
        assert refused_stream.stream_stream is not None and await handler(stream, s) is refused_stream
        assert await handler(unary, "/grpc.health.v1.Health/Check") is unary  # open to all

    asyncio.run(main())
