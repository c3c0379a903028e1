"""The bytes one gated image sends to TorchServe and gets back, on-device expansion against the
naive path: the bound of issue 8's target "on-device expansion ahead of the naive path by at
least the ratio of bytes it saves", measured instead of read off the number of rows.

- on-device: the gateway's call for the cascade's first probe, as ``service.backend``'s
  ``probe`` builds it: the image as a ``robustgate.v1.Tensor`` (``encode_tensor``) and the plan
  ``GateRun`` asks for first (the image's own keyed seed, ``request_seed``), in one
  ``PredictionsRequest``; its answer one ``ProbeResult`` with every row's logits and, where the
  plan asks, the base image's features;
- naive: one plain call per row of that plan, as the serving benchmark's naive row sends them
  (the image's ``Tensor``, no plan), each answered one row of logits; and, as a second figure,
  the variants themselves, each in the smallest tensor that carries it exactly (``uint8`` where
  it lies on the 1/255 grid, as the base image and integer shifts do, else ``float32``).

Answers are the real handler's (the archive of the store, loaded in process as TorchServe's
worker loads it, on the CPU), in TorchServe's ``PredictionResponse``. Sizes are serialized
protobuf bytes: gRPC's 5-byte prefix per message and each call's HTTP/2 headers (path, token,
deadline; HPACK-compressed after the first) are not counted, and would add to the naive side,
one set per call."""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

# The key the gateway would hash each image's seed with (Settings.seed): any fixed one; the
# seed's varint takes 9 bytes for almost every key, as a real gateway's does.
SEED_KEY = 1


def gated_calls(store: Path, model: str, fmt: str, image: np.ndarray) -> dict[str, object]:
    """The ``PredictionsRequest`` messages for one gated ``image`` (``uint8`` [C, H, W]):
    ``on_device`` (one call: the image and the cascade's first plan), ``naive`` (one plain call
    per row of that plan: the image alone each time, as the benchmark's naive row sends it),
    ``naive_variants`` (one call per row: the base image and each variant as its own tensor);
    and ``rows``, the plan's rows."""
    import torch

    from handlers import probe
    from model_store.archive import archive_name
    from robustgate.torchserve import inference_pb2
    from service.backend import encode_tensor
    from service.gate.cascade import GateRun
    from service.gate.policy_io import load_policy
    from service.pipeline import request_seed, spec_to_proto

    name = archive_name(model, fmt)
    policy = load_policy(store / model / "policy.json")
    plan = spec_to_proto(GateRun.start(policy, request_seed(SEED_KEY, image)).next_plan())
    rows = probe.count_rows(plan)
    tensor = encode_tensor(image)

    def call(**inputs: bytes):
        return inference_pb2.PredictionsRequest(model_name=name, input=inputs)

    variants = probe.expand(torch.from_numpy(image.astype(np.float32) / 255.0), plan).numpy()
    return {"rows": rows,
            "on_device": call(tensor=tensor, plan=plan.SerializeToString()),
            "naive": [call(tensor=tensor) for _ in range(rows)],
            "naive_variants": [call(tensor=encode_tensor(exact_tensor(v))) for v in variants]}


def exact_tensor(x: np.ndarray) -> np.ndarray:
    """A float32 [C, H, W] image in [0, 1] as ``uint8`` where that carries it exactly (every
    value within float32's rounding of a whole grey level, as the handler reads it back), else
    as it is."""
    grey = np.rint(x * 255.0)
    if grey.min() >= 0 and grey.max() <= 255 and np.abs(x * 255.0 - grey).max() <= 1e-3:
        return grey.astype(np.uint8)
    return x.astype(np.float32)


@contextlib.contextmanager
def handler_in_process(store: Path, model: str, fmt: str) -> Iterator[object]:
    """The handler of ``model``'s ``fmt`` archive in ``store``, initialized from the unpacked
    archive as a TorchServe worker without a GPU initializes it, its log quiet (it would
    warn that its code is this checkout's, not the unpacked archive's); the process-wide
    settings its ``initialize`` sets for a worker (torch threads, the root log level)
    restored after."""
    import torch
    import yaml
    from ts.context import Context

    from handlers.onnx_handler import OnnxHandler
    from handlers.torchscript_handler import TorchScriptHandler
    from service.registry import archive_path

    threads, level = torch.get_num_threads(), logging.getLogger().level
    quiet = logging.getLogger("handlers")
    quiet_level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with tempfile.TemporaryDirectory(prefix="rg-wire-") as tmp:
            with zipfile.ZipFile(archive_path(store, model, fmt)) as z:
                z.extractall(tmp)
            manifest = json.loads((Path(tmp) / "MAR-INF" / "MANIFEST.json").read_text())
            config = yaml.safe_load((Path(tmp) / "model-config.yaml").read_text())
            ctx = Context(manifest["model"]["modelName"], tmp, manifest, 1, None, "0.12.0",
                          model_yaml_config=config)
            ctx.metrics = type("NoMetrics", (), {"add_time": lambda *a, **k: None})()
            h = {"torchscript": TorchScriptHandler, "onnx": OnnxHandler}[fmt]()
            h.initialize(ctx)
            yield h, ctx
    finally:
        torch.set_num_threads(threads)
        logging.getLogger().setLevel(level)
        quiet.setLevel(quiet_level)


def answer(handler_ctx: tuple, request) -> object:
    """The ``PredictionResponse`` TorchServe sends back for ``request``, served alone."""
    from ts.context import RequestProcessor

    from robustgate.torchserve import inference_pb2

    h, ctx = handler_ctx
    ctx.request_processor = [RequestProcessor({})]
    (out,) = h.handle([dict(request.input)], ctx)
    return inference_pb2.PredictionResponse(prediction=out)


def wire_bytes(store: Path, model: str, fmt: str = "onnx", image: np.ndarray | None = None) -> dict[str, float]:
    """Bytes to TorchServe and back for one gated ``image`` (default: the first test image),
    on-device expansion against the naive path (:func:`gated_calls`; answers by the real
    handler, :func:`answer`): each message's serialized size, summed over the naive path's
    calls; and the ratios naive / on-device for the requests and for requests and answers."""
    if image is None:
        from model_store import data

        image = data.load_test().images[0][None]
    calls = gated_calls(store, model, fmt, image)
    with handler_in_process(store, model, fmt) as h:
        od_answer = answer(h, calls["on_device"]).ByteSize()
        naive_answers = [answer(h, c).ByteSize() for c in calls["naive"]]
    out = {"format": fmt, "rows": calls["rows"],
           "on_device_request": calls["on_device"].ByteSize(), "on_device_answer": od_answer,
           "naive_request": sum(c.ByteSize() for c in calls["naive"]), "naive_answer": sum(naive_answers),
           "naive_variants_request": sum(c.ByteSize() for c in calls["naive_variants"])}
    out["request_ratio"] = round(out["naive_request"] / out["on_device_request"], 3)
    out["total_ratio"] = round((out["naive_request"] + out["naive_answer"])
                               / (out["on_device_request"] + out["on_device_answer"]), 3)
    out["variants_request_ratio"] = round(out["naive_variants_request"] / out["on_device_request"], 3)
    return out
