"""A real TorchServe (the session's, from tests/conftest.py: model_store.serve on free
loopback ports with the real archives of the tiny store), called over TorchServe's gRPC
API (the pinned inference.proto).

Reference computations for the variants are independent of handlers/probe.py: NumPy,
SciPy, the training augmentation (model_store.evaluate.apply_view) and plain loops."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import scipy.ndimage
import torch
from google.protobuf import json_format
from PIL import Image

from handlers.probe import splitmix64  # checked against SplitMix64's published outputs (test_handler_probe)
from model_store import data, serve
from model_store.evaluate import apply_view
from robustgate.torchserve import inference_pb2, inference_pb2_grpc
from robustgate.v1 import probe_pb2

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "proto" / "examples"
MODELS = ("fmnist-cnn-torchscript", "fmnist-cnn-onnx")


@pytest.fixture(scope="module")
def server(torchserve: serve.TorchServe) -> serve.TorchServe:
    """The session's TorchServe (tests/conftest.py), started by model_store.serve."""
    return torchserve


@pytest.fixture(scope="module")
def stub(server: serve.TorchServe) -> Iterator[inference_pb2_grpc.InferenceAPIsServiceStub]:
    with grpc.insecure_channel(server.grpc_inference_target) as channel:
        yield inference_pb2_grpc.InferenceAPIsServiceStub(channel)


@pytest.fixture(scope="module")
def token(server: serve.TorchServe) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {server.keys().inference}")]


@pytest.fixture(scope="module")
def local(tiny_store: Path):
    """The in-process models: name -> images float32 [N,1,28,28] -> (logits, features)."""
    ts = torch.jit.load(str(tiny_store / "fmnist-cnn" / "model.pt"))
    sess = ort.InferenceSession(str(tiny_store / "fmnist-cnn" / "model.onnx"), providers=["CPUExecutionProvider"])

    def run_ts(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            lo, fe = ts(x)
        return lo.numpy(), fe.numpy()

    def run_onnx(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        lo, fe = sess.run(["logits", "features"], {"images": x.numpy()})
        return lo, fe

    return {MODELS[0]: run_ts, MODELS[1]: run_onnx}


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def call(stub, token, model: str, image: bytes, plan: probe_pb2.ProbePlan | None = None) -> probe_pb2.ProbeResult:
    inputs = {"data": image}
    if plan is not None:
        inputs["plan"] = plan.SerializeToString()
    resp = stub.Predictions(inference_pb2.PredictionsRequest(model_name=model, input=inputs), metadata=token, timeout=60)
    return probe_pb2.ProbeResult.FromString(resp.prediction)


def logits(res: probe_pb2.ProbeResult) -> np.ndarray:
    assert not res.HasField("error"), res.error
    return np.frombuffer(res.logits, dtype="<f4").reshape(res.rows, res.classes)


def example(name: str) -> probe_pb2.ProbePlan:
    return json_format.Parse((EXAMPLES / name).read_text(), probe_pb2.ProbePlan())


def reference_variants(base: torch.Tensor, plan: probe_pb2.ProbePlan) -> torch.Tensor:
    """Every row of ``plan`` for ``base`` [1, 28, 28], computed without handlers/."""
    x = base.numpy()
    rows = [x]
    if plan.version >= 3:  # one stream of copies, in blocks of 8 from splitmix64(seed) + block
        first, stop = plan.noise.offset, plan.noise.offset + plan.noise.count
        root = splitmix64(plan.seed)
        eps = np.concatenate([torch.randn((8, 1, 28, 28), generator=torch.Generator().manual_seed(root + k)
                                          ).numpy() for k in range(stop // 8 + 1)])[first:stop]
    else:
        gen = torch.Generator().manual_seed(plan.seed)
        eps = torch.randn((plan.noise.count, 1, 28, 28), generator=gen).numpy()
    rows += list(x + np.float32(plan.noise.sigma) * eps)
    for b in plan.squeeze.bit_depths:
        m = np.float32(2**b - 1)
        rows.append(np.rint(x * m) / m)
    for k in plan.squeeze.median_sizes:
        rows.append(scipy.ndimage.median_filter(x, size=(1, k, k), mode="reflect"))
    for v in plan.views:
        t = json_format.MessageToDict(v, preserving_proto_field_name=True)
        rows.append(apply_view(base[None], t)[0].numpy())
    g = plan.occlusion.grid
    for r in range(g):
        for c in range(g):
            o = x.copy()
            o[:, r * 28 // g : (r + 1) * 28 // g, c * 28 // g : (c + 1) * 28 // g] = plan.occlusion.fill
            rows.append(o)
    g, t = plan.shuffle.grid, 28 // max(plan.shuffle.grid, 1)
    gen = torch.Generator().manual_seed(plan.seed + 1)
    tiles = [x[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(g) for c in range(g)]
    for _ in range(plan.shuffle.count if g else 0):
        p = torch.randperm(g * g, generator=gen)
        while torch.equal(p, torch.arange(g * g)):
            p = torch.randperm(g * g, generator=gen)
        s = np.zeros_like(x)
        for i, src in enumerate(p.tolist()):
            s[:, (i // g) * t : (i // g + 1) * t, (i % g) * t : (i % g + 1) * t] = tiles[src]
        rows.append(s)
    gen = torch.Generator().manual_seed(plan.seed + 2)
    eps = torch.randn((plan.jitter.count, 1, 28, 28), generator=gen).numpy()
    rows += list(x + np.float32(plan.jitter.sigma) * eps)
    return torch.from_numpy(np.stack(rows).astype(np.float32))


@pytest.fixture(scope="module")
def images(fmnist: data.FashionMNIST) -> np.ndarray:
    idx = np.random.default_rng(3).choice(len(fmnist.test), 32, replace=False)
    return fmnist.test.images[np.sort(idx)]


@pytest.mark.parametrize("model", MODELS)
def test_logits_equal_the_in_process_model(stub, token, local, images: np.ndarray, model: str) -> None:
    with ThreadPoolExecutor(8) as pool:
        res = list(pool.map(lambda a: call(stub, token, model, png(a)), images))
    got = np.concatenate([logits(r) for r in res])
    want, _ = local[model](data.to_tensor(images))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert all(r.rows == 1 and r.plan_version == 0 and r.device == "cpu" for r in res)
    assert {r.runtime for r in res} == {"torchscript" if "torchscript" in model else "onnxruntime:CPUExecutionProvider"}


@pytest.mark.parametrize("model", MODELS)
def test_plan_rows_match_reference_variants(stub, token, local, images: np.ndarray, model: str) -> None:
    plan = example("full.json")
    res = call(stub, token, model, png(images[0]), plan)
    rows = json.loads((EXAMPLES / "index.json").read_text())["valid"]["full.json"]["rows"]
    assert (res.rows, res.plan_version) == (rows, plan.version) and plan.version == 2
    variants = reference_variants(data.to_tensor(images[:1])[0], plan)
    assert variants.shape[0] == rows
    want, feats = local[model](variants)
    np.testing.assert_allclose(logits(res), want, atol=1e-4, rtol=0)
    got_feats = np.frombuffer(res.features, dtype="<f4")
    assert res.feature_dim == feats.shape[1]
    np.testing.assert_allclose(got_feats, feats[0], atol=1e-4, rtol=0)


def test_a_noise_stream_piece_is_the_whole_budgets_copies(stub, token, local, images: np.ndarray) -> None:
    """Plan version 3 through TorchServe: copies 12..35 of a stream, as the gateway's later
    sequential batch asks for them, are the reference's and the rows one plan for copies
    0..35 answers (the served model on the same rows, so up to its float tolerance)."""
    piece = example("noise_stream.json")
    assert (piece.version, piece.noise.offset, piece.noise.count) == (3, 12, 24)
    res = call(stub, token, MODELS[0], png(images[2]), piece)
    assert (res.rows, res.plan_version) == (25, 3)
    want, _ = local[MODELS[0]](reference_variants(data.to_tensor(images[2:3])[0], piece))
    np.testing.assert_allclose(logits(res), want, atol=1e-4, rtol=0)
    whole = probe_pb2.ProbePlan()
    whole.CopyFrom(piece)
    whole.noise.offset, whole.noise.count = 0, 36
    both = call(stub, token, MODELS[0], png(images[2]), whole)
    np.testing.assert_allclose(logits(both)[13:], logits(res)[1:], atol=1e-4, rtol=0)
    assert not np.allclose(logits(both)[1:25], logits(res)[1:], atol=1e-3)  # not the first copies


def test_fixed_seed_reproduces_exactly(stub, token, images: np.ndarray) -> None:
    plan = example("noise.json")
    a = call(stub, token, MODELS[0], png(images[1]), plan)
    b = call(stub, token, MODELS[0], png(images[1]), plan)
    assert a.logits == b.logits and a.features == b.features and a.rows == 101
    plan.seed = 1
    c = call(stub, token, MODELS[0], png(images[1]), plan)
    assert not np.array_equal(logits(a)[1:], logits(c)[1:])
    np.testing.assert_allclose(logits(a)[0], logits(c)[0], atol=1e-5, rtol=0)


def test_concurrent_requests_with_different_plans_each_get_their_own_answer(
    stub, token, local, images: np.ndarray
) -> None:
    plans = [
        probe_pb2.ProbePlan(version=1, seed=i, noise=probe_pb2.NoiseProbe(sigma=0.1 + 0.05 * i, count=i + 1),
                            views=[probe_pb2.ViewTransform(rotate_deg=5.0 * i)],
                            occlusion=probe_pb2.OcclusionProbe(grid=i % 3, fill=0.5))
        for i in range(16)
    ]
    jobs = [(images[i], plans[i]) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        res = list(pool.map(lambda j: call(stub, token, MODELS[0], png(j[0]), j[1]), jobs))
    for (img, plan), r in zip(jobs, res):
        want, _ = local[MODELS[0]](reference_variants(data.to_tensor(img[None])[0], plan))
        np.testing.assert_allclose(logits(r), want, atol=1e-4, rtol=0)
    # The shipped batch size is 1 (the gateway coalesces): TorchServe holds no call back for
    # company. Several requests in one handler call are covered in tests/test_handler_batch.py.
    assert {r.batch_requests for r in res} == {1}


def _code_and_message(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details().splitlines()[0]


def _sixteen_bit(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a.astype(np.uint16) * 257).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("model", MODELS)
def test_bad_input_is_a_4xx_and_the_server_keeps_answering(stub, token, images: np.ndarray, model: str) -> None:
    good = png(images[2])
    cases = {
        "corrupt": (good[: len(good) // 2], None, "truncated or corrupt|not a decodable"),
        "not an image": (b"GIF89a-nope", None, "neither PNG nor JPEG"),
        "oversized": (good + b"\0" * (2 << 20), None, "bytes; the limit is"),
        "wrong size": (png(np.zeros((32, 32), np.uint8)), None, "32x32; the model takes 28x28"),
        "bad plan": (good, example("invalid/median_size.json"), "median_sizes"),
    }
    for name, (raw, plan, match) in cases.items():
        code, msg = _code_and_message(lambda: call(stub, token, model, raw, plan))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert __import__("re").search(match, msg), (name, msg)
        assert logits(call(stub, token, model, good)).shape == (1, 10)
    # 16-bit grey is scaled to 8 bits, not refused (nor clipped): the same pixels, the same answer
    assert np.array_equal(logits(call(stub, token, model, _sixteen_bit(images[2]))),
                          logits(call(stub, token, model, good)))


def test_a_bad_request_does_not_fail_its_batch(stub, token, images: np.ndarray) -> None:
    jobs = [png(a) for a in images[:12]]
    jobs[5] = b"junk"
    answers: list[tuple[str, object]] = []

    def one(raw: bytes) -> tuple[str, object]:
        try:
            return "ok", call(stub, token, MODELS[1], raw)
        except grpc.RpcError as e:
            return "rpc", e.code()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(one, jobs))
    for i, (kind, value) in enumerate(answers):
        if i == 5:  # alone in its batch: a gRPC error; batched with others: an error payload
            assert (kind, value) == ("rpc", grpc.StatusCode.INVALID_ARGUMENT) or (
                kind == "ok" and value.error.code == 400
            ), answers[5]
        else:
            assert kind == "ok" and logits(value).shape == (1, 10), (i, answers[i])


def test_logs_go_to_the_rolling_file_not_the_console_file(stub, token, server: serve.TorchServe) -> None:
    # A refused input makes TorchServe log the handler's traceback (about 1.5 kB). The
    # console file is never rotated: it must hold none of that, or every bad request grows
    # the run directory (a size-limited emptyDir in k8s) until the pod is evicted.
    code, _ = _code_and_message(lambda: stub.Predictions(inference_pb2.PredictionsRequest(
        model_name=MODELS[1], input={"tensor": b"garbage"}), metadata=token, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    logs = Path(server.settings.run_dir) / "logs"
    assert server.log_file == logs / serve.LOG_FILE
    deadline = time.monotonic() + 10
    while "PredictionException" not in server.log_file.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the handler's error never reached ts_log.log"
        time.sleep(0.1)
    console = (logs / serve.CONSOLE_FILE).read_text(errors="replace")
    assert "Model server started" in console  # the frontend's own output is kept
    assert "MODEL_LOG" not in console and "PredictionException" not in console and "[WARN" not in console
    assert "PredictionException" in server.log_tail(lines=200)


def test_workers_run_the_archives_handler_code_not_the_checkouts(stub, token, server: serve.TorchServe,
                                                                  images: np.ndarray) -> None:
    """The session's TorchServe was started with this checkout on PYTHONPATH (tests/conftest.py),
    as the image's gateway has it: every worker still imports the handler package its archive
    carries, which the archive's manifest and staleness check cover."""
    for model in MODELS:  # a worker of each has answered: its initialize line is in the log
        call(stub, token, model, png(images[0]))
    repo = str(Path(__file__).resolve().parent.parent)
    log = server.log_file.read_text(errors="replace")  # rolls at 20 MB: this run's start is in it
    loaded = re.findall(r"MODEL_LOG - (\S+): .* handler code (\S+)", log)
    assert {model for model, _ in loaded} == set(MODELS), loaded
    for model, code in loaded:
        assert not code.startswith(repo) and code.endswith("/handlers"), (model, code)
    assert "not from the archive" not in log


def test_a_call_without_the_token_is_refused(stub, server: serve.TorchServe, images: np.ndarray) -> None:
    for md in ([], [("authorization", "Bearer wrong")], [("authorization", f"Bearer {server.keys().management}")]):
        code, _ = _code_and_message(lambda: call(stub, md, MODELS[0], png(images[0])))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{server.management_url}/models/{MODELS[0]}", timeout=10)
    assert 400 <= err.value.code < 500  # TorchServe answers 400 to a missing management token


def test_serving_configuration(server: serve.TorchServe) -> None:
    for model in MODELS:  # the archive's model-config.yaml is in force
        st = server.model_status(model)
        assert st["ready"] and st["workers"] == ["READY", "READY"]
        assert (st["batch_size"], st["max_batch_delay_ms"]) == (1, 1)  # the gateway batches, see model-config.yaml
    req = urllib.request.Request(f"{server.management_url}/models?url=x.mar", method="POST",
                                 headers={"Authorization": f"Bearer {server.keys().management}"})
    with pytest.raises(urllib.error.HTTPError) as err:  # model API off
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert b"ts_inference_requests_total" in resp.read()
    config = (Path(server.settings.run_dir) / "config.properties").read_text()
    assert "disable_token_authorization=false" in config and "metrics_mode=prometheus" in config
    for line in config.splitlines():
        if "_address=" in line:
            assert "127.0.0.1" in line, line


def test_status_command_reports_ready(server: serve.TorchServe) -> None:
    out = subprocess.run([sys.executable, "-m", "model_store.serve", "status", "--run-dir", str(server.settings.run_dir)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert set(report["models"]) == set(MODELS) and report["grpc_inference"] == server.grpc_inference_target
