"""What the squeeze detector's context buys, and what neither a bigger budget nor a nonlinear
detector would: the calibration's own fit and allocation, redone in process for variants.

The shipped gate (``service.calibration``) fits the squeeze detector on clean part-A
calibration images against successful reference FGSM/PGD on part B, then allocates one clean
flag budget (5 %, lowered to hold it with 95 % confidence) among squeeze, viewpoint and
density so that the union catches the most of the reference sets, each set weighing the
same (four attack sets, two 40-degree rotations, one tile shuffle). This study repeats that
in process, on the served model's TorchScript export and the handler's own variant code
(:func:`handlers.probe.expand`), with the served policy's references and probe, for:

- squeeze measurements only (the detector before it read context);
- with context (:data:`service.gate.squeeze_detector.CONTEXT_FEATURES`: the views and the
  density distance);
- with context and jitter (:data:`~service.gate.squeeze_detector.JITTER_FEATURES`: four
  copies with Gaussian noise of sigma 0.03), as a logistic regression (shipped until
  2026-12-04) and with a hidden layer of 32 tanh units (shipped: ``DEFAULT_HIDDEN``);
- each again with the whole budget aimed at the attacks (the shifted sets weigh nothing);
- with context and jitter, a gradient-boosted classifier (scikit-learn) in place of the
  detector's own fit (its decision values ranked the same way);
- the shipped form fitted on the shifted reference sets (40-degree rotations, tile
  shuffles) as well as on the attacks, each set weighing the same: one detector for both,
  its features already holding the density distance and the views' moves.

Each is measured on test images the fits never saw: clean images, and FGSM / PGD (the
calibration's own attack code, float pixels, as the robustness report sends them), 40-degree
rotations, 2x2 tile shuffles and MNIST digits made from other test images.

``--jitter COUNTxSIGMA ...`` sweeps the jitter copies instead: for each setting the probe
sends that many copies at that sigma (to every image, fitted and measured alike), and the
shipped form is fitted and allocated as calibration would, with the budget shared and with
all of it on the attacks; the report is ``detector_study-jitter``.

    python -m benchmarks.detector_study            # ~4 min on 2 cores
    python -m benchmarks.detector_study --jitter 4x0.015 4x0.03 4x0.06 8x0.03   # ~22 min
    python -m benchmarks.detector_study --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.efficacy import mnist_digits
from benchmarks.report import parser, report_stem, run_facts, study_command, write_report
from handlers.probe import expand
from model_store import data
from service import perturb
from service.calibration import reference_attacks, reference_shifts
from service.gate.allocation import allocate
from service.gate.calibrate import DEFAULT_CONFIDENCE, DEFAULT_FLAG_RATE, rate_with_confidence
from service.gate.checks import Check
from service.gate.engine import RawScores, detector_input, raw_scores
from service.gate.plan import NoiseSpec
from service.gate.policy_io import load_policy
from service.gate.defaults import DEFAULT_JITTER, DEFAULT_VIEWS
from service.gate.squeeze_detector import (
    CONTEXT_FEATURES, DEFAULT_HIDDEN, JITTER_FEATURES, fit_squeeze_detector,
)
from service.pipeline import request_seed, spec_to_proto

CHECKS = (Check.SQUEEZE, Check.VIEWPOINT, Check.DENSITY)
ATTACK_SETS = ("fgsm@0.03", "fgsm@0.1", "pgd@0.03", "pgd@0.1")
Fitter = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple[str, ...], NoiseSpec],
                  Callable[[np.ndarray], np.ndarray]]
JITTER = CONTEXT_FEATURES + JITTER_FEATURES


@dataclass(frozen=True)
class Variant:
    name: str
    context: tuple[str, ...]
    attacks_only: bool = False
    fitter: str = "logistic"
    shifts_too: bool = False
    """Fit the detector on the shifted reference sets (rotations, shuffles) as well as on the
    attacks, so that one check can watch both."""


LAYER = f"{DEFAULT_HIDDEN} tanh units"
VARIANTS = (
    Variant("squeeze measurements only", context=()),
    Variant("with context", context=CONTEXT_FEATURES),
    Variant("with context and jitter, logistic", context=JITTER),
    Variant(f"with context and jitter, {LAYER} (shipped)", context=JITTER, fitter="hidden"),
    Variant("squeeze only, whole budget on attacks", context=(), attacks_only=True),
    Variant("with context, whole budget on attacks", context=CONTEXT_FEATURES, attacks_only=True),
    Variant("with context and jitter, logistic, whole budget on attacks", context=JITTER,
            attacks_only=True),
    Variant(f"with context and jitter, {LAYER}, whole budget on attacks", context=JITTER,
            attacks_only=True, fitter="hidden"),
    Variant("with context and jitter, gradient boosting", context=JITTER, fitter="gbm"),
    Variant(f"with context and jitter, {LAYER}, fitted on shifts too", context=JITTER, fitter="hidden",
            shifts_too=True),
)
#: What ``--jitter`` measures for each setting: the shipped form, budget shared and all on attacks.
SWEEP_VARIANTS = (
    Variant(f"{LAYER} (shipped form)", context=JITTER, fitter="hidden"),
    Variant(f"{LAYER}, whole budget on attacks", context=JITTER, attacks_only=True, fitter="hidden"),
)


def _own(hidden: int) -> Fitter:
    """The detector's own fit, as calibration runs it (hidden 0: logistic regression)."""
    def fit(clean: np.ndarray, attacked: np.ndarray, weights: np.ndarray, context: tuple[str, ...],
            jitter: NoiseSpec):
        copies = (jitter.count, jitter.sigma) if JITTER_FEATURES[0] in context else (0, 0.0)
        views = len(DEFAULT_VIEWS) if context else 0
        return fit_squeeze_detector(clean, attacked, weights, context=context, views=views,
                                    jitter=copies, hidden=hidden).decision
    return fit


def _gbm(clean: np.ndarray, attacked: np.ndarray, weights: np.ndarray, context: tuple[str, ...],
         jitter: NoiseSpec):
    from sklearn.ensemble import HistGradientBoostingClassifier

    mean, scale = clean.mean(0), clean.std(0) + 1e-12
    x = (np.vstack([clean, attacked]) - mean) / scale
    y = np.r_[np.zeros(len(clean)), np.ones(len(attacked))]
    # clean and attacked weigh half each, as in the detector's own fit
    w = np.r_[np.full(len(clean), 0.5 / len(clean)), 0.5 * weights / weights.sum()]
    m = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=0)
    m.fit(x, y, sample_weight=w * len(x))
    return lambda f: m.predict_proba((f - mean) / scale)[:, 1]


FITTERS: dict[str, Fitter] = {"logistic": _own(0), "hidden": _own(DEFAULT_HIDDEN), "gbm": _gbm}


class Prober:
    """The cheap probe of the served policy, in process: raw scores per image (with the
    default jitter copies where the policy sends none, so every variant can be measured).
    Each image gets a plan as the gateway (and calibration) would send it: its own seed, so
    its own draw of the jitter copies (:func:`service.pipeline.request_seed` keyed by 0, the
    key of a gateway run with ``--seed 0``; as shipped a gateway draws a secret one).
    ``jitter``: these copies instead of the policy's (or the default's)."""

    def __init__(self, store: Path, model: str, jitter: NoiseSpec | None = None) -> None:
        self.policy = load_policy(store / model / "policy.json")
        spec = self.policy.cheap_plan(0)
        if jitter is None:
            jitter = spec.jitter if spec.jitter.count else DEFAULT_JITTER
        self.spec = replace(spec, jitter=jitter)
        self.ts = torch.jit.load(str(store / model / "model.pt")).eval()

    def plan(self, image: np.ndarray):  # -> probe_pb2.ProbePlan
        """The plan for one image as the gateway decodes it (uint8 [H, W] or float32 [1, H, W])."""
        return spec_to_proto(self.spec.with_seed(request_seed(0, image)))

    def __call__(self, images: np.ndarray) -> list[RawScores]:
        """images: uint8 [N, H, W] or float32 [N, 1, H, W] in [0, 1]."""
        x = torch.from_numpy(images) if images.dtype == np.float32 else data.to_tensor(images)
        out: list[RawScores] = []
        with torch.inference_mode():
            for i in range(0, len(x), 128):
                xb = x[i:i + 128]
                plans = [self.plan(im) for im in images[i:i + 128]]
                logits, feats = self.ts(torch.cat([expand(im, plan) for im, plan in zip(xb, plans)]))
                logits = logits.reshape(len(xb), self.spec.rows, -1).numpy()
                feats = feats.reshape(len(xb), self.spec.rows, -1)[:, 0].numpy()
                out += [raw_scores(l, f, self.spec, self.policy.references.density)
                        for l, f in zip(logits, feats)]
        return out


def _features(raws: list[RawScores], context: tuple[str, ...]) -> np.ndarray:
    return np.array([detector_input(r, context) for r in raws])


def run(store: Path, model: str, calib_images: int | None, attack_images: int, test_clean: int,
        seed: int = 0, jitters: Sequence[NoiseSpec] = ()) -> dict:
    """The study's rows: :data:`VARIANTS` on the policy's own probe, or with ``jitters``
    :data:`SWEEP_VARIANTS` once per jitter setting, every setting on the same images."""
    t0 = time.perf_counter()
    card = json.loads((store / model / "card.json").read_text())
    ds = data.load(seed=card["data"].get("split_seed", 0))
    calib, test = ds.calib, ds.test
    n = len(calib) if calib_images is None else min(calib_images, len(calib))
    half = n // 2
    if len(test) < test_clean + attack_images:
        raise SystemExit(f"need {test_clean + attack_images} test images, the data set has {len(test)}")
    model_path = store / model / "model.pt"
    b_img, b_lab = calib.images[half:n][:1000], calib.labels[half:n][:1000]
    ref_images = {k: v.astype(np.float32) for k, v in
                  reference_attacks(model_path, b_img, b_lab, seed=seed).items() if len(v)}
    ref_images.update(reference_shifts(b_img, seed))
    t_img = test.images[test_clean:test_clean + attack_images]
    t_lab = test.labels[test_clean:test_clean + attack_images]
    measured_images = {"clean test images": test.images[:test_clean],
                       **{k: v.astype(np.float32) for k, v in
                          reference_attacks(model_path, t_img, t_lab, seed=seed + 1).items() if len(v)},
                       "rotate 40°": perturb.rotate(t_img, 40),
                       "tile shuffle 2x2": perturb.tile_shuffle(t_img, 2, seed=seed + 1),
                       "mnist digits (OOD)": mnist_digits(attack_images)}
    rate = rate_with_confidence(DEFAULT_FLAG_RATE, n - half, DEFAULT_CONFIDENCE)
    rows = []
    for jitter in jitters or (None,):
        probe = Prober(store, model, jitter)
        part_a, part_b = probe(calib.images[:half]), probe(calib.images[half:n])
        ref = {k: probe(v) for k, v in ref_images.items()}
        measured = {k: probe(v) for k, v in measured_images.items()}
        for v in SWEEP_VARIANTS if jitters else VARIANTS:
            row = _row(v, probe.spec.jitter, part_a, part_b, ref, measured, rate)
            if jitters:
                row["jitter"] = {"count": probe.spec.jitter.count, "sigma": probe.spec.jitter.sigma}
            rows.append(row)
    return {"model": model, "calibration_images": n, "flag_rate_calibrated": rate,
            "reference_sets": {k: len(r) for k, r in ref_images.items()},
            "measured_sets": {k: len(r) for k, r in measured_images.items()},
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}


def _row(v: Variant, jitter: NoiseSpec, part_a: list[RawScores], part_b: list[RawScores],
         ref: dict[str, list[RawScores]], measured: dict[str, list[RawScores]], rate: float) -> dict:
    """One variant fitted on part A against the reference sets, its thresholds allocated on
    part B, and the share of each measured set it flags."""
    is_attack = {k: k in ATTACK_SETS for k in ref}
    att = [k for k in ref if is_attack[k] or v.shifts_too]
    w_att = np.concatenate([np.full(len(ref[k]), 1.0 / len(ref[k])) for k in att])
    decide = FITTERS[v.fitter](_features(part_a, v.context),
                               np.concatenate([_features(ref[k], v.context) for k in att]), w_att,
                               v.context, jitter)

    def scores(raws: list[RawScores]) -> dict[Check, np.ndarray]:
        return {Check.SQUEEZE: np.asarray(decide(_features(raws, v.context)), dtype=np.float64),
                Check.VIEWPOINT: np.array([r.viewpoint for r in raws]),
                Check.DENSITY: np.array([r.density for r in raws])}

    ref_scores = {k: scores(r) for k, r in ref.items()}
    set_weight = {k: 1.0 if is_attack[k] or not v.attacks_only else 1e-9 for k in ref}
    alloc = allocate(scores(part_b), {c: np.concatenate([s[c] for s in ref_scores.values()]) for c in CHECKS},
                     rate, weights=np.concatenate([np.full(len(ref[k]), set_weight[k] / len(ref[k]))
                                                   for k in ref]))
    flagged = {}
    for name, raws in measured.items():
        s = scores(raws)
        hit = np.zeros(len(raws), dtype=bool)
        for c, t in alloc.thresholds.items():
            if t is not None:
                hit |= s[c] > t
        flagged[name] = float(hit.mean())
    return {"variant": v.name, "flagged": flagged, "budget": {c.value: alloc.rates[c] for c in CHECKS}}


def render(r: dict, command: str) -> str:
    sets = list(r["measured_sets"])
    when = f" ({r['date']}, {r['machine']})" if "date" in r else ""  # reports before 2026-12-07 lack it
    lines = [
        f"# The squeeze detector's context, budget and form, side by side (in process){when}", "",
        f"`{command}` ({r['seconds']:.0f} s). Model {r['model']}; fits on {r['calibration_images'] // 2} "
        f"clean calibration images against the reference attacks, thresholds allocated at a "
        f"{100 * r['flag_rate_calibrated']:.2f} % clean rate on {r['calibration_images'] - r['calibration_images'] // 2} "
        f"others (reference sets: {', '.join(f'{k} {n}' for k, n in r['reference_sets'].items())}). "
        "Share of each test set flagged (test attacks counted where they succeed):", "",
        "| variant | " + " | ".join(f"{k} (n {r['measured_sets'][k]})" for k in sets)
        + " | budget squeeze / viewpoint / density |",
        "|---|" + "---|" * (len(sets) + 1)]
    for row in r["rows"]:
        b = row["budget"]
        name = row["variant"]
        if "jitter" in row:
            name = f"jitter {row['jitter']['count']} × σ {row['jitter']['sigma']:g}, {name}"
        lines.append(f"| {name} | " + " | ".join(f"{100 * row['flagged'][k]:.1f} %" for k in sets)
                     + f" | {100 * b['squeeze']:.2f} / {100 * b['viewpoint']:.2f} / {100 * b['density']:.2f} % |")
    lines += ["", "The clean column should stay near the calibrated rate. 'Whole budget on attacks' "
              "shows the ceiling of each detector within one clean budget, and what the shifted sets "
              "lose for it."]
    if any("jitter" in row for row in r["rows"]):
        lines += ["", "Each jitter setting is the probe's jitter section for every image, the fits' and "
                  "the allocation's as well as the measured sets'; the cheap probe grows by a row per "
                  "copy (the shipped 4 copies: 14 forward passes per image)."]
    return "\n".join(lines + [""])


def jitter_setting(text: str) -> NoiseSpec:
    """``COUNTxSIGMA`` (e.g. ``4x0.03``): that many jitter copies at that sigma."""
    count, sep, sigma = text.partition("x")
    try:
        spec = NoiseSpec(sigma=float(sigma), count=int(count))
    except ValueError:
        spec = None
    if not sep or spec is None or not 1 <= spec.count <= 64 or not 0 < spec.sigma <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want COUNTxSIGMA, 1 <= COUNT <= 64, 0 < SIGMA <= 1")
    return spec


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.detector_study", __doc__)
    p.add_argument("--calibration-images", type=int, help="calibration images (default: all, as calibration)")
    p.add_argument("--attack-images", type=int, default=4000, help="test images attacked (and shifted) per set")
    p.add_argument("--clean", type=int, default=4000, help="clean test images")
    p.add_argument("--jitter", type=jitter_setting, nargs="+", default=[], metavar="COUNTxSIGMA",
                   help="sweep the jitter copies (e.g. 4x0.015 4x0.03 8x0.03): the shipped form at each")
    args = p.parse_args(argv)
    if args.smoke:
        args.calibration_images, args.attack_images, args.clean = 600, 150, 150
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    result = run(args.store, args.model, args.calibration_images, args.attack_images, args.clean,
                 jitters=args.jitter)
    module = "benchmarks.detector_study"
    command = study_command(module, args)
    stem = report_stem(module, args.smoke)
    if args.jitter:
        command += " --jitter " + " ".join(f"{j.count}x{j.sigma:g}" for j in args.jitter)
        stem = stem.replace("detector_study", "detector_study-jitter")
    result = {**run_facts(command), **result}
    write_report(args.out, stem, result, render(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
