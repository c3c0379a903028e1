"""The gateway against TorchServe called directly, in turns: the issue's first targets read
from rows measured side by side, not minutes apart.

    python -m benchmarks.versus_direct           # ~3 minutes
    python -m benchmarks.versus_direct --smoke   # seconds (the test suite runs this)

Three rows, all up at once: the gateway with the gate off as shipped (coalescing, in front of
the shipped archive at batch size 1); that archive called directly, on the same TorchServe;
and TorchServe's best setting for callers that send one image per call (its own batching, 32
images and 2 ms: a second TorchServe). Closed-loop clients at each ``--concurrency`` call the
rows in turns of ``--turn-s`` seconds, the order rotating from turn to turn, so a shared
machine's drift falls on every row alike: the serving benchmark measures these rows minutes
apart, and on a 2-core VM its gate-off / best-tuned ratio read 0.66× one afternoon and 0.52×
that evening with nothing changed on that path. Clients send raw uint8 tensors, as the
serving benchmark's do. Per row: calls/s, p50 and the CPU per answered call of the processes
that serve it (the gateway's and its TorchServe's; a direct row's TorchServe), each the
median over the turns. Per pair: the median of the turns' ratios (p50s: differences) and the
lowest and highest turn.

Writes benchmarks/results/versus_direct[-smoke].{md,json}.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.report import parser, report_stem, run_facts, store_with_policy, write_report
from benchmarks.serving import ADDED_P50_MS, GATE_OFF_THROUGHPUT, meets
from model_store.archive import FORMATS

GATEWAY = "gateway, gate off, as shipped"
SHIPPED = "TorchServe direct, shipped archive (batch 1)"
BEST = "TorchServe direct, TorchServe batching (32, 2 ms)"
# (label, row, over row, how: "ratio" of calls/s or "added" p50 ms, at which concurrency, target)
# (the bounds are the serving report's)
PAIRS = (("gate off / best-tuned direct, calls/s", GATEWAY, BEST, "ratio", "max", GATE_OFF_THROUGHPUT),
         ("gate off / shipped archive direct, calls/s", GATEWAY, SHIPPED, "ratio", "max", None),
         ("gate off added p50 over shipped archive direct, ms", GATEWAY, SHIPPED, "added", "min", ADDED_P50_MS))


def pair_rows(seen: dict[str, list], concurrency: int, levels: list[int]) -> list[dict]:
    """Each of :data:`PAIRS` measured at ``concurrency`` (its level, the highest or the lowest
    of ``levels``), from ``seen`` (:func:`benchmarks.serving.closed_loops_in_turns`' turns):
    the median over the turns of one row's calls/s over the other's in the same turn, or of
    its p50 less the other's; the lowest and highest turn; the target's verdict."""
    out = []
    for label, row, other, how, level, target in PAIRS:
        if concurrency != (max(levels) if level == "max" else min(levels)):
            continue
        per_turn = [a.per_s / b.per_s if how == "ratio" else a.p50_ms - b.p50_ms
                    for a, b in zip(seen[row], seen[other])]
        value = statistics.median(per_turn)
        met = None if target is None else meets(value, *target)
        out.append({"pair": label, "concurrency": concurrency, "value": value, "low": min(per_turn),
                    "high": max(per_turn), "target": None if target is None else f"{target[0]} {target[1]}",
                    "met": met})
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.versus_direct", __doc__)
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--turn-s", type=float, default=3.0)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="the archive every row serves")
    args = p.parse_args(argv)
    warm_s = 3.0
    if args.smoke:
        args.concurrency, args.turns, args.turn_s, warm_s = "1,4", 2, 0.3, 0.3
    levels = [int(c) for c in args.concurrency.split(",")]
    fmt = args.format

    from benchmarks.serving import (batching_store, closed_loop, closed_loops_in_turns, connections, cpu_parts,
                                    torchserve_call)
    from model_store import data, serve
    from robustgate.torchserve import inference_pb2_grpc
    from robustgate.v1 import classifier_pb2_grpc as pb_grpc
    from service.backend import encode_tensor
    from service.client import Client
    from tests.test_gateway import start_gateway, stop

    images = data.load_test().images[:512]
    tensors = [encode_tensor(im[None]) for im in images]
    reqs = [Client.request(im[None], args.model, top_k=1) for im in images]
    model_name = f"{args.model}-{fmt}"

    async def measure(ts, best, gateway_pid: int, address: str) -> tuple[list[dict], list[dict]]:
        direct = inference_pb2_grpc.InferenceAPIsServiceStub
        async with (connections(address, 1, pb_grpc.ClassifierServiceStub) as gw,
                    connections(ts.grpc_inference_target, 1, direct) as shipped,
                    connections(best.grpc_inference_target, 1, direct) as batching):
            async def through_gateway(i: int) -> None:
                await gw[0].Classify(reqs[i % len(reqs)], timeout=30)

            calls = {GATEWAY: through_gateway, SHIPPED: torchserve_call(ts, shipped, model_name, tensors),
                     BEST: torchserve_call(best, batching, model_name, tensors)}

            def cpu(gateway: int | None, torchserve: int):
                return lambda: sum(v for k, v in cpu_parts(gateway, torchserve).items() if k != "client")
            clocks = {GATEWAY: cpu(gateway_pid, ts.pid), SHIPPED: cpu(None, ts.pid), BEST: cpu(None, best.pid)}
            out_rows, out_pairs = [], []
            for c in levels:
                for call in calls.values():  # TorchServe's frontend runs interpreted until its JIT has warmed
                    await closed_loop("warm-up", call, c, warm_s)
                seen = await closed_loops_in_turns(calls, c, args.turns, args.turn_s, clocks)
                for name, turns in seen.items():
                    out_rows.append({"row": name, "concurrency": c,
                                     "calls_per_s": statistics.median(t.per_s for t in turns),
                                     "p50_ms": statistics.median(t.p50_ms for t in turns),
                                     "cpu_ms_per_call": statistics.median(t.cpu_ms_per_call for t in turns),
                                     "errors": sum(t.errors for t in turns)})
                out_pairs += pair_rows(seen, c, levels)
            return out_rows, out_pairs

    rows: list[dict] = []
    pairs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rg-versus-direct-") as tmp_name:
        tmp = Path(tmp_name)
        gate_off = store_with_policy(args.store, tmp / "off", args.model, lambda pol: pol.update(mode="off"))
        batching = batching_store(args.store, args.model, tmp / "batching", fmt=fmt)
        with contextlib.ExitStack() as up:  # each TorchServe takes its free ports once the one before holds its own
            ts = up.enter_context(serve.start(serve.ServeSettings.on_free_ports(
                store=args.store, run_dir=tmp / "ts", models=(model_name,))))
            best = up.enter_context(serve.start(serve.ServeSettings.on_free_ports(
                store=batching, run_dir=tmp / "ts-batching", models=(model_name,))))
            gateway, address = start_gateway(gate_off, ts, tmp, models=args.model, **{"backend-format": fmt})
            try:
                rows, pairs = asyncio.run(measure(ts, best, gateway.pid, address))
            finally:
                stop(gateway)

    failed = [(r["row"], r["concurrency"], r["errors"]) for r in rows if r["errors"]]
    if failed:  # never report over calls that failed
        raise SystemExit(f"versus_direct: calls failed: {failed}")
    command = "python -m benchmarks.versus_direct" + (
        " --smoke" if args.smoke else f" --concurrency {args.concurrency}" if args.concurrency != "1,64" else "") + (
        f" --format {fmt}" if fmt != "onnx" else "")
    report = {**run_facts(command), "model": args.model, "format": fmt, "turns": args.turns, "turn_s": args.turn_s,
              "rows": rows, "pairs": pairs}
    stem = report_stem("benchmarks.versus_direct" + ("" if fmt == "onnx" else f"-{fmt}"), args.smoke)
    write_report(args.out, stem, report, render(report))
    return 0


def render(r: dict) -> str:
    lines = [f"# The gateway against TorchServe called directly, in turns ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` ({r['model']}, {r['format']} archives; clients send raw uint8 "
             f"tensors; {r['turns']} turns of {r['turn_s']} s per concurrency, the three rows taking turns, all "
             "up at once). Each figure is the median over the turns. CPU: user + system time per answered "
             "call of the processes serving the row (the gateway and its TorchServe; a direct row's TorchServe).",
             "", "| row | clients | calls/s | p50 ms | serving CPU ms/call |", "|---|---|---|---|---|"]
    lines += [f"| {x['row']} | {x['concurrency']} | {x['calls_per_s']:.0f} | {x['p50_ms']:.2f} | "
              f"{x['cpu_ms_per_call']:.3f} |" for x in r["rows"]]
    lines += ["", "Each pair: the median over the turns of the two rows' ratio (or difference) in the same "
              "turn, with the lowest and highest turn.", "",
              "| pair | clients | median | lowest – highest turn | target |", "|---|---|---|---|---|"]
    how = {label: how for label, _, _, how, _, _ in PAIRS}
    for x in r["pairs"]:
        fmt = "{:.2f}" if how[x["pair"]] == "ratio" else "{:+.2f}"
        verdict = "" if x["met"] is None else f"{x['target']}: {'met' if x['met'] else '**missed**'}"
        lines.append(f"| {x['pair']} | {x['concurrency']} | {fmt.format(x['value'])} | "
                     f"{fmt.format(x['low'])} – {fmt.format(x['high'])} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
