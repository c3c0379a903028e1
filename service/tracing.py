"""OpenTelemetry traces: one span per request, a child span per stage — ``decode``, each
``backend`` call to TorchServe, each ``gate`` step — exported over OTLP/gRPC when
``settings.otlp_endpoint`` is set.

    tracing = setup(settings)            # OFF unless an endpoint is configured
    with tracing.request_span("classify", metadata, {"robustgate.model": name}) as span:
        with tracing.span("decode"):
            ...
    tracing.shutdown()                   # flushes what is still queued

Off (the default) it costs nothing measurable: OpenTelemetry is not imported, and every span
is the same shared no-op context manager. A caller's W3C ``traceparent`` metadata makes the
request span a child of the caller's trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, ContextManager, Protocol

from service.settings import Settings

SERVICE_NAME = "robustgate"
# A string attribute's longest exported value: a caller's model name or request_id is on a
# request span before validation refuses it, so an exported span stays small whatever was sent.
MAX_ATTRIBUTE_CHARS = 256
AttributeValue = str | bool | int | float


class SpanLike(Protocol):
    def set_attribute(self, key: str, value: AttributeValue) -> None: ...


class _NoSpan:
    """What a span is while tracing is off: takes attributes and drops them."""

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        pass


NO_SPAN = _NoSpan()
_NULL: ContextManager[SpanLike] = contextlib.nullcontext(NO_SPAN)  # reusable, shared


class Tracing:
    """Spans for the request path; a no-op when built without a tracer (``OFF``)."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def span(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> ContextManager[SpanLike]:
        """A child of the current span (a stage of the request). Like the request span, it
        records no exception and sets no error status by itself: a caller's bad image ending a
        ``decode`` span is not a server failure, and its message is the caller's text."""
        if self._tracer is None:
            return _NULL
        return self._tracer.start_as_current_span(name, attributes=attributes, record_exception=False,
                                                  set_status_on_exception=False)

    def request_span(self, name: str, metadata: Iterable[tuple[str, str | bytes]] | None,
                     attributes: Mapping[str, AttributeValue] | None = None) -> ContextManager[SpanLike]:
        """The root span of one request (a server span), joined to the caller's trace when its
        gRPC metadata carries ``traceparent``. Exceptions are not recorded on it: the caller
        sets the status code (:func:`set_error`), so client errors do not read as failures."""
        if self._tracer is None:
            return _NULL
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
        return self._tracer.start_as_current_span(
            name, context=propagate.extract(carrier), kind=SpanKind.SERVER, attributes=attributes,
            record_exception=False, set_status_on_exception=False)

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporter."""
        if self._provider is not None:
            self._provider.shutdown()


OFF = Tracing()


def set_error(span: SpanLike, description: str) -> None:
    """Mark ``span`` failed (a server-side error); no-op while tracing is off."""
    if span is NO_SPAN:
        return
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, description))  # type: ignore[attr-defined]


def setup(settings: Settings) -> Tracing:
    """``OFF`` unless ``settings.otlp_endpoint`` is set; else a tracer whose spans go through a
    batching processor to an OTLP/gRPC exporter (``http://`` endpoint: plaintext,
    ``https://``: TLS; a bare ``host:port``: plaintext). Sampling is parent-based at ``settings.trace_sample_ratio``;
    string attributes are clipped to ``MAX_ATTRIBUTE_CHARS``."""
    if not settings.otlp_endpoint:
        return OFF
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}),
        sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)),
        span_limits=SpanLimits(max_attribute_length=MAX_ATTRIBUTE_CHARS,  # events' too
                               max_span_attribute_length=MAX_ATTRIBUTE_CHARS),
    )
    endpoint = settings.otlp_endpoint
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"),
                                timeout=settings.backend_timeout_s)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Tracing(provider.get_tracer("service.tracing"), provider)
