"""The gateway's own work for the gate, in process: its logic and its answer, back to back
and after the process idled, side by side in one run.

    python -m benchmarks.gate_logic          # ~1 min
    python -m benchmarks.gate_logic --smoke  # seconds (the test suite runs this)

The serving benchmark's stage clocks put the gate's logic at about 0.6 ms a request and the
larger answer at 0.3 to 0.4 ms more than a gate-off one, at one client on 2 cores. This
measures the same code without TorchServe or gRPC: for ``--images`` test images, the model's
outputs for every probe the policy sends are computed first (in process, as the worker
would), then each row times only the gateway's part, one request per call:

- **gate logic**: :class:`service.gate.cascade.GateRun` from start to report, each plan
  built as the wire message (``spec_to_proto``), for the shipped policy (cascade) and with
  every check on; what the pipeline's ``gate`` stage times, plus building the plans;
- **answer**: the request's metrics (``service.server.record``), the response message
  (``convert.to_pb``) and its bytes, for a gated request and a gate-off one.

Each row also runs **after idle**, once for each of ``--idle-ms`` (1, 2, 5 and 8 ms): the
process sleeps that long (not timed) before every call, as the gateway does at one client
while TorchServe answers (the serving report's backend stage: about 3 ms a gate-off call,
8 ms the cascade's); on a VM a core that idled runs the next code slower (caches and the
core gone cold), which the serving benchmark's stage clocks include. The sweep shows how
the slowdown grows with the idle time. The gate logic row times more than the pipeline's ``gate`` stage
(which times ``feed`` and ``report``): the run's start, the request's seed and each plan's
wire message too. Rows run in turns (``benchmarks.serving.interleaved``).

Writes benchmarks/results/gate_logic[-smoke].{md,json}.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.report import invocation, parser, report_stem, run_facts, write_report
from benchmarks.serving import INTERVAL_NOTE, AfterIdle


def gate_outputs(policy, model_run, images, base_seed: int = 0) -> list[list[tuple]]:
    """For each image, the (logits, features) the backend would answer to each plan the
    policy sends for it, in order: the model run in process on each plan's rows."""
    import numpy as np
    import torch

    from handlers import probe
    from service.gate.cascade import GateRun
    from service.pipeline import request_seed, spec_to_proto

    out = []
    with torch.inference_mode():
        for im in images:
            run = GateRun.start(policy, request_seed(base_seed, im), certify=False)
            answers = []
            while (spec := run.next_plan()) is not None:
                plan = spec_to_proto(spec)
                base = torch.from_numpy(np.asarray(im, dtype=np.float32)[None] / 255.0)
                logits, feats = model_run(probe.expand(base, plan))
                answers.append((logits, feats[0] if plan.return_features else None))
                run = run.feed(*answers[-1])
            run.report()
            out.append(answers)
    return out


def gate_call(policy, images, outputs, base_seed: int = 0) -> Callable[[int], object]:
    """One request's gate, start to report, on the precomputed backend answers."""
    from service.gate.cascade import GateRun
    from service.pipeline import request_seed, spec_to_proto

    def call(i: int) -> object:
        k = i % len(images)
        run = GateRun.start(policy, request_seed(base_seed, images[k]), certify=False)
        for answer in outputs[k]:
            spec_to_proto(run.next_plan())
            run = run.feed(*answer)
        assert run.next_plan() is None, "the policy asked for a probe it did not ask for before"
        return run.report()
    return call


def answer_call(results: list, metrics) -> Callable[[int], object]:
    """One answered request's metrics, response message and bytes."""
    from service import convert
    from service.server import record

    def call(i: int) -> object:
        res = results[i % len(results)]
        record(metrics, res)
        return convert.to_pb(res).SerializeToString()
    return call


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.gate_logic", __doc__)
    p.add_argument("--images", type=int, default=200, help="test images, each one request")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--turn-s", type=float, default=0.1)
    p.add_argument("--idle-ms", type=float, nargs="+", default=[1.0, 2.0, 5.0, 8.0],
                   help="sleeps before each call of the after-idle rows, one set of rows each")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.turns, args.turn_s = 8, 2, 0.01
    import numpy as np

    from benchmarks.serving import Runner, ab_in_turns, every_check_on, like_a_worker
    from model_store import data
    from service.gate.policy_io import policy_from_dict
    from service.metrics import Metrics
    from service.pipeline import ClassifyResult, Timings, top_k
    from service.registry import Registry

    served = Registry.load(args.store, (args.model,), "onnx").get(args.model)
    pol = json.loads((args.store / args.model / "policy.json").read_text())
    every = json.loads(json.dumps(pol))
    every_check_on(every)
    policies = {"cascade": served.policy, "every check": policy_from_dict(every)}
    images = data.load_test().images[: args.images]
    r = Runner(args.store, args.model, "torchscript", all_outputs=True)
    run = lambda x: tuple(t.numpy() for t in r.run(x.to(r.device)))  # noqa: E731
    metrics = Metrics()
    metrics.declare([(served.name, served.policy.version, served.model_sha256, served.policy.mode.value)],
                    {served.backend_name: served.name})
    calls: dict[str, Callable[[int], object] | AfterIdle] = {}
    passes: dict[str, float] = {}
    with like_a_worker():
        outputs = {name: gate_outputs(pol_, run, images) for name, pol_ in policies.items()}
    for name, pol_ in policies.items():
        calls[f"gate logic, {name}"] = gate_call(pol_, images, outputs[name])
        passes[name] = float(np.mean([sum(a[0].shape[0] for a in answers) for answers in outputs[name]]))
    reports = [calls["gate logic, cascade"](k) for k in range(len(images))]
    timings = Timings(decode=0.001, backend=0.002, gate=0.0005, total=0.004)

    def result(k: int, report) -> ClassifyResult:
        logits = outputs["cascade"][k][0][0][0]
        classes = () if report is not None and report.withhold_label else top_k(logits, served.labels, 5)
        return ClassifyResult(f"r{k}", served.name, served.version, classes, report, timings, 1)
    calls["answer, gated (cascade)"] = answer_call([result(k, rep) for k, rep in enumerate(reports)], metrics)
    calls["answer, gate off"] = answer_call([result(k, None) for k in range(len(images))], metrics)
    base = list(calls)
    for c in calls.values():
        for i in range(len(images)):
            c(i)
    idle = {ms: f"after {ms:g} ms idle: " for ms in args.idle_ms}
    for ms, prefix in idle.items():
        for name in base:
            calls[prefix + name] = AfterIdle(ms / 1000, calls[name])
    pairs = {prefix + n: n for prefix in idle.values() for n in base}
    pairs["answer, gated (cascade)"] = "answer, gate off"
    measured, ratio, spread = ab_in_turns(calls, args.turns, args.turn_s, pairs, "gate_logic")
    rows = [{"row": n, "passes": passes.get(n.removeprefix("gate logic, ")), "p50_ms": measured[n].p50_ms,
             "after_idle": [{"idle_ms": ms, "p50_ms": measured[prefix + n].p50_ms,
                             "over_back_to_back": ratio[prefix + n], "interval": list(spread[prefix + n])}
                            for ms, prefix in idle.items()],
             "calls": measured[n].calls + sum(measured[prefix + n].calls for prefix in idle.values())}
            for n in base]
    report = {**run_facts(invocation("benchmarks.gate_logic", argv)), "model": args.model,
              "policy": served.policy.version, "images": args.images, "turns": args.turns, "turn_s": args.turn_s,
              "idle_ms": args.idle_ms, "rows": rows,
              "gated_answer_over_off": ratio["answer, gated (cascade)"],
              "gated_answer_interval": list(spread["answer, gated (cascade)"])}
    write_report(args.out, report_stem("benchmarks.gate_logic", args.smoke), report, render(report))
    return 0


def render(r: dict) -> str:
    lines = [f"# The gateway's own work for the gate, in process ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` (model {r['model']}, policy `{r['policy']}`; {r['images']} test images, "
             f"one request each, the backend's answers computed first; one caller, {r['turns']} turns of "
             f"{r['turn_s']} s per row). \"After N ms idle\": the process sleeps N ms (not timed) before "
             "each call, as the gateway does at one client while TorchServe answers; each cell is the p50 "
             "and its ratio to back to back. " + INTERVAL_NOTE, "",
             "| row | forward passes | back to back p50 ms | "
             + " | ".join(f"after {ms:g} ms idle" for ms in r["idle_ms"]) + " |",
             "|---|---|---|" + "---|" * len(r["idle_ms"])]
    for x in r["rows"]:
        fp = f"{x['passes']:.1f}" if x["passes"] is not None else "–"
        cells = [f"{a['p50_ms']:.3f} ms, {a['over_back_to_back']:.2f}× ({a['interval'][0]:.2f}–{a['interval'][1]:.2f})"
                 for a in x["after_idle"]]
        lines.append(f"| {x['row']} | {fp} | {x['p50_ms']:.3f} | " + " | ".join(cells) + " |")
    lo, hi = r["gated_answer_interval"]
    lines += ["", f"A gated answer against a gate-off one, back to back: {r['gated_answer_over_off']:.2f}× "
              f"({lo:.2f}–{hi:.2f}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
