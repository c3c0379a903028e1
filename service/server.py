"""gRPC transport: a thin servicer (decode -> pipeline -> encode), one error table, admission
control, health that follows the backend, reflection, graceful drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import disable_created_metrics

from robustgate.v1 import classifier_pb2 as pb
from robustgate.v1 import classifier_pb2_grpc as pb_grpc
from service import convert, early_signal
from service import metrics_server as metrics_http
from service import ratelog
from service.backend import TorchServeBackend, read_inference_key
from service.coalesce import CoalesceConfig, Coalescer
from service.decode import Limits
from service.errors import (
    BackendRefused,
    BackendUnavailable,
    DeadlineExceeded,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    ModelNotLoaded,
    NotOffered,
    Overloaded,
    PolicyMismatch,
    Unauthenticated,
)
from service.healthcheck import HealthServicer
from service.interceptors import PerMethod, ServerMetricsInterceptor, cut_short_code
from service.metrics import Metrics, SupervisorMetrics
from service.pipeline import ClassifyResult, Pipeline
from service.registry import Registry, ServedModel
from service.settings import Settings, read_tokens_file
from service.tracing import OFF, SpanLike, Tracing, set_error
from service.tracing import setup as setup_tracing

log = logging.getLogger(__name__)
_throttled = ratelog.Throttle(log)  # a connection over its share repeats with each of its calls

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ClassifierService"].full_name
INTERNAL_MESSAGE = "internal error"

# The one table from domain errors to status codes. Anything else: INTERNAL, fixed message.
STATUS_BY_ERROR: dict[type[GatewayError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ModelNotLoaded: grpc.StatusCode.UNAVAILABLE,  # by TorchServe: a model the gateway serves
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PolicyMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    NotOffered: grpc.StatusCode.FAILED_PRECONDITION,
    BackendRefused: grpc.StatusCode.INTERNAL,  # a deployment fault: the error-ratio alert counts it
}


# Codes that mean the server failed (a trace span's error status), not the caller.
SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                           grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


# A status message travels in a header (gRPC's soft limit on all of them: 8 KiB, and each
# byte outside ASCII percent-encoded to three) and may quote what the caller sent (a model
# name, a dtype, a shape): beyond this it would end the call RESOURCE_EXHAUSTED instead.
MAX_MESSAGE_CHARS = 500


def status_of(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """(code, message safe for the caller) for any exception."""
    for kind, code in STATUS_BY_ERROR.items():
        if isinstance(err, kind):
            message = str(err)
            return code, message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS - 1] + "…"
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def _log_unexpected(err: BaseException, what: str) -> None:
    """The traceback of an error no domain error names (a bug: answered INTERNAL with a fixed
    message). A domain error answered INTERNAL (BackendRefused, a deployment fault) was logged
    where it arose, throttled: a traceback per request would be thousands of lines a second."""
    if not isinstance(err, GatewayError):
        log.error(what, exc_info=err)


class Connection:
    """One client connection's requests in flight (gRPC names a connection by its peer address
    and port), the streams that wait for room among them, and its streams open. limit: its
    share of requests in flight (0: none)."""

    __slots__ = ("peer", "limit", "inflight", "users", "streams", "_room")

    def __init__(self, peer: str, limit: int) -> None:
        self.peer = peer
        self.limit = limit
        self.inflight = 0
        self.users = 0  # calls and streams of it open: kept while any is
        self.streams = 0  # ClassifyStreams of it open
        self._room: asyncio.Event | None = None

    def full(self) -> bool:
        return 0 < self.limit <= self.inflight

    async def room(self) -> None:
        """Wait until fewer than ``limit`` of this connection's requests are in flight."""
        while self.full():
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    def done(self) -> None:
        """One of its requests is no longer in flight."""
        self.inflight -= 1
        if self._room is not None:
            self._room.set()

    async def take(self) -> None:
        """Wait for room, then count one stream item in flight: handed on with :meth:`hold`,
        or given back with :meth:`done`."""
        await self.room()
        self.inflight += 1

    def hold(self, item: asyncio.Task) -> None:
        """The item :meth:`take` counted stays in flight until its task ends, however it ends
        (cancelled before it ran too)."""
        item.add_done_callback(lambda _: self.done())


class Admission:
    """At most ``limit`` requests in flight, and at most ``per_connection`` from one client
    connection (0: no such limit). A request beyond either is refused at once (never queued);
    a stream waits for its connection's room before it reads its next item (``ClassifyStream``).
    At most ``streams_per_connection`` streams open on one connection (0: no limit): one more
    is refused as it opens."""

    def __init__(self, limit: int, metrics: Metrics, per_connection: int = 0,
                 streams_per_connection: int = 0) -> None:
        self.limit = limit
        self.per_connection = per_connection
        self.streams_per_connection = streams_per_connection
        self.inflight = 0
        self.metrics = metrics
        self._connections: dict[str, Connection] = {}

    @contextlib.contextmanager
    def connection(self, peer: str) -> Iterator[Connection | None]:
        """``peer``'s connection while a call or stream of it is open; None: no per-connection
        limit of either kind."""
        if not self.per_connection and not self.streams_per_connection:
            yield None
            return
        c = self._connections.get(peer)
        if c is None:
            c = self._connections[peer] = Connection(peer, self.per_connection)
        c.users += 1
        try:
            yield c
        finally:
            c.users -= 1
            if not c.users:
                del self._connections[peer]

    def open_stream(self, connection: Connection | None) -> None:
        """Count one ClassifyStream open on ``connection`` (until :meth:`close_stream`), or
        refuse it (Overloaded) when ``streams_per_connection`` are open on it already. An open
        stream costs the gateway a reader task and its buffers even while it waits for its
        caller: without a bound one connection could open them by the hundred thousand."""
        cap = self.streams_per_connection
        if connection is None or not cap:
            return
        if connection.streams >= cap:
            self.metrics.shed["stream"].inc()
            _throttled.log(logging.WARNING, "streams", "a client connection (%s) has %d streams open "
                           "(max_streams_per_connection): its next streams are refused", connection.peer, cap)
            raise Overloaded(f"this connection has {cap} streams open, its limit; close one, or open "
                             "another connection")
        connection.streams += 1

    def close_stream(self, connection: Connection | None) -> None:
        """A stream :meth:`open_stream` counted has ended."""
        if connection is not None and self.streams_per_connection:
            connection.streams -= 1

    @contextlib.contextmanager
    def slot(self, connection: Connection | None = None):
        """One request in flight, counted against ``connection``'s share too where given (a
        stream's items take theirs with :meth:`Connection.take` as they are read)."""
        if connection is not None and connection.full():
            self.metrics.shed["connection"].inc()
            _throttled.log(logging.WARNING, "connection", "a client connection (%s) is at its limit of %d "
                           "requests in flight (max_inflight_per_connection): its next calls are refused",
                           connection.peer, connection.limit)
            raise Overloaded(f"this connection is at its limit of {connection.limit} requests in flight; "
                             "spread calls over more connections, or retry later")
        if self.inflight >= self.limit:
            self.metrics.shed["server"].inc()
            raise Overloaded(f"server is at its limit of {self.limit} requests in flight; retry later")
        self.inflight += 1
        self.metrics.inflight.inc()
        if connection is not None:
            connection.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            if connection is not None:
                connection.done()


def record(metrics: Metrics, res: ClassifyResult) -> None:
    """Everything one answered request tells the dashboards."""
    m, report, series = res.model, res.report, metrics.series
    decision = report.decision.value if report is not None else "NONE"
    series(metrics.requests, m, decision, "OK").inc()
    series(metrics.request_duration, m).observe(res.timings.total)
    series(metrics.stage_duration, "decode").observe(res.timings.decode)
    series(metrics.stage_duration, "backend").observe(res.timings.backend)
    series(metrics.stage_duration, "gate").observe(res.timings.gate)
    if report is None:
        return
    series(metrics.forward_passes, m).observe(report.forward_passes)
    for r in report.checks:
        if r.verdict is not None and r.score is not None:
            series(metrics.check_score, m, r.check.value).observe(r.score)
            series(metrics.check_verdicts, m, r.check.value, r.verdict.value).inc()
    if report.certificate is not None:
        series(metrics.certified_radius, m).observe(report.certificate.radius or 0.0)


def mark_failed(span: SpanLike, code: grpc.StatusCode) -> bool:
    """A request's span ends with ``code``; an error status where the fault is the server's
    (returned: True)."""
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_FAULTS:
        set_error(span, code.name)
        return True
    return False


class ClassifierServicer(pb_grpc.ClassifierServiceServicer):
    def __init__(self, pipeline: Pipeline, registry: Registry, settings: Settings, admission: Admission,
                 metrics: Metrics, tracing: Tracing = OFF) -> None:
        self.pipeline = pipeline
        self.tracing = tracing
        self.registry = registry
        self.settings = settings
        self.admission = admission
        self.metrics = metrics
        self._known = {m.name for m in registry.all()}
        self.backend_serving = False  # as the last backend probe found it (ListModels' ready)

    def set_backend_serving(self, serving: bool) -> None:
        self.backend_serving = serving

    def _count_error(self, request: pb.ClassifyRequest, err: BaseException) -> None:
        self._count(request, status_of(err)[0])

    def _count(self, request: pb.ClassifyRequest, code: grpc.StatusCode) -> None:
        model = request.model if request.model in self._known else "unknown"  # fixed label set
        self.metrics.requests.labels(model=model, decision="NONE", code=code.name).inc()

    async def _classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext,
                        connection: Connection | None = None) -> pb.ClassifyResponse:
        """One request through the pipeline; ``connection``: a call's, whose share it takes
        (a stream's items took theirs before they were read)."""
        with self.tracing.request_span("classify", context.invocation_metadata(), {
                "rpc.system": "grpc", "rpc.service": SERVICE_NAME, "robustgate.model": request.model,
                "robustgate.request_id": request.request_id}) as span:
            admitted = None  # perf_counter() once admitted
            try:
                with self.admission.slot(connection):
                    admitted = time.perf_counter()
                    res = await self.pipeline.classify(convert.to_domain(request), self._deadline(context))
            except asyncio.CancelledError:  # the caller's deadline passed, or it left
                mark_failed(span, cut_short_code(context))
                self._time_failed(request, admitted)
                raise
            except Exception as e:
                if admitted is not None and isinstance(e, Overloaded):  # refused past admission: TorchServe's queue
                    self.metrics.shed["backend"].inc()
                if mark_failed(span, status_of(e)[0]):
                    self._time_failed(request, admitted)
                raise
            span.set_attribute("rpc.grpc.status_code", 0)
            if res.report is not None:
                span.set_attribute("robustgate.decision", res.report.decision.value)
                span.set_attribute("robustgate.forward_passes", res.report.forward_passes)
        record(self.metrics, res)
        return convert.to_pb(res)

    def _time_failed(self, request: pb.ClassifyRequest, admitted: float | None) -> None:
        """A failed request's time, where the failure is the server's (a deadline that ran
        out, a backend's failure) or the caller left: the slow ones the latency panels and
        alert must see; a caller's error (a bad image) is answered at once. ``admitted``:
        when it was admitted (None: it never was, and waited for nothing of ours)."""
        if admitted is not None and request.model in self._known:
            self.metrics.series(self.metrics.request_duration, request.model).observe(
                time.perf_counter() - admitted)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        left = context.time_remaining()
        budget = self.settings.request_timeout_s if left is None else min(left, self.settings.request_timeout_s * 10)
        return time.monotonic() + budget

    async def _fail(self, context: grpc.aio.ServicerContext, err: BaseException) -> None:
        code, message = status_of(err)
        _log_unexpected(err, "unexpected error")
        await context.abort(code, message)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        try:
            with self.admission.connection(context.peer()) as connection:
                return await self._classify(request, context, connection)
        except asyncio.CancelledError:  # the client left, or its deadline passed first
            self._count(request, cut_short_code(context))
            raise
        except Exception as e:
            self._count_error(request, e)
            await self._fail(context, e)
            raise  # unreachable: abort raises

    async def _stream_answer(self, request: pb.ClassifyRequest,
                             context: grpc.aio.ServicerContext) -> pb.ClassifyStreamResponse:
        """One stream item's answer: its result, or its error (the stream goes on)."""
        try:
            answer = await self._classify(request, context)
            return pb.ClassifyStreamResponse(request_id=request.request_id, result=answer)
        except asyncio.CancelledError:  # the stream ended under it
            self._count(request, cut_short_code(context))
            raise
        except Exception as e:
            self._count_error(request, e)
            code, message = status_of(e)
            _log_unexpected(e, "unexpected error on stream")
            echo = request.request_id if len(request.request_id) <= convert.MAX_REQUEST_ID_CHARS else ""  # refused for it
            return pb.ClassifyStreamResponse(request_id=echo, error=pb.StreamError(code=code.value[0], message=message))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """Up to ``stream_window`` items in flight at once (so the coalescer can batch them),
        answered in request order. A reader task reads the next item only once the window and
        the connection's share have room for it (the rest stay with gRPC's flow control; a
        stream waiting for its caller's next item holds no share), then counts it in flight;
        this generator yields the answers in the order the items came. A stream opened on a
        connection with ``max_streams_per_connection`` open already is refused at once."""
        with self.admission.connection(context.peer()) as connection:
            try:
                self.admission.open_stream(connection)
            except Overloaded as e:
                await self._fail(context, e)
                return  # unreachable: abort raises
            try:
                window = asyncio.Semaphore(self.settings.stream_window)
                pending: asyncio.Queue[asyncio.Task[pb.ClassifyStreamResponse] | None] = asyncio.Queue()
                # Items whose task has not run its first step: one cancelled then never runs its
                # body (where a cancelled item is counted); it was read, so it is counted at the end.
                unstarted: dict[asyncio.Task[pb.ClassifyStreamResponse], pb.ClassifyRequest] = {}

                async def answer_of(request: pb.ClassifyRequest) -> pb.ClassifyStreamResponse:
                    unstarted.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
                    return await self._stream_answer(request, context)

                async def read() -> None:
                    items = aiter(request_iterator)
                    try:
                        while True:
                            await window.acquire()
                            if connection is not None:  # waited for, not taken: an idle stream holds no share
                                await connection.room()
                            try:
                                item = await anext(items)
                            except BaseException:  # the requests ended, failed or were cancelled: no item
                                window.release()
                                raise
                            if connection is not None:
                                try:  # at once, unless a call took the room while the item came
                                    await connection.take()
                                except asyncio.CancelledError:  # read, never started: a request all the same
                                    self._count(item.request, cut_short_code(context))
                                    raise
                            answer = asyncio.create_task(answer_of(item.request))
                            unstarted[answer] = item.request
                            if connection is not None:
                                connection.hold(answer)
                            pending.put_nowait(answer)
                    except StopAsyncIteration:
                        pass
                    finally:
                        pending.put_nowait(None)  # end of the requests, however they ended

                reader = asyncio.create_task(read())
                task: asyncio.Task[pb.ClassifyStreamResponse] | None = None
                try:
                    while (task := await pending.get()) is not None:
                        answer = await task
                        window.release()
                        yield answer
                    try:
                        await reader  # the requests ended: cleanly, or with the reader's error
                    except asyncio.CancelledError:
                        raise
                    except DecodeError:  # gRPC could not parse the caller's next message
                        await self._fail(context,
                                         InvalidInput("a stream message is not a valid ClassifyStreamRequest"))
                    except Exception as e:  # reading the stream failed: a status, never the error's text
                        await self._fail(context, e)
                finally:  # the call ended early (cancelled, failed): stop what is still in flight
                    left = [t for t in [reader, task, *(pending.get_nowait() for _ in range(pending.qsize()))]
                            if t is not None]
                    for t in left:
                        t.cancel()
                    await asyncio.gather(*left, return_exceptions=True)
                    for request in unstarted.values():
                        self._count(request, cut_short_code(context))
            finally:
                self.admission.close_stream(connection)

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[pb.ModelSummary(name=m.name, version=m.version, formats=list(m.formats), ready=self.backend_serving)
                    for m in self.registry.all()]
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        try:
            return convert.model_to_pb(self.registry.get(request.model, request.version), self.settings.max_image_bytes,
                                       self.settings.allow_certify)
        except Exception as e:
            await self._fail(context, e)
            raise


# Methods anyone may call without a token: probes and tooling must work.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"


TOKEN_RECHECK_S = 2.0  # how often the callers' token file is looked at (a stat; read when it changed)


class CallerTokens:
    """The bearer tokens a caller may present: ``auth_token``, or each line of
    ``auth_token_file``. The file is looked at (a stat) on a call that carries a token, at most
    every :data:`TOKEN_RECHECK_S`, and re-read when it changed (a Kubernetes Secret's update
    swaps the mounted file), so a token is rotated without a restart: the new one added as a
    second line, the callers moved, the old line removed. A file that then cannot be read or
    holds no token keeps the tokens read before (logged, and tried again): an update caught
    half-way must not lock every caller out."""

    def __init__(self, settings: Settings) -> None:
        self._path = settings.auth_token_file
        self._stamp = self._look()
        self._checked = time.monotonic()
        if self._path:
            try:  # a token no caller could send (not ASCII, a control character) would refuse every call
                self._expected = self._read()
            except ValueError as e:
                raise StartFailed(str(e)) from None
        else:
            self._expected = (f"Bearer {settings.auth_token}".encode(),) if settings.auth_token else ()

    def __bool__(self) -> bool:
        return bool(self._expected)

    def _read(self) -> tuple[bytes, ...]:
        return tuple(f"Bearer {t}".encode() for t in read_tokens_file(self._path, "auth_token_file"))

    def _look(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self._path) if self._path else None
        except OSError:
            return None
        return None if st is None else (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def current(self, now: float) -> tuple[bytes, ...]:
        """The accepted ``authorization`` values, the file looked at again if it is time."""
        if self._path and now - self._checked >= TOKEN_RECHECK_S:
            self._checked = now
            stamp = self._look()
            if stamp != self._stamp:
                try:
                    self._expected = self._read()
                except ValueError as e:
                    _throttled.log(logging.WARNING, "token file", "kept the callers' tokens read before: %s", e)
                else:
                    self._stamp = stamp
                    log.info("callers' tokens re-read from %s: %d accepted", self._path, len(self._expected))
        return self._expected


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` (UNAUTHENTICATED), except health
    and reflection. The comparison is constant-time, against every accepted token."""

    def __init__(self, tokens: CallerTokens) -> None:
        self._tokens = tokens
        self._refusals = PerMethod(lambda _method, handler: _refusal(handler), keep=1)

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(OPEN_PREFIXES):
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else bytes(value)
                found = False
                for expected in self._tokens.current(time.monotonic()):  # each compared: no early exit
                    found |= hmac.compare_digest(got, expected)
                return found
        return False

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler
        return self._refusals(details.method, handler)


async def _deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_stream(request_iterator, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # unreachable: abort raises; makes this an async generator


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind that answers UNAUTHENTICATED. No deserializer: a caller
    without the token has its bytes refused unread, so bytes that do not parse read
    UNAUTHENTICATED too, not INVALID_ARGUMENT."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_deny, None, handler.response_serializer)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_deny_stream, None, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, None, handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(_deny, None, handler.response_serializer)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from settings (mutual TLS when a client CA is set); None: plaintext.
    Each file is loaded with OpenSSL first: gRPC refuses a certificate that is not its key's,
    or is no PEM, only when it binds, with the same error as a port that is taken."""
    if not settings.tls_cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file, password=lambda: b"")
    except ssl.SSLError as e:
        raise StartFailed(f"tls_cert_file {settings.tls_cert_file} and tls_key_file {settings.tls_key_file} are not "
                          f"a PEM certificate chain and its unencrypted private key ({e.reason or e})") from None
    if settings.tls_client_ca_file:
        try:
            context.load_verify_locations(settings.tls_client_ca_file)
        except ssl.SSLError as e:
            raise StartFailed(f"tls_client_ca_file {settings.tls_client_ca_file} holds no PEM CA certificate "
                              f"({e.reason or e})") from None
    ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=ca, require_client_auth=ca is not None)


#: The health service the liveness probe asks for: SERVING while the gateway process serves at
#: all, whatever its backend does. The overall status ("") and the classifier's follow the
#: backend (readiness): a restart would not mend a backend, only cut the calls and streams the
#: gateway has open. A hung event loop answers nothing, which fails the probe all the same.
LIVENESS_SERVICE = "robustgate.liveness"


#: Probes in a row a SERVING gateway lets its backend answer "busy" (TorchServe's queue full,
#: :class:`Overloaded` as service.backend reads its INTERNAL "has no worker", or no answer
#: within the timeout, as when the probe waits behind a long queue) before readiness turns NOT_SERVING. One busy probe under a load spike took the pod out
#: of its Service, and every pod of a fleet under the same load with it. Not for long:
#: TorchServe answers a model with no live worker as it answers a full queue. A backend that
#: refuses the connection, or has not loaded a model, turns it NOT_SERVING at once.
BUSY_PROBES = 3


@dataclass
class BackendHealth:
    """The backend's health as the probes have found it: the status set (None: none yet) and
    the busy probes in a row."""

    status: int | None = None
    busy: int = 0


async def probe_backend(backend: TorchServeBackend, registry: Registry, health_servicer: health.aio.HealthServicer,
                        timeout_s: float, metrics: Metrics, state: BackendHealth,
                        serving: Callable[[bool], None] = lambda ok: None) -> None:
    """Probe every served model with a blank image: SERVING only if all of them answer, or
    were SERVING and have answered busy fewer than :data:`BUSY_PROBES` times in a row.
    ``state``: updated; ``serving``: told every round's outcome."""
    async def answer(m: ServedModel) -> str:
        blank = np.zeros((m.input.channels, m.input.height, m.input.width), dtype=np.uint8)
        try:
            await backend.probe(m.backend_name, blank, None, timeout_s)
        except (Overloaded, DeadlineExceeded):
            return "busy"
        except GatewayError:
            return "down"
        return "up"

    # every model, side by side: one busy must not hide another not loaded, and a hung
    # backend holds a round (and a worker's start) for one timeout, not one per model
    answers = set(await asyncio.gather(*(answer(m) for m in registry.all())))
    down = "down" in answers
    busy = "busy" in answers and not down  # down wins: a busy model beside one down does not hold readiness
    answered = not (busy or down)
    state.busy = state.busy + 1 if busy else 0
    SERVING = health_pb2.HealthCheckResponse.SERVING
    ok = answered or (busy and state.status == SERVING and state.busy < BUSY_PROBES)
    metrics.backend_up.set(1 if answered else 0)  # this probe's answer, as the alert reads it
    serving(ok)
    new = SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    if new != state.status:
        log.info("backend %s", "answers: SERVING" if ok else
                 f"is busy {state.busy} probes in a row: NOT_SERVING" if busy else "does not answer: NOT_SERVING")
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, new)
    state.status = new


async def watch_backend(backend: TorchServeBackend, registry: Registry, health_servicer: health.aio.HealthServicer,
                        interval_s: float, timeout_s: float, metrics: Metrics, state: BackendHealth,
                        serving: Callable[[bool], None] = lambda ok: None) -> None:
    """:func:`probe_backend` every ``interval_s``, from ``state``, the first probe's."""
    while True:
        await asyncio.sleep(interval_s)
        await probe_backend(backend, registry, health_servicer, timeout_s, metrics, state, serving)


@dataclass
class Gateway:
    """A running gateway: its server, bound port and the parts tests look at."""

    server: grpc.aio.Server
    port: int
    backend: TorchServeBackend
    health: health.aio.HealthServicer
    admission: Admission
    tasks: list[asyncio.Task]
    metrics: Metrics
    metrics_port: int | None = None
    _metrics_server: object | None = None
    tracing: Tracing = OFF
    coalescer: Coalescer | None = None

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()  # NOT_SERVING: load balancers stop sending
        await self.server.stop(grace_s)
        for t in self.tasks:
            t.cancel()
        try:
            if self.coalescer is not None:
                await self.coalescer.close()
            await self.backend.close()
        finally:
            ratelog.flush_all()  # every log line held back says so before the process ends
        self.tracing.shutdown()  # exports the spans still queued
        if self._metrics_server is not None:
            server = self._metrics_server
            # shutdown() waits up to half a second for the serving thread: not on the event loop.
            await asyncio.to_thread(server.shutdown)  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]  # the port refuses from now on


#: Seconds a client must leave between its keepalive pings (``keepalive_time_s`` where shorter).
CLIENT_PING_INTERVAL_S = 10.0


def _ms(seconds: float) -> int:
    """A duration setting in seconds as gRPC's whole milliseconds, at least 1."""
    return max(1, round(seconds * 1000))


def keepalive_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC server options for ``keepalive_time_s`` and ``keepalive_timeout_s`` (their
    docstrings): the gateway's own pings, sent whether or not calls are open and without a
    limit on pings between data frames (an open stream can be idle for long), and the pings it
    accepts from clients. Empty with ``keepalive_time_s`` 0 (gRPC's defaults then)."""
    if settings.keepalive_time_s <= 0:
        return []
    every, timeout = _ms(settings.keepalive_time_s), _ms(settings.keepalive_timeout_s)
    return [
        ("grpc.keepalive_time_ms", every),
        ("grpc.keepalive_timeout_ms", timeout),
        # gRPC 1.85 closes the connection on this one; with keepalive_timeout_ms alone, a ping
        # left unanswered by a silent peer (tests/test_reliability.py) closed nothing in 10 s.
        ("grpc.http2.ping_timeout_ms", timeout),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", min(every, _ms(CLIENT_PING_INTERVAL_S))),
    ]


async def start(settings: Settings, registry: Registry | None = None, worker: bool = False) -> Gateway:
    """Build and start the gateway; returns once it listens. ``worker``: one of several
    processes of ``service/workers.py``, bound with SO_REUSEPORT beside the others (otherwise a
    port another socket holds fails the start), whose supervisor counts the workers."""
    registry = registry or Registry.load(settings.store, settings.models, settings.backend_format)
    registry.check_coalescing(settings.coalesce_max_batch, settings.coalesce_max_rows)
    registry.check_archive_models(settings.store, settings.backend_format)
    token = read_inference_key(settings.torchserve_key_file)
    disable_created_metrics()  # no rule or panel reads the *_created series; they would double the count
    metrics = Metrics()
    if not worker:  # one process: the count of workers a supervisor would serve
        SupervisorMetrics(metrics.registry).workers.set(1)
    metrics.declare(((m.name, m.policy.version, m.model_sha256, m.policy.mode.value) for m in registry.all()),
                    {m.backend_name: m.name for m in registry.all()})
    for m in registry.all():
        metrics.baseline(m.name, m.policy.calibration)
    tracing = setup_tracing(settings)
    backend = TorchServeBackend(settings.torchserve_address, token, metrics, key_file=settings.torchserve_key_file)
    limits = Limits(max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels)
    coalescer = None
    if settings.coalesce_max_batch >= 2:
        coalescer = Coalescer(backend, CoalesceConfig(settings.coalesce_max_batch, settings.coalesce_max_wait_ms,
                                                      settings.coalesce_max_rows,
                                                      max_calls=settings.coalesce_max_calls), metrics)
    pipeline = Pipeline(registry, coalescer or backend, limits, settings.backend_timeout_s, settings.seed, tracing,
                        allow_certify=settings.allow_certify, decode_threads=settings.decode_threads)
    admission = Admission(settings.max_inflight, metrics, settings.max_inflight_per_connection,
                          settings.max_streams_per_connection)
    caller_tokens = CallerTokens(settings)
    interceptors: list[grpc.aio.ServerInterceptor] = [ServerMetricsInterceptor(metrics.registry)]
    if caller_tokens:  # after the metrics interceptor, so refused calls are counted too
        interceptors.append(BearerTokenInterceptor(caller_tokens))
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 1 if worker else 0),
    ]
    if settings.max_connection_age_s > 0:  # no grace option: calls and streams in flight run to their end
        options.append(("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)))
    options += keepalive_options(settings)
    server = grpc.aio.server(interceptors=interceptors, options=options)
    servicer = ClassifierServicer(pipeline, registry, settings, admission, metrics, tracing)
    pb_grpc.add_ClassifierServiceServicer_to_server(servicer, server)
    health_servicer = HealthServicer()  # bounded; its status set by the first probe, before the server starts
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    creds = server_credentials(settings)
    address = f"{settings.host}:{settings.port}"
    try:
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind": taken, or not an address of this host
        raise cannot_listen(address) from None
    metrics_server, metrics_port = None, None
    if settings.metrics_port >= 0:
        try:
            metrics_server, _thread = metrics_http.start(settings.host, settings.metrics_port, metrics.registry,
                                                         settings.torchserve_metrics_url)
        except ValueError as e:  # the relay's URL (its host does not resolve)
            raise StartFailed(str(e)) from None
        except OSError:  # taken, or not an address of this host: named, as the supervisor names it
            raise cannot_listen(f"{settings.host}:{settings.metrics_port} (metrics)") from None
        metrics_port = metrics_server.server_port
    # The backend probed once before the server answers anything (the port is bound: a
    # connection made meanwhile waits in its backlog), so a gateway's first health answer is
    # already the backend's, and a worker started beside others (or replacing one) never
    # answers NOT_SERVING for a backend that answers. A backend that hangs delays the start
    # by at most backend_timeout_s (every model is probed at once; the supervisor allows for it).
    backend_health = BackendHealth()
    await probe_backend(backend, registry, health_servicer, settings.backend_timeout_s, metrics, backend_health,
                        serving=servicer.set_backend_serving)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    await server.start()
    task = asyncio.create_task(watch_backend(backend, registry, health_servicer, settings.health_interval_s,
                                             settings.backend_timeout_s, metrics, backend_health,
                                             servicer.set_backend_serving))
    log.info("gateway listening on %s:%d (%s%s, metrics %s, traces %s), models %s via TorchServe %s (%s, %s)",
             settings.host, port, "mutual TLS" if settings.tls_client_ca_file else "TLS" if creds else "plaintext",
             ", bearer token" if caller_tokens else "", metrics_port if metrics_port is not None else "off", settings.otlp_endpoint or "off",
             ", ".join(m.name for m in registry.all()), settings.torchserve_address, settings.backend_format,
             f"coalescing up to {settings.coalesce_max_batch} images / {settings.coalesce_max_wait_ms:g} ms / "
             f"{settings.coalesce_max_calls or 'unlimited'} calls in flight"
             if coalescer else "no coalescing")
    return Gateway(server, port, backend, health_servicer, admission, [task], metrics, metrics_port, metrics_server,
                   tracing, coalescer)


def cannot_listen(address: str) -> OSError:
    """The one-line refusal to start on a port that cannot be bound (one process or several)."""
    return OSError(f"cannot listen on {address}: the port is taken or the address is not this host's")


class StartFailed(Exception):
    """The gateway did not start; the message says why in one line (a policy or archive that
    does not fit, an unreadable key file, a port already taken...)."""


async def serve(settings: Settings, worker: bool = False, started: Callable[[], object] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain in-flight calls within ``settings.grace_s``.
    StartFailed when it cannot start; anything raised after it listens is a fault, not a
    refusal to start, and keeps its traceback. ``started`` is called once it listens."""
    try:
        gw = await start(settings, worker=worker)
    except (GatewayError, OSError) as e:
        raise StartFailed(str(e)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if early_signal.received():  # SIGTERM came while it started: stop now (nothing is in flight yet)
        log.info("SIGTERM arrived while starting: stopping")
        stop.set()
    if started is not None:
        started()
    await stop.wait()
    log.info("draining: up to %.1f s for in-flight calls", settings.grace_s)
    await gw.stop(settings.grace_s)
