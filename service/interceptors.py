"""Standard gRPC server metrics (``grpc_server_*``, as go-grpc-prometheus names them) from an
interceptor, for every unary and bidirectional-streaming method."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.metrics import LATENCY_BUCKETS


def cut_short_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose handler was cancelled before it set one: the client's
    deadline passed (DEADLINE_EXCEEDED, a server-side failure to answer in time) or the call
    was cancelled (CANCELLED: the client left, or the server's drain ran out)."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED


class ServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=registry)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, by status code.",
                               labels + ["grpc_code"], registry=registry)
        self.handling = Histogram("grpc_server_handling_seconds", "Time to complete an RPC.", labels,
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.msg_received = Counter("grpc_server_msg_received", "Stream messages received.", labels, registry=registry)

    def _done(self, labels: tuple[str, str, str], context: grpc.aio.ServicerContext, start: float,
              failed: bool, cancelled: bool = False) -> None:
        code = context.code() if hasattr(context, "code") else None
        if isinstance(code, grpc.StatusCode):
            name = code.name
        elif code is None:
            name = cut_short_code(context).name if cancelled else "UNKNOWN" if failed else "OK"
        else:  # an int value
            name = next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
        self.handled.labels(*labels, name).inc()
        self.handling.labels(*labels).observe(time.perf_counter() - start)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        _, service, method = details.method.split("/", 2) if details.method.count("/") == 2 else ("", "", details.method)
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            labels = (service, method, "unary")

            async def unary(request, context):
                self.started.labels(*labels).inc()
                start, failed, cancelled = time.perf_counter(), True, False
                try:
                    response = await inner(request, context)
                    failed = False
                    return response
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    self._done(labels, context, start, failed, cancelled)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.stream_stream is not None:
            inner_s = handler.stream_stream
            labels = (service, method, "bidi_stream")

            async def counted(iterator):
                async for item in iterator:
                    self.msg_received.labels(*labels).inc()
                    yield item

            async def stream(request_iterator, context):
                self.started.labels(*labels).inc()
                start, failed, cancelled = time.perf_counter(), True, False
                try:
                    # aclosing: a cancelled call closes the servicer's generator (and whatever
                    # it has in flight) now, not when the garbage collector finds it
                    async with contextlib.aclosing(inner_s(counted(request_iterator), context)) as responses:
                        async for response in responses:
                            yield response
                    failed = False
                except asyncio.CancelledError:
                    cancelled = True
                    raise
                finally:
                    self._done(labels, context, start, failed, cancelled)

            return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
        return handler
