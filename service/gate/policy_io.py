"""Policy files: JSON load and save with validation and errors that name the bad field.

The file is the only I/O of the gate. Layout (``schema`` = ``robustgate.policy.v2``)::

    {"schema": "robustgate.policy.v2", "version": "3", "mode": "enforce",
     "model": {"name": "fmnist-cnn", "sha256": "..."}, "data": {"sha256": "..."},
     "probe": {<ProbePlan as protobuf JSON, snake_case>},
     "checks": {"squeeze": {"enabled": true, "flag": 0.97, "reject": 0.995,
                            "escalate": 0.8}, ...},
     "noise": {"sigma": 0.25, "alpha": 0.001, "target_radius": 0.25, "max_samples": 400,
               "detect_samples": 32, "first_batch": 8, "growth": 2, "certify": false},
     "max_forward_passes": 64,
     "references": {"squeezers": ["bits5", ...], "squeeze": [{"values": [...]}, ...],
                    "density": {"means": ..., ...},
                    "squeeze_detector": {"mean": [...], "scale": [...], "weights": [...],
                                         "bias": 0.1, "clean": {"values": [...]},
                                         "context": ["log_density", ...]}},
     "calibration": {"flag_rate": 0.05, ...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.gate._fields import (
    as_bool, as_float, as_int, as_list, as_mapping, as_optional_float, as_str, reject_unknown,
)
from service.gate.checks import Check
from service.gate.density import DensityModel
from service.gate.errors import GateError, PolicyError
from service.gate.plan import ProbeSpec
from service.gate.policy import (
    DETECT_SAMPLES, POLICY_SCHEMA, CheckPolicy, Mode, NoiseSettings, Policy, References, Thresholds,
)
from service.gate.quantile import EmpiricalCDF
from service.gate.squeeze_detector import SqueezeDetector

_TOP = {"schema", "version", "mode", "model", "data", "probe", "checks", "noise",
        "max_forward_passes", "references", "calibration"}


def policy_to_dict(policy: Policy) -> dict[str, Any]:
    """JSON-able dict of ``policy`` (the file layout in the module docstring)."""
    n = policy.noise
    return {
        "schema": POLICY_SCHEMA,
        "version": policy.version,
        "mode": policy.mode.value,
        "model": {"name": policy.model_name, "sha256": policy.model_sha256},
        "data": {"sha256": policy.data_sha256},
        "probe": policy.probe.to_dict(),
        "checks": {c.value: {"enabled": cp.enabled, "flag": cp.thresholds.flag,
                             "reject": cp.thresholds.reject,
                             "escalate": cp.thresholds.escalate}
                   for c, cp in policy.checks.items()},
        "noise": {"sigma": n.sigma, "alpha": n.alpha, "target_radius": n.target_radius,
                  "max_samples": n.max_samples, "detect_samples": n.detect_samples,
                  "first_batch": n.first_batch,
                  "growth": n.growth, "certify": n.certify},
        "max_forward_passes": policy.max_forward_passes,
        "references": {
            "squeezers": list(policy.references.squeezers),
            "squeeze": [cdf.to_dict() for cdf in policy.references.squeeze],
            "density": (policy.references.density.to_dict()
                        if policy.references.density is not None else None),
            "squeeze_detector": (policy.references.squeeze_detector.to_dict()
                                 if policy.references.squeeze_detector is not None else None)},
        "calibration": dict(policy.calibration),
    }


def policy_from_dict(data: Mapping[str, Any]) -> Policy:
    """Parse and validate a policy dict; raises PolicyError naming the offending field."""
    d = as_mapping(data, "policy", PolicyError)
    reject_unknown(d, _TOP, "policy", PolicyError)
    schema = d.get("schema")
    if schema != POLICY_SCHEMA:
        raise PolicyError(f"schema: expected {POLICY_SCHEMA!r}, got {schema!r}; recalibrate: "
                          f"python -m service.calibration --model <name> --start-torchserve")
    model = as_mapping(_need(d, "model"), "model", PolicyError)
    reject_unknown(model, {"name", "sha256"}, "model", PolicyError)
    dataset = as_mapping(_need(d, "data"), "data", PolicyError)
    reject_unknown(dataset, {"sha256"}, "data", PolicyError)
    try:
        probe = ProbeSpec.from_dict(as_mapping(_need(d, "probe"), "probe", PolicyError))
        references = _references(d.get("references", {}))
    except PolicyError:
        raise
    except GateError as exc:
        raise PolicyError(f"{exc}") from exc
    return Policy(
        model_name=as_str(_need(model, "name", "model"), "model.name", PolicyError),
        model_sha256=as_str(_need(model, "sha256", "model"), "model.sha256", PolicyError),
        data_sha256=as_str(_need(dataset, "sha256", "data"), "data.sha256", PolicyError),
        version=as_str(_need(d, "version"), "version", PolicyError),
        mode=Mode(_mode(_need(d, "mode"))),
        probe=probe,
        noise=_noise(as_mapping(_need(d, "noise"), "noise", PolicyError)),
        checks=_checks(as_mapping(d.get("checks", {}), "checks", PolicyError)),
        max_forward_passes=as_int(d.get("max_forward_passes", 64), "max_forward_passes",
                                  PolicyError, minimum=1),
        references=references,
        calibration=_calibration(d.get("calibration", {})),
    )


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; every failure is a PolicyError naming the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PolicyError(f"{p}: policy file not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{p}: cannot read policy file ({exc.__class__.__name__})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{p}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg})") from exc
    except (ValueError, RecursionError) as exc:  # an integer of over 4,300 digits; nesting past the stack
        raise PolicyError(f"{p}: not valid JSON ({exc.__class__.__name__})") from exc
    try:
        return policy_from_dict(data)
    except PolicyError as exc:
        raise PolicyError(f"{p}: {exc}") from exc


def save_policy(policy: Policy, path: str | os.PathLike[str]) -> None:
    """Write ``policy`` as JSON atomically (temporary file in the same folder, then rename)."""
    p = Path(path)
    text = json.dumps(policy_to_dict(policy), indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; the policy is read by other users (TorchServe, the gateway)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _need(d: Mapping[str, Any], key: str, where: str = "policy") -> Any:
    if key not in d or d[key] is None:
        raise PolicyError(f"{where}: missing required field {key!r}")
    return d[key]


def _mode(value: Any) -> str:
    if value not in {m.value for m in Mode}:
        raise PolicyError(f"mode: expected one of {[m.value for m in Mode]}, got {value!r}")
    return str(value)


def _checks(d: Mapping[str, Any]) -> dict[Check, CheckPolicy]:
    known = {c.value for c in Check}
    reject_unknown(d, known, "checks", PolicyError)
    out: dict[Check, CheckPolicy] = {}
    for name, raw in d.items():
        path = f"checks.{name}"
        c = as_mapping(raw, path, PolicyError)
        reject_unknown(c, {"enabled", "flag", "reject", "escalate"}, path, PolicyError)
        flag = as_optional_float(c.get("flag"), f"{path}.flag", PolicyError)
        reject = as_optional_float(c.get("reject"), f"{path}.reject", PolicyError)
        escalate = as_optional_float(c.get("escalate"), f"{path}.escalate", PolicyError)
        try:
            thresholds = Thresholds(flag=flag, reject=reject, escalate=escalate)
        except PolicyError as exc:
            raise PolicyError(f"{path}: {exc}") from exc
        out[Check(name)] = CheckPolicy(
            enabled=as_bool(c.get("enabled", False), f"{path}.enabled", PolicyError),
            thresholds=thresholds)
    return out


def _noise(d: Mapping[str, Any]) -> NoiseSettings:
    reject_unknown(d, {"sigma", "alpha", "target_radius", "max_samples", "detect_samples",
                       "first_batch", "growth", "certify"}, "noise", PolicyError)
    max_samples = as_int(d.get("max_samples", 400), "noise.max_samples", PolicyError)
    return NoiseSettings(
        sigma=as_float(_need(d, "sigma", "noise"), "noise.sigma", PolicyError),
        alpha=as_float(d.get("alpha", 0.001), "noise.alpha", PolicyError),
        target_radius=as_float(d.get("target_radius", 0.25), "noise.target_radius",
                               PolicyError),
        max_samples=max_samples,
        # a policy written before the field was calibrated on 32 copies, the default
        detect_samples=as_int(d.get("detect_samples", min(DETECT_SAMPLES, max_samples)),
                              "noise.detect_samples", PolicyError),
        first_batch=as_int(d.get("first_batch", 8), "noise.first_batch", PolicyError),
        growth=as_int(d.get("growth", 2), "noise.growth", PolicyError),
        certify=as_bool(d.get("certify", False), "noise.certify", PolicyError))


def _references(raw: Any) -> References:
    d = as_mapping(raw, "references", PolicyError)
    reject_unknown(d, {"squeezers", "squeeze", "density", "squeeze_detector"}, "references",
                   PolicyError)
    names = as_list(d.get("squeezers", []), "references.squeezers", PolicyError)
    cdfs = as_list(d.get("squeeze", []), "references.squeeze", PolicyError)
    density = d.get("density")
    detector = d.get("squeeze_detector")
    return References(
        squeeze=tuple(EmpiricalCDF.from_dict(as_mapping(c, f"references.squeeze[{i}]",
                                                        PolicyError))
                      for i, c in enumerate(cdfs)),
        density=None if density is None else DensityModel.from_dict(
            as_mapping(density, "references.density", PolicyError)),
        squeeze_detector=None if detector is None else SqueezeDetector.from_dict(
            as_mapping(detector, "references.squeeze_detector", PolicyError)),
        squeezers=tuple(as_str(n, f"references.squeezers[{i}]", PolicyError)
                        for i, n in enumerate(names)))


def _calibration(raw: Any) -> dict[str, float | int | str | bool]:
    d = as_mapping(raw, "calibration", PolicyError)
    for key, value in d.items():
        if not isinstance(value, (int, float, str, bool)):
            raise PolicyError(f"calibration.{key}: expected a finite number, string or "
                              f"boolean")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            as_float(value, f"calibration.{key}", PolicyError)  # finite, an integer too (read as a float)
    return dict(d)

