"""The gateway against an earlier revision's, side by side in front of one TorchServe.

    python -m benchmarks.gateway_ab --against 013b8d6    # ~2 minutes
    python -m benchmarks.gateway_ab --smoke              # seconds (the test suite runs this)

The gateway as it is ("new") and as it was at ``--against`` ("old": that revision's tree from
``git archive``, run from its own folder with its protos first on its path) serve the same
store, one process each, in front of one TorchServe (the working tree's archive of
``--format``: only the gateway differs). Closed-loop clients at each ``--concurrency`` call
one and then the other in turns of ``--turn-s`` seconds, the first of a turn alternating, so
a shared machine's drift falls on each alike; with the gate off (where the gateway's own
per-call work is the cost on a few cores) and with the calibrated gate (cascade); clients send
raw uint8 tensors, or with ``--input png`` the same images as PNG files. Per row:
calls/s, p50, and the gateway process's CPU per answered call (user + system, from
``/proc``), each the median over the turns; and new / old of each, the median of the
turns' ratios. The serving benchmark measures rows minutes apart, where a change of a few
per cent is lost in the drift; this measures one gateway change at a time.

Writes benchmarks/results/gateway_ab[-png][-smoke].{md,json}.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.report import REPO, parser, report_stem, run_facts, short_commit, store_with_policy, write_report
from model_store.archive import FORMATS

MODES = {"gate off": lambda pol: pol.update(mode="off"), "calibrated gate (cascade)": lambda pol: None}
INPUTS = ("tensor", "png")


def requests(images, model: str, kind: str = "tensor") -> list:
    """One Classify request per grey ``[28, 28]`` test image: a raw uint8 tensor, or the image
    as a client's PNG file (``benchmarks.decode_png.encoded``)."""
    from benchmarks.decode_png import encoded
    from service.client import Client

    sent = encoded(images, 28) if kind == "png" else [im[None] for im in images]
    return [Client.request(x, model, top_k=1) for x in sent]


def tree_at(rev: str, dst: Path) -> Path:
    """The repository's files at git revision ``rev``, written under ``dst``."""
    dst.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", b"") or str(e).encode()
        raise SystemExit(f"gateway_ab: cannot read revision {rev!r} (a git checkout with it is needed): "
                         f"{detail.decode(errors='replace').strip()}") from None
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.gateway_ab", __doc__)
    # resolved as parsed: the report names the commit measured, and the run reads that one throughout
    p.add_argument("--against", type=short_commit, default="HEAD", help="git revision of the old gateway")
    p.add_argument("--concurrency", default="1,64")
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--turn-s", type=float, default=2.0)
    p.add_argument("--format", choices=FORMATS, default="onnx", help="the TorchServe archive both call")
    p.add_argument("--input", choices=INPUTS, default="tensor",
                   help="what clients send: raw uint8 tensors, or the same images as PNG files (decoded by the gateway)")
    args = p.parse_args(argv)
    warm_s = 2.0
    if args.smoke:
        args.concurrency, args.turns, args.turn_s, warm_s = "1,4", 2, 0.2, 0.2
    levels = [int(c) for c in args.concurrency.split(",")]

    from model_store import data, serve
    from tests.test_gateway import start_gateway, stop

    reqs = requests(data.load_test().images[:512], args.model, args.input)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rg-gateway-ab-") as tmp_name:
        tmp = Path(tmp_name)
        old_tree = tree_at(args.against, tmp / "old")
        sources = {"old": old_tree, "new": REPO}
        settings = serve.ServeSettings.on_free_ports(store=args.store, run_dir=tmp / "ts",
                                                     models=(f"{args.model}-{args.format}",))
        with serve.start(settings) as ts:
            for mode, edit in MODES.items():
                store = store_with_policy(args.store, tmp / mode.replace(" ", "-"), args.model, edit)
                gateways = {}
                try:
                    for tag, src in sources.items():
                        gateways[tag] = start_gateway(store, ts, tmp, source=src, models=args.model,
                                                      **{"backend-format": args.format})
                    rows += asyncio.run(in_turns(mode, gateways, reqs, levels, args.turns, args.turn_s, warm_s))
                finally:
                    for proc, _ in gateways.values():
                        stop(proc)
    failed = [r for r in rows if r["errors"]]
    if failed:  # never report over calls that failed
        raise SystemExit(f"gateway_ab: calls failed: {[(r['mode'], r['concurrency'], r['errors']) for r in failed]}")
    command = f"python -m benchmarks.gateway_ab --against {args.against}" + (
        " --smoke" if args.smoke else f" --concurrency {args.concurrency}" if args.concurrency != "1,64" else "") + (
        " --input png" if args.input == "png" else "")
    report = {**run_facts(command), "model": args.model, "format": args.format, "input": args.input,
              "against": args.against, "turns": args.turns, "turn_s": args.turn_s, "rows": rows}
    stem = report_stem("benchmarks.gateway_ab" + ("-png" if args.input == "png" else ""), args.smoke)
    write_report(args.out, stem, report, render(report))
    return 0


async def in_turns(mode: str, gateways: dict, reqs: list, levels: list[int], turns: int, turn_s: float,
                   warm_s: float) -> list[dict]:
    """One row per concurrency: each gateway's calls/s, p50 and CPU per call over ``turns``
    turns of ``turn_s`` seconds, the two taking turns."""
    from benchmarks.serving import closed_loop, closed_loops_in_turns, connections, gateway_cpu_s
    from robustgate.v1 import classifier_pb2_grpc as pb_grpc

    stub = pb_grpc.ClassifierServiceStub
    out = []
    tags = list(gateways)
    async with connections(gateways["old"][1], 1, stub) as old, connections(gateways["new"][1], 1, stub) as new:
        stubs = {"old": old[0], "new": new[0]}

        def call_of(tag: str):
            async def call(i: int) -> None:
                await stubs[tag].Classify(reqs[i % len(reqs)], timeout=30)
            return call

        calls = {tag: call_of(tag) for tag in tags}
        clocks = {tag: (lambda pid=gateways[tag][0].pid: gateway_cpu_s(pid)) for tag in tags}
        for c in levels:
            for tag in tags:
                await closed_loop("warm-up", calls[tag], c, warm_s)
            seen = await closed_loops_in_turns(calls, c, turns, turn_s, clocks)
            med = {t: [statistics.median(x[k] for x in seen[t]) for k in range(3)] for t in tags}
            ratio = [statistics.median(n[k] / o[k] for o, n in zip(seen["old"], seen["new"])) for k in range(3)]
            out.append({"mode": mode, "concurrency": c,
                        "old_calls_per_s": med["old"][0], "new_calls_per_s": med["new"][0],
                        "old_p50_ms": med["old"][1], "new_p50_ms": med["new"][1],
                        "old_cpu_ms_per_call": med["old"][2], "new_cpu_ms_per_call": med["new"][2],
                        "calls_per_s_new_over_old": ratio[0], "p50_new_over_old": ratio[1],
                        "cpu_new_over_old": ratio[2],
                        "errors": sum(x[3] for t in tags for x in seen[t])})
    return out


def render(r: dict) -> str:
    lines = [f"# The gateway, now against {r['against']} ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` ({r['model']}, TorchServe's {r['format']} archive behind both; clients "
             f"send {'PNG files' if r.get('input') == 'png' else 'raw uint8 tensors'}; "
             f"{r['turns']} turns of {r['turn_s']} s per row, the two gateways taking turns). Each figure is "
             "the median over the turns; new / old is the median of the turns' ratios. Gateway CPU: user + "
             "system time of the gateway process per answered call.", "",
             "| gate | clients | old calls/s | new calls/s | new / old | old p50 ms | new p50 ms | new / old "
             "| old gateway CPU ms/call | new | new / old |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['mode']} | {x['concurrency']} | {x['old_calls_per_s']:.0f} | {x['new_calls_per_s']:.0f} | "
              f"{x['calls_per_s_new_over_old']:.3f} | {x['old_p50_ms']:.2f} | {x['new_p50_ms']:.2f} | "
              f"{x['p50_new_over_old']:.3f} | {x['old_cpu_ms_per_call']:.3f} | {x['new_cpu_ms_per_call']:.3f} | "
              f"{x['cpu_new_over_old']:.3f} |" for x in r["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
