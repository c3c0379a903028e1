"""The servicer's error and stream bookkeeping, with a stand-in pipeline and context: what
reaches the log and the request counter on paths a real server reaches only by timing."""

from __future__ import annotations

import asyncio
import logging
import types

import grpc
import pytest

from robustgate.v1 import classifier_pb2 as pb
from service.backend import refusal
from service.metrics import Metrics
from service.server import Admission, ClassifierServicer


class Aborted(Exception):
    pass


class Context:
    """What the servicer reads of a grpc.aio context."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple:
        return ()

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise Aborted(code, message)


def servicer(pipeline: object, metrics: Metrics, window: int = 4) -> ClassifierServicer:
    registry = types.SimpleNamespace(all=lambda: [types.SimpleNamespace(name="m")])
    settings = types.SimpleNamespace(stream_window=window, request_timeout_s=10.0)
    return ClassifierServicer(pipeline, registry, settings, Admission(100, metrics), metrics)  # type: ignore[arg-type]


def counted(metrics: Metrics) -> dict[str, float]:
    return {s.labels["code"]: s.value for fam in metrics.requests.collect() for s in fam.samples
            if s.name.endswith("_total")}


def test_a_deployment_fault_is_logged_throttled_not_with_a_traceback_per_request(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler refusing the gateway's plans (gateway and archives disagree) fails every
    request INTERNAL. The backend logs it once per 10 s; the servicer also logged a traceback
    per request ("unexpected error"), thousands of lines a second under load."""

    class Refused:
        async def classify(self, request: object, deadline: float) -> None:
            raise refusal("bad plan: noise.count over max_batch_rows")

    from service import backend
    from service.ratelog import Throttle

    monkeypatch.setattr(backend, "_throttled", Throttle(backend.log))  # none held from other tests
    metrics = Metrics()
    sv = servicer(Refused(), metrics)

    async def calls() -> list[tuple]:
        answers = []
        for _ in range(200):
            with pytest.raises(Aborted) as err:
                await sv.Classify(pb.ClassifyRequest(model="m", image=b"x"), Context())
            answers.append(err.value.args)
        return answers

    with caplog.at_level(logging.INFO):
        answers = asyncio.run(calls())
    assert {a[0] for a in answers} == {grpc.StatusCode.INTERNAL}
    assert "refused the gate's probe plan" in answers[0][1] and "max_batch_rows" not in answers[0][1]
    assert counted(metrics) == {"INTERNAL": 200.0}
    refusals = [r for r in caplog.records if "refused a probe plan" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in caplog.records][:5]
    assert not [r for r in caplog.records if r.exc_info], "a traceback per request"


def test_a_bug_still_logs_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        async def classify(self, request: object, deadline: float) -> None:
            raise KeyError("internal detail")

    with caplog.at_level(logging.INFO), pytest.raises(Aborted) as err:
        asyncio.run(servicer(Broken(), Metrics()).Classify(pb.ClassifyRequest(model="m", image=b"x"), Context()))
    assert err.value.args[0] is grpc.StatusCode.INTERNAL and "internal detail" not in err.value.args[1]
    assert [r for r in caplog.records if r.exc_info and "unexpected error" in r.getMessage()]


def test_a_stream_item_cancelled_before_it_started_is_still_counted() -> None:
    """Every item read from a stream is a request in the counter. One whose task the stream's
    end cancelled before its first step never ran the code that counts a cancelled item:
    here the caller leaves while the second item is being read."""

    class Slow:
        async def classify(self, request: object, deadline: float) -> None:
            await asyncio.Event().wait()  # never answers: the caller leaves first

    metrics = Metrics()
    sv = servicer(Slow(), metrics)

    async def run() -> None:
        consumer: asyncio.Task | None = None

        async def items():
            yield pb.ClassifyStreamRequest(request=pb.ClassifyRequest(model="m", request_id="0", image=b"x"))
            assert consumer is not None
            consumer.cancel()  # the caller leaves: its stream ends as the next item is read
            yield pb.ClassifyStreamRequest(request=pb.ClassifyRequest(model="m", request_id="1", image=b"x"))

        async def consume() -> None:
            async for _ in sv.ClassifyStream(items(), Context()):
                pass

        consumer = asyncio.create_task(consume())
        with pytest.raises(asyncio.CancelledError):
            await consumer

    asyncio.run(run())
    assert counted(metrics) == {"CANCELLED": 2.0}


def test_a_request_cut_short_at_its_deadline_is_an_error_on_its_span() -> None:
    """A request whose caller's deadline passed while it waited on the backend is cancelled by
    gRPC: counted DEADLINE_EXCEEDED (a server fault), it left its span without a status code
    or error, so the slowest requests never showed as errors in the tracing backend. A caller
    that left (CANCELLED) is no fault of ours: a status code, no error."""
    from opentelemetry.trace import StatusCode

    from tests.test_pipeline import traced

    class Hangs:
        async def classify(self, request: object, deadline: float) -> None:
            await asyncio.Event().wait()

    for left, code, error in ((0.0, grpc.StatusCode.DEADLINE_EXCEEDED, True), (5.0, grpc.StatusCode.CANCELLED, False)):
        exporter, tracing = traced()
        metrics = Metrics()
        sv = servicer(Hangs(), metrics)
        sv.tracing = tracing

        class Late(Context):
            def time_remaining(self) -> float | None:
                return left

        async def run() -> None:
            task = asyncio.create_task(sv._classify(pb.ClassifyRequest(model="m", image=b"x"), Late()))
            await asyncio.sleep(0.01)
            task.cancel()  # as gRPC does at the deadline, or when the caller leaves
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(run())
        (span,) = exporter.get_finished_spans()
        assert span.attributes["rpc.grpc.status_code"] == code.value[0]
        assert (span.status.status_code == StatusCode.ERROR) is error
        assert (span.status.description == code.name) is error


def test_a_busy_backend_keeps_readiness_for_a_few_probes_a_down_one_loses_it_at_once(caplog) -> None:
    """One probe that found TorchServe's queue full (or waited past its timeout behind it)
    turned a loaded pod NOT_SERVING, and every pod of a fleet under the same load with it.
    A SERVING gateway now lets its backend be busy BUSY_PROBES - 1 probes in a row; a third
    turns it NOT_SERVING (TorchServe answers a model with no live worker like a full queue),
    as does a refused connection or a model not loaded, at once; a gateway not yet SERVING
    is not made so by a busy backend. backend_up is each probe's own answer."""
    from grpc_health.v1 import health, health_pb2

    from service.errors import BackendUnavailable, DeadlineExceeded, ModelNotLoaded, Overloaded
    from service.server import BUSY_PROBES, SERVICE_NAME, BackendHealth, probe_backend

    assert BUSY_PROBES == 3
    SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    answers: list[Exception | None] = []

    class Backend:
        async def probe(self, name, image, plan, timeout_s):
            if (e := answers.pop(0)) is not None:
                raise e

    model = types.SimpleNamespace(backend_name="m-onnx", input=types.SimpleNamespace(channels=1, height=28, width=28))
    registry = types.SimpleNamespace(all=lambda: [model])
    busy, late = Overloaded("backend is overloaded"), DeadlineExceeded("no answer")
    down, unloaded = BackendUnavailable("backend is unavailable"), ModelNotLoaded("not loaded")

    async def rounds(state: BackendHealth, script: list) -> list[tuple[int | None, float, bool]]:
        hs, metrics, told = health.aio.HealthServicer(), Metrics(), []
        for name in ("", SERVICE_NAME) if state.status is not None else ():  # as set before
            await hs.set(name, state.status)
        seen = []
        for answer in script:  # a tuple: one answer per model
            answers.extend(answer if isinstance(answer, tuple) else (answer,))
            await probe_backend(Backend(), registry, hs, 1.0, metrics, state, told.append)  # type: ignore[arg-type]
            status = (await hs.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), None)).status
            assert status == (await hs.Check(health_pb2.HealthCheckRequest(), None)).status == state.status
            seen.append((status, metrics.backend_up._value.get(), told[-1]))
        return seen

    with caplog.at_level("INFO", logger="service.server"):
        got = asyncio.run(rounds(BackendHealth(), [None, busy, late, busy, None, busy, down, None, unloaded]))
    assert got == [(SERVING, 1, True), (SERVING, 0, True), (SERVING, 0, True), (NOT_SERVING, 0, False),
                   (SERVING, 1, True), (SERVING, 0, True), (NOT_SERVING, 0, False), (SERVING, 1, True),
                   (NOT_SERVING, 0, False)]
    assert "backend is busy 3 probes in a row: NOT_SERVING" in caplog.text
    assert caplog.text.count("backend does not answer: NOT_SERVING") == 2
    # at start (no status yet) a busy backend is not taken for a sound one
    assert asyncio.run(rounds(BackendHealth(), [busy, None])) == [(NOT_SERVING, 0, False), (SERVING, 1, True)]
    # every model is probed: one busy does not hide another not loaded
    other = types.SimpleNamespace(backend_name="n-onnx", input=model.input)
    registry.all = lambda: [model, other]
    assert asyncio.run(rounds(BackendHealth(status=SERVING), [(busy, unloaded)])) == [(NOT_SERVING, 0, False)]
    assert asyncio.run(rounds(BackendHealth(status=SERVING), [(busy, None)])) == [(SERVING, 0, True)]
    assert not answers  # each model probed once a round


def test_the_backend_probe_asks_every_model_at_once() -> None:
    """Each model was probed after the previous one answered: a hung TorchServe held a health
    round, and a worker's start, for the backend timeout once per model. Every probe is now
    in flight together: here none answers until all have been asked."""
    from grpc_health.v1 import health, health_pb2

    from service.errors import DeadlineExceeded
    from service.server import SERVICE_NAME, BackendHealth, probe_backend

    size = types.SimpleNamespace(channels=1, height=28, width=28)
    registry = types.SimpleNamespace(all=lambda: [types.SimpleNamespace(backend_name=f"m{i}-onnx", input=size)
                                                  for i in range(3)])

    async def run() -> tuple[int, set[str]]:
        asked: set[str] = set()
        all_asked = asyncio.Event()

        class Backend:
            async def probe(self, name, image, plan, timeout_s):
                asked.add(name)
                if len(asked) == 3:
                    all_asked.set()
                await all_asked.wait()
                if name == "m1-onnx":
                    raise DeadlineExceeded("no answer")

        hs, state = health.aio.HealthServicer(), BackendHealth()
        await asyncio.wait_for(probe_backend(Backend(), registry, hs, 1.0, Metrics(), state), 10)  # type: ignore[arg-type]
        status = (await hs.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), None)).status
        return status, asked

    status, asked = asyncio.run(run())
    assert asked == {"m0-onnx", "m1-onnx", "m2-onnx"}
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING  # one busy at start: not taken for sound
