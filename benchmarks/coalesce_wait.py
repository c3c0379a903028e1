"""How long should a coalesced request wait for company? ``--coalesce-max-wait-ms`` side by side.

    python -m benchmarks.coalesce_wait                  # ~4 minutes
    python -m benchmarks.coalesce_wait --smoke          # seconds (the test suite runs this)

One TorchServe (the shipped ONNX archive) and, for each policy (gate off, the calibrated
cascade), one gateway per wait, all up at once. Closed-loop clients at each concurrency call
every gateway in turn (``--passes`` times, the order reversed every other pass, so the drift
of a shared machine falls on each alike). A request waits only while a call for its model is
in flight, and never longer than that call (the batch leaves when it comes back): the wait
bounds how long a busy backend's next batch may gather.

Writes benchmarks/results/coalesce_wait[-smoke].{md,json}.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.report import invocation, parser, report_stem, run_facts, store_with_policy, write_report


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.coalesce_wait", __doc__)
    p.add_argument("--waits", default="2,10,20", help="coalesce_max_wait_ms values, ms")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    args = p.parse_args(argv)
    if args.smoke:
        args.waits, args.concurrency, args.passes, args.seconds = "2,10", "1,4", 1, 0.3
    waits = [float(w) for w in args.waits.split(",")]
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

    async def measure(addresses: dict[tuple[str, float], str]) -> None:
        async with contextlib.AsyncExitStack() as stack:
            calls = {}
            for key, address in addresses.items():
                stub = pb_grpc.ClassifierServiceStub(await stack.enter_async_context(grpc.aio.insecure_channel(address)))
                calls[key] = lambda i, stub=stub: stub.Classify(reqs[i % len(reqs)], timeout=30)
            for call in calls.values():
                await closed_loop("warm-up", call, 16, min(1.0, args.seconds))
            got: dict[tuple[str, float, int], list] = {}
            for c in levels:
                for k in range(args.passes):
                    order = list(calls.items()) if k % 2 == 0 else list(calls.items())[::-1]
                    for key, call in order:
                        got.setdefault((*key, c), []).append(await closed_loop("x", call, c, args.seconds))
        for (policy, wait, c), results in got.items():
            rows.append({"policy": policy, "wait_ms": wait, "concurrency": c,
                         "per_s": float(np.mean([r.per_s for r in results])),
                         "per_s_passes": [round(r.per_s, 1) for r in results],
                         "p50_ms": float(np.mean([r.p50_ms for r in results])),
                         "errors": sum(r.errors for r in results)})

    with serve.start(settings) as ts:
        started = {}
        try:
            for policy, store in policies.items():
                for w in waits:
                    started[(policy, w)] = start_gateway(store, ts, tmp, models=args.model, **{
                        "coalesce-max-wait-ms": f"{w:g}"})
            asyncio.run(measure({key: address for key, (_, address) in started.items()}))
        finally:
            for proc, _ in started.values():
                stop(proc)

    report = {**run_facts(invocation("benchmarks.coalesce_wait", argv)), "model": args.model,
              "seconds_per_measurement": args.seconds, "passes": args.passes, "rows": rows}
    stem = report_stem("benchmarks.coalesce_wait", args.smoke)
    write_report(args.out, stem, report, render(report))
    return 0


def render(r: dict) -> str:
    waits = sorted({row["wait_ms"] for row in r["rows"]})
    base = waits[0]
    by = {(row["policy"], row["wait_ms"], row["concurrency"]): row for row in r["rows"]}
    lines = [f"# Coalescing wait ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` ({r['seconds_per_measurement']} s per measurement, "
             f"mean of {r['passes']} passes in turns). Calls/s, and in brackets the ratio to the "
             f"{base:g} ms wait; p50 in ms.", "",
             "| policy | clients | " + " | ".join(f"{w:g} ms: calls/s" for w in waits) + " | "
             + " | ".join(f"{w:g} ms: p50" for w in waits) + " |",
             "|---|---|" + "---|" * (2 * len(waits))]
    for policy, c in dict.fromkeys((row["policy"], row["concurrency"]) for row in r["rows"]):
        ref = by[(policy, base, c)]["per_s"]
        tput = [f"{by[(policy, w, c)]['per_s']:.0f} ({by[(policy, w, c)]['per_s'] / ref:.2f})" if ref else "–"
                for w in waits]
        p50 = [f"{by[(policy, w, c)]['p50_ms']:.1f}" for w in waits]
        lines.append(f"| {policy} | {c} | " + " | ".join(tput) + " | " + " | ".join(p50) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
