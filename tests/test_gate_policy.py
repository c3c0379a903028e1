"""Policy: validation, JSON files, and the decision rule under each mode."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.gate.checks import Check
from service.gate.defaults import default_probe, draft_policy
from service.gate.density import fit_density
from service.gate.errors import PolicyError
from service.gate.policy import (
    CheckPolicy, Mode, NoiseSettings, Policy, References, Thresholds,
)
from service.gate.policy_io import load_policy, policy_from_dict, policy_to_dict, save_policy
from service.gate.quantile import EmpiricalCDF
from service.gate.report import CheckScore, CheckStatus, Decision, decide

SHA_M, SHA_D = "a" * 64, "b" * 64


def make_policy(mode: Mode = Mode.ENFORCE, **changes: Any) -> Policy:
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(60, 5))
    labels = np.repeat(np.arange(10), 6)
    refs = References(
        squeeze=tuple(EmpiricalCDF.from_samples(rng.random(50) * (i + 1)) for i in range(3)),
        density=fit_density(feats, labels), squeezers=default_probe().squeeze.names())
    policy = Policy(
        model_name="fmnist-cnn", model_sha256=SHA_M, data_sha256=SHA_D, version="7",
        mode=mode, probe=default_probe(), noise=NoiseSettings(sigma=0.25),
        checks={Check.SQUEEZE: CheckPolicy(True, Thresholds(0.95, 0.99, 0.8)),
                Check.VIEWPOINT: CheckPolicy(True, Thresholds(0.5, 1.0, 0.3)),
                Check.DENSITY: CheckPolicy(True, Thresholds(3.0, 6.0, 2.0)),
                Check.OCCLUSION: CheckPolicy(False, Thresholds(0.1, 0.2)),
                Check.NOISE: CheckPolicy(True, Thresholds(0.3, 0.6))},
        max_forward_passes=64, references=refs, calibration={"flag_rate_target": 0.05})
    return replace(policy, **changes) if changes else policy


def test_round_trip_through_a_file(tmp_path: Path) -> None:
    policy = make_policy()
    path = tmp_path / "policy.json"
    save_policy(policy, path)
    data = json.loads(path.read_text())
    assert data["schema"] == "robustgate.policy.v2" and data["version"] == "7"
    assert data["references"]["squeezers"] == list(default_probe().squeeze.names())
    assert data["checks"]["squeeze"] == {"enabled": True, "flag": 0.95, "reject": 0.99,
                                         "escalate": 0.8}
    assert load_policy(path) == policy
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_noise_detect_samples_round_trips_and_defaults_to_the_count_calibrated_on() -> None:
    policy = make_policy(noise=NoiseSettings(sigma=0.25, detect_samples=48))
    d = policy_to_dict(policy)
    assert d["noise"]["detect_samples"] == 48 and policy_from_dict(d) == policy
    del d["noise"]["detect_samples"]  # a policy written before the field: calibrated on 32
    assert policy_from_dict(d).noise.detect_samples == 32


def test_missing_checks_are_disabled() -> None:
    d = policy_to_dict(make_policy())
    del d["checks"]["occlusion"], d["checks"]["structure"]
    p = policy_from_dict(d)
    assert not p.enabled(Check.OCCLUSION) and p.thresholds(Check.STRUCTURE) == Thresholds()


def _broken(mutate: Any) -> dict[str, Any]:
    d = json.loads(json.dumps(policy_to_dict(make_policy())))
    mutate(d)
    return d


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="other"), "schema"),
    (lambda d: d.update(schema="robustgate.policy.v1"), "recalibrate"),  # softmax-L1 squeeze
    (lambda d: d.update(mode="loud"), "mode"),
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d.pop("model"), "model"),
    (lambda d: d["model"].update(sha256="xyz"), "model.sha256"),
    (lambda d: d["checks"]["squeeze"].update(reject=0.5), "checks.squeeze"),
    (lambda d: d["checks"]["squeeze"].update(flag=2.0, reject=3.0), "quantiles"),
    (lambda d: d["checks"]["viewpoint"].update(flag="high"), "checks.viewpoint.flag"),
    (lambda d: d["checks"].update(colour={"enabled": True}), "colour"),
    (lambda d: d["references"].update(squeeze=[]), "squeeze"),
    # references fitted on other squeezers, or in another order, or on unnamed ones
    (lambda d: d["probe"]["squeeze"]["bit_depths"].reverse(), r"fitted on \['bits"),
    (lambda d: d["references"]["squeezers"].reverse(), "order counts"),
    (lambda d: d["references"].pop("squeezers"), "references.squeezers: missing"),
    (lambda d: d["references"].update(squeezers=[5, 4, 3]), r"references.squeezers\[0\]"),
    (lambda d: d["references"].update(density={"means": [[0.0]]}), "density"),
    (lambda d: d["noise"].update(alpha=0), "alpha"),
    (lambda d: d["noise"].update(alpha=0.9), r"alpha must be in \(0, 0.5\]"),
    (lambda d: d["noise"].update(detect_samples=0), "detect_samples"),
    (lambda d: d["noise"].update(detect_samples="many"), "noise.detect_samples: expected an integer"),
    (lambda d: d["probe"].update(version=9), "version"),
    (lambda d: d["probe"].update(noise={"sigma": 0.2, "count": 4}), "probe.noise"),
    (lambda d: d.update(max_forward_passes=5), "max_forward_passes"),
    (lambda d: d.update(max_forward_passes="\u00b2"), "max_forward_passes: expected an integer"),  # isdigit()
    (lambda d: d.update(max_forward_passes="--5"), "max_forward_passes: expected an integer"),
    (lambda d: d.update(max_forward_passes="9" * 5000), "max_forward_passes: expected an integer"),  # int() limit
    (lambda d: d["checks"]["noise"].update(escalate=0.1), "escalate"),
    # no flag, escalate above reject: the band that sends images to the noise check was empty
    (lambda d: d["checks"]["viewpoint"].update(flag=None, reject=0.5, escalate=0.9),
     "escalate threshold 0.9 is above reject 0.5"),
    # a negative share made the sequential test settle before drawing a copy: the check vanished
    (lambda d: d["checks"]["noise"].update(flag=-0.1, reject=None), r"shares of noise copies in \[0, 1\], got -0.1"),
    (lambda d: d["checks"]["noise"].update(flag=0.5, reject=1.5), "got 1.5"),
    # an integer beyond any float raised OverflowError (the gateway's start: a traceback)
    (lambda d: d["checks"]["viewpoint"].update(flag=10 ** 400), "checks.viewpoint.flag: must be finite"),
    (lambda d: d["references"]["squeeze"][0].update(values=[10 ** 400]), "values must be numbers"),
    (lambda d: d["references"]["density"]["means"][0].__setitem__(0, 10 ** 400), "density model"),
    (lambda d: d["calibration"].update(flag_rate_target=10 ** 400), "calibration.flag_rate_target: must be finite"),
    (lambda d: d["calibration"].update(flag_rate_target=float("inf")), "calibration.flag_rate_target"),
    # falsy values of the wrong type were read as empty (no checks, no references)
    (lambda d: d.update(checks=[]), "checks"),
    (lambda d: d.update(checks=False), "checks"),
    (lambda d: d.update(references=0), "references"),
    (lambda d: d.update(calibration=[]), "calibration"),
    (lambda d: d["references"].update(squeeze=0), "references.squeeze"),
    # one call to the model server per copy: 400 round trips for one request
    (lambda d: d["noise"].update(first_batch=1, growth=1), "more than 24 batches"),
])
def test_bad_policies_raise_policy_error(mutate: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        policy_from_dict(_broken(mutate))


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "robustgate.policy.v2",\n  "version": }')
    with pytest.raises(PolicyError, match=r"bad\.json: not valid JSON \(line 2"):
        load_policy(bad)
    for text in ('{"version": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000):  # past int()'s digits; the stack
        bad.write_text(text)
        with pytest.raises(PolicyError, match=r"bad\.json: not valid JSON"):
            load_policy(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(_broken(lambda d: d.update(mode="loud"))))
    with pytest.raises(PolicyError, match=r"wrong\.json: mode"):
        load_policy(wrong)


def test_model_hash_must_match() -> None:
    policy = make_policy()
    policy.check_model(SHA_M.upper())
    with pytest.raises(PolicyError, match="calibrated for model"):
        policy.check_model("c" * 64)


def test_budgets_and_cheap_plan() -> None:
    policy = make_policy()
    assert policy.budget(Check.SQUEEZE) == 3 and policy.budget(Check.VIEWPOINT) == 6
    assert policy.budget(Check.DENSITY) == 0 and policy.budget(Check.NOISE) == 32  # scored copies
    plan = policy.cheap_plan(seed=99)
    assert plan.seed == 99 and plan.return_features
    assert plan.occlusion.grid == 0 and plan.shuffle.count == 0 and plan.noise.count == 0
    assert plan.rows == 1 + 3 + 6
    assert policy.noise_plan(5, 16).rows == 17
    # Only noise batches need plan version 3 (a stream with offsets): the policy's own probe
    # stays at 2, which archives and gateways from before version 3 read.
    assert policy.probe.version == 2 and policy.cheap_plan(5).version == 2
    assert policy.noise_plan(5, 16, offset=8).version == 3 and policy.noise_plan(5, 16, offset=8).noise.offset == 8
    # one template, re-seeded per request: plans differ in their seed only
    assert policy.cheap_plan(7) == replace(plan, seed=7)
    assert replace(policy, checks={**policy.checks, Check.VIEWPOINT: replace(
        policy.checks[Check.VIEWPOINT], enabled=False)}).cheap_plan(99).views == ()


def test_draft_policy_is_valid_and_runs_viewpoint_only() -> None:
    policy = draft_policy("m", SHA_M, SHA_D, sigma=0.25)
    assert policy.mode is Mode.MONITOR
    assert [c for c in Check if policy.enabled(c)] == [Check.VIEWPOINT]
    assert policy.cheap_plan(0).rows == 7


def _scores(**values: float) -> dict[Check, CheckScore | float]:
    return {Check(k): v for k, v in values.items()}


def test_decide_enforce() -> None:
    policy = make_policy()
    assert decide(_scores(squeeze=0.9, viewpoint=0.2, density=1.0), policy).decision \
        is Decision.PASS
    flagged = decide(_scores(squeeze=0.96, viewpoint=0.2, density=1.0), policy)
    assert flagged.decision is Decision.FLAG and not flagged.withhold_label
    assert flagged.result(Check.SQUEEZE).verdict is Decision.FLAG
    rejected = decide(_scores(squeeze=0.9, viewpoint=0.2, density=7.0), policy,
                      forward_passes=11)
    assert rejected.decision is rejected.would_be is Decision.REJECT
    assert rejected.withhold_label and rejected.forward_passes == 11
    line = rejected.result(Check.DENSITY)
    assert (line.score, line.flag_threshold, line.reject_threshold) == (7.0, 3.0, 6.0)
    assert rejected.policy_version == "7"


def test_threshold_is_crossed_only_strictly() -> None:
    assert decide(_scores(squeeze=0.95, viewpoint=1.0), make_policy()).decision \
        is Decision.FLAG  # viewpoint 1.0 == reject: not crossed; 1.0 > flag 0.5
    assert decide(_scores(squeeze=0.95), make_policy()).decision is Decision.PASS


def test_disabled_and_missing_checks() -> None:
    report = decide(_scores(occlusion=5.0, squeeze=0.1), make_policy())
    assert report.decision is Decision.PASS
    occ = report.result(Check.OCCLUSION)
    assert occ.status is CheckStatus.DISABLED and occ.verdict is None and occ.score == 5.0
    assert report.result(Check.NOISE).status is CheckStatus.SKIPPED
    assert report.result(Check.SQUEEZE).status is CheckStatus.SCORED
    assert [r.check for r in report.checks] == list(Check)


def test_monitor_answers_and_records_would_be() -> None:
    report = decide(_scores(density=9.0), make_policy(Mode.MONITOR))
    assert report.decision is Decision.PASS and report.would_be is Decision.REJECT
    assert not report.withhold_label and report.mode is Mode.MONITOR


def test_off_runs_nothing() -> None:
    report = decide(_scores(density=9.0), make_policy(Mode.OFF))
    assert report.decision is Decision.PASS and report.would_be is None
    assert all(r.status is CheckStatus.SKIPPED and r.score is None for r in report.checks)


@pytest.mark.parametrize("budget", [1, 7, 8, 9, 24, 400, 401, 10_000, 220_000])
@pytest.mark.parametrize("first, growth", [(1, 1), (8, 1), (8, 2), (42, 2), (1, 3), (100, 1)])
def test_the_batch_limit_counts_the_sequential_schedule(budget: int, first: int, growth: int) -> None:
    from service.gate.policy import batches_over
    from service.gate.sequential import batch_schedule

    n = len(batch_schedule(budget, first=first, growth=growth))
    assert not batches_over(budget, first, growth, n) and batches_over(budget, first, growth, n - 1)
    assert NoiseSettings(sigma=0.25, max_samples=400).max_samples == 400  # the shipped schedule: 6 batches
