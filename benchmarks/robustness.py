"""Robustness evaluation through the real gateway: writes a Markdown + JSON report and ROC plots.

    python -m benchmarks.robustness                 # full: 2,000 clean, 500 per attack
    python -m benchmarks.robustness --smoke         # seconds: a handful of images

Starts its own TorchServe (free ports) and gateway on the default store (built and
calibrated), then sends clean test images, successful FGSM / PGD / CW attacks at several
eps (as float tensors, and FGSM / PGD again in whole grey levels as a PNG would carry them,
each pixel's move rounded toward zero so they stay within eps, where they still succeed), rotations and shifts beyond the training augmentation, natural
corruptions (Gaussian noise, blur, JPEG sent as JPEG files), a sticker patch, tile-shuffled
images and MNIST digits (out of distribution).
Reports per set and per check: each check's flag rate at its calibrated thresholds (and on
clean images), ROC-AUC; the combined gate's flag and reject rates; for shifted and corrupted
images, the model's error on them and the gate's flags split by it; certified accuracy at
radii 0..1 with the samples it took; and, named as such, the feature-squeezing paper's
published detection rates beside the attack rows of the same table.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.report import invocation, parser, report_stem, run_facts, write_report


# Xu, Evans, Qi, NDSS 2018, Table 4 (MNIST, joint detection at the paper's own FPR ~4 %):
# published figures for reference only; their model, data set and attacks differ.
PAPER = {"FGSM": 0.46, "BIM": 0.91, "CW L2": 1.0}
#: The paper's attack each of our sets compares with (by the set name's first word).
PAPER_ROW = {"fgsm": "FGSM", "pgd": "BIM", "cw": "CW L2"}


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.robustness", __doc__)
    p.add_argument("--clean", type=int, default=2000)
    p.add_argument("--attacked", type=int, default=500, help="images attacked per attack")
    p.add_argument("--certify", type=int, default=100, help="images certified through the gateway")
    p.add_argument("--certify-in-process", type=int, default=100,
                   help="images certified in process with a large budget (--certify-samples; the papers use 100,000)")
    p.add_argument("--certify-samples", type=int, default=10_000)
    args = p.parse_args(argv)
    if args.smoke:
        args.clean, args.attacked, args.certify = 40, 20, 4
        args.certify_in_process, args.certify_samples = 2, 200

    from benchmarks import efficacy as ef
    from model_store import data, serve
    from service.client import Client
    from tests.test_gateway import start_gateway, stop

    ds = data.load()
    test = ds.test
    tmp = Path(tempfile.mkdtemp(prefix="rg-robustness-"))
    settings = serve.ServeSettings.on_free_ports(
        store=args.store, run_dir=tmp / "ts", models=(f"{args.model}-torchscript", f"{args.model}-onnx"))
    policy = json.loads((args.store / args.model / "policy.json").read_text())
    t_start = time.perf_counter()
    with serve.start(settings) as ts:
        proc, address = start_gateway(args.store, ts, tmp)
        try:
            with Client(address) as client:
                results = evaluate(client, ef, test, args, args.store, args.model, policy["noise"])
        finally:
            stop(proc)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results.update(run_facts(invocation("benchmarks.robustness", argv)))
    results["policy_version"] = policy["version"]
    results["flag_rate_target"] = policy["calibration"].get("flag_rate_target")
    stem = report_stem("benchmarks.robustness", args.smoke)
    write_report(args.out, stem, results, render(results))
    plot_roc(results, args.out / f"{stem}-roc.png")
    shutil.rmtree(tmp, ignore_errors=True)  # kept, with TorchServe's and the gateway's logs, when the run failed
    return 0


def evaluate(client, ef, test, args, store: Path, model: str, noise: dict) -> dict:
    """noise: the served policy's noise settings (its sigma and alpha certify in process too)."""
    clean_resp = ef.classify_all(client, test.images[: args.clean], model)
    clean = ef.Outcome.of(clean_resp)
    net = ef.load_attack_model(store, model)
    base = test.images[args.clean : args.clean + args.attacked]
    labels = test.labels[args.clean : args.clean + args.attacked]
    sets: dict[str, np.ndarray | list[bytes]] = {}
    for name, eps in (("fgsm", 0.03), ("fgsm", 0.1), ("pgd", 0.03), ("pgd", 0.1), ("cw", 1.0)):
        adv, idx = ef.attack(net, name, eps, base, labels)
        sets[f"{name} eps={eps:g}" if name != "cw" else "cw L2 (c=1)"] = adv
        if name != "cw":  # as a client sending PNG would: whole grey levels within eps, still successful
            sets[f"{name} eps={eps:g}, 8-bit"] = ef.as_8bit(net, adv, labels[idx], base[idx])
    # Shifts and natural corruptions of the same images: labels known, the model not always wrong.
    shifted = {
        "rotate 40°": ef.rotate(base, 40),
        "rotate 20°": ef.rotate(base, 20),
        "shift 4 px": ef.shift(base, 4),
        "tile shuffle 2x2": ef.tile_shuffle(base),
        "gaussian noise 0.1": np.clip(base / 255.0 + np.random.default_rng(0).normal(0, 0.1, base.shape),
                                      0, 1).astype(np.float32)[:, None],
        "gaussian blur 1 px": ef.blur(base, 1.0),
        "JPEG quality 25 (sent as JPEG)": ef.jpeg(base, 25),
        "patch 8x8": ef.patch(base),
    }
    sets.update(shifted)
    sets["mnist digits (OOD)"] = ef.mnist_digits(len(base))
    logits = ef.onnx_logits(store, model)
    rows = []
    roc: dict[str, dict[str, list[float]]] = {}
    for name, images in sets.items():
        resp = ef.classify_all(client, images, model) if len(images) else []
        if not resp:
            rows.append({"set": name, "n": 0})
            continue
        out = ef.Outcome.of(resp)
        per_check = {}
        for check, s in out.scores.items():
            if check in clean.scores:
                per_check[check] = {"auc": ef.auc(clean.scores[check], s),
                                    "flagged": out.check_flagged.get(check, 0.0)}
        row = {"set": name, "n": out.n, "flagged": out.flagged, "rejected": out.rejected,
               "mean_forward_passes": float(out.passes.mean()), "checks": per_check}
        if name in shifted:  # what the gate does with the images the model gets wrong, and right
            wrong = logits(ef.as_pixels(images)).argmax(1) != labels
            flagged = np.isin([r.gate.policy_decision for r in resp], ef.FLAGGED)
            row.update(model_wrong=float(wrong.mean()),
                       flagged_where_wrong=float(flagged[wrong].mean()) if wrong.any() else None,
                       flagged_where_right=float(flagged[~wrong].mean()) if (~wrong).any() else None)
        rows.append(row)
        roc[name] = {c: s.tolist() for c, s in out.scores.items()}
    # Certified images come after the clean and attacked ones; both rows certify the first of
    # them, with the sigma and alpha of the policy the gateway serves.
    first = args.clean + args.attacked
    cert_imgs, cert_labels = test.images[first : first + args.certify], test.labels[first : first + args.certify]
    cert = ef.classify_all(client, cert_imgs, model, certify=True)
    radii = (0.0, 0.25, 0.5, 0.75, 1.0)
    sigma, alpha = float(noise["sigma"]), float(noise["alpha"])
    k = args.certify_in_process
    n0 = 100
    offline = ef.certify_in_process(ef.onnx_logits(store, model), test.images[first : first + k],
                                    test.labels[first : first + k], sigma, radii, n0=n0,
                                    n=args.certify_samples, alpha=alpha)
    return {
        "clean": {"n": clean.n, "flagged": clean.flagged, "rejected": clean.rejected,
                  "mean_forward_passes": float(clean.passes.mean()), "checks_flagged": clean.check_flagged,
                  "accuracy": float(np.mean([bool(r.classes) and r.classes[0].index == y
                                             for r, y in zip(clean_resp, test.labels)]))},
        "sets": rows,
        "certified": {"n": len(cert), "accuracy": {str(r): a for r, a in ef.certified_accuracy(
                          cert, cert_labels, radii, base_top1=logits(ef.as_pixels(cert_imgs)).argmax(1)).items()},
                      "mean_forward_passes": float(np.mean([r.gate.forward_passes for r in cert]))},
        "certified_in_process": {"n": k, "samples": args.certify_samples, "selection_samples": n0,
                                 "alpha": alpha, "sigma": sigma,
                                 "accuracy": {str(r): a for r, a in offline.items()}},
        "roc_scores": {"clean": {c: s.tolist() for c, s in clean.scores.items()}, **roc},
    }


def _share(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f} %"


def render(r: dict) -> str:
    c = r["clean"]
    clean_checks = ", ".join(f"{k} {100 * v:.1f} %" for k, v in c.get("checks_flagged", {}).items())
    lines = [f"# Robustness evaluation ({r.get('date')}, {r.get('machine')})", "",
             f"Policy `{r.get('policy_version')}`; calibrated clean flag rate target {r.get('flag_rate_target')}.",
             f"Reproduce: `{r.get('command', 'python -m benchmarks.robustness')}` ({r.get('seconds')} s).", "",
             f"Clean test images: {c['n']}, realised flag rate **{100 * c['flagged']:.1f} %**, reject "
             f"{100 * c['rejected']:.1f} %, top-1 accuracy of answers {100 * c['accuracy']:.1f} %, "
             f"{c['mean_forward_passes']:.1f} forward passes per image."
             + (f" Each check alone at its calibrated thresholds flags {clean_checks} of them." if clean_checks else ""),
             "",
             "Attacks count only where they succeed, so the model is wrong on all of them; the 8-bit rows are "
             "the same attacks in whole grey levels, as a PNG carries them, each pixel's move rounded toward "
             "the clean image so that it stays within eps. For shifted and "
             "corrupted images, \"model wrong\" is the served model's top-1 error on them (in process) and "
             "the next two columns split the gate's flags by it. Per check: the share each check alone "
             "flags at its calibrated thresholds, then its ROC-AUC against the clean images.", "",
             "| input set | n | model wrong | flagged (FLAG or REJECT) | flagged where wrong / right | rejected "
             "| passes | per check: flagged, AUC | published: feature squeezing on MNIST (Xu et al. 2018) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["sets"]:
        key = PAPER_ROW.get(row["set"].split()[0])
        paper = f"{100 * PAPER[key]:.0f} % ({key})" if key else "–"
        if not row["n"]:
            lines.append(f"| {row['set']} | 0 | - | - | - | - | - | - | {paper} |")
            continue
        checks = ", ".join(f"{k} {_share(v.get('flagged'))} {v['auc']:.2f}" for k, v in row["checks"].items())
        if "model_wrong" in row:
            wrong = _share(row["model_wrong"])
            split = f"{_share(row['flagged_where_wrong'])} / {_share(row['flagged_where_right'])}"
        else:
            wrong = "all" if key else "–"
            split = "–"
        lines.append(f"| {row['set']} | {row['n']} | {wrong} | {100 * row['flagged']:.1f} % | {split} | "
                     f"{100 * row['rejected']:.1f} % | {row['mean_forward_passes']:.1f} | {checks} | {paper} |")
    cert, off = r["certified"], r.get("certified_in_process")

    def shares(n: int, accuracy: dict) -> str:  # no images (--certify 0): say so, not "nan %"
        return " | ".join(f"{100 * v:.1f} %" if n else "not run" for v in accuracy.values())

    passes = f"{cert['mean_forward_passes']:.0f} forward passes on average" if cert["n"] else "not run"
    noise = f"sigma {off['sigma']:g}, alpha {off['alpha']:g}" if off else "alpha 0.001"
    lines += ["", f"Certified accuracy (randomized smoothing, {noise}; the gateway's policy):", "",
              "| | n | " + " | ".join(f"radius {k}" for k in cert["accuracy"]) + " |",
              "|---|---|" + "---|" * len(cert["accuracy"]),
              f"| through the gateway (`certify: true`, {passes}) | {cert['n']} | "
              + shares(cert["n"], cert["accuracy"]) + " |"]
    if off:
        lines.append(f"| in process, CERTIFY of Cohen et al. ({off['selection_samples']} + {off['samples']:,} "
                     f"samples) | {off['n']} | " + shares(off["n"], off["accuracy"]) + " |")
    lines += ["",
              "The last column is for comparison only: the feature-squeezing paper's published "
              "detection rates on MNIST (Xu, Evans, Qi, NDSS 2018), a different model, data set and "
              "attack settings (its own eps and attack parameters; BIM is its iterative L-inf attack, "
              "the nearest to PGD), at the paper's own clean rate of about 4 %."]
    return "\n".join(lines) + "\n"


def plot_roc(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    clean = r["roc_scores"]["clean"]
    sets = [k for k in r["roc_scores"] if k != "clean"]
    checks = sorted(clean)
    fig, axes = plt.subplots(1, len(checks), figsize=(4.2 * len(checks), 4), squeeze=False)
    colours = plt.get_cmap("tab20")(np.arange(len(sets)) % 20)  # one colour a set, up to 20
    for ax, check in zip(axes[0], checks):
        for name, colour in zip(sets, colours):
            s = r["roc_scores"][name].get(check)
            if not s:
                continue
            y = np.r_[np.zeros(len(clean[check])), np.ones(len(s))]
            fpr, tpr, _ = roc_curve(y, np.r_[clean[check], s])
            attack = name.split()[0] in PAPER_ROW  # attacks solid, shifts and corruptions dashed
            ax.plot(fpr, tpr, label=name, lw=1, color=colour, ls="-" if attack else "--")
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set_title(f"{check}")
        ax.set_xlabel("clean flag rate")
        ax.set_ylabel("detection rate")
    axes[0][-1].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
