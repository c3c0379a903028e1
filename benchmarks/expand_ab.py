"""The probe expansion against an earlier revision's, side by side in one process.

    python -m benchmarks.expand_ab --against 74de92c    # ~25 s; on a GPU where torch sees one
    python -m benchmarks.expand_ab --smoke              # seconds (the test suite runs this)

``handlers/probe.py`` as it is ("new") and as it was at ``--against`` ("old", read with
``git show``) expand the first probe of the calibrated gate (cascade) and of every check on,
from the model's own policy, with and without the forward pass and the copy of the logits
to the host that the handler makes; one caller, the rows measured in turns of
``--turn-s`` seconds, so a shared machine's drift falls on each alike. On a GPU the
expansion's kernel launches and host waits, not its arithmetic, are the cost: this measures
a change to them where the serving benchmark, whose rows run minutes apart and through
TorchServe, could not separate it from the machine's drift.

Writes benchmarks/results/expand_ab[-smoke].{md,json}.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from benchmarks.report import REPO, parser, report_stem, run_facts, short_commit, write_report
from benchmarks.serving import INTERVAL_NOTE


def probe_at(rev: str, tmp: Path) -> ModuleType:
    """``handlers/probe.py`` as it was at git revision ``rev``, imported as its own module."""
    try:
        src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:handlers/probe.py"], check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise SystemExit(f"expand_ab: cannot read handlers/probe.py at {rev!r} (a git checkout with that "
                         f"revision is needed): {str(detail).strip()}") from None
    path = tmp / "probe_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("probe_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["probe_old"] = mod  # its dataclasses look their module up while it loads
    spec.loader.exec_module(mod)
    return mod


def first_probes(store: Path, model: str) -> dict[str, object]:
    """The first plan the model's policy sends, as shipped (cascade) and with every check on."""
    from benchmarks.serving import every_check_on
    from handlers import probe
    from service.gate.policy_io import policy_from_dict
    from service.pipeline import spec_to_proto

    pol = json.loads((store / model / "policy.json").read_text())
    plans = {}
    for name, edit in (("cascade", None), ("every check", every_check_on)):
        if edit is not None:
            edit(pol)
        plan = spec_to_proto(policy_from_dict(pol).cheap_plan(0))
        plans[f"{name}, {probe.count_rows(plan)} rows"] = plan
    return plans


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.expand_ab", __doc__)
    # resolved as parsed: the report names the commit measured, and the run reads that one throughout
    p.add_argument("--against", type=short_commit, default="HEAD", help="git revision of the old handlers/probe.py")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--turn-s", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.smoke:
        args.turns, args.turn_s = 2, 0.01
    import numpy as np
    import torch

    from benchmarks.serving import Runner, ab_in_turns, like_a_worker
    from handlers import probe as new
    from model_store import data

    r = Runner(args.store, args.model, "torchscript")  # on the GPU where there is one, as the worker
    images = torch.from_numpy(data.load_test().images[:64].astype(np.float32)[:, None] / 255.0).to(r.device)
    plans = first_probes(args.store, args.model)
    plain = "plain forward, 1 row"

    def name(plan: str, forward: bool, tag: str) -> str:
        return f"{tag}: {plan}" + (", with forward" if forward else "")

    with tempfile.TemporaryDirectory() as tmp:
        old = probe_at(args.against, Path(tmp))

        def call(mod: ModuleType, plan, forward: bool) -> Callable[[int], object]:
            def run(i: int) -> object:
                x = mod.expand(images[i % len(images)], plan)
                return r.run(x) if forward else x.cpu()
            return run

        calls = {name(p, fwd, tag): call(mod, plan, fwd) for p, plan in plans.items()
                 for fwd in (False, True) for tag, mod in (("old", old), ("new", new))}
        calls[plain] = lambda i: r.run(images[i % len(images)][None])
        with like_a_worker():  # the archive's intra-op threads, inference mode
            for c in calls.values():  # warm: allocator, cuDNN's choice, TorchScript's profiling runs
                for i in range(5 if args.smoke else 200):
                    c(i)
            pairs = {name(p, fwd, "new"): name(p, fwd, "old") for p in plans for fwd in (False, True)}
            # each new / old, and how far this run's noise moves it
            measured, ratio, spread = ab_in_turns(calls, args.turns, args.turn_s, pairs, "expand_ab")
    rows = []
    for p in plans:
        for fwd in (False, True):
            o, n = measured[name(p, fwd, "old")], measured[name(p, fwd, "new")]
            rows.append({"plan": p, "forward": fwd, "old_p50_ms": o.p50_ms, "new_p50_ms": n.p50_ms,
                         "new_over_old": ratio[name(p, fwd, "new")], "interval": list(spread[name(p, fwd, "new")]),
                         "calls": o.calls + n.calls})
    command = f"python -m benchmarks.expand_ab --against {args.against}"
    report = {**run_facts(command), "model": args.model, "device": str(r.device), "against": args.against,
              "turns": args.turns, "turn_s": args.turn_s, "rows": rows,
              "plain_forward_p50_ms": measured[plain].p50_ms}
    write_report(args.out, report_stem("benchmarks.expand_ab", args.smoke), report, render(report))
    return 0


def render(r: dict) -> str:
    lines = [f"# Probe expansion, now against {r['against']} ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` (on {r['device']}; one caller, {r['turns']} turns of {r['turn_s']} s "
             "per row). Each call expands the policy's first probe of one test image; \"with forward\" adds "
             "the model and the copy of the logits to the host, as the handler does. " + INTERVAL_NOTE, "",
             "| first probe | with forward | old p50 ms | new p50 ms | new / old |", "|---|---|---|---|---|"]

    def spread(x: dict) -> str:  # reports before the intervals have none
        return f" ({x['interval'][0]:.2f}–{x['interval'][1]:.2f})" if "interval" in x else ""
    lines += [f"| {x['plan']} | {'yes' if x['forward'] else 'no'} | {x['old_p50_ms']:.3f} | {x['new_p50_ms']:.3f} | "
              f"{x['new_over_old']:.2f}{spread(x)} |" for x in r["rows"]]
    lines += ["", f"A plain forward of one image, for scale: {r['plain_forward_p50_ms']:.3f} ms p50.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
