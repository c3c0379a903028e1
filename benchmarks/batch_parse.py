"""The handler's parse of a coalesced ``ProbeBatch``: walked on the wire and parsed item by
item (``handlers.base.batch_items``, the code ``ProbeHandler.parse_batch`` runs, with its
bounds and messages) against one parse of the whole batch (what it did before), side by
side in one process.

    python -m benchmarks.batch_parse            # ~2 min
    python -m benchmarks.batch_parse --smoke    # seconds (the test suite runs this)

Each batch holds ``n`` test images as uint8 tensors, each with the plan the shipped policy
sends first for it (the cascade's cheap probe), as the gateway's coalescer writes them. Both
rows end with every item's tensor and plan in hand; the tensors' checks and the plans'
validation, which follow alike, are left out. A last pair sends what a hostile caller could:
``--hostile-mib`` of empty items (TorchServe lets 8 MiB through), which the whole parse builds
into millions of messages and the walk refuses one item past the limit (256). One caller, the
rows in turns. The whole row leaves out the copy of the request (``bytes(raw)``) the handler
made before its parse, so it flatters the former path a little.

Writes benchmarks/results/batch_parse[-smoke].{md,json}.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.report import invocation, parser, report_stem, run_facts, write_report
from benchmarks.serving import INTERVAL_NOTE, ab_in_turns
from handlers.base import HandlerSettings, batch_items, read_card
from handlers.decode import InputError, InputSpec
from robustgate.v1 import probe_pb2

WHOLE, WALKED = "parsed whole", "walked, item by item"


def parse_whole(buf: bytes) -> list:
    return [(it.tensor, it.plan) for it in probe_pb2.ProbeBatch.FromString(buf).items]


def parse_walked(buf: bytes, spec: InputSpec, settings: HandlerSettings) -> list:
    out = []
    for it in batch_items(buf, spec, settings):
        if isinstance(it, InputError):  # every item here is valid: a refusal is a fault in the benchmark
            raise it
        out.append((it.tensor, it.plan))
    return out


def label(n: int) -> str:
    return f"{n} item" if n == 1 else f"{n} items"


def refused(call: Callable[[], object]) -> Callable[[int], object]:
    """A row whose every call ends in the walk's refusal of the item count (what the handler
    answers); any other refusal is a fault in the benchmark."""
    def run(i: int) -> object:
        try:
            return call()
        except InputError as e:
            if not e.message.startswith("batch has more than"):
                raise
            return e
    return run


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.batch_parse", __doc__)
    p.add_argument("--items", type=int, nargs="+", default=[1, 8, 32, 256], help="items per batch, one pair each")
    p.add_argument("--hostile-mib", type=float, default=8.0, help="MiB of empty items in the hostile pair")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--turn-s", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.smoke:
        args.turns, args.turn_s, args.hostile_mib = 2, 0.01, 0.25

    import json

    import numpy as np

    from model_store import data
    from service.gate.cascade import GateRun
    from service.gate.policy_io import policy_from_dict
    from service.pipeline import request_seed, spec_to_proto

    policy = policy_from_dict(json.loads((args.store / args.model / "policy.json").read_text()))
    images = data.load_test().images[: max(args.items)]
    items = []
    for im in images:
        plan = spec_to_proto(GateRun.start(policy, request_seed(0, im), certify=False).next_plan())
        tensor = probe_pb2.Tensor(shape=list(im.shape), dtype="uint8", data=np.ascontiguousarray(im).tobytes())
        items.append(probe_pb2.ProbeItem(tensor=tensor, plan=plan))
    settings = HandlerSettings()  # the shipped limits (256 items)
    spec = read_card(str(args.store / args.model / "card.json"), settings).spec
    batches = {n: probe_pb2.ProbeBatch(items=items[:n]).SerializeToString() for n in args.items}
    calls: dict[str, Callable[[int], object]] = {}
    for n, buf in batches.items():
        assert parse_whole(buf) == parse_walked(buf, spec, settings)  # the same items
        calls[f"{label(n)}, {WHOLE}"] = lambda i, b=buf: parse_whole(b)
        calls[f"{label(n)}, {WALKED}"] = lambda i, b=buf: parse_walked(b, spec, settings)
    hostile = b"\x0a\x00" * int(args.hostile_mib * (1 << 19))
    hostile_name = f"{args.hostile_mib:g} MiB of empty items"
    calls[f"{hostile_name}, {WHOLE}"] = lambda i: len(probe_pb2.ProbeBatch.FromString(hostile).items)
    calls[f"{hostile_name}, {WALKED}"] = refused(lambda: parse_walked(hostile, spec, settings))
    for c in calls.values():
        for i in range(2 if args.smoke else 20):
            c(i)
    kinds = [label(n) for n in args.items] + [hostile_name]
    pairs = {f"{k}, {WALKED}": f"{k}, {WHOLE}" for k in kinds}
    measured, ratio, spread = ab_in_turns(calls, args.turns, args.turn_s, pairs, "batch_parse")
    rows = [{"batch": k, "items": n, "bytes": len(buf),
             "whole_p50_us": measured[f"{k}, {WHOLE}"].p50_ms * 1e3,
             "walked_p50_us": measured[f"{k}, {WALKED}"].p50_ms * 1e3,
             "extra_us_per_item": (measured[f"{k}, {WALKED}"].p50_ms - measured[f"{k}, {WHOLE}"].p50_ms) * 1e3 / n
             if k != hostile_name else None,  # the walk refuses it: no items in hand
             "walked_over_whole": ratio[f"{k}, {WALKED}"], "interval": list(spread[f"{k}, {WALKED}"]),
             "calls": min(measured[f"{k}, {path}"].calls for path in (WHOLE, WALKED))}
            for k, n, buf in [*((label(n), n, batches[n]) for n in args.items), (hostile_name, len(hostile) // 2, hostile)]]
    report = {**run_facts(invocation("benchmarks.batch_parse", argv)), "model": args.model,
              "policy": policy.version, "turns": args.turns, "turn_s": args.turn_s, "rows": rows}
    write_report(args.out, report_stem("benchmarks.batch_parse", args.smoke), report, render(report))
    return 0


def render(r: dict) -> str:
    lines = [f"# The handler's parse of a ProbeBatch: walked, item by item, against whole ({r['date']}, "
             f"{r['machine']})", "",
             f"Reproduce: `{r['command']}` (model {r['model']}, policy `{r['policy']}`: each item a 28×28 uint8 "
             f"tensor and the plan the policy sends first; one caller, {r['turns']} turns of {r['turn_s']} s per "
             "row). Microseconds at the median. The hostile batch: the whole parse builds every empty item; the "
             "walk refuses it one item past the limit. " + INTERVAL_NOTE, "",
             "| batch | bytes | parsed whole, µs | walked, item by item, µs | extra µs per item | walked / whole |",
             "|---|---|---|---|---|---|"]
    for x in r["rows"]:
        extra = f"{x['extra_us_per_item']:.2f}" if x["extra_us_per_item"] is not None else "–"
        ratio = x["walked_over_whole"]
        cell = (f"{ratio:.2f} ({x['interval'][0]:.2f}–{x['interval'][1]:.2f})" if ratio >= 0.01
                else f"1/{1 / ratio:,.0f}")  # the intervals are kept to 3 decimals
        lines.append(f"| {x['batch']} | {x['bytes']:,} | {x['whole_p50_us']:.1f} | {x['walked_p50_us']:.1f} | {extra} | "
                     f"{cell} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
