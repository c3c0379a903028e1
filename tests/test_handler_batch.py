"""Both handlers in process, on the archives of a real store: one answer per request,
variants of every request in one chunked forward, per-request errors inside a batch."""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from ts.context import Context, RequestProcessor
from ts.utils.util import PredictionException

from handlers import probe
from handlers.base import HandlerSettings, ProbeHandler
from handlers.onnx_handler import OnnxHandler
from handlers.torchscript_handler import TorchScriptHandler
from model_store import data
from robustgate.v1 import probe_pb2
from tests.test_wire import field

HANDLERS = {"torchscript": TorchScriptHandler, "onnx": OnnxHandler}


class _Metrics:
    def add_time(self, *args, **kwargs) -> None:
        pass


def make_context(model_dir: Path, config: dict, gpu_id: int | None = None) -> Context:
    """A worker's context for the unpacked archive at ``model_dir``; ``gpu_id``: the GPU
    TorchServe would give the worker (None: none, as on a machine without one)."""
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    ctx = Context(manifest["model"]["modelName"], str(model_dir), manifest, 32, gpu_id, "0.12.0",
                  model_yaml_config=config)
    ctx.metrics = _Metrics()
    return ctx


def load_handler(tmp: Path, store: Path, fmt: str, gpu_id: int | None = None,
                 **handler_overrides) -> tuple[ProbeHandler, Context]:
    model_dir = tmp / fmt
    if not model_dir.exists():
        with zipfile.ZipFile(store / "archives" / f"fmnist-cnn-{fmt}.mar") as z:
            z.extractall(model_dir)
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    config["handler"].update(handler_overrides)
    ctx = make_context(model_dir, config, gpu_id)
    h = HANDLERS[fmt]()
    # initialize() sets process-wide knobs meant for a worker: restore them for the other tests
    threads, level = torch.get_num_threads(), logging.getLogger().level
    try:
        h.initialize(ctx)
    finally:
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(level)
    return h, ctx


def test_onnx_on_a_gpu_whose_cuda_provider_does_not_load(tmp_path: Path, tiny_store: Path,
                                                        monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Given a GPU whose CUDA provider does not load (cuDNN or CUDA libraries that do not
    match), the ONNX handler served on the CPU with a warning, its probes passing and the GPU
    idle, even where the GPU overlay requires one (TORCHSERVE_REQUIRE_GPU=true, which the
    entrypoint checked against torch only). With it set the model now does not load. Here
    there is no GPU: the provider cannot load, as on a CPU machine told it has a GPU."""
    from handlers.onnx_handler import REQUIRE_GPU_ENV

    if torch.cuda.is_available():
        pytest.skip("a usable GPU here: its CUDA provider may load (the case without one is CI's)")
    h, _ = load_handler(tmp_path, tiny_store, "onnx")
    model = str(tmp_path / "onnx" / "model.onnx")
    monkeypatch.delenv(REQUIRE_GPU_ENV, raising=False)
    h.device = torch.device("cuda:0")
    with caplog.at_level("WARNING", logger="handlers.onnx_handler"):
        h.load(model)
    assert h.device.type == "cpu" and "serving on CPU" in caplog.text
    monkeypatch.setenv(REQUIRE_GPU_ENV, "true")
    h.device = torch.device("cuda:0")
    with pytest.raises(RuntimeError, match=f"CUDAExecutionProvider does not load .* {REQUIRE_GPU_ENV}=true"):
        h.load(model)


def handle(h: ProbeHandler, ctx: Context, requests: list[dict]) -> list[probe_pb2.ProbeResult]:
    ctx.request_processor = [RequestProcessor({}) for _ in requests]
    out = h.handle(requests, ctx)
    assert len(out) == len(requests)
    return [probe_pb2.ProbeResult.FromString(o) for o in out]


def logits(res: probe_pb2.ProbeResult) -> np.ndarray:
    return np.frombuffer(res.logits, dtype="<f4").reshape(res.rows, res.classes)


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def images(fmnist: data.FashionMNIST) -> np.ndarray:
    return fmnist.test.images[:8]


@pytest.fixture(scope="module", params=sorted(HANDLERS))
def loaded(request, tiny_store: Path, tmp_path_factory) -> tuple[ProbeHandler, Context]:
    return load_handler(tmp_path_factory.mktemp("mar"), tiny_store, request.param)


PLAN = probe_pb2.ProbePlan(
    version=1, seed=11, noise=probe_pb2.NoiseProbe(sigma=0.25, count=6),
    squeeze=probe_pb2.SqueezeProbe(bit_depths=[1, 4], median_sizes=[2]),
    views=[probe_pb2.ViewTransform(rotate_deg=10.0)],
    occlusion=probe_pb2.OcclusionProbe(grid=2, fill=0.0),
    shuffle=probe_pb2.ShuffleProbe(grid=2, count=2), return_features=True,
)


def test_plain_request_matches_the_model(loaded, images: np.ndarray, tiny_store: Path) -> None:
    h, ctx = loaded
    ref = torch.jit.load(str(tiny_store / "fmnist-cnn" / "model.pt"))
    with torch.inference_mode():
        want = ref(data.to_tensor(images))[0].numpy()
    res = handle(h, ctx, [{"data": png(a)} for a in images])
    for r, w in zip(res, want):
        assert (r.rows, r.classes, r.plan_version, r.batch_requests) == (1, 10, 0, len(images))
        assert r.device == "cpu" and r.runtime.startswith(("torchscript", "onnxruntime:CPUExecutionProvider"))
        np.testing.assert_allclose(logits(r)[0], w, atol=1e-4, rtol=0)


def test_batch_with_different_plans_and_one_bad_request(loaded, images: np.ndarray) -> None:
    h, ctx = loaded
    other = probe_pb2.ProbePlan(version=1, seed=3, noise=probe_pb2.NoiseProbe(sigma=0.5, count=3))
    reqs = [
        {"data": png(images[0]), "plan": PLAN.SerializeToString()},
        {"data": b"not an image"},
        {"data": png(images[1]), "plan": other.SerializeToString()},
        {"data": png(images[2])},
    ]
    res = handle(h, ctx, reqs)
    assert [r.rows for r in res] == [17, 0, 4, 1]
    assert res[1].error.code == 400 and "neither PNG nor JPEG" in res[1].error.message and not res[1].logits
    assert ctx.get_response_status(1) == (400, res[1].error.message)
    assert all(r.batch_requests == 4 for r in res)
    assert res[0].feature_dim == h.card.feature_dim and len(res[0].features) == 4 * h.card.feature_dim
    assert not res[2].features
    # each answer is the one it gets alone
    for i in (0, 2, 3):
        alone = handle(h, ctx, [reqs[i]])[0]
        np.testing.assert_allclose(logits(res[i]), logits(alone), atol=1e-5, rtol=0)


def test_a_request_header_does_not_route_the_batch_elsewhere(loaded, images: np.ndarray) -> None:
    """TorchServe's BaseHandler routes a whole worker batch by request 0's headers: "explain:
    True" (a REST header, or its /explanations endpoint) sent every request to an explain path
    this handler lacks, "describe: True" answered one None for the batch (503 for all)."""
    h, ctx = loaded
    reqs = [{"data": png(a)} for a in images[:3]]
    want = handle(h, ctx, reqs)
    for header in ("explain", "describe"):
        ctx.request_processor = [RequestProcessor({header: "True"})] + [RequestProcessor({}) for _ in reqs[1:]]
        assert ctx.get_request_header(0, header) == "True"
        got = [probe_pb2.ProbeResult.FromString(b) for b in h.handle(reqs, ctx)]
        assert [r.rows for r in got] == [1, 1, 1] and not any(r.HasField("error") for r in got)
        for r, w in zip(got, want):
            np.testing.assert_allclose(logits(r), logits(w), atol=1e-5, rtol=0)


def test_every_result_carries_its_batch_worker_time(loaded, images: np.ndarray) -> None:
    h, ctx = loaded
    batch = probe_pb2.ProbeBatch(items=[probe_pb2.ProbeItem(
        tensor=probe_pb2.Tensor(shape=[1, 28, 28], dtype="uint8", data=a.tobytes()), plan=PLAN) for a in images[:2]])
    reqs = [{"data": png(images[0]), "plan": PLAN.SerializeToString()}, {"data": b"not an image"},
            {"batch": batch.SerializeToString()}]
    ctx.request_processor = [RequestProcessor({}) for _ in reqs]
    t0 = time.perf_counter()
    out = h.handle(reqs, ctx)
    wall = time.perf_counter() - t0
    res = [probe_pb2.ProbeResult.FromString(o) for o in out[:2]]
    res += list(probe_pb2.ProbeBatchResult.FromString(out[2]).results)
    took = {r.worker_seconds for r in res}  # one batch, one time, the failed request's included
    assert len(took) == 1 and 0 < took.pop() <= wall


def test_a_bad_request_alone_raises_a_4xx(loaded) -> None:
    h, ctx = loaded
    bad_plan = probe_pb2.ProbePlan(version=1, squeeze=probe_pb2.SqueezeProbe(median_sizes=[9]))
    for req, match in (
        ({"data": b"junk"}, "neither PNG nor JPEG"),
        ({"data": png(np.zeros((28, 28), np.uint8)), "plan": bad_plan.SerializeToString()}, "median"),
        ({"data": png(np.zeros((28, 28), np.uint8)), "plan": b"\xff\xff"}, "not a valid"),
        ({"plan": PLAN.SerializeToString()}, "exactly one"),
        ({"data": "text, not bytes"}, "bytes"),
    ):
        ctx.request_processor = [RequestProcessor({})]
        with pytest.raises(PredictionException, match=match) as err:
            h.handle([req], ctx)
        assert err.value.error_code == 400


def test_same_plan_and_seed_reproduce_exactly(loaded, images: np.ndarray) -> None:
    h, ctx = loaded
    req = {"data": png(images[4]), "plan": PLAN.SerializeToString()}
    a, b = handle(h, ctx, [req]), handle(h, ctx, [req])
    assert a[0].logits == b[0].logits and a[0].features == b[0].features


def test_forward_runs_in_chunks(tiny_store: Path, tmp_path: Path, images: np.ndarray) -> None:
    big, ctx = load_handler(tmp_path, tiny_store, "torchscript")
    small, ctx_small = load_handler(tmp_path, tiny_store, "torchscript", max_forward_batch=5)
    calls: list[int] = []
    forward = small.forward
    small.forward = lambda x: (calls.append(x.shape[0]), forward(x))[1]  # count the chunks
    reqs = [{"data": png(images[0]), "plan": PLAN.SerializeToString()}, {"data": png(images[1])}]
    a, b = handle(big, ctx, reqs), handle(small, ctx_small, reqs)
    assert calls == [5, 5, 5, 3]  # 17 + 1 rows
    for x, y in zip(a, b):
        np.testing.assert_allclose(logits(x), logits(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("step", [5, 23])  # 23: the wanted feature rows 23 and 46 start chunks
def test_a_worker_batch_is_expanded_as_its_chunks_need_it(tiny_store: Path, tmp_path: Path, images: np.ndarray,
                                                         monkeypatch, step: int) -> None:
    """The whole worker batch was expanded before its first forward: a batch of ProbeBatches
    may ask for batch_size x max_batch_rows rows at once. Rows are now expanded request by
    request as the chunks need them: at most a chunk's less one are ever pending beside the
    request being expanded, and the answers, features too, are those of one big forward."""

    big, ctx = load_handler(tmp_path, tiny_store, "onnx")
    small, ctx_small = load_handler(tmp_path, tiny_store, "onnx", max_forward_batch=step)
    expanded, forwarded, pending_at_expand = [0], [0], []
    expand, forward = probe.expand, small.forward

    def counting_expand(base, plan):
        pending_at_expand.append(expanded[0] - forwarded[0])
        out = expand(base, plan)
        expanded[0] += out.shape[0]
        return out

    def counting_forward(x):
        forwarded[0] += x.shape[0]
        return forward(x)

    plain = probe_pb2.ProbePlan(version=2, seed=1, noise=probe_pb2.NoiseProbe(sigma=0.1, count=2))
    reqs = [{"data": png(images[i]), "plan": (PLAN if i % 3 == 0 else plain).SerializeToString()} for i in range(8)]
    want = handle(big, ctx, reqs)
    monkeypatch.setattr(probe, "expand", counting_expand)
    small.forward = counting_forward
    got = handle(small, ctx_small, reqs)
    assert expanded[0] == forwarded[0] == 3 * 17 + 5 * 3
    assert max(pending_at_expand) < step, pending_at_expand
    for a, b in zip(want, got):
        np.testing.assert_allclose(logits(a), logits(b), atol=1e-5, rtol=0)
        assert a.feature_dim == b.feature_dim
        np.testing.assert_allclose(np.frombuffer(a.features, "<f4"), np.frombuffer(b.features, "<f4"), atol=1e-5)
    assert sum(bool(r.features) for r in got) == 3


def test_torchscript_and_onnx_agree(tiny_store: Path, tmp_path: Path, images: np.ndarray) -> None:
    req = [{"data": png(images[5]), "plan": PLAN.SerializeToString()}]
    ts = handle(*load_handler(tmp_path, tiny_store, "torchscript"), req)[0]
    ox = handle(*load_handler(tmp_path, tiny_store, "onnx"), req)[0]
    np.testing.assert_allclose(logits(ts), logits(ox), atol=1e-4, rtol=0)


def test_torchscript_on_the_cpu_is_optimized_for_inference(tiny_store: Path, tmp_path: Path) -> None:
    h, _ = load_handler(tmp_path, tiny_store, "torchscript")
    # oneDNN's layout once for the whole network, not around each convolution; the archive
    # keeps the export, which runs anywhere (the answers match it: the tests above)
    assert "aten::to_mkldnn" in str(h.model.graph)
    assert "aten::to_mkldnn" not in str(torch.jit.load(str(tiny_store / "fmnist-cnn" / "model.pt")).graph)


@pytest.mark.parametrize("broken", ["raises", "answers differently"])
def test_a_failed_cpu_optimization_serves_the_export(tiny_store: Path, tmp_path: Path, images: np.ndarray,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture, broken: str) -> None:
    def optimize(mod: torch.jit.ScriptModule, *args, **kwargs):
        if broken == "raises":
            raise RuntimeError("no oneDNN here")
        return lambda x: tuple(t + 1.0 for t in mod(x))

    monkeypatch.setattr(torch.jit, "optimize_for_inference", optimize)
    with caplog.at_level(logging.WARNING, logger="handlers.torchscript_handler"):
        h, ctx = load_handler(tmp_path, tiny_store, "torchscript")
    assert "not optimized for the CPU" in caplog.text and "serving the module as exported" in caplog.text
    assert isinstance(h.model, torch.jit.ScriptModule) and "aten::to_mkldnn" not in str(h.model.graph)
    ref = torch.jit.load(str(tiny_store / "fmnist-cnn" / "model.pt"))
    with torch.inference_mode():
        want = ref(data.to_tensor(images[:2]))[0].numpy()
    for r, w in zip(handle(h, ctx, [{"data": png(a)} for a in images[:2]]), want):
        np.testing.assert_allclose(logits(r)[0], w, atol=1e-4, rtol=0)


def test_model_config_settings() -> None:
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "handlers" / "model-config.yaml").read_text())
    s = HandlerSettings.from_yaml(cfg["handler"])
    from handlers import limits

    assert s.max_batch_items == limits.MAX_BATCH_ITEMS  # the gateway's bound on coalesce_max_batch
    assert s.max_forward_batch >= 64 and s.intra_op_threads == 1 and s.log_level == "WARNING"
    # One batching layer, the gateway's: TorchServe must not hold the coalesced calls back.
    assert cfg["batchSize"] == 1 and cfg["maxBatchDelay"] > 0 and cfg["minWorkers"] >= 1
    with pytest.raises(ValueError, match="unknown keys"):
        HandlerSettings.from_yaml({"max_batch": 3})


@pytest.mark.parametrize("section, words", [
    ({"max_forward_batch": "512"}, "max_forward_batch must be an integer"),  # quoted in the YAML
    ({"max_image_bytes": 1.5}, "max_image_bytes must be an integer"),
    ({"max_variants": True}, "max_variants must be an integer"),
    ({"intra_op_threads": -1}, "intra_op_threads must be >= 0"),
    ({"log_level": 10}, "log_level must be a string"),
    ({"log_level": "LOUD"}, "not a logging level"),
])
def test_handler_settings_of_the_wrong_type_are_refused_at_load(section: dict, words: str) -> None:
    """A quoted number passed the old int() check and the worker loaded, then failed every
    request comparing an int with a str: TorchServe answered each with 503."""
    with pytest.raises(ValueError, match=words):
        HandlerSettings.from_yaml(section)
    assert HandlerSettings.from_yaml({"max_forward_batch": 512, "log_level": "info"}).max_forward_batch == 512


def tensor(a: np.ndarray) -> probe_pb2.Tensor:
    return probe_pb2.Tensor(shape=list(a.shape), dtype="uint8", data=a.tobytes())


def test_every_refused_plan_says_bad_plan_first(loaded, images: np.ndarray) -> None:
    """The gateway tells a refused plan (its own fault) from a refused image (the caller's)
    by that prefix (probe.proto, ProbeError): one of each beside a good request."""
    h, ctx = loaded
    too_many = probe_pb2.ProbePlan(version=1, noise=probe_pb2.NoiseProbe(sigma=0.5, count=h.settings.max_variants + 1))
    reqs = [
        {"data": png(images[0]), "plan": too_many.SerializeToString()},
        {"data": png(images[0]), "plan": b"\xff\xff not a plan"},
        {"data": png(images[0]), "plan": "a str, not bytes"},
        {"data": png(images[0]), "plan": probe_pb2.ProbePlan(version=9).SerializeToString()},
        {"data": png(images[0]), "plan": b"\x2a\x00" * (probe.max_plan_bytes(h.settings.max_variants) // 2 + 1)},
        {"data": b"not an image"},
        {"data": png(images[1])},
    ]
    res = handle(h, ctx, reqs)
    assert all(r.error.code == 400 and r.error.message.startswith("bad plan: ") for r in res[:5]), res[:5]
    assert "bytes, more than any plan within this model's" in res[4].error.message  # refused unparsed
    assert res[5].error.code == 400 and not res[5].error.message.startswith("bad plan")
    assert res[6].rows == 1 and not res[6].HasField("error")


def test_the_largest_plans_fit_the_byte_bound() -> None:
    """Every field at its widest (views with every field set, the largest varints): a plan of
    max_variants variants of any kind serializes within probe.max_plan_bytes."""
    for n in (1, 7, 2048):
        view = probe_pb2.ViewTransform(rotate_deg=-1e30, shift_x=-1e30, shift_y=-1e30, scale=-1e30, hflip=True, vflip=True)
        wide = dict(version=2**32 - 1, seed=2**64 - 1, return_features=True,
                    occlusion=probe_pb2.OcclusionProbe(grid=2**32 - 1, fill=-1e30),
                    shuffle=probe_pb2.ShuffleProbe(grid=2**32 - 1, count=2**32 - 1))
        noise = probe_pb2.NoiseProbe(sigma=-1e30, count=2**32 - 1)
        for plan in (probe_pb2.ProbePlan(views=[view] * n, noise=noise, jitter=noise, **wide),
                     probe_pb2.ProbePlan(squeeze=probe_pb2.SqueezeProbe(bit_depths=[2**32 - 1] * n,
                                                                        median_sizes=[2**32 - 1] * n), **wide)):
            assert len(plan.SerializeToString()) <= probe.max_plan_bytes(n), n


def test_a_probe_batch_answers_each_item_as_if_alone(loaded, images: np.ndarray) -> None:
    """Coalesced items (each with its own plan, one bad) beside a plain request in one worker batch."""
    h, ctx = loaded
    other = probe_pb2.ProbePlan(version=1, seed=3, noise=probe_pb2.NoiseProbe(sigma=0.5, count=3))
    batch = probe_pb2.ProbeBatch(items=[
        probe_pb2.ProbeItem(tensor=tensor(images[0]), plan=PLAN),
        probe_pb2.ProbeItem(tensor=probe_pb2.Tensor(shape=[3, 3], dtype="uint8", data=bytes(9))),
        probe_pb2.ProbeItem(tensor=tensor(images[1]), plan=other),
        probe_pb2.ProbeItem(tensor=tensor(images[2])),
    ])
    ctx.request_processor = [RequestProcessor({}), RequestProcessor({})]
    out = h.handle([{"batch": batch.SerializeToString()}, {"data": png(images[3])}], ctx)
    res = probe_pb2.ProbeBatchResult.FromString(out[0]).results
    plain = probe_pb2.ProbeResult.FromString(out[1])
    assert [r.rows for r in res] == [17, 0, 4, 1] and plain.rows == 1
    assert res[1].error.code == 400 and "shape" in res[1].error.message
    assert res[0].feature_dim == h.card.feature_dim and not res[2].features
    singles = [{"data": png(images[0]), "plan": PLAN.SerializeToString()}, None,
               {"data": png(images[1]), "plan": other.SerializeToString()}, {"data": png(images[2])}]
    for r, single in zip(res, singles):
        if single is not None:
            alone = handle(h, ctx, [single])[0]
            np.testing.assert_allclose(logits(r), logits(alone), atol=1e-5, rtol=0)
            assert r.features == alone.features


def test_a_bad_probe_batch_is_refused_whole(tiny_store: Path, tmp_path: Path, images: np.ndarray) -> None:
    h, ctx = load_handler(tmp_path, tiny_store, "onnx", max_batch_items=2)
    three = probe_pb2.ProbeBatch(items=[probe_pb2.ProbeItem(tensor=tensor(images[i])) for i in range(3)])
    for raw, match in ((b"\xff\xff", "not a valid"), (b"", "no items"), ("text", "bytes"),
                       (three.SerializeToString(), "limit is 2")):
        ctx.request_processor = [RequestProcessor({})]
        with pytest.raises(PredictionException, match=match) as err:
            h.handle([{"batch": raw}], ctx)
        assert err.value.error_code == 400
        # Beside another request in one worker batch: its answer is the message its caller
        # reads, a ProbeBatchResult of that one error (a ProbeResult read as one has no results).
        ctx.request_processor = [RequestProcessor({}), RequestProcessor({})]
        out = h.handle([{"batch": raw}, {"data": png(images[0])}], ctx)
        res = probe_pb2.ProbeBatchResult.FromString(out[0]).results
        assert len(res) == 1 and res[0].error.code == 400 and match in res[0].error.message
        assert probe_pb2.ProbeResult.FromString(out[1]).rows == 1


def test_a_probe_batch_is_bounded_in_rows(tiny_store: Path, tmp_path: Path, images: np.ndarray) -> None:
    h, ctx = load_handler(tmp_path, tiny_store, "onnx", max_batch_rows=20)
    batch = probe_pb2.ProbeBatch(items=[probe_pb2.ProbeItem(tensor=tensor(images[0]), plan=PLAN),  # 17 rows
                                        probe_pb2.ProbeItem(tensor=tensor(images[1])),              # 18
                                        probe_pb2.ProbeItem(tensor=tensor(images[2]), plan=PLAN)])  # 35: over
    ctx.request_processor = [RequestProcessor({})]
    res = probe_pb2.ProbeBatchResult.FromString(h.handle([{"batch": batch.SerializeToString()}], ctx)[0]).results
    assert [r.rows for r in res] == [17, 1, 0]
    assert res[2].error.code == 413 and "20 rows" in res[2].error.message


def test_a_probe_batch_is_bounded_before_it_is_parsed(tiny_store: Path, tmp_path: Path, images: np.ndarray) -> None:
    """8 MiB of empty items (what TorchServe's max_request_size lets through; parsed whole,
    ~190 MB of messages) is refused at the item past the limit, unparsed. An item whose plan is
    over the plan bound, whose bytes do not parse, or that is longer than a lone request's tensor
    and a plan (a shape of a million entries), fails alone beside items that are served."""
    h, ctx = load_handler(tmp_path, tiny_store, "onnx", max_batch_items=6)
    ctx.request_processor = [RequestProcessor({})]
    with pytest.raises(PredictionException, match="batch has more than 6 items; the limit is 6") as err:
        h.handle([{"batch": b"\x0a\x00" * (4 << 20) + b"\xff\xff"}], ctx)  # the end, which does not walk, unread
    assert err.value.error_code == 400
    empty_views = b"\x2a\x00" * (probe.max_plan_bytes(h.settings.max_variants) // 2 + 1)
    huge = probe_pb2.ProbeItem(tensor=tensor(images[1])).SerializeToString() + field(2, empty_views)
    batch = b"".join(field(1, x) for x in (
        probe_pb2.ProbeItem(tensor=tensor(images[0]), plan=PLAN).SerializeToString(),
        huge,
        b"\x12\x7f\x00",  # a plan of 127 bytes in an item of 3
        # a group (proto2's wire type, which a parser reads as an unknown field) in an item longer
        # than the plan bound: the walk cannot measure what follows it, so the item is refused
        # rather than parsed unbounded
        probe_pb2.ProbeItem(tensor=tensor(images[3])).SerializeToString() + field(9, empty_views) + b"\x1b\x1c",
        probe_pb2.ProbeItem(tensor=tensor(images[2])).SerializeToString(),
    ))
    limit = h.settings.max_image_bytes + 1024 + probe.max_plan_bytes(h.settings.max_variants) + 16
    shapes = probe_pb2.ProbeItem(tensor=probe_pb2.Tensor(shape=[1] * limit)).SerializeToString()  # 8 B a byte, parsed
    batch += field(1, shapes)
    res = probe_pb2.ProbeBatchResult.FromString(h.handle([{"batch": batch}], ctx)[0]).results
    assert [r.rows for r in res] == [17, 0, 0, 0, 1, 0]
    assert res[5].error.code == 400 and res[5].error.message.startswith(
        f"batch item is {len(shapes):,} bytes; the limit is {limit:,}")
    assert res[1].error.code == 400 and res[1].error.message.startswith("bad plan: ")
    assert "bytes, more than any plan within this model's" in res[1].error.message
    assert all(r.error.code == 400 and "not a valid robustgate.v1.ProbeItem" in r.error.message for r in res[2:4])


def test_a_surprise_in_one_batch_item_fails_that_item_only(tiny_store: Path, tmp_path: Path, images: np.ndarray,
                                                           monkeypatch, caplog) -> None:
    """A fault of ours while one item is parsed or decoded (not a bad input): that item is
    answered 500 "internal error" (no internal message), logged with its traceback, and the
    other items of the batch are served."""
    from handlers import base

    h, ctx = load_handler(tmp_path, tiny_store, "onnx")
    batch = probe_pb2.ProbeBatch(items=[probe_pb2.ProbeItem(tensor=tensor(images[i])) for i in range(4)])
    raw = batch.SerializeToString()
    spans = base.wire.batch_items(memoryview(raw), 256, 1 << 20)
    parse_item, tensor_array = base._parse_item, base.tensor_array

    def parse_fails_on_the_second(buf, span, *args):
        if span == spans[1]:
            raise RuntimeError("parser fault: secret internals")
        return parse_item(buf, span, *args)

    decoded = []

    def decode_fails_on_the_third(t, spec):
        decoded.append(t)
        if len(decoded) == 2:  # the second item that gets here: the batch's third
            raise ValueError("decoder fault: secret internals")
        return tensor_array(t, spec)

    monkeypatch.setattr(base, "_parse_item", parse_fails_on_the_second)
    monkeypatch.setattr(base, "tensor_array", decode_fails_on_the_third)
    ctx.request_processor = [RequestProcessor({})]
    caplog.clear()  # the load's own lines (handler code from this checkout, not the archive) are not the batch's
    with caplog.at_level(logging.ERROR, logger="handlers.base"):
        res = probe_pb2.ProbeBatchResult.FromString(h.handle([{"batch": raw}], ctx)[0]).results
    assert [r.rows for r in res] == [1, 0, 0, 1]
    for r in res[1:3]:
        assert (r.error.code, r.error.message) == (500, "internal error")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "batch item could not be parsed", "batch item could not be decoded"]
    assert "secret internals" in caplog.text  # the traceback is in the worker's log, not in the answer


def test_batch_items_refuses_a_batch_at_once_and_parses_its_items_as_they_are_taken(images: np.ndarray,
                                                                                    monkeypatch) -> None:
    """A batch refused whole raises when it is handed over, before any item is asked for; its
    items are parsed one at a time as the caller takes them (all of them at once held a
    second copy of a batch of up to 8 MiB)."""
    from handlers import base
    from handlers.decode import InputError, InputSpec

    spec, settings = InputSpec(mode="L", h=28, w=28, max_bytes=1 << 20, max_pixels=1 << 22), HandlerSettings()
    with pytest.raises(InputError, match="not a valid robustgate.v1.ProbeBatch"):
        base.batch_items(b"\xff\xff", spec, settings)  # not iterated
    with pytest.raises(InputError, match="no items"):
        base.batch_items(b"", spec, settings)
    parsed = []
    parse_item = base._parse_item
    monkeypatch.setattr(base, "_parse_item", lambda *args: parsed.append(args[1]) or parse_item(*args))
    raw = probe_pb2.ProbeBatch(items=[probe_pb2.ProbeItem(tensor=tensor(images[i])) for i in range(3)])
    items = base.batch_items(raw.SerializeToString(), spec, settings)
    assert parsed == []
    first = next(items)
    assert len(parsed) == 1 and first.tensor.data == images[0].tobytes()
    assert [it.tensor.data for it in items] == [images[1].tobytes(), images[2].tobytes()] and len(parsed) == 3


def test_a_non_ascii_refusal_beside_a_good_request_keeps_the_batch_answer_framed(loaded, images: np.ndarray) -> None:
    """A request whose tensor names a non-ASCII dtype, in a worker batch with a good one: its
    refusal is the response's status phrase, and TorchServe writes that phrase's length in
    characters before its UTF-8 bytes; 'ü' made the frame longer than it said, so the Java
    frontend read the rest of the batch's answer from the wrong offsets. Framed here by
    TorchServe's own encoder and read back as its frontend reads it."""
    import struct

    from ts.protocol.otf_message_handler import create_predict_response

    h, ctx = loaded
    bad = probe_pb2.Tensor(shape=[1, 28, 28], dtype="\u00fc" * 40, data=images[0].tobytes())
    reqs = [{"tensor": bad.SerializeToString()}, {"data": png(images[1])}]
    ctx.request_processor = [RequestProcessor({}) for _ in reqs]
    out = h.handle(reqs, ctx)
    msg = create_predict_response(out, {0: "req-0", 1: "req-1"}, "ok", 200, ctx)

    def take(buf: bytes, at: int) -> tuple[bytes, int]:  # an int length, then that many bytes
        (n,) = struct.unpack_from("!i", buf, at)
        return buf[at + 4: at + 4 + n], at + 4 + n

    at = 4 + 4 + len(b"ok")  # the batch's code and message, then each response
    bodies = []
    for want in ("req-0", "req-1"):
        rid, at = take(msg, at)
        assert rid.decode() == want
        _, at = take(msg, at)  # content type
        (code,) = struct.unpack_from("!i", msg, at)
        phrase, at = take(msg, at + 4)
        (headers,) = struct.unpack_from("!i", msg, at)
        at += 4
        for _ in range(2 * headers):
            _, at = take(msg, at)
        body, at = take(msg, at)
        bodies.append((code, phrase.decode("utf-8"), probe_pb2.ProbeResult.FromString(body)))
    assert struct.unpack_from("!i", msg, at) == (-1,) and at + 4 == len(msg)  # the frame's end
    (code, phrase, refused), (_, _, good) = bodies
    assert code == 400 and "dtype" in phrase and phrase == refused.error.message and phrase.isascii()
    assert good.rows == 1 and not good.HasField("error")
