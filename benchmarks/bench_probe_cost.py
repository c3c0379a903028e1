"""What a probe plan costs against a plain call, through a real TorchServe.

    python benchmarks/bench_probe_cost.py [--store DIR] [--plan proto/examples/full.json] [--calls 300]

Starts TorchServe (model_store.serve) on free loopback ports with the store's archives,
then for each model sends the same real test images sequentially over gRPC: first plain
(one row of logits), then with the plan (the ~40-row example by default), and prints the
latency of each and their ratio. Sequential calls measure the cost of one request; the
variants of a plan ride inside that one call.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from PIL import Image

from model_store import build, data, serve
from robustgate.torchserve import inference_pb2, inference_pb2_grpc
from robustgate.v1 import probe_pb2

REPO = Path(__file__).resolve().parent.parent


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def timed_calls(stub, token, model: str, images: list[bytes], plan: bytes | None, calls: int) -> list[float]:
    """Seconds per call, sequential, after a warm-up."""
    def one(img: bytes) -> None:
        inputs = {"data": img} if plan is None else {"data": img, "plan": plan}
        stub.Predictions(inference_pb2.PredictionsRequest(model_name=model, input=inputs), metadata=token, timeout=60)

    for img in images[:20]:
        one(img)
    out = []
    for i in range(calls):
        t = time.perf_counter()
        one(images[i % len(images)])
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=build.DEFAULT_STORE)
    p.add_argument("--plan", type=Path, default=REPO / "proto" / "examples" / "full.json")
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args(argv)

    plan = json_format.Parse(args.plan.read_text(), probe_pb2.ProbePlan())
    ds = data.load()
    images = [png(a) for a in ds.test.images[:200]]
    with tempfile.TemporaryDirectory(prefix="rg-bench-") as run_dir:
        settings = serve.ServeSettings.on_free_ports(store=args.store, run_dir=Path(run_dir),
                                                     disable_system_metrics=True)
        print(f"starting TorchServe on {args.store} ...", flush=True)
        with serve.start(settings) as ts, grpc.insecure_channel(ts.grpc_inference_target) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            token = [("authorization", f"Bearer {ts.keys().inference}")]
            first = stub.Predictions(inference_pb2.PredictionsRequest(
                model_name=ts.models[0], input={"data": images[0], "plan": plan.SerializeToString()}), metadata=token)
            rows = probe_pb2.ProbeResult.FromString(first.prediction).rows
            print(f"plan {args.plan.name}: {rows} rows (base + {rows - 1} variants); {args.calls} sequential calls each")
            print(f"{'model':28s} {'plain ms':>9s} {'plan ms':>9s} {'ratio':>6s}   (median; mean in brackets)")
            for model in ts.models:
                plain = timed_calls(stub, token, model, images, None, args.calls)
                probed = timed_calls(stub, token, model, images, plan.SerializeToString(), args.calls)
                mp, mq = statistics.median(plain) * 1e3, statistics.median(probed) * 1e3
                print(f"{model:28s} {mp:9.2f} {mq:9.2f} {mq / mp:6.2f}   "
                      f"({statistics.mean(plain) * 1e3:.2f} / {statistics.mean(probed) * 1e3:.2f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
