"""How long should a coalesced request wait for company? ``--coalesce-max-wait-ms`` and
``--coalesce-max-calls`` side by side.

    python -m benchmarks.coalesce_wait                  # ~6 minutes
    python -m benchmarks.coalesce_wait --smoke          # seconds (the test suite runs this)

One TorchServe (the shipped ONNX archive) and, for each policy (gate off, the calibrated
cascade), one gateway per variant (a wait in ms and a limit on TorchServe calls in flight),
all up at once. Closed-loop clients at each concurrency call every gateway in turn
(``--passes`` times, the order reversed every other pass, so the drift of a shared machine
falls on each alike). A request waits only while a call for its model is in flight, and
never longer than that call (the batch leaves when it comes back): the wait bounds how long
a busy backend's next batch may gather. With a call limit, a request that finds that many
calls out waits for one of them to come back, however long that takes.

Writes benchmarks/results/coalesce_wait[-smoke].{md,json}.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import invocation, parser, report_stem, run_facts, store_with_policy, write_report
from service.backend import NO_PROXY
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.coalesce_wait", __doc__)
    shipped = Settings()
    wait, calls = f"{shipped.coalesce_max_wait_ms:g}", shipped.coalesce_max_calls
    p.add_argument("--variants", default=f"{wait}:{calls},{wait}:0,10:0,10:{calls}",
                   help="WAIT:CALLS pairs (coalesce_max_wait_ms, coalesce_max_calls; 0: no limit); "
                        "ratios are to the first (default %(default)s: the gateway's own settings first)")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = p.parse_args(argv)
    if args.smoke:
        args.variants, args.concurrency, args.passes, args.seconds = f"{wait}:{calls},10:0", "1,4", 1, 0.3
    variants = [(float(w), int(n)) for w, n in (v.split(":") for v in args.variants.split(","))]
    if len(set(variants)) != len(variants):
        p.error("--variants: each WAIT:CALLS pair once")
    levels = [int(c) for c in args.concurrency.split(",")]

    import grpc

    from benchmarks.serving import closed_loop
    from model_store import data, serve
    from robustgate.v1 import classifier_pb2_grpc as pb_grpc
    from service.client import Client
    from tests.test_gateway import start_gateway, stop

    images = data.load().test.images[:512]
    reqs = [Client.request(im[None], args.model, top_k=1) for im in images]  # raw uint8 tensors
    tmp = Path(tempfile.mkdtemp(prefix="rg-coalesce-wait-"))
    policies = {"gate off": store_with_policy(args.store, tmp / "off", args.model, lambda pol: pol.update(mode="off")),
                "cascade": args.store}
    settings = serve.ServeSettings.on_free_ports(store=args.store, run_dir=tmp / "ts", models=(f"{args.model}-onnx",))
    rows: list[dict] = []

    async def measure(addresses: dict[tuple[str, float, int], str]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            calls = {}
            for key, address in addresses.items():
                stub = pb_grpc.ClassifierServiceStub(await stack.enter_async_context(grpc.aio.insecure_channel(address, options=[NO_PROXY])))
                calls[key] = lambda i, stub=stub: stub.Classify(reqs[i % len(reqs)], timeout=30)
            for call in calls.values():
                await closed_loop("warm-up", call, 16, min(1.0, args.seconds))
            got: dict[tuple[str, float, int], list] = {}
            for c in levels:
                for k in range(args.passes):
                    order = list(calls.items()) if k % 2 == 0 else list(calls.items())[::-1]
                    for key, call in order:
                        got.setdefault((*key, c), []).append(await closed_loop("x", call, c, args.seconds))
        for (policy, wait, max_calls, c), results in got.items():
            rows.append({"policy": policy, "wait_ms": wait, "max_calls": max_calls, "concurrency": c,
                         "per_s": float(np.mean([r.per_s for r in results])),
                         "per_s_passes": [round(r.per_s, 1) for r in results],
                         "p50_ms": float(np.mean([r.p50_ms for r in results])),
                         "errors": sum(r.errors for r in results)})

    with serve.start(settings) as ts:
        started = {}
        try:
            for policy, store in policies.items():
                for w, n in variants:
                    started[(policy, w, n)] = start_gateway(store, ts, tmp, models=args.model, **{
                        "coalesce-max-wait-ms": f"{w:g}", "coalesce-max-calls": str(n)})
            asyncio.run(measure({key: address for key, (_, address) in started.items()}))
        finally:
            for proc, _ in started.values():
                stop(proc)

    report = {**run_facts(invocation("benchmarks.coalesce_wait", argv)), "model": args.model,
              "seconds_per_measurement": args.seconds, "passes": args.passes, "rows": rows}
    stem = report_stem("benchmarks.coalesce_wait", args.smoke)
    write_report(args.out, stem, report, render(report))
    shutil.rmtree(tmp, ignore_errors=True)  # kept, with TorchServe's and the gateway's logs, when the run failed
    return 0


def label(wait_ms: float, max_calls: int) -> str:
    return f"{wait_ms:g} ms, " + (f"<= {max_calls} calls" if max_calls else "no call limit")


def render(r: dict) -> str:
    variants = list(dict.fromkeys((row["wait_ms"], row["max_calls"]) for row in r["rows"]))
    base = variants[0]
    by = {(row["policy"], row["wait_ms"], row["max_calls"], row["concurrency"]): row for row in r["rows"]}
    lines = [f"# Coalescing wait ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` ({r['seconds_per_measurement']} s per measurement, "
             f"mean of {r['passes']} passes in turns). Variants: the longest wait for company while "
             f"a call is in flight, and the most TorchServe calls in flight per model. Calls/s, and in "
             f"brackets the ratio to {label(*base)}; p50 in ms.", "",
             "| policy | clients | " + " | ".join(f"{label(*v)}: calls/s" for v in variants) + " | "
             + " | ".join(f"{label(*v)}: p50" for v in variants) + " |",
             "|---|---|" + "---|" * (2 * len(variants))]
    for policy, c in dict.fromkeys((row["policy"], row["concurrency"]) for row in r["rows"]):
        ref = by[(policy, *base, c)]["per_s"]
        tput = [f"{by[(policy, *v, c)]['per_s']:.0f} ({by[(policy, *v, c)]['per_s'] / ref:.2f})" if ref else "–"
                for v in variants]
        p50 = [f"{by[(policy, *v, c)]['p50_ms']:.1f}" for v in variants]
        lines.append(f"| {policy} | {c} | " + " | ".join(tput) + " | " + " | ".join(p50) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
