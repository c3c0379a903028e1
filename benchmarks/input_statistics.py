"""Why the gate reads the model's answers, not the pixels: an input-statistics detector
against the squeeze detector, both fitted the same way, in process.

Feature squeezing also changes the *input*: bit-depth reduction removes whatever sits
between the grid's levels. On Fashion-MNIST that residual alone separates L-inf attacks from
clean images almost perfectly, because clean backgrounds are exactly 0 and an attack moves
them to eps. Detectors of input statistics have a history here (Hendrycks and Gimpel 2017,
PCA of the input); Carlini and Wagner (AISec 2017, "Adversarial examples are not easily
detected") traced their success on MNIST to its zero border. This study measures the price
on clean images a production client may send: the same garments JPEG-compressed or with
slight sensor noise.

All three detectors are the gate's own fit
(:func:`service.gate.squeeze_detector.fit_squeeze_detector`: a logistic regression for the
first two, with the shipped hidden layer for the third), fitted on calibration images
against the calibration's reference FGSM/PGD (:func:`service.calibration.reference_attacks`),
thresholded at the 95 % quantile of held-out clean calibration images, and measured on test
images and on attacks made from test images. Squeezes use the handler's own
:func:`handlers.probe.bit_depth`; images are 8-bit, as a PNG carries them (attacks in whole
grey levels within their eps, :func:`attacks_8bit`). The third column
is the squeeze detector as shipped: the same squeeze measurements plus the context and the
jitter copies it reads, through its hidden layer
(:data:`service.gate.squeeze_detector.JITTER_FEATURES`), measured on
the served policy's cheap probe (:class:`benchmarks.detector_study.Prober`), since faint
noise probes the model near the image and a JPEG or a noisy photo is near another image.

    python -m benchmarks.input_statistics            # ~2 min on 2 cores
    python -m benchmarks.input_statistics --smoke    # seconds, for the test suite
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.detector_study import JITTER, Prober
from benchmarks.efficacy import as_8bit
from benchmarks.report import parser, report_stem, run_facts, study_command, write_report
from handlers.probe import bit_depth
from model_store import data
from service.calibration import reference_attacks
from service.decode import InputSpec, Limits, decode_image
from service.gate.defaults import DEFAULT_BIT_DEPTHS
from service.gate.engine import detector_input
from service.gate.squeeze_detector import DEFAULT_HIDDEN, fit_squeeze_detector, measure_squeeze

FLAG_RATE = 0.05
JPEG_QUALITIES = (95, 85, 75)
NOISE_SIGMA = 0.02


def attacks_8bit(attacks: dict[str, np.ndarray], pool: np.ndarray, labels: np.ndarray,
                 net) -> dict[str, np.ndarray]:
    """Each set of successful attacks ("fgsm@0.03": float [M, 1, H, W]) on images of ``pool``
    (uint8 [N, H, W], ``labels`` [N]) in whole grey levels within its eps, as a PNG client
    can send them (:func:`benchmarks.efficacy.as_8bit`), keeping those that still fool ``net``.
    Each attack's source image is the pool image within eps of it."""
    ref = pool.astype(np.float32) / 255.0
    out = {}
    for name, adv in attacks.items():
        eps = float(name.split("@")[1])
        src = []
        for a in adv[:, 0]:
            d = np.abs(ref - a).max(axis=(1, 2))
            j = int(np.argmin(d))
            if d[j] > eps + 1e-4:
                raise RuntimeError(f"{name}: an attacked image has no source within eps in the pool")
            src.append(j)
        src_idx = np.array(src, dtype=np.int64)
        out[name] = as_8bit(net, adv, labels[src_idx], pool[src_idx]) if len(adv) else adv[:, 0].astype(np.uint8)
    return out


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float [N, 1, H, W] in [0, 1] -> uint8 [N, H, W], as a PNG would carry it."""
    return np.round(np.clip(x[:, 0], 0, 1) * 255).astype(np.uint8)


def jpeg(images: np.ndarray, quality: int, spec: InputSpec) -> np.ndarray:
    """uint8 [N, H, W] encoded as JPEG at ``quality`` and decoded by the gateway's decoder."""
    out = []
    for im in images:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(decode_image(buf.getvalue(), spec, Limits())[0])
    return np.stack(out)


class Features:
    """The detectors' features of uint8 [N, H, W] images, from the served TorchScript model."""

    def __init__(self, store: Path, model: str) -> None:
        self.prober = Prober(store, model)
        self.ts = self.prober.ts  # one load of the served model for both

    def _logits(self, x: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([self.ts(x[i:i + 1024])[0] for i in range(0, len(x), 1024)]
                             ).numpy().astype(np.float64)

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(squeeze detector features [N, 2S+1], input residual features [N, S], the shipped
        detector's features [N, 2S+1+7])."""
        x = data.to_tensor(images)
        base = self._logits(x)
        squeezed = np.stack([self._logits(bit_depth(x, b)) for b in DEFAULT_BIT_DEPTHS], axis=1)
        logit = np.stack([measure_squeeze(b, s).features() for b, s in zip(base, squeezed)])
        residual = np.stack([np.log((x - bit_depth(x, b)).abs().mean(dim=(1, 2, 3)).numpy()
                                    .astype(np.float64) + 1e-4) for b in DEFAULT_BIT_DEPTHS],
                            axis=1)
        shipped = np.array([detector_input(r, JITTER) for r in self.prober(images)])
        return logit, residual, shipped


def run(store: Path, model: str, clean: int, attack_images: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    card = json.loads((store / model / "card.json").read_text())
    ds = data.load(seed=card["data"].get("split_seed", 0))
    calib, test = ds.calib, ds.test
    if len(calib) < 2 * clean + attack_images or len(test) < clean + attack_images:
        raise SystemExit(f"need {2 * clean + attack_images} calibration and {clean + attack_images} "
                         f"test images, the data set has {len(calib)} and {len(test)}")
    model_path = store / model / "model.pt"
    feats = Features(store, model)
    lo = 2 * clean  # attacks come from images the clean sets do not hold
    cal_attacks = reference_attacks(model_path, calib.images[lo:lo + attack_images],
                                    calib.labels[lo:lo + attack_images], seed=seed)
    test_attacks = reference_attacks(model_path, test.images[clean:clean + attack_images],
                                     test.labels[clean:clean + attack_images], seed=seed + 1)
    rng = np.random.default_rng(seed)
    test_clean = test.images[:clean]
    noisy = to_uint8((test_clean / 255.0 + NOISE_SIGMA * rng.standard_normal(
        test_clean.shape))[:, None])
    clean_sets = {"clean test images (PNG)": test_clean,
                  **{f"clean, JPEG quality {q}": jpeg(test_clean, q, InputSpec.from_card(card))
                     for q in JPEG_QUALITIES},
                  f"clean, Gaussian noise sigma {NOISE_SIGMA:g}": noisy}
    fit_a, fit_b = feats(calib.images[:clean]), feats(calib.images[clean:lo])
    def net(x: torch.Tensor) -> torch.Tensor:
        return feats.ts(x)[0]

    cal_8bit = attacks_8bit(cal_attacks, calib.images[lo:lo + attack_images], calib.labels[lo:lo + attack_images], net)
    test_8bit = attacks_8bit(test_attacks, test.images[clean:clean + attack_images],
                             test.labels[clean:clean + attack_images], net)
    cal = {k: feats(v) for k, v in cal_8bit.items() if len(v)}
    measured = {**{k: feats(v) for k, v in clean_sets.items()},
                **{f"{k} (test, {len(v)} succeeded in 8 bits within eps)": feats(v)
                   for k, v in test_8bit.items() if len(v)}}
    weights = np.concatenate([np.full(len(v[0]), 1.0 / len(v[0])) for v in cal.values()])
    rows: dict[str, dict[str, float]] = {k: {} for k in measured}
    names = ("squeeze detector (logits)", "input residual (pixels)",
             "squeeze detector with context and jitter (logits, as shipped)")
    for i, name in enumerate(names):
        kw = {} if i < 2 else {"context": JITTER, "views": len(feats.prober.spec.views),
                               "jitter": (feats.prober.spec.jitter.count, feats.prober.spec.jitter.sigma),
                               "hidden": DEFAULT_HIDDEN}
        det = fit_squeeze_detector(fit_a[i], np.concatenate([v[i] for v in cal.values()]), weights, **kw)
        threshold = float(np.quantile(det.decision(fit_b[i]), 1 - FLAG_RATE))
        for k, v in measured.items():
            rows[k][name] = float(np.mean(det.decision(v[i]) > threshold))
    return {"model": model, "clean": clean, "attack_images": attack_images,
            "flag_rate_target": FLAG_RATE, "bit_depths": list(DEFAULT_BIT_DEPTHS),
            "calibration_attacks": {k: len(v[0]) for k, v in cal.items()},
            "flagged": rows, "seconds": round(time.perf_counter() - t0, 1)}


def render(r: dict, command: str) -> str:
    cols = list(next(iter(r["flagged"].values())))
    when = f" ({r['date']}, {r['machine']})" if "date" in r else ""  # reports before run_facts lack it
    lines = [
        f"# Input statistics against the squeeze detector{when}", "",
        f"`{command}` ({r['seconds']:.0f} s). Model {r['model']}; each detector fitted on "
        f"{r['clean']} clean calibration images against the reference attacks "
        f"({', '.join(f'{k}: {n}' for k, n in r['calibration_attacks'].items())}), thresholded "
        f"at a {r['flag_rate_target']:.0%} flag rate on {r['clean']} held-out clean calibration "
        f"images; bit depths {r['bit_depths']}. Share flagged:", "",
        "| images | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for k, v in r["flagged"].items():
        lines.append(f"| {k} | " + " | ".join(f"{100 * v[c]:.1f} %" for c in cols) + " |")
    lines += ["", "Clean rows should sit at the flag rate: every point above it is a client "
              "sending an ordinary JPEG or a slightly noisy camera image and being told it "
              "looks attacked.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.input_statistics", __doc__)
    p.add_argument("--clean", type=int, default=2000, help="clean images per set")
    p.add_argument("--attack-images", type=int, default=1000, help="images attacked per set")
    args = p.parse_args(argv)
    if args.smoke:
        args.clean, args.attack_images = 150, 120
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    result = run(args.store, args.model, args.clean, args.attack_images)
    module = "benchmarks.input_statistics"
    command = study_command(module, args)
    result = {**run_facts(command), **result}
    write_report(args.out, report_stem(module, args.smoke), result, render(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
