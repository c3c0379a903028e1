"""``python -m service.calibration``: calibrate a model's gate policy on held-out clean data.

    python -m service.calibration --model fmnist-cnn            # TorchServe already running
    python -m service.calibration --model fmnist-cnn --start-torchserve --if-missing

Runs the real probe path (TorchServe and the handler build every variant), on the
calibration split that training never saw:

1. split it in two: part A fits the references (each squeezer's clean CDF; class means and
   shared covariance of the penultimate features), part B sets the thresholds, so no
   threshold is set on the data its own references were fitted on. The squeeze detector is
   fitted on part A's clean images against part B's successful attacks; where the probe
   holds views and features it also reads their context
   (:data:`service.gate.squeeze_detector.CONTEXT_FEATURES`), and where it holds jitter
   copies, theirs (:data:`~service.gate.squeeze_detector.JITTER_FEATURES`);
2. makes a reference set on part B — attacks (FGSM and PGD, L-inf, at eps 0.03 and 0.1,
   white-box on the TorchScript export; only successful ones count) and shifted inputs
   (rotations by 40 degrees, 2x2 tile shuffles) — and ALLOCATES the
   flag and reject budgets among the enabled checks (:func:`service.gate.calibrate.
   calibrate_thresholds`): the union of all checks flags at most the target share of clean
   images (with 95 % confidence for images like the calibration images, ``--confidence``;
   approximate for the union) while catching as many attacks as it can. Each reference set
   weighs the same, however many of its images there are: 1,000 rotations would otherwise
   outvote 170 successful FGSM images and starve the squeeze check of budget;
3. writes ``<store>/<model>/policy.json`` (versioned, with the model's and the data's
   sha256) and re-signs the store's manifest.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from model_store import archive, data
from service import perturb
from service.backend import TorchServeBackend, read_inference_key
from service.gate.calibrate import (
    DEFAULT_CONFIDENCE, calibrate_thresholds, fit_squeeze_references, with_thresholds,
)
from service.gate.checks import CHEAP_CHECKS, Check
from service.gate.defaults import DEFAULT_VIEWS, default_probe, draft_policy
from service.gate.density import fit_density
from service.gate.engine import RawScores, check_scores, detector_input, raw_scores
from service.gate.plan import NoiseSpec, OcclusionSpec, ProbeSpec, ShuffleSpec, ViewSpec
from service.gate.policy import Mode, Policy, References
from service.gate.policy_io import save_policy
from service.gate.squeeze_detector import (
    CONTEXT_FEATURES, DEFAULT_HIDDEN, JITTER_FEATURES, MIN_ATTACKS, fit_squeeze_detector,
)
from service.pipeline import request_seed, spec_to_proto
from service.registry import JITTER_DRAWS, NOISE_COPIES, POLICY_FILE

CHEAP = (Check.SQUEEZE, Check.VIEWPOINT, Check.DENSITY)
DEFAULT_CHECKS = (Check.SQUEEZE, Check.VIEWPOINT, Check.DENSITY)
ATTACKS = (("fgsm", 0.03), ("fgsm", 0.1), ("pgd", 0.03), ("pgd", 0.1))


# --- reference attacks (white-box, on the TorchScript export) -----------------------------

def _logits_fn(ts_model: torch.jit.ScriptModule):
    return lambda x: ts_model(x)[0]


def fgsm(f, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of size eps (Goodfellow et al. 2015); x in [0, 1]."""
    x = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(f(x), y)
    (grad,) = torch.autograd.grad(loss, x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def pgd(f, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 10, gen: torch.Generator | None = None) -> torch.Tensor:
    """L-inf PGD with a random start (Madry et al. 2018), step 2.5 * eps / steps."""
    alpha = 2.5 * eps / steps
    adv = (x + torch.empty_like(x).uniform_(-eps, eps, generator=gen)).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(f(adv), y)
        (grad,) = torch.autograd.grad(loss, adv)
        adv = (x + (adv.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return adv.detach()


def reference_attacks(model_path: Path, images: np.ndarray, labels: np.ndarray, seed: int = 0
                      ) -> dict[str, np.ndarray]:
    """Successful adversarial images float32 [M, 1, 28, 28] per attack name ("pgd@0.1")."""
    ts = torch.jit.load(str(model_path)).eval()
    f = _logits_fn(ts)
    x = data.to_tensor(images)
    y = torch.from_numpy(labels)
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, np.ndarray] = {}
    for name, eps in ATTACKS:
        advs = []
        for i in range(0, len(x), 256):
            xb, yb = x[i : i + 256], y[i : i + 256]
            adv = fgsm(f, xb, yb, eps) if name == "fgsm" else pgd(f, xb, yb, eps, gen=gen)
            with torch.no_grad():
                ok = (f(adv).argmax(1) != yb) & (f(xb).argmax(1) == yb)
            advs.append(adv[ok])
        out[f"{name}@{eps:g}"] = torch.cat(advs).numpy()
    return out


def reference_shifts(images: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The shifted inputs the gate also watches, uint8 [N, H, W] per set name: rotations by
    +-40 degrees and 2x2 tile shuffles of ``images`` (uint8 [N, H, W])."""
    return {"rotate+40": perturb.rotate(images, 40), "rotate-40": perturb.rotate(images, -40),
            "shuffle2x2": perturb.tile_shuffle(images, 2, seed=seed)}


# --- probing through TorchServe -----------------------------------------------------------

VIEW_NAMES = ("rotate+10", "rotate-10", "shift+2x", "shift-2x", "shift+2y", "shift-2y")  # DEFAULT_VIEWS'


def label_preserving_views(card: dict) -> tuple[ViewSpec, ...]:
    """The viewpoint check's views: those of :data:`DEFAULT_VIEWS` and the mirror image that
    the model card measured to keep the label (``label_preserving_transforms``). None of
    them: an empty tuple, and the check is left off (a view that changes the label is no
    test of fragility: the model is right to answer otherwise)."""
    preserving = {t["name"] for t in card["label_preserving_transforms"]}
    views = tuple(v for v, name in zip(DEFAULT_VIEWS, VIEW_NAMES) if name in preserving)
    return views + ((ViewSpec(hflip=True),) if "hflip" in preserving else ())


def calibration_spec(policy: Policy, seed: int, checks: Sequence[Check]) -> ProbeSpec:
    """The variants the calibrated checks use, plus features: one call per image. Sections of
    checks not being calibrated are left out (occlusion alone is 16 rows; the jitter copies are
    squeeze's detector's). Noise: ``noise.detect_samples`` copies, the count the gateway scores
    the noise check over, so the thresholds set here hold there."""
    p = policy.probe
    return dataclasses.replace(
        p, seed=seed, return_features=True,
        jitter=p.jitter if Check.SQUEEZE in checks else NoiseSpec(),
        occlusion=p.occlusion if Check.OCCLUSION in checks else OcclusionSpec(),
        shuffle=p.shuffle if Check.STRUCTURE in checks else ShuffleSpec(),
        noise=NoiseSpec(sigma=policy.noise.sigma, count=policy.noise.detect_samples) if Check.NOISE in checks
        else NoiseSpec())


async def probe_all(backend: TorchServeBackend, model: str, images: np.ndarray, spec: ProbeSpec,
                    concurrency: int, timeout_s: float = 60.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Logits [rows, C] per image and base features [N, D]; images uint8 or float32 [N, 1, H, W].

    Each image is probed as the gateway probes it: with its own seed
    (:func:`service.pipeline.request_seed`, keyed by ``spec.seed``), so its jitter copies (and
    noise) are drawn afresh for every image, not one draw shared by all of them. The jitter
    copies are the very ones a request would get from a gateway run with ``--seed``
    ``spec.seed`` (by default a gateway keys its seeds with a secret drawn at start); the noise
    copies are the same distribution, not the same draws (the gateway's come from the
    request's noise stream, :data:`service.gate.cascade.NOISE_STREAM`)."""
    sem = asyncio.Semaphore(concurrency)
    logits: list[np.ndarray | None] = [None] * len(images)
    feats: list[np.ndarray | None] = [None] * len(images)

    async def one(i: int) -> None:
        plan = spec_to_proto(spec.with_seed(request_seed(spec.seed, images[i])))
        async with sem:
            out = await backend.probe(model, images[i], plan, timeout_s)
        logits[i], feats[i] = out.logits, out.features

    await asyncio.gather(*(one(i) for i in range(len(images))))
    return [l for l in logits if l is not None], np.stack([f for f in feats if f is not None])


def scores_matrix(raws: Sequence[RawScores], spec: ProbeSpec, policy: Policy) -> dict[Check, np.ndarray]:
    per: dict[Check, list[float]] = {}
    for r in raws:
        for check, cs in check_scores(r, spec, policy.references).items():
            per.setdefault(check, []).append(cs.score)
    return {c: np.asarray(v) for c, v in per.items()}


async def calibrate(
    store: Path, model: str, address: str, key_file: Path, *, images: int | None = None,
    attack_images: int = 1000, concurrency: int = 16, flag_rate: float = 0.05, reject_rate: float = 0.01,
    checks: Sequence[Check] = DEFAULT_CHECKS, backend_format: str = "onnx", seed: int = 0,
    mode: Mode = Mode.ENFORCE, confidence: float | None = DEFAULT_CONFIDENCE,
    detector_hidden: int = DEFAULT_HIDDEN, log=print,
) -> Policy:
    # What it reads must be what the build wrote; everything but the policy verifies again
    # before the new policy replaces the old one (a store that fails keeps its policy).
    archive.verify_manifest(store, only=[f"{model}/card.json", f"{model}/model.pt"])
    card = json.loads((store / model / "card.json").read_text())
    ds = data.load(seed=card["data"].get("split_seed", 0))
    calib = ds.calib
    n = len(calib) if images is None else min(images, len(calib))
    half = n // 2
    views = label_preserving_views(card)
    policy = draft_policy(model, card["hashes"]["model.pt"], card["data"]["sha256"], card["noise_sigma"])
    policy = dataclasses.replace(policy, probe=dataclasses.replace(policy.probe, views=views))
    if not views and Check.VIEWPOINT in checks:
        log("warning: the model card names no view that keeps the label; the viewpoint check is left off")
        checks = [c for c in checks if c is not Check.VIEWPOINT]
    spec = calibration_spec(policy, seed, checks)
    backend = TorchServeBackend(address, read_inference_key(key_file))
    ts_name = f"{model}-{backend_format}"
    imgs = calib.images[:n, None]  # uint8 [N, 1, 28, 28], as the gateway sends decoded PNGs
    try:
        t0 = time.perf_counter()
        logits, feats = await probe_all(backend, ts_name, imgs, spec, concurrency)
        log(f"probed {n} clean calibration images ({spec.rows} rows each) in {time.perf_counter() - t0:.0f} s")
        # Part A: references. Class-conditional Gaussians on the true labels (Lee et al. 2018),
        # scored at the predicted class at run time; part A's raw scores (with those distances,
        # for the squeeze detector's context) also give each squeezer's clean CDF.
        density = fit_density(feats[:half], calib.labels[:half], num_classes=len(card["labels"]))
        raw_a = [raw_scores(l, f, spec, density) for l, f in zip(logits[:half], feats[:half])]
        squeeze_refs = fit_squeeze_references(np.array([r.squeeze for r in raw_a]))
        policy = dataclasses.replace(policy, references=References(
            squeeze=squeeze_refs, density=density, squeezers=spec.squeeze.names()))
        raw_b = [raw_scores(l, f, spec, density) for l, f in zip(logits[half:], feats[half:])]
        # Reference attacks on part B.
        t0 = time.perf_counter()
        b_images, b_labels = calib.images[half:n][:attack_images], calib.labels[half:n][:attack_images]
        attacked_sets = reference_attacks(store / model / "model.pt", b_images, b_labels, seed=seed)
        attack_names = set(attacked_sets)
        for name, shifted in reference_shifts(b_images, seed).items():
            attacked_sets[name] = (shifted.astype(np.float32) / 255.0)[:, None]
        adv_all = np.concatenate(list(attacked_sets.values()))
        set_of = np.concatenate([np.full(len(v), k, dtype=object) for k, v in attacked_sets.items()])
        weights = np.concatenate([np.full(len(v), 1.0 / len(v)) for v in attacked_sets.values() if len(v)])
        adv_logits, adv_feats = await probe_all(backend, ts_name, adv_all.astype(np.float32), spec, concurrency)
        raw_adv = [raw_scores(l, f, spec, density) for l, f in zip(adv_logits, adv_feats)]
        log(f"reference attacks: {', '.join(f'{k}: {len(v)}' for k, v in attacked_sets.items())} successful "
            f"({time.perf_counter() - t0:.0f} s)")
    finally:
        await backend.close()

    # The squeeze detector: part A clean against the successful FGSM/PGD on part B (part B's
    # clean images, which set the thresholds, stay out of the fit).
    # With views and density in the probe the detector also reads their context; part A's
    # density distances are in-sample (its class means came from part A), which only tilts
    # the fit: the thresholds are set on part B.
    detector = None
    if Check.SQUEEZE in checks:
        is_attack = np.array([k in attack_names for k in set_of], dtype=bool)
        context = CONTEXT_FEATURES if all(r.context_features is not None for r in raw_a + raw_adv) else ()
        jitter = (spec.jitter.count, spec.jitter.sigma)
        if context and jitter[0] and all(r.jitter_features is not None for r in raw_a + raw_adv):
            context += JITTER_FEATURES
        else:
            jitter = (0, 0.0)
        if is_attack.sum() >= MIN_ATTACKS:
            detector = fit_squeeze_detector(
                np.array([detector_input(r, context) for r in raw_a]),
                np.array([detector_input(r, context) for r, a in zip(raw_adv, is_attack) if a]),
                weights[is_attack], context=context, views=len(spec.views) if context else 0,
                jitter=jitter, hidden=detector_hidden, seed=seed)
        else:
            log(f"warning: only {int(is_attack.sum())} reference attacks succeeded (< {MIN_ATTACKS}); "
                "the squeeze check combines its squeezers by their maximum quantile")
    policy = dataclasses.replace(policy, references=dataclasses.replace(policy.references,
                                                                        squeeze_detector=detector))
    clean = scores_matrix(raw_b, spec, policy)
    attacked = scores_matrix(raw_adv, spec, policy)

    enabled = [c for c in checks if c in clean]
    if warning := cascade_warning(enabled):
        log(warning)
    result = calibrate_thresholds({c: clean[c] for c in enabled}, {c: attacked[c] for c in enabled},
                                  weights=weights, flag_rate=flag_rate, reject_rate=reject_rate, confidence=confidence)
    for kind in ("flag", "reject"):
        target, got = result.summary[f"{kind}_rate_target"], result.summary[f"{kind}_rate_calibrated"]
        if target and not got:
            log(f"warning: {n - half} threshold images are too few to hold a {kind} rate of {target} "
                f"with {confidence} confidence; the thresholds {kind} no calibration image. "
                "Use more images (--images) or a lower --confidence.")
        elif Check.SQUEEZE in clean and (warning := squeeze_ceiling_warning(clean[Check.SQUEEZE], kind, got)):
            log(warning)
        elif kind == "flag" and (warning := expected_rate_warning(kind, target, got, n - half)):
            log(warning)
    policy = with_thresholds(policy, result.thresholds, enable=True)
    for c in Check:
        if c not in enabled and policy.enabled(c):
            policy = with_thresholds(policy, {c: policy.thresholds(c)}, enable=False)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    summary = {**result.summary, "reference_images": half, "threshold_images": n - half,
               "created": stamp, "backend_format": backend_format,
               "squeeze_detector": detector is not None,
               "squeeze_detector_context": bool(detector is not None and detector.context),
               "squeeze_detector_jitter": bool(detector is not None and detector.reads_jitter),
               "squeeze_detector_hidden": detector.hidden if detector is not None else 0,
               JITTER_DRAWS[0]: JITTER_DRAWS[1],  # probe_all: each image's own seed
               CALIBRATOR_KEY: calibrator_digest(),
               **({NOISE_COPIES: policy.noise.detect_samples} if Check.NOISE in checks else {}),
               **{f"attack_{k}": len(v) for k, v in attacked_sets.items()}}
    # Room for an opt-in certificate: the cheap probe plus the whole noise budget, with one
    # base row per sequential batch.
    ceiling = policy.cheap_plan(0).rows + policy.noise.max_samples + 16
    policy = dataclasses.replace(policy, version=f"{stamp}-{card['hashes']['model.pt'][:8]}", mode=mode,
                                 calibration=summary, max_forward_passes=ceiling)
    target = store / model / POLICY_FILE  # saved only once everything else still verifies
    archive.approve_changes(store, [f"{model}/{POLICY_FILE}"], write=lambda: save_policy(policy, target))
    return policy


def cascade_warning(checks: Sequence[Check]) -> str | None:
    """A warning when the noise check is calibrated beside cheap checks, else None. The budget
    is shared out on every calibration image's noise score, but served in the cascade the noise
    check scores only the images a cheap check escalates: it flags (and catches) less than the
    summary's rates say, and the policy's realised clean rate falls below its target. Alone, it
    scores every image, as calibrated (service/gate/cascade.py)."""
    if Check.NOISE in checks and any(c in CHEAP_CHECKS for c in checks):
        return ("warning: noise is calibrated as if it scored every image; beside cheap checks the cascade "
                "scores it only where they escalate, so it flags and catches less than this summary says")
    return None


EXPECTED_RATE_SLACK = 0.01  # the band: the target's 5 % +- 1 point


def expected_rate_warning(kind: str, target: float, calibrated: float, images: int) -> str | None:
    """A warning when the clean rate to expect falls more than :data:`EXPECTED_RATE_SLACK`
    below ``target``, else None. The confidence margin makes the rate a one-sided bound: the
    thresholds let ``k = calibrated * images`` of the threshold images cross, and a fresh clean
    image crosses with probability about ``(k + 1) / (images + 1)`` (the order statistic's
    mean), which on few images sits well under the target (1,000: 3.9 % for 5 %)."""
    if not target:
        return None
    expected = (round(calibrated * images) + 1) / (images + 1)
    if expected >= target - EXPECTED_RATE_SLACK:
        return None
    return (f"warning: on {images} threshold images the {kind} rate is calibrated at {calibrated:.2%} so that "
            f"it stays within {target:.2%} with the asked confidence; expect about {expected:.2%} on clean "
            f"traffic, more than {EXPECTED_RATE_SLACK:.0%} under the target. Use more images (--images) or a "
            "lower --confidence.")


def squeeze_ceiling_warning(clean_squeeze: np.ndarray, kind: str, rate: float) -> str | None:
    """A warning when the squeeze check cannot ``kind`` at ``rate``, else None. Its score is a
    clean quantile, 1.0 for every score above all the references: when more threshold images
    than the rate lets cross sit there, no threshold below 1.0 holds the rate, and none at
    1.0 is ever crossed, whatever the attack's squeeze distance. More reference images (a
    longer tail) move the ceiling out."""
    scores = np.asarray(clean_squeeze, dtype=np.float64)
    top = int((scores >= 1.0).sum())
    if not rate or top <= rate * scores.size:
        return None
    return (f"warning: squeeze cannot {kind} at a rate of {rate}: {top} of {scores.size} threshold "
            f"images score above every squeeze reference (1.0), more than that rate lets cross. "
            "Use more images (--images).")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.calibration", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-cnn")
    p.add_argument("--store", type=Path, default=archive.REPO / "model_store" / "artifacts")
    p.add_argument("--address", default="127.0.0.1:7070", help="TorchServe gRPC inference address")
    p.add_argument("--key-file", type=Path, default=archive.REPO / "var" / "torchserve" / "key_file.json")
    p.add_argument("--images", type=int, help="calibration images to use (default: all 5,000)")
    p.add_argument("--attack-images", type=int, default=1000)
    p.add_argument("--flag-rate", type=float, default=0.05)
    p.add_argument("--reject-rate", type=float, default=0.01)
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="keep the clean flag and reject rates within their targets with this "
                        "confidence (Clopper-Pearson); 0 calibrates at the targets themselves")
    p.add_argument("--checks", default=",".join(c.value for c in DEFAULT_CHECKS))
    p.add_argument("--mode", default="enforce", choices=[m.value for m in Mode])
    p.add_argument("--detector-hidden", type=int, default=DEFAULT_HIDDEN,
                   help="hidden tanh units of the squeeze detector; 0 fits a logistic regression, "
                        "whose weights read one per feature")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--if-missing", action="store_true",
                   help="do nothing when a current policy for this model exists (for these weights, by this code)")
    p.add_argument("--start-torchserve", action="store_true", help="start (and stop) TorchServe for the run")
    args = p.parse_args(argv)
    if args.detector_hidden < 0:
        p.error(f"--detector-hidden must be >= 0, got {args.detector_hidden}")
    from model_store.serve import ServeError
    from service.errors import GatewayError

    try:
        with archive.store_lock(args.store, "calibration"):  # a build or another calibration: one at a time
            return _calibrate_command(args)
    except (GatewayError, ServeError, archive.ManifestError) as e:  # TorchServe unreachable, a store
        print(f"error: {e}", file=sys.stderr)                         # that fails its manifest: one line
        return 1
    except OSError as e:  # a store that cannot be read or locked
        print(archive.os_error_line(e, args.store), file=sys.stderr)
        return 1


# The code a policy's figures come from: the calibration, the gate's scores and fits, and the
# handler that computes every variant. ``--if-missing`` keeps a policy only where this code
# is the code that calibrated it (recorded under CALIBRATOR_KEY).
CALIBRATOR_SOURCES = ("service/calibration.py", "service/gate", "handlers")
CALIBRATOR_KEY = "calibrator"


def calibrator_digest(root: Path = archive.REPO) -> str:
    """16 hex digits of sha256 over :data:`CALIBRATOR_SOURCES`' Python files (names and bytes)."""
    h = hashlib.sha256()
    for rel in CALIBRATOR_SOURCES:
        path = root / rel
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stale_reason(store: Path, model: str) -> str | None:
    """Why ``model``'s policy in ``store`` must be calibrated (again), or None where it is
    current: missing, unreadable, calibrated for other weights, or by other code (a policy kept
    across a change of the gate or the handler scored with thresholds fitted to the old)."""
    from service.gate.policy_io import load_policy

    target = store / model / POLICY_FILE
    if not target.is_file():
        return "no policy"
    try:
        card = json.loads((store / model / "card.json").read_text())
        policy = load_policy(target)
        policy.check_model(card["hashes"]["model.pt"])
    except Exception as e:  # broken, or another model's
        return f"existing policy unusable ({e})"
    found, now = policy.calibration.get(CALIBRATOR_KEY), calibrator_digest()
    if found != now:
        return f"existing policy calibrated by other code (calibrator {found or 'unrecorded'}, now {now})"
    return None


def _calibrate_command(args: argparse.Namespace) -> int:
    target = args.store / args.model / POLICY_FILE
    if args.if_missing and target.is_file():
        why = stale_reason(args.store, args.model)
        if why is None:
            print(f"[{args.model}] policy already calibrated: {target}")
            return 0
        print(f"[{args.model}] {why}; recalibrating")
    checks = [Check(c.strip()) for c in args.checks.split(",") if c.strip()]
    kwargs = dict(images=args.images, attack_images=args.attack_images, concurrency=args.concurrency,
                  flag_rate=args.flag_rate, reject_rate=args.reject_rate, checks=checks, mode=Mode(args.mode),
                  confidence=args.confidence, detector_hidden=args.detector_hidden)
    if args.start_torchserve:
        import shutil
        import tempfile

        from model_store import serve

        # A private TorchServe on free ports, so a running service is left alone.
        run_dir = Path(tempfile.mkdtemp(prefix="rg-calibrate-"))
        settings = serve.ServeSettings.on_free_ports(store=args.store, run_dir=run_dir, models=(f"{args.model}-onnx",))
        with serve.start(settings) as ts:
            policy = asyncio.run(calibrate(args.store, args.model, ts.grpc_inference_target,
                                           settings.run_dir / serve.KEY_FILE, **kwargs))
        shutil.rmtree(run_dir, ignore_errors=True)  # kept, with TorchServe's logs, when it failed
    else:
        policy = asyncio.run(calibrate(args.store, args.model, args.address, args.key_file, **kwargs))
    print(f"[{args.model}] policy {policy.version} written to {target}")
    print(json.dumps(dict(policy.calibration), indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C, or run.sh passing on a SIGTERM: finally blocks ran
        sys.exit(130)
