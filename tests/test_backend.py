"""The gateway's side of the probe contract, against the shared example plans."""

import json
from pathlib import Path

import numpy as np
import pytest

from robustgate.v1 import probe_pb2
from service.backend import decode_result, encode_tensor
from service.errors import BackendRefused, BackendUnavailable
from service.gate.plan import ProbeSpec
from service.pipeline import spec_to_proto

EXAMPLES = Path(__file__).resolve().parent.parent / "proto" / "examples"


def test_result_with_a_per_request_error_raises_its_domain_error(caplog, monkeypatch) -> None:
    """The gateway sends only tensors it decoded and checked as the handler does: a handler
    that refuses one disagrees with the gateway (a server fault, INTERNAL with a fixed
    message), the caller is not told its good image was bad, the handler's words (first
    line only) go to the log."""
    import grpc

    from service import backend
    from service.backend import INPUT_REFUSED_MESSAGE
    from service.ratelog import Throttle
    from service.server import status_of

    monkeypatch.setattr(backend, "_throttled", Throttle(backend.log))  # nothing held back by other tests
    bad = probe_pb2.ProbeResult(error=probe_pb2.ProbeError(code=400, message="tensor shape [1, 32, 32]; the model "
                                                           "takes [1, 28, 28]\nTraceback"), batch_requests=3)
    with caplog.at_level("ERROR", logger="service.backend"), pytest.raises(BackendRefused) as err:
        decode_result(bad.SerializeToString())
    assert status_of(err.value) == (grpc.StatusCode.INTERNAL, INPUT_REFUSED_MESSAGE)
    assert "tensor shape [1, 32, 32]; the model takes [1, 28, 28]" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(BackendUnavailable):
        decode_result(probe_pb2.ProbeResult(error=probe_pb2.ProbeError(code=507, message="oom")).SerializeToString())


@pytest.mark.parametrize("message", [
    "bad plan: plan asks for 3000 variants; this model allows at most 2048",
    "bad plan: plan version 3 is not supported (this handler speaks 1 and 2)",
    "plan is not a valid robustgate.v1.ProbePlan",  # archives from before every refusal said "bad plan"
])
def test_a_refused_plan_is_the_deployments_fault_not_the_callers(message: str, caplog, monkeypatch) -> None:
    """The gateway wrote the plan: a client that sent a good image must not be told it sent a
    bad one, and ops must see a server fault (INTERNAL, counted by the error-ratio alert),
    with the handler's words in the log only."""
    import grpc

    from service import backend
    from service.backend import PLAN_REFUSED_MESSAGE, map_rpc_error
    from service.ratelog import Throttle
    from service.server import SERVER_FAULTS, status_of

    monkeypatch.setattr(backend, "_throttled", Throttle(backend.log))  # nothing held back by other tests

    raw = probe_pb2.ProbeResult(error=probe_pb2.ProbeError(code=400, message=message)).SerializeToString()
    with caplog.at_level("ERROR", logger="service.backend"), pytest.raises(BackendRefused) as err:
        decode_result(raw)
    assert status_of(err.value) == (grpc.StatusCode.INTERNAL, PLAN_REFUSED_MESSAGE)
    assert grpc.StatusCode.INTERNAL in SERVER_FAULTS and message in caplog.text
    rpc = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details=message)
    assert isinstance(map_rpc_error(rpc), BackendRefused)
    rpc = grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                               details="batch has 300 items; the limit is 256")  # the coalescer's call
    refused = map_rpc_error(rpc)
    assert isinstance(refused, BackendRefused) and str(refused) == backend.INPUT_REFUSED_MESSAGE


def test_a_failure_every_request_repeats_is_logged_once_per_interval(caplog, monkeypatch) -> None:
    """A deployment fault or an outage fails every request alike: the first line at once,
    then one per 10 s for the same kind, saying how many were held back."""
    import grpc

    from service import backend
    from service.ratelog import Throttle

    now = [0.0]
    monkeypatch.setattr(backend, "_throttled", Throttle(backend.log, 10.0, clock=lambda: now[0]))
    skew = "bad plan: plan version 3 is not supported (this handler speaks 1 and 2)"
    down = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details="connection refused")
    with caplog.at_level("WARNING", logger="service.backend"):
        for _ in range(100):
            backend.refusal(skew)
            backend.map_rpc_error(down)
        now[0] = 9.9
        backend.refusal("bad plan: plan asks for 3000 variants; this model allows at most 2048")  # another kind
        backend.refusal(skew)
        assert [r.getMessage()[:40] for r in caplog.records] == [
            "the model server refused a probe plan (g", "backend call failed: UNAVAILABLE connect",
            "the model server refused a probe plan (g"]
        now[0] = 10.0
        backend.refusal(skew)
    assert caplog.records[-1].getMessage().endswith("(and 100 more like it in the last 10 s)")
    assert len(caplog.records) == 4


def test_result_round_trip() -> None:
    logits = np.arange(30, dtype=np.float32).reshape(3, 10)
    feats = np.ones(4, dtype=np.float32)
    raw = probe_pb2.ProbeResult(rows=3, classes=10, logits=logits.tobytes(), features=feats.tobytes(),
                                feature_dim=4, device="cpu", runtime="onnxruntime").SerializeToString()
    out = decode_result(raw)
    assert np.array_equal(out.logits, logits) and np.array_equal(out.features, feats) and out.runtime == "onnxruntime"


def test_tensor_encoding_keeps_dtype_and_shape() -> None:
    t = probe_pb2.Tensor()
    t.ParseFromString(encode_tensor(np.full((1, 28, 28), 0.5, dtype=np.float32)))
    assert list(t.shape) == [1, 28, 28] and t.dtype == "float32" and len(t.data) == 28 * 28 * 4


def _index() -> dict:
    return json.loads((EXAMPLES / "index.json").read_text())


@pytest.mark.parametrize("name", sorted(_index()["valid"]))
def test_gate_reads_each_valid_example_plan_like_the_handler(name: str) -> None:
    """The handler tests use the same files: both sides count the same rows and the gate's
    plan type turns each into the same wire message."""
    from google.protobuf import json_format

    raw = json.loads((EXAMPLES / name).read_text())
    spec = ProbeSpec.from_dict(raw)
    assert spec.rows == _index()["valid"][name]["rows"]
    # Same plan on the wire (an empty section and an absent one mean the same to the handler).
    wire = json_format.MessageToDict(spec_to_proto(spec), preserving_proto_field_name=True)
    assert ProbeSpec.from_dict(wire) == spec
    assert spec_to_proto(spec).seed == json_format.ParseDict(raw, probe_pb2.ProbePlan()).seed


# The variant cap comes from the archive's model-config.yaml, which the gateway does not read:
# the handler alone enforces it.
HANDLER_ONLY = {"invalid/too_many_variants.json"}
# Limits of the image size: the gateway checks them when a policy's probe meets the model's
# card (the examples are for a 1x28x28 model).
IMAGE_SIZE = {"invalid/shuffle_grid_not_dividing.json", "invalid/view_shift_too_large.json",
              "invalid/occlusion_grid_too_large.json"}


@pytest.mark.parametrize("name", sorted(set(_index()["invalid"]) - HANDLER_ONLY))
def test_gate_refuses_each_invalid_example_plan(name: str) -> None:
    from service.gate.errors import PlanError

    raw = json.loads((EXAMPLES / name).read_text())
    want = _index()["invalid"][name].replace(".", r"\.")
    with pytest.raises(PlanError, match=want):
        ProbeSpec.from_dict(raw).check_input(28, 28)
    if name in IMAGE_SIZE:
        ProbeSpec.from_dict(raw).check_input(999, 960)  # fits a larger image


@pytest.mark.parametrize("name", sorted(_index()["valid"]))
def test_valid_example_plans_fit_the_example_image_size(name: str) -> None:
    ProbeSpec.from_dict(json.loads((EXAMPLES / name).read_text())).check_input(28, 28)


def test_spec_to_proto_is_the_json_conversion_for_every_seed_and_a_fresh_message_each_time() -> None:
    from dataclasses import replace

    from google.protobuf import json_format

    from service.gate.defaults import default_probe
    from service.gate.plan import NoiseSpec

    def by_json(spec: ProbeSpec) -> probe_pb2.ProbePlan:
        return json_format.ParseDict(spec.to_dict(), probe_pb2.ProbePlan())

    cheap = default_probe()
    for seed in (0, 1, 12345, 2**63 - 1, 2**64 - 1):
        for spec in (replace(cheap, seed=seed), ProbeSpec(seed=seed, noise=NoiseSpec(sigma=0.25, count=8)),
                     ProbeSpec(seed=seed, noise=NoiseSpec(sigma=0.25, count=16)),
                     ProbeSpec(seed=seed, noise=NoiseSpec(sigma=0.25, count=16, offset=24))):
            assert spec_to_proto(spec) == by_json(spec)
            assert spec_to_proto(spec).SerializeToString() == by_json(spec).SerializeToString()
    # a batch at offset 0 after one at 24 (the template is shared): no offset left over
    assert spec_to_proto(ProbeSpec(seed=3, noise=NoiseSpec(sigma=0.25, count=16))).noise.offset == 0
    # The conversion is cached per plan: a caller changing its message changes no later one.
    mine = spec_to_proto(cheap)
    mine.seed, mine.squeeze.bit_depths[0] = 7, 8
    assert spec_to_proto(cheap) == by_json(cheap)


def test_a_model_torchserve_has_not_loaded_is_unavailable_not_not_found(caplog) -> None:
    """The gateway serves the model, so a NOT_FOUND from TorchServe (restarted without it,
    unregistered; 0.12 answers INTERNAL "Model not found", test_reliability) is a server fault the caller may retry: UNAVAILABLE, counted by the
    error-ratio alert; NOT_FOUND stays for names the gateway itself does not serve."""
    import grpc

    from service.backend import map_rpc_error
    from service.server import SERVER_FAULTS, status_of

    err = map_rpc_error(grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(),
                                                     grpc.aio.Metadata(), "Model not found: fmnist-cnn-onnx"))
    assert isinstance(err, BackendUnavailable)
    code, message = status_of(err)
    assert code is grpc.StatusCode.UNAVAILABLE and code in SERVER_FAULTS
    assert message == "model is not loaded in the backend; retry later"
    assert "fmnist-cnn-onnx" in caplog.text  # TorchServe's words go to the log, not the caller


def test_a_probe_batch_the_handler_refused_whole_raises_its_error_for_the_call(monkeypatch) -> None:
    """One error for a batch of three (the handler refused the batch, e.g. over its item
    limit): the call's error, a refusal the coalescer answers by sending the items one by one;
    not "an undecodable result" (UNAVAILABLE for all three)."""
    import asyncio

    from service import backend
    from service.backend import TorchServeBackend
    from service.ratelog import Throttle

    monkeypatch.setattr(backend, "_throttled", Throttle(backend.log))
    answers: list[bytes] = []

    async def predict(self, model_name, version, inputs, timeout_s):
        return answers.pop(0)

    monkeypatch.setattr(TorchServeBackend, "_predict", predict)
    items = [(np.zeros((1, 28, 28), np.uint8), None)] * 3

    async def call():  # the channel is made on the loop that uses it
        return await TorchServeBackend("127.0.0.1:1", "token").probe_batch("m", items, 1.0)

    refused = probe_pb2.ProbeError(code=400, message="batch has 3 items; the limit is 2")
    answers.append(probe_pb2.ProbeBatchResult(results=[probe_pb2.ProbeResult(error=refused)]).SerializeToString())
    with pytest.raises(BackendRefused):
        asyncio.run(call())
    answers.append(probe_pb2.ProbeBatchResult(results=[probe_pb2.ProbeResult(rows=1)]).SerializeToString())
    with pytest.raises(BackendUnavailable, match="undecodable"):  # one answer, not an error: the handler's fault
        asyncio.run(call())


def test_the_channel_to_torchserve_has_torchserves_limits_not_the_callers() -> None:
    """A gateway whose callers are held to a small max_message_bytes still sends coalesced
    calls and reads their answers (every variant's logits) up to TorchServe's own limits."""
    import asyncio

    import grpc

    from model_store.serve import ServeSettings
    from robustgate.torchserve import inference_pb2, inference_pb2_grpc
    from service import backend
    from service.backend import TorchServeBackend

    assert backend.BACKEND_MAX_SEND_BYTES == ServeSettings.max_request_size
    assert backend.BACKEND_MAX_RECEIVE_BYTES == ServeSettings.max_response_size
    rows = 4096  # coalesce_max_rows: 160 KiB of logits for ten classes
    logits = np.zeros((rows, 10), "<f4").tobytes()

    class Fake(inference_pb2_grpc.InferenceAPIsServiceServicer):
        async def Predictions(self, request, context):  # noqa: N802 (gRPC method name)
            n = len(probe_pb2.ProbeBatch.FromString(request.input["batch"]).items)
            one = probe_pb2.ProbeResult(rows=rows // n, classes=10, logits=logits[: len(logits) // n])
            return inference_pb2.PredictionResponse(prediction=probe_pb2.ProbeBatchResult(results=[one] * n)
                                                    .SerializeToString())

    async def main() -> list:
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 << 20),
                                          ("grpc.max_send_message_length", 64 << 20)])
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Fake(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            tb = TorchServeBackend(f"127.0.0.1:{port}", "token")
            items = [(np.zeros((3, 224, 224), np.float32), None)] * 8  # 4.8 MB of tensors in one call
            return await tb.probe_batch("m", items, 5.0)
        finally:
            await server.stop(0)

    outs = asyncio.run(main())
    assert len(outs) == 8 and all(o.logits.shape == (rows // 8, 10) for o in outs)


def test_the_channel_to_torchserve_never_goes_through_a_proxy(proxy_env) -> None:
    """gRPC honours http_proxy / grpc_proxy even for 127.0.0.1: a pod that set one for its
    egress sent every call, TorchServe's token in its metadata, to the proxy (as CONNECT)."""
    import asyncio

    import grpc

    from robustgate.torchserve import inference_pb2, inference_pb2_grpc
    from service.backend import TorchServeBackend

    tokens: list[str] = []

    class Fake(inference_pb2_grpc.InferenceAPIsServiceServicer):
        async def Predictions(self, request, context):  # noqa: N802 (gRPC method name)
            tokens.extend(v for k, v in context.invocation_metadata() if k == "authorization")
            return inference_pb2.PredictionResponse(prediction=probe_pb2.ProbeResult(
                rows=1, classes=10, logits=np.zeros((1, 10), "<f4").tobytes()).SerializeToString())

    async def main():
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Fake(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        tb = TorchServeBackend(f"127.0.0.1:{port}", "secret")
        try:
            return await tb.probe("m", np.zeros((1, 28, 28), np.float32), None, 5.0)
        finally:
            await tb.close()
            await server.stop(0)

    out = asyncio.run(main())
    assert out.logits.shape == (1, 10) and tokens == ["Bearer secret"]
    assert proxy_env == []


def test_the_token_refresh_retry_shares_the_calls_timeout(tmp_path: Path) -> None:
    """TorchServe refuses a renewed token after a while (here 0.6 s of a 1 s budget); the one
    retry with the re-read token gets what is left, not a second full timeout."""
    import asyncio

    import grpc

    from robustgate.torchserve import inference_pb2, inference_pb2_grpc
    from service.backend import TorchServeBackend

    budgets: list[float] = []

    class Slow(inference_pb2_grpc.InferenceAPIsServiceServicer):
        async def Predictions(self, request, context):  # noqa: N802 (gRPC method name)
            budgets.append(context.time_remaining())
            await asyncio.sleep(0.6)
            if dict(context.invocation_metadata()).get("authorization") == "Bearer old":
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, "Token Authorization failed")
            return inference_pb2.PredictionResponse(prediction=b"ok")

    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "new"}, "management": {"key": "m"}, "API": {"key": "a"}}))

    async def main() -> grpc.StatusCode:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Slow(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            backend = TorchServeBackend(f"127.0.0.1:{port}", "old", key_file=keys)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await backend._call(inference_pb2.PredictionsRequest(model_name="m"), 1.0)
            return err.value.code()
        finally:
            await server.stop(0)

    assert asyncio.run(main()) == grpc.StatusCode.DEADLINE_EXCEEDED  # not an answer at 1.2 s
    assert len(budgets) == 2 and budgets[0] > 0.7 and budgets[1] < budgets[0] - 0.5, budgets


def test_a_call_its_caller_leaves_is_counted_as_cancelled() -> None:
    """A call cancelled under it (its caller gone where coalescing is off, the gateway stopping)
    is counted in robustgate_backend_requests_total as CANCELLED (it went uncounted)."""
    import asyncio

    import grpc
    from prometheus_client import CollectorRegistry

    from robustgate.torchserve import inference_pb2, inference_pb2_grpc
    from service.backend import TorchServeBackend
    from service.metrics import Metrics

    class Slow(inference_pb2_grpc.InferenceAPIsServiceServicer):
        async def Predictions(self, request, context):  # noqa: N802 (gRPC method name)
            await asyncio.sleep(5)
            return inference_pb2.PredictionResponse(prediction=b"ok")

    metrics = Metrics(CollectorRegistry())

    async def main() -> None:
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Slow(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            backend = TorchServeBackend(f"127.0.0.1:{port}", None, metrics=metrics)
            call = asyncio.ensure_future(backend._call(inference_pb2.PredictionsRequest(model_name="m"), 10.0))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
        finally:
            await server.stop(0)

    asyncio.run(main())
    counted = {s.labels["code"]: s.value for m in metrics.registry.collect() if m.name == "robustgate_backend_requests"
               for s in m.samples if s.name.endswith("_total")}
    assert counted == {"CANCELLED": 1.0}


def _result(rows: int = 2, classes: int = 3, logits=None, feats=None, feature_dim=None) -> bytes:
    z = np.zeros((rows, classes), np.float32) if logits is None else np.asarray(logits, np.float32)
    f = np.ones(4, np.float32) if feats is None else np.asarray(feats, np.float32)
    return probe_pb2.ProbeResult(rows=rows, classes=classes, logits=z.tobytes(), features=f.tobytes(),
                                 feature_dim=f.size if feature_dim is None else feature_dim).SerializeToString()


@pytest.mark.parametrize("raw, detail", [
    (_result(logits=[[0, np.nan, 1], [0, 0, 0]]), "not finite"),
    (_result(logits=[[0, np.inf, 1], [0, 0, 0]]), "not finite"),
    (_result(feats=[0, 1, np.nan, 2]), "not finite"),
    (_result(rows=0, logits=np.zeros((0, 3))), "0 rows of 3 classes"),
    (_result(rows=1, classes=0, logits=np.zeros((1, 0))), "1 rows of 0 classes"),
    (_result(rows=2, classes=3, logits=np.zeros(5)), "cannot reshape"),  # bytes for 5 logits, not 6
    (_result(feats=np.ones(3), feature_dim=4), "3 features where the result says 4"),
])
def test_an_answer_no_caller_could_use_is_the_backends_fault(raw: bytes, detail: str, caplog, monkeypatch) -> None:
    """A model that emits NaN answered a gate-off caller OK with every probability nan, and a
    gated one INTERNAL with a traceback logged per request: now the answer is refused where it
    is decoded, as any undecodable one (UNAVAILABLE, a fixed message, the detail logged once)."""
    import grpc

    from service import backend
    from service.ratelog import Throttle
    from service.server import status_of

    monkeypatch.setattr(backend, "_throttled", Throttle(backend.log))
    with caplog.at_level("ERROR", logger="service.backend"), pytest.raises(BackendUnavailable) as err:
        backend._checked(raw)
    assert status_of(err.value) == (grpc.StatusCode.UNAVAILABLE, "backend answered an undecodable result")
    assert len(caplog.records) == 1 and detail in caplog.text
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no traceback chained to it
    assert backend._checked(_result()).logits.shape == (2, 3)  # the same answer, well formed, decodes


@pytest.mark.parametrize("details, kind", [
    ('Model "m-onnx" has no worker to serve inference request. Please use scale workers API to add workers.',
     "Overloaded"),
    ("Model not found: m-onnx\norg.pytorch.serve.archive.model.ModelNotFoundException", "ModelNotLoaded"),
    ("Model version: 2.0 does not exist for model: m-onnx", "ModelNotLoaded"),
    ("Worker died.", "BackendUnavailable"),
])
def test_torchserves_internal_is_read_by_its_words(details: str, kind: str, caplog) -> None:
    """TorchServe 0.12's gRPC API answers a full job queue and a model or version it lacks
    with INTERNAL (test_reliability shows the first two on a real one): the words tell them
    apart from a failure."""
    import grpc

    from service.backend import map_rpc_error

    err = map_rpc_error(grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                             details))
    assert type(err).__name__ == kind
