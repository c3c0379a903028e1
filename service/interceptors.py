"""Standard gRPC server metrics (``grpc_server_*``, as go-grpc-prometheus names them) from an
interceptor, for every unary and bidirectional-streaming method; and, since it wraps every
handler, a request that does not parse answered INVALID_ARGUMENT (gRPC's own answer is
UNKNOWN, naming the parser's exception): a unary request, a server-streaming one (health's
Watch), or a message of a bidirectional stream its servicer does not answer for itself."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Histogram

from service.metrics import LATENCY_BUCKETS


def cut_short_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status of a call whose handler was cancelled before it set one: the client's
    deadline passed (DEADLINE_EXCEEDED, a server-side failure to answer in time) or the call
    was cancelled (CANCELLED: the client left, or the server's drain ran out)."""
    left = context.time_remaining()
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 0 else grpc.StatusCode.CANCELLED


def status_name(context: grpc.aio.ServicerContext, failed: bool, cancelled: bool) -> str:
    """The status code's name a call ended with: the one it set, else by how it ended."""
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code is None:
        return cut_short_code(context).name if cancelled else "UNKNOWN" if failed else "OK"
    return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")  # an int value


_CUT_SHORT = (asyncio.CancelledError, GeneratorExit)
_UNPARSED = object()  # a request its deserializer could not parse


def _tolerant(parse):
    """``parse`` (a handler's request deserializer) returning :data:`_UNPARSED` where it
    raises: gRPC answers a request its deserializer raises on UNKNOWN, naming the exception's
    type, and a caller's malformed bytes are INVALID_ARGUMENT (:func:`_refuse`)."""
    def parsed(raw: bytes):
        try:
            return parse(raw) if parse is not None else raw
        except Exception:
            return _UNPARSED
    return parsed


async def _refuse(context, method: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the {method} request does not parse")


def _parse_checked(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A server-streaming handler whose request, when it does not parse, is answered
    INVALID_ARGUMENT (other kinds are returned as they are). It keeps the servicer's style:
    an async generator, or a coroutine that writes with ``context.write``; a synchronous one
    (which grpc.aio runs in its thread pool) is left as it is."""
    if handler.unary_stream is None:
        return handler
    inner = handler.unary_stream
    if inspect.isasyncgenfunction(inner):
        async def generated(request, context):
            if request is _UNPARSED:
                await _refuse(context, method)
            async for response in inner(request, context):
                yield response
        wrapped = generated
    elif not inspect.iscoroutinefunction(inner):
        return handler
    else:
        async def written(request, context):
            if request is _UNPARSED:
                await _refuse(context, method)
            return await inner(request, context)
        wrapped = written
    return grpc.unary_stream_rpc_method_handler(wrapped, _tolerant(handler.request_deserializer),
                                                handler.response_serializer)


class PerMethod:
    """Handlers an interceptor derives from the ones it is given, made once per method and
    handler and kept: deriving one per call costs more than what it adds, and an interceptor
    outside this one would see a new handler each call. The inner handler is matched by
    identity; the last ``keep`` per method are kept (a method may answer with more than one)."""

    def __init__(self, derive: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler], keep: int) -> None:
        self._derive = derive
        self._keep = keep
        self._kept: dict[str, list[tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]]] = {}

    def __call__(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kept = self._kept.setdefault(method, [])
        for inner, outer in kept:
            if inner is handler:
                return outer
        kept.append((handler, self._derive(method, handler)))
        del kept[:-self._keep]
        return kept[-1][1]


WRAPPED_PER_METHOD = 2  # handlers wrapped and kept for each method (ServerMetricsInterceptor)


class ServerMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["grpc_service", "grpc_method", "grpc_type"]
        self.started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=registry)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, by status code.",
                               labels + ["grpc_code"], registry=registry)
        self.handling = Histogram("grpc_server_handling_seconds", "Time to complete an RPC.", labels,
                                  buckets=LATENCY_BUCKETS, registry=registry)
        self.msg_received = Counter("grpc_server_msg_received", "Stream messages received.", labels, registry=registry)
        # A method answers with two handlers where a token is required (its own, and the
        # refusal of callers without the token): both are kept, so neither evicts the other.
        self._wrapped = PerMethod(self._wrap, keep=WRAPPED_PER_METHOD)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        return self._wrapped(details.method, handler)  # wrapping and label lookups cost more than counting

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        _, service, method = full_method.split("/", 2) if full_method.count("/") == 2 else ("", "", full_method)
        kind = "unary" if handler.unary_unary is not None else "bidi_stream" if handler.stream_stream is not None else None
        if kind is None:
            return _parse_checked(method, handler)
        labels = (service, method, kind)
        started, handling = self.started.labels(*labels), self.handling.labels(*labels)
        handled = self.handled
        handled_by_code: dict[str, object] = {}  # its children, each looked up at its code's first call

        class Counted:
            """One call: started when entered; handled, by its code, and its duration when
            left (with an exception: failed, or cut short for a CancelledError, or for a
            GeneratorExit: gRPC closes a stream's generator where it waits to send, when the
            client cancels or its deadline passes while the client is not reading)."""

            __slots__ = ("context", "start")

            def __init__(self, context: grpc.aio.ServicerContext) -> None:
                self.context = context

            def __enter__(self) -> None:
                started.inc()
                self.start = time.perf_counter()

            def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
                name = status_name(self.context, failed=kind is not None,
                                   cancelled=kind is not None and issubclass(kind, _CUT_SHORT))
                child = handled_by_code.get(name)
                if child is None:
                    child = handled_by_code[name] = handled.labels(*labels, name)
                child.inc()
                handling.observe(time.perf_counter() - self.start)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request, context):
                with Counted(context):
                    if request is _UNPARSED:
                        await _refuse(context, method)
                    return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, _tolerant(handler.request_deserializer),
                                                       handler.response_serializer)
        inner_s = handler.stream_stream
        received = self.msg_received.labels(*labels)

        async def counted(iterator):
            async for item in iterator:
                received.inc()
                yield item

        async def stream(request_iterator, context):
            with Counted(context):
                # aclosing: a cancelled call closes the servicer's generator (and whatever
                # it has in flight) now, not when the garbage collector finds it
                async with contextlib.aclosing(inner_s(counted(request_iterator), context)) as responses:
                    try:
                        async for response in responses:
                            yield response
                    except DecodeError:  # a message the servicer let through unanswered
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                            f"a {method} message does not parse")

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
