"""The pipeline around a scripted backend: what a request's fields do before and after the
backend call (the gateway tests run it against a real TorchServe)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service.backend import ProbeOutput
from service.decode import InputSpec, Limits
from service.errors import InvalidInput
from service.gate.policy import Mode
from service.pipeline import ClassifyInput, Pipeline, RawTensor
from tests.test_gate_policy import make_policy


class Backend:
    def __init__(self, classes: int) -> None:
        self.classes = classes

    async def probe(self, model_name, image, plan, timeout_s, version=""):
        return ProbeOutput(np.arange(self.classes, dtype=np.float32)[None], None, "cpu", "scripted")


def classify_with(backend, policy, labels: tuple[str, ...] = tuple("abcdefghij"), tracing=None, **request):
    """One request for model "m" (``labels``, ``policy``) through a pipeline in front of ``backend``."""
    from service.tracing import OFF

    model = SimpleNamespace(name="m", version="1", labels=labels, input=InputSpec(), backend_name="m-onnx",
                            policy=policy)
    pipeline = Pipeline(SimpleNamespace(get=lambda name, version: model), backend, Limits(),  # type: ignore[arg-type]
                        backend_timeout_s=5.0, tracing=tracing or OFF)
    req = ClassifyInput(model="m", tensor=RawTensor((28, 28), "uint8", bytes(784)), **request)
    return asyncio.run(pipeline.classify(req, time.monotonic() + 5))


def classify(labels: tuple[str, ...], **request) -> tuple:
    res = classify_with(Backend(len(labels)), make_policy(Mode.OFF), labels, **request)
    return tuple(c.label for c in res.classes)


def test_unset_top_k_is_five_or_every_label_of_a_model_of_fewer() -> None:
    ten = tuple("abcdefghij")
    assert classify(ten) == ("j", "i", "h", "g", "f")
    assert classify(("a", "b", "c")) == ("c", "b", "a")  # was INVALID_ARGUMENT for every default request
    assert classify(("a", "b", "c"), top_k=2) == ("c", "b")
    with pytest.raises(InvalidInput, match="top_k 4 exceeds the model's 3 classes"):
        classify(("a", "b", "c"), top_k=4)


def test_a_failed_backend_call_marks_its_stage_span_failed() -> None:
    """Stage spans set no status by themselves (a bad image is the caller's); the backend
    call's failure is the server's, and its span says so without the message's text."""
    from opentelemetry.trace import StatusCode

    from service.errors import BackendUnavailable

    class Down:
        async def probe(self, model_name, image, plan, timeout_s, version=""):
            raise BackendUnavailable("TorchServe at 127.0.0.1:7070 refused the connection")

    exporter, tracing = traced()
    with pytest.raises(BackendUnavailable):
        classify_with(Down(), make_policy(Mode.OFF), tuple("abc"), tracing)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["backend"].status.status_code is StatusCode.ERROR
    assert spans["backend"].status.description == "BackendUnavailable" and not spans["backend"].events
    assert spans["decode"].status.status_code is StatusCode.UNSET


def test_top_k_ranks_by_logit_where_probabilities_underflow() -> None:
    """Classes far below the top have probability 0.0 in float64; ranked by probability, ties
    went to index order and class 2 (logit -800) was listed after class 1 (-801)."""
    from service.pipeline import top_k

    ranked = top_k(np.array([0.0, -801.0, -800.0, 3.0], np.float32), ("a", "b", "c", "d"), 4)
    assert [c.label for c in ranked] == ["d", "a", "c", "b"]
    assert ranked[2].probability == ranked[3].probability == 0.0
    tie = top_k(np.array([1.0, 2.0, 2.0], np.float32), ("a", "b", "c"), 3)
    assert [c.label for c in tie] == ["b", "c", "a"]  # equal logits keep index order


class Scripted:
    """A backend whose every answer is ``logits`` and ``features``."""

    def __init__(self, logits: np.ndarray, features: np.ndarray | None) -> None:
        self.logits, self.features = logits, features

    async def probe(self, model_name, image, plan, timeout_s, version=""):
        return ProbeOutput(self.logits, self.features, "cpu", "scripted")


def test_an_answer_of_another_shape_than_asked_is_the_backends_fault(caplog, monkeypatch) -> None:
    """An archive other than the one checked at start (more rows, other classes) or features
    the density model cannot read: UNAVAILABLE with a fixed message and the detail logged,
    where a gate-off request read row 0 of anything and a gated one raised the gate's own
    error (INTERNAL, a traceback per request)."""
    from service import backend as backend_module
    from service.errors import BackendUnavailable
    from service.ratelog import Throttle

    off, gated = make_policy(Mode.OFF), make_policy(Mode.ENFORCE)
    rows = gated.cheap_plan(0).rows
    assert classify_with(Scripted(np.zeros((1, 10), np.float32), None), off).classes  # well formed: answered
    assert classify_with(Scripted(np.zeros((rows, 10), np.float32), np.zeros(5, np.float32)), gated).report
    for backend, policy, detail in [
        (Scripted(np.zeros((2, 10), np.float32), None), off, "(2, 10) for 1 rows of 10 classes"),
        (Scripted(np.zeros((1, 9), np.float32), None), off, "(1, 9) for 1 rows of 10 classes"),
        (Scripted(np.zeros((1, 10), np.float32), None), gated, f"(1, 10) for {rows} rows of 10 classes"),
        (Scripted(np.zeros((rows, 10), np.float32), np.zeros(3, np.float32)), gated, "features must be finite [5]"),
    ]:
        caplog.clear()
        monkeypatch.setattr(backend_module, "_throttled", Throttle(backend_module.log))  # each logged
        exporter, tracing = traced()
        with caplog.at_level("ERROR", logger="service.backend"), \
                pytest.raises(BackendUnavailable, match="^backend answered an undecodable result$") as err:
            classify_with(backend, policy, tracing=tracing)
        assert detail in caplog.text and err.value.__cause__ is None
        failed = [(s.name, s.status.description) for s in exporter.get_finished_spans()
                  if s.status.status_code.name == "ERROR"]
        assert failed == [("gate" if "features" in detail else "backend", "BackendUnavailable")]  # a trace says where


def traced():  # also used by test_servicer
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from service.tracing import Tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, Tracing(provider.get_tracer("test"), provider)
