"""What a probe plan costs against a plain call, through a real TorchServe.

    python benchmarks/bench_probe_cost.py [--store DIR] [--plan proto/examples/full.json] [--calls 300] [--aio]

Starts TorchServe (model_store.serve) on free loopback ports with the store's archives,
then for each model sends the same real test images sequentially over gRPC: first plain
(one row of logits), then with the plan (the ~40-row example by default), and prints the
latency of each and their ratio, and how much of each call the TorchServe worker spent by
its own clock (``ProbeResult.worker_seconds``): the rest, "around", is TorchServe's frontend,
its queue and the gRPC hop. Sequential calls measure the cost of one request; the variants of
a plan ride inside that one call. ``--aio``: the calls from a grpc.aio client, as the gateway
makes them, instead of the blocking one.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format
from PIL import Image

from model_store import build, data, serve
from robustgate.torchserve import inference_pb2, inference_pb2_grpc
from robustgate.v1 import probe_pb2
from service.backend import NO_PROXY

REPO = Path(__file__).resolve().parent.parent


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def request(model: str, img: bytes, plan: bytes | None) -> inference_pb2.PredictionsRequest:
    return inference_pb2.PredictionsRequest(model_name=model,
                                            input={"data": img} if plan is None else {"data": img, "plan": plan})


def worker_seconds(resp: inference_pb2.PredictionResponse) -> float:
    return probe_pb2.ProbeResult.FromString(resp.prediction).worker_seconds


async def timed_calls(call: Callable[[bytes], object], images: list[bytes],
                      calls: int) -> tuple[list[float], list[float]]:
    """Seconds per call and the worker's seconds in each, sequential, after a warm-up;
    ``call(image)`` returns the worker's seconds, or an awaitable of them (a grpc.aio client)."""
    async def one(img: bytes) -> float:
        out = call(img)
        return await out if inspect.isawaitable(out) else out

    for img in images[:20]:
        await one(img)
    took, worker = [], []
    for i in range(calls):
        t = time.perf_counter()
        worker.append(await one(images[i % len(images)]))
        took.append(time.perf_counter() - t)
    return took, worker


async def measure(ts, stub, token, model: str, images: list[bytes], plan: bytes | None, calls: int,
                  aio: bool) -> tuple[list[float], list[float]]:
    """:func:`timed_calls` from the blocking ``stub``, or from a grpc.aio client as the gateway calls."""
    if not aio:
        return await timed_calls(
            lambda img: worker_seconds(stub.Predictions(request(model, img, plan), metadata=token, timeout=60)),
            images, calls)
    async with grpc.aio.insecure_channel(ts.grpc_inference_target, options=[NO_PROXY]) as channel:
        aio_stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)

        async def call(img: bytes) -> float:
            return worker_seconds(await aio_stub.Predictions(request(model, img, plan), metadata=token, timeout=60))
        return await timed_calls(call, images, calls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=build.DEFAULT_STORE)
    p.add_argument("--plan", type=Path, default=REPO / "proto" / "examples" / "full.json")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--aio", action="store_true", help="call from a grpc.aio client, as the gateway does")
    args = p.parse_args(argv)

    plan = json_format.Parse(args.plan.read_text(), probe_pb2.ProbePlan())
    ds = data.load()
    images = [png(a) for a in ds.test.images[:200]]
    with tempfile.TemporaryDirectory(prefix="rg-bench-") as run_dir:
        settings = serve.ServeSettings.on_free_ports(store=args.store, run_dir=Path(run_dir),
                                                     disable_system_metrics=True)
        print(f"starting TorchServe on {args.store} ...", flush=True)
        with serve.start(settings) as ts, grpc.insecure_channel(ts.grpc_inference_target, options=[NO_PROXY]) as channel:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
            token = [("authorization", f"Bearer {ts.keys().inference}")]
            first = stub.Predictions(request(ts.models[0], images[0], plan.SerializeToString()), metadata=token)
            rows = probe_pb2.ProbeResult.FromString(first.prediction).rows
            print(f"plan {args.plan.name}: {rows} rows (base + {rows - 1} variants); {args.calls} sequential calls each")
            print(f"{'model':28s} {'plain ms':>9s} {'plan ms':>9s} {'ratio':>6s}   (median; mean in brackets)   "
                  "worker / around, plain and plan (mean ms)")
            for model in ts.models:
                plain, plain_w = asyncio.run(measure(ts, stub, token, model, images, None, args.calls, args.aio))
                probed, probed_w = asyncio.run(measure(ts, stub, token, model, images, plan.SerializeToString(),
                                                       args.calls, args.aio))
                mp, mq = statistics.median(plain) * 1e3, statistics.median(probed) * 1e3
                ap, aq = statistics.mean(plain) * 1e3, statistics.mean(probed) * 1e3
                wp, wq = statistics.mean(plain_w) * 1e3, statistics.mean(probed_w) * 1e3
                print(f"{model:28s} {mp:9.2f} {mq:9.2f} {mq / mp:6.2f}   ({ap:.2f} / {aq:.2f} ms)   "
                      f"{wp:.2f} / {ap - wp:.2f}, {wq:.2f} / {aq - wq:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
