"""The served models: card, gate policy and TorchServe name of each, read once at start-up.

A model is served only when its policy was calibrated for exactly this model: the policy's
``model_sha256`` must equal the sha256 of the model's TorchScript export recorded in its card
(both exports come from the same weights; the TorchScript file names the model).

Where the store also holds the archive TorchServe serves (``archives/<model>-<format>.mar``),
the limits its handler enforces on one call (the ``handler:`` section of the archive's
``model-config.yaml``) are read too, and a policy or coalescing setting that would ask more
is refused at start-up: the handler would otherwise refuse those calls one by one, at
request time. A store without the archive (TorchServe serving one from elsewhere) is not
checked; the handler's refusal is then answered as a deployment fault (``BackendRefused``).
"""

from __future__ import annotations

import json
import logging
import math
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from handlers import limits as handler_limits
from model_store.archive import (FORMATS, ManifestError, UnsafeArchive, archive_name, check_archive_model,
                                 check_members, sha256_file, verify_manifest)
from service.decode import InputSpec
from service.errors import GatewayError, ModelNotFound, PolicyMismatch
from service.gate.checks import Check
from service.gate.errors import PlanError, PolicyError
from service.gate.policy import Mode, Policy
from service.gate.policy_io import load_policy
from service.gate.smoothing import certify_counts

log = logging.getLogger(__name__)

POLICY_FILE = "policy.json"
CARD_FILE = "card.json"
# Calibration's record (a key of the policy's ``calibration``) that it probed every image
# with the jitter draw the gateway gives that image (``pipeline.request_seed``). Policies
# calibrated before the record existed drew one set of jitter copies for all their images.
JITTER_DRAWS = ("jitter_draws", "per-image")
# Calibration's record of how many noise copies per image it set the noise thresholds on (a
# policy calibrated with the noise check): a policy edited since to score another count no
# longer holds the clean rate those thresholds were set for.
NOISE_COPIES = "noise_copies"
ARCHIVE_CONFIG = "model-config.yaml"  # TorchServe's per-model config, at the archive's root
MAX_CONFIG_BYTES = 64 * 1024  # the shipped one is under 2 KB


@dataclass(frozen=True)
class ArchiveLimits:
    """What one call may ask of a model's handler, as its archive sets it (the ``handler:``
    section of ``model-config.yaml``, read by ``handlers/base.py``), or the handler's default
    (``handlers/limits.py``) where the archive leaves a key unset: the handler enforces that
    default, so an unset key is no more "no limit" to the gateway than to the handler."""

    archive: str  # the archive's file name, for messages
    max_variants: int = handler_limits.MAX_VARIANTS  # variants one plan may ask for (rows - 1)
    max_batch_items: int = handler_limits.MAX_BATCH_ITEMS  # images one coalesced call may carry
    max_batch_rows: int = handler_limits.MAX_BATCH_ROWS  # rows one coalesced call may ask for
    defaults: tuple[str, ...] = ()  # the keys the archive leaves unset

    def source(self, key: str) -> str:
        """Where the limit ``key`` comes from, for messages."""
        if key in self.defaults:
            return f"the handler's default handler.{key}, which its {ARCHIVE_CONFIG} leaves unset"
        return f"handler.{key} in its {ARCHIVE_CONFIG}"


def read_archive_limits(path: Path) -> ArchiveLimits:
    """The handler limits of the archive at ``path``; PolicyMismatch when it cannot be read."""
    try:
        with zipfile.ZipFile(path) as z:
            check_members(z)  # the one TorchServe will unpack, read by the same open
            if z.getinfo(ARCHIVE_CONFIG).file_size > MAX_CONFIG_BYTES:
                raise ValueError(f"it is over {MAX_CONFIG_BYTES:,} bytes")
            config = yaml.safe_load(z.read(ARCHIVE_CONFIG)) or {}
        section = config.get("handler") or {}
        if not isinstance(section, dict):
            raise ValueError("its handler section is not a mapping")
        keys = [f.name for f in fields(ArchiveLimits) if f.name.startswith("max_")]
        values = {k: section.get(k, getattr(ArchiveLimits, k)) for k in keys}  # unset: the handler's default
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"handler.{k} must be an integer >= 1, got {v!r}")
    except UnsafeArchive as e:
        raise PolicyMismatch(str(e)) from None
    except (OSError, KeyError, zipfile.BadZipFile, yaml.YAMLError, AttributeError, ValueError) as e:
        raise PolicyMismatch(f"cannot read {ARCHIVE_CONFIG} from the archive {path}: {e}") from None
    return ArchiveLimits(archive=path.name, **values, defaults=tuple(k for k in keys if k not in section))


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    labels: tuple[str, ...]
    input: InputSpec
    policy: Policy
    backend_name: str  # TorchServe's model name, e.g. "fmnist-cnn-torchscript"
    formats: tuple[str, ...]
    model_sha256: str
    noise_sigma: float
    limits: ArchiveLimits | None = None  # None: the store has no archive for the backend format


def archive_path(store: Path, name: str, fmt: str) -> Path:
    """Where the store keeps model ``name``'s TorchServe archive in format ``fmt``."""
    return store / "archives" / f"{archive_name(name, fmt)}.mar"


def load_model(store: Path, name: str, backend_format: str, verified: dict[str, str] | None = None) -> ServedModel:
    """Read ``store/name/{card,policy}.json``; raise PolicyMismatch when they disagree.
    ``verified``: digests just checked against the files (:func:`verify_served_files`), so
    the weights are not read a second time to compare with the card."""
    model_dir = store / name
    card_path = model_dir / CARD_FILE
    if not card_path.is_file():
        raise ModelNotFound(f"model {name!r} has no card in {model_dir}")
    try:
        card = json.loads(card_path.read_text())
        model_sha = card["hashes"]["model.pt"]
        input_spec = InputSpec.from_card(card)
        labels, noise_sigma = tuple(card["labels"]), float(card["noise_sigma"])
    except (ValueError, KeyError, TypeError) as e:  # not JSON, or not a card's shape
        raise GatewayError(f"model {name!r}: {card_path} is not a valid model card "
                           f"({type(e).__name__}: {str(e)[:200]})") from None
    if len(labels) < 2:  # else every gated request failed INTERNAL: the checks compare classes
        raise GatewayError(f"model {name!r}: {card_path} lists {len(labels)} label(s); a classifier "
                           "the gate serves has at least 2")
    weights = model_dir / "model.pt"
    if weights.is_file() and ((verified or {}).get(f"{name}/model.pt") or sha256_file(weights)) != model_sha:
        raise PolicyMismatch(f"{weights} does not match its card's sha256")
    policy_path = model_dir / POLICY_FILE
    try:
        policy = load_policy(policy_path)
        policy.check_model(model_sha)
    except PolicyError as e:
        raise PolicyMismatch(f"model {name!r}: {e}") from None
    try:  # else the handler would refuse every gated call, answered as if the image were bad
        policy.probe.check_input(input_spec.height, input_spec.width)
    except PlanError as e:
        raise PolicyMismatch(f"model {name!r}: the probe of {policy_path} does not fit the card's "
                             f"input: {e}") from None
    _warn_if_stale(name, policy)
    _warn_if_noise_falls_short(name, policy, noise_sigma)
    _warn_if_a_check_cannot_fire(name, policy)
    formats = tuple(f for f in FORMATS if archive_path(store, name, f).is_file())
    archive = archive_path(store, name, backend_format)
    limits = read_archive_limits(archive) if archive.is_file() else None
    if limits is not None and policy.max_plan_rows - 1 > limits.max_variants:
        raise PolicyMismatch(
            f"model {name!r}: its policy can ask {policy.max_plan_rows - 1} variants in one probe "
            f"(noise.max_samples {policy.noise.max_samples}, max_forward_passes "
            f"{policy.max_forward_passes}); the archive {limits.archive} allows at most "
            f"{limits.max_variants} ({limits.source('max_variants')})")
    return ServedModel(
        name=name,
        version=str(card.get("version", "1")),
        labels=labels,
        input=input_spec,
        policy=policy,
        backend_name=archive_name(name, backend_format),
        formats=formats,
        model_sha256=model_sha,
        noise_sigma=noise_sigma,
        limits=limits,
    )


def _warn_if_stale(name: str, policy: Policy) -> None:
    """Say so when the squeeze check runs without the fitted detector: policies calibrated
    before the detector still load and keep their clean rate, but catch fewer attacks until
    recalibrated (``python -m service.calibration`` without ``--if-missing``), which fits one
    where at least 20 reference attacks succeed. A detector fitted before the probe's jitter
    copies existed still serves, as fitted; recalibrating fits one that reads them (in
    ``benchmarks.detector_study``, 1-13 points more of the FGSM and PGD the calibration
    fits against). One fitted on a single jitter draw shared by all calibration images (no
    :data:`JITTER_DRAWS` record) realised about half a point under its clean flag rate
    through the gateway, which draws per image, and caught 0.7-8 points less of FGSM, PGD
    and CW (``benchmarks.robustness``, 2026-12-03). Silent where the gate is off."""
    squeeze = policy.checks.get(Check.SQUEEZE)
    if policy.mode is Mode.OFF or squeeze is None or not squeeze.enabled:
        return
    det = policy.references.squeeze_detector
    if det is None:
        log.warning("model %r: policy %s scores the squeeze check by the maximum of per-squeezer "
                    "quantiles (no fitted detector); recalibrating fits one where at least 20 "
                    "reference attacks succeed", name, policy.version)
    elif not det.reads_jitter:
        log.warning("model %r: policy %s has a squeeze detector fitted without jitter copies; "
                    "recalibrating fits one that reads them and catches more attacks",
                    name, policy.version)
    elif policy.calibration.get(JITTER_DRAWS[0]) != JITTER_DRAWS[1]:
        log.warning("model %r: policy %s was calibrated with one draw of the jitter copies for every "
                    "image, while the gateway draws them per image; it serves as calibrated, a little "
                    "under its clean flag rate and catching a little less; recalibrating fits it on "
                    "the draws the gateway makes", name, policy.version)


def _warn_if_a_check_cannot_fire(name: str, policy: Policy) -> None:
    """Name each enabled check with no flag, reject or escalate threshold (a policy edited by
    hand, or one whose calibration gave the check no share): every request pays its forward
    passes and it never changes a decision."""
    if policy.mode is Mode.OFF:
        return
    for check, cp in policy.checks.items():
        t = cp.thresholds
        if cp.enabled and t.flag is None and t.reject is None and t.escalate is None:
            log.warning("model %r: policy %s enables the %s check with no flag, reject or escalate threshold: "
                        "it costs %d forward passes a request and never changes a decision; disable it, or "
                        "recalibrate", name, policy.version, check.value, policy.budget(check))


def _warn_if_noise_falls_short(name: str, policy: Policy, trained_sigma: float) -> None:
    """Warn when the noise stage can never do what the policy asks of it: no copy fits in
    ``max_forward_passes`` after the cheap probe (an enabled noise check is then skipped on
    every request, certification never runs), fewer than ``noise.detect_samples`` do (the
    noise check scores fewer copies than its thresholds were calibrated on), or even unanimous
    copies certify less than ``noise.target_radius`` (every certificate reads "not
    certified"); or when its noise is not the card's ``noise_sigma``, the noise the model was
    trained under (any caller may ask for a certificate, unless the gateway's ``allow_certify``
    is off)."""
    n = policy.noise
    if not math.isclose(n.sigma, trained_sigma, rel_tol=1e-6):
        log.warning("model %r: policy %s draws noise at sigma %g, the model was trained at %g (its card): "
                    "certificates still hold, for a smoothed model it was not trained as, so fewer certify "
                    "and the noise check flags off its calibrated rate; recalibrate, or set noise.sigma back",
                    name, policy.version, n.sigma, trained_sigma)
    cheap = policy.cheap_plan(0).rows
    budget = policy.noise_budget(cheap, certify=True)  # an image the cheap checks settle: the most it can have
    if budget == 0:
        if policy.enabled(Check.NOISE) or n.certify:
            log.warning("model %r: policy %s leaves no forward pass for a noise copy after the cheap probe "
                        "(max_forward_passes %d): the noise check and certification never run",
                        name, policy.version, policy.max_forward_passes)
        return
    calibrated_on = policy.calibration.get(NOISE_COPIES)
    if policy.enabled(Check.NOISE) and calibrated_on is not None and calibrated_on != n.detect_samples:
        log.warning("model %r: policy %s scores the noise check on %d copies, but its thresholds were "
                    "calibrated on %s: the check flags off its calibrated rate; recalibrate, or set "
                    "noise.detect_samples back", name, policy.version, n.detect_samples, calibrated_on)
    scored = policy.noise_budget(cheap, certify=False)
    if policy.enabled(Check.NOISE) and scored < n.detect_samples:
        log.warning("model %r: policy %s leaves room for %d noise copies after the cheap probe, fewer than the "
                    "%d its noise thresholds were calibrated on: the check flags off its calibrated rate",
                    name, policy.version, scored, n.detect_samples)
    best = certify_counts(0, budget, budget, budget, n.sigma, n.alpha).radius or 0.0
    if best < n.target_radius:
        log.warning("model %r: policy %s certifies at most radius %.3f with its %d noise copies, below its "
                    "target_radius %g: no certificate it gives reads certified", name, policy.version, best,
                    budget, n.target_radius)


def verify_served_files(store: Path, names: tuple[str, ...], backend_format: str) -> dict[str, str]:
    """GatewayError unless each model's card, its weights and its backend archive (those of
    them present) match the store's manifest: a card's labels are what callers read, and its
    model hash is what binds a policy to the model. The policy itself is left out: a deployment
    may mount its own (``deploy/docker-entrypoint.sh``), held to the card's model hash instead.
    Returns the verified {relative path: sha256}."""
    wanted = []
    for n in names:
        wanted.append(f"{n}/{CARD_FILE}")
        wanted += [rel for rel in (f"{n}/model.pt", f"archives/{archive_name(n, backend_format)}.mar")
                   if (store / rel).is_file()]
    try:
        return verify_manifest(store, only=wanted)
    except ManifestError as e:
        raise GatewayError(str(e)) from None


class Registry:
    """Name -> ServedModel; unknown names and versions are ModelNotFound."""

    def __init__(self, models: dict[str, ServedModel]) -> None:
        self._models = dict(models)

    @classmethod
    def load(cls, store: Path, names: tuple[str, ...], backend_format: str) -> "Registry":
        """The served models of ``store``, whose files the gateway reads verified first against
        the store's manifest (:func:`verify_served_files`)."""
        verified = verify_served_files(store, names, backend_format)
        return cls({n: load_model(store, n, backend_format, verified) for n in names})

    def get(self, name: str, version: str = "") -> ServedModel:
        m = self._models.get(name)
        if m is None:
            raise ModelNotFound(f"model {name!r} is not served; served: {', '.join(sorted(self._models))}")
        if version and version != m.version:
            raise ModelNotFound(f"model {name!r} version {version!r} is not served; served version: {m.version}")
        return m

    def all(self) -> list[ServedModel]:
        return [self._models[k] for k in sorted(self._models)]

    def check_archive_models(self, store: Path, backend_format: str) -> None:
        """PolicyMismatch unless each model's backend archive (where the store has one) serves
        the model its card describes, the one its policy is bound to
        (:func:`model_store.archive.check_archive_model`)."""
        for m in self.all():
            path = archive_path(store, m.name, backend_format)
            if path.is_file():
                try:
                    check_archive_model(path, store / m.name)
                except UnsafeArchive as e:
                    raise PolicyMismatch(str(e)) from None

    def check_coalescing(self, max_batch: int, max_rows: int) -> None:
        """PolicyMismatch when a coalesced call could carry more images or rows than a model's
        archive allows (``max_batch`` < 2: coalescing off, every call carries one image). A
        call's rows reach ``max_rows``, or one request's largest probe where that is more."""
        if max_batch < 2:
            return
        for m in self.all():
            lim = m.limits
            if lim is None:
                continue
            if max_batch > lim.max_batch_items:
                raise PolicyMismatch(f"model {m.name!r}: coalescing sends up to {max_batch} images a call "
                                     f"(coalesce_max_batch); the archive {lim.archive} takes at most "
                                     f"{lim.max_batch_items} ({lim.source('max_batch_items')})")
            rows = max(max_rows, m.policy.max_plan_rows)
            if rows > lim.max_batch_rows:
                raise PolicyMismatch(f"model {m.name!r}: coalescing sends up to {rows} rows a call "
                                     f"(coalesce_max_rows {max_rows}, or one request's largest probe); the "
                                     f"archive {lim.archive} takes at most {lim.max_batch_rows} "
                                     f"({lim.source('max_batch_rows')})")
