"""The fitted squeeze detector: features, fit, JSON, and its use by the policy and engine."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from service.gate.allocation import attack_weights
from service.gate.checks import Check, squeeze_scores
from service.gate.defaults import default_probe
from service.gate.cascade import GateRun
from service.gate.engine import check_scores, detector_input, raw_scores, score
from service.gate.errors import CalibrationError, PolicyError
from service.gate.policy import References
from service.gate.policy_io import policy_from_dict, policy_to_dict
from service.gate.quantile import EmpiricalCDF
from service.gate.report import CheckStatus
from service.gate.squeeze_detector import (
    CONTEXT_FEATURES, JITTER_FEATURES, Moves, SqueezeDetector, context_features,
    fit_squeeze_detector, jitter_features, measure_squeeze, squeeze_features,
)
from tests.test_gate_policy import make_policy

S = 3
F = 2 * S + 1


def synthetic(n: int, shift: float, seed: int) -> np.ndarray:
    """Features float [n, F]: standard normal, the drop features (S..2S-1) moved by shift."""
    x = np.random.default_rng(seed).normal(size=(n, F))
    x[:, S:2 * S] += shift
    return x


def test_features_measure_distance_drop_and_margin() -> None:
    base = np.array([3.0, 1.0, 0.0, 0.0])
    # Squeezer 1 moves nothing; squeezer 2 takes 1 from the top class and gives it to class 1.
    squeezed = np.vstack([base, base + np.array([-1.0, 1.0, 0.0, 0.0])])
    f = squeeze_features(base, squeezed)
    assert f.shape == (5,)
    assert f[0] == pytest.approx(np.log(1e-3))
    assert f[1] == pytest.approx(np.log(np.sqrt(2) + 1e-3))
    assert f[2] == pytest.approx(0.0) and f[3] == pytest.approx(1.0)  # centred drops
    assert f[4] == pytest.approx(np.log(2.0 + 1e-3))  # base margin 3 - 1
    # Logits are defined up to a shift: moving every squeezed logit by 5 changes nothing.
    assert squeeze_features(base, squeezed + 5.0) == pytest.approx(f)
    with pytest.raises(ValueError, match="logits"):
        squeeze_features(base, squeezed[:, :3])


def test_fit_separates_and_its_clean_cdf_holds_the_flag_rate() -> None:
    clean, attacked = synthetic(2000, 0.0, 1), synthetic(500, 2.0, 2)
    det = fit_squeeze_detector(clean, attacked)
    assert det.squeezers == S
    # The weight goes to the features that separate, not to the noise ones.
    assert np.all(np.abs(det.weights[S:2 * S]) > 5 * np.abs(det.weights[:S]).max())
    held_clean, held_attacked = synthetic(4000, 0.0, 3), synthetic(1000, 2.0, 4)
    clean_scores = np.array([det.score(x) for x in held_clean])
    attacked_scores = np.array([det.score(x) for x in held_attacked])
    assert np.mean(clean_scores > 0.95) == pytest.approx(0.05, abs=0.015)
    # Three features shifted by 2 sd: a linear detector sees a 2 * sqrt(3) sd shift.
    assert np.mean(attacked_scores > 0.95) > 0.85


def test_attack_weights_steer_the_fit() -> None:
    clean = synthetic(1000, 0.0, 5)
    a = synthetic(400, 0.0, 6)
    a[:200, 0] += 3.0       # set 1 moves feature 0
    a[200:, S] += 3.0       # set 2 moves feature S
    heavy_first = fit_squeeze_detector(clean, a, np.r_[np.full(200, 10.0), np.full(200, 0.1)])
    heavy_second = fit_squeeze_detector(clean, a, np.r_[np.full(200, 0.1), np.full(200, 10.0)])
    assert heavy_first.weights[0] > heavy_first.weights[S]
    assert heavy_second.weights[S] > heavy_second.weights[0]


@pytest.mark.parametrize("clean, attacked, weights, match", [
    (np.zeros((10, F)), np.zeros((5, F - 1)), None, "features"),
    (np.zeros((1, F)), np.zeros((5, F)), None, "at least"),
    (np.full((10, F), np.nan), np.zeros((5, F)), None, "non-finite"),
    (np.zeros((10, F)), np.zeros((5, F)), np.ones(4), "weights"),
    (np.zeros((10, F)), np.zeros((5, F)), -np.ones(5), "weights"),
])
def test_bad_fit_inputs_raise(clean, attacked, weights, match) -> None:
    with pytest.raises(CalibrationError, match=match):
        fit_squeeze_detector(clean, attacked, weights)


def test_json_round_trip_and_bad_files() -> None:
    det = fit_squeeze_detector(synthetic(300, 0.0, 7), synthetic(100, 1.5, 8))
    again = SqueezeDetector.from_dict(json.loads(json.dumps(det.to_dict())))
    assert again == det
    x = synthetic(5, 1.0, 9)
    assert again.decision(x) == pytest.approx(det.decision(x))
    good = det.to_dict()
    for bad, match in (({**good, "extra": 1}, "optionally"), ({**good, "bias": "x"}, "bias"),
                       ({**good, "weights": good["weights"][:-1]}, "length"),
                       ({**good, "scale": [0.0] * F}, "scale"),
                       ({**good, "mean": ["a"] * F}, "squeeze detector"),
                       # integers beyond any float: OverflowError, a traceback at the gateway's start
                       ({**good, "bias": 10 ** 400}, "squeeze detector"),
                       ({**good, "mean": [10 ** 400] * F}, "squeeze detector")):
        with pytest.raises(CalibrationError, match=match):
            SqueezeDetector.from_dict(bad)


def ring(n: int, seed: int, attacked: bool) -> np.ndarray:
    """Features float [n, F], standard normal; attacked images have feature S moved 3 sd
    away from 0 in either direction, so no single linear direction separates them."""
    x = np.random.default_rng(seed).normal(size=(n, F))
    if attacked:
        x[:, S] = np.where(x[:, S] >= 0, 1.0, -1.0) * (np.abs(x[:, S]) + 3.0)
    return x


def test_a_hidden_layer_separates_what_a_logistic_regression_cannot() -> None:
    clean, attacked = ring(2000, 20, False), ring(600, 21, True)
    linear = fit_squeeze_detector(clean, attacked)
    layered = fit_squeeze_detector(clean, attacked, hidden=8)
    assert (linear.hidden, layered.hidden) == (0, 8)
    assert layered.weights.shape == (8,) and layered.hidden_weights.shape == (8, F)
    assert layered.squeezers == S
    held_clean, held_attacked = ring(4000, 22, False), ring(1000, 23, True)

    def caught(det: SqueezeDetector) -> float:
        cut = np.quantile(det.decision(held_clean), 0.95)
        return float(np.mean(det.decision(held_attacked) > cut))

    assert caught(layered) > 0.95
    assert caught(linear) < 0.6  # a shift in either direction: a line sees about half
    # Its clean CDF still holds the flag rate on images the fit never saw.
    scores = np.array([layered.score(x) for x in held_clean])
    assert np.mean(scores > 0.95) == pytest.approx(0.05, abs=0.015)
    # The decision is the documented formula: tanh layer, then the logistic output.
    x = held_attacked[:4]
    z = (x - layered.mean) / layered.scale
    by_hand = np.tanh(z @ layered.hidden_weights.T + layered.hidden_bias) @ layered.weights + layered.bias
    assert layered.decision(x) == pytest.approx(by_hand)


def test_a_hidden_layer_fit_is_deterministic_for_a_seed() -> None:
    clean, attacked = ring(500, 24, False), ring(200, 25, True)
    one, two = (fit_squeeze_detector(clean, attacked, hidden=4, seed=3) for _ in range(2))
    assert one == two
    other = fit_squeeze_detector(clean, attacked, hidden=4, seed=4)
    assert not np.array_equal(other.hidden_weights, one.hidden_weights)
    with pytest.raises(CalibrationError, match="hidden"):
        fit_squeeze_detector(clean, attacked, hidden=-1)


def test_a_hidden_layer_round_trips_and_bad_layers_are_refused() -> None:
    det = fit_squeeze_detector(ring(300, 26, False), ring(100, 27, True), hidden=4)
    data = json.loads(json.dumps(det.to_dict()))
    assert set(data["hidden"]) == {"weights", "bias"} and len(data["weights"]) == 4
    again = SqueezeDetector.from_dict(data)
    assert again == det and again.hidden == 4
    x = ring(5, 28, True)
    assert again.decision(x) == pytest.approx(det.decision(x))
    assert not again == fit_squeeze_detector(ring(300, 26, False), ring(100, 27, True))
    # Without the layer, its output weights [4] do not fit the F features: refused.
    layer = data["hidden"]
    for bad, match in (({**data, "hidden": {"weights": layer["weights"]}}, "hidden"),
                       ({**data, "hidden": {**layer, "bias": layer["bias"][:-1]}}, "hidden layer"),
                       ({**data, "hidden": {**layer, "weights": [r[:-1] for r in layer["weights"]]}},
                        "hidden layer"),
                       ({**data, "hidden": {**layer, "bias": ["x"] * 4}}, "hidden"),
                       ({**data, "hidden": {**layer, "bias": [float("nan")] * 4}}, "non-finite"),
                       ({k: v for k, v in data.items() if k != "hidden"}, "length")):
        with pytest.raises(CalibrationError, match=match):
            SqueezeDetector.from_dict(bad)
    with pytest.raises(CalibrationError, match="together"):
        replace(det, hidden_bias=None)
    with pytest.raises(ValueError, match="features"):
        det.decision(np.zeros(F - 1))


def detector_policy():
    policy = make_policy()
    det = fit_squeeze_detector(synthetic(300, 0.0, 10), synthetic(100, 2.0, 11))
    return replace(policy, references=replace(policy.references, squeeze_detector=det)), det


def test_policy_keeps_the_detector_and_refuses_a_mismatched_one() -> None:
    policy, det = detector_policy()
    d = json.loads(json.dumps(policy_to_dict(policy)))
    assert policy_from_dict(d).references.squeeze_detector == det
    d["references"]["squeeze_detector"]["bias"] = None
    with pytest.raises(PolicyError, match="bias"):
        policy_from_dict(d)
    four = fit_squeeze_detector(np.random.default_rng(0).normal(size=(50, 9)),
                                np.random.default_rng(1).normal(size=(20, 9)) + 1)
    with pytest.raises(PolicyError, match="fitted on 4 squeezers, the probe has 3"):
        replace(policy, references=replace(policy.references, squeeze_detector=four))


def test_measure_squeeze_by_hand() -> None:
    base = np.array([4.0, 1.0, 0.0])
    squeezed = np.array([[4.0, 1.0, 0.0], [3.0, 2.0, 1.0], [6.0, 3.0, 2.0]])
    m = measure_squeeze(base, squeezed)
    # rows: no move; the top-1 logit down 1 while the others rise 1; a uniform shift (no move)
    move = np.array([-1.0, 1.0, 1.0]) - 1 / 3
    assert m.l2 == pytest.approx([0.0, np.sqrt((move ** 2).sum()), 0.0])
    assert m.top_drop == pytest.approx([0.0, 4 / 3, 0.0])
    assert m.margin == 3.0
    assert m.l2 == pytest.approx(squeeze_scores(base, squeezed))


def test_engine_scores_squeeze_by_the_detector_and_falls_back_without_it() -> None:
    policy, det = detector_policy()
    spec = replace(default_probe(), return_features=False)
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(spec.rows, 10)).astype(np.float32)
    raw = raw_scores(logits, None, spec)
    lay = spec.layout()
    assert raw.squeeze_features == pytest.approx(
        tuple(squeeze_features(logits[0].astype(np.float64), logits[lay.squeeze])))
    # the per-squeezer L2 the details report is the squeeze check's own measure
    assert raw.squeeze == pytest.approx(tuple(squeeze_scores(logits[0], logits[lay.squeeze])))
    with_det = check_scores(raw, spec, policy.references)[Check.SQUEEZE]
    decision = float(det.decision(raw.squeeze_features))
    assert with_det.score == det.clean.at(decision)
    assert dict(with_det.detail)["detector_log_odds"] == pytest.approx(decision)
    plain = check_scores(raw, spec, References(squeeze=policy.references.squeeze))[Check.SQUEEZE]
    assert "detector_log_odds" not in dict(plain.detail)
    assert plain.score == max(cdf.at(x) for cdf, x in zip(policy.references.squeeze, raw.squeeze))


def test_detector_needs_a_clean_cdf() -> None:
    det = fit_squeeze_detector(synthetic(50, 0.0, 13), synthetic(20, 2.0, 14))
    with pytest.raises(CalibrationError, match="EmpiricalCDF"):
        SqueezeDetector(det.mean, det.scale, det.weights, det.bias, clean=[0.0])  # type: ignore[arg-type]
    assert isinstance(det.clean, EmpiricalCDF)


def test_attack_weights_are_normalised_and_checked() -> None:
    assert attack_weights(None, 4) == pytest.approx([0.25] * 4)
    assert attack_weights([1.0, 3.0], 2) == pytest.approx([0.25, 0.75])
    for bad in ([1.0], [0.0, 0.0], [1.0, -1.0], [1.0, np.nan]):
        with pytest.raises(CalibrationError, match="weights must be"):
            attack_weights(bad, 2)


def context_detector(seed: int = 20) -> SqueezeDetector:
    rng = np.random.default_rng(seed)
    k = F + len(CONTEXT_FEATURES)
    return fit_squeeze_detector(rng.normal(size=(300, k)), rng.normal(size=(100, k)) + 1.0,
                                context=CONTEXT_FEATURES, views=len(default_probe().views))


def test_context_features_measure_the_views_and_the_density() -> None:
    base = np.array([3.0, 1.0, 0.0, 0.0])
    # View 1 keeps the logits; view 2 moves 2 from the top class to class 1.
    views = np.vstack([base, base + np.array([-2.0, 2.0, 0.0, 0.0])])
    f = context_features(base, views, viewpoint_l1=0.25, density=4.0)
    assert f.shape == (len(CONTEXT_FEATURES),)
    assert f[0] == pytest.approx(np.log(4.0 + 1e-3)) and f[1] == pytest.approx(np.log(0.25 + 1e-3))
    assert f[2] == pytest.approx((np.log(1e-3) + np.log(np.sqrt(8) + 1e-3)) / 2)  # mean log L2
    assert f[3] == pytest.approx(1.0)  # mean centred top-1 drop: (0 + 2) / 2


def test_a_detector_with_context_round_trips_and_older_files_load_without_it() -> None:
    det = context_detector()
    assert det.context == CONTEXT_FEATURES and det.squeezers == S and det.views == 6
    data = json.loads(json.dumps(det.to_dict()))
    assert data["context"] == list(CONTEXT_FEATURES) and data["views"] == 6
    assert SqueezeDetector.from_dict(data) == det
    plain = fit_squeeze_detector(synthetic(300, 0.0, 7), synthetic(100, 1.5, 8))
    assert "context" not in plain.to_dict()  # a policy from before context reads the same
    assert SqueezeDetector.from_dict(plain.to_dict()).context == ()
    assert det != replace(det, views=5)
    even = {k: data[k][:-1] for k in ("mean", "scale", "weights")}  # 10 = 2 S + 1 + 4 for no S
    for bad, match in (({**data, "context": ["log_density"]}, "context must be"),
                       ({**data, "context": "log_density"}, "list of names"),
                       ({**data, **even}, "do not fit"),
                       ({**data, "views": 0}, "views must be"),
                       ({**data, "views": True}, "views must be"),
                       ({**plain.to_dict(), "views": 6}, "views must be")):
        with pytest.raises(CalibrationError, match=match):
            SqueezeDetector.from_dict(bad)


def test_a_context_detector_sends_views_and_features_and_needs_their_references() -> None:
    policy = make_policy()
    det = context_detector()
    with_det = replace(policy, references=replace(policy.references, squeeze_detector=det))
    # Viewpoint and density switched off: the detector still gets what it reads.
    off = {**with_det.checks, Check.VIEWPOINT: replace(with_det.checks[Check.VIEWPOINT], enabled=False),
           Check.DENSITY: replace(with_det.checks[Check.DENSITY], enabled=False)}
    plan = replace(with_det, checks=off).cheap_plan(0)
    assert plan.views == policy.probe.views and plan.return_features
    plan = replace(policy, checks=off).cheap_plan(0)  # no context detector: nothing extra
    assert plan.views == () and not plan.return_features
    # Squeeze off too: the detector reads nothing, and nothing extra is sent.
    all_off = {**off, Check.SQUEEZE: replace(off[Check.SQUEEZE], enabled=False)}
    plan = replace(with_det, checks=all_off).cheap_plan(0)
    assert plan.views == () and not plan.return_features and plan.squeeze.names() == ()
    # Its context needs the views it was fitted on and the density references.
    with pytest.raises(PolicyError, match="no references.density"):
        replace(with_det, references=replace(with_det.references, density=None), checks=off)
    for views in ((), policy.probe.views[:1]):
        with pytest.raises(PolicyError, match=f"6 views .* {len(views)} views in probe.views"):
            replace(with_det, probe=replace(with_det.probe, views=views), checks=off)
    # ... unless squeeze is off, where the detector is never used.
    replace(with_det, probe=replace(with_det.probe, views=()),
            checks={**all_off, Check.VIEWPOINT: replace(all_off[Check.VIEWPOINT], enabled=False)})
    # The plain detector's 7 weights read as 1 squeezer plus context: the probe has 3.
    plain = fit_squeeze_detector(synthetic(300, 0.0, 7), synthetic(100, 1.5, 8))
    misread = SqueezeDetector.from_dict({**plain.to_dict(), "context": list(CONTEXT_FEATURES), "views": 6})
    with pytest.raises(PolicyError, match="fitted on 1 squeezers, the probe has 3"):
        replace(policy, references=replace(policy.references, squeeze_detector=misread))


def test_engine_feeds_the_context_to_the_detector_and_falls_back_without_it() -> None:
    policy = make_policy()
    det = context_detector()
    refs = replace(policy.references, squeeze_detector=det)
    spec = default_probe()
    rng = np.random.default_rng(21)
    logits = rng.normal(size=(spec.rows, 10)).astype(np.float32)
    feats = rng.normal(size=policy.references.density.dim).astype(np.float32)
    raw = raw_scores(logits, feats, spec, refs.density)
    lay = spec.layout()
    want = context_features(logits[0].astype(np.float64), logits[lay.views].astype(np.float64),
                            raw.viewpoint, raw.density)
    assert raw.context_features == pytest.approx(tuple(want))
    got = check_scores(raw, spec, refs)[Check.SQUEEZE]
    assert got.score == det.clean.at(float(det.decision(raw.squeeze_features + raw.context_features)))
    assert detector_input(raw, det.context) == raw.squeeze_features + raw.context_features
    assert detector_input(raw, ()) == raw.squeeze_features
    # Context not measured as fitted (no density distance; other views): squeeze is left out,
    # not scored on the maximum's scale against the detector's thresholds.
    bare = raw_scores(logits, None, replace(spec, return_features=False))
    assert bare.context_features is None and detector_input(bare, det.context) is None
    assert Check.SQUEEZE not in check_scores(bare, spec, refs)
    assert Check.VIEWPOINT in check_scores(bare, spec, refs)
    fewer = replace(spec, views=spec.views[:2])
    short = raw_scores(logits[:fewer.rows], feats, fewer, refs.density)
    assert short.context_features is not None
    assert Check.SQUEEZE not in check_scores(short, fewer, refs)


def test_views_sent_only_as_context_are_charged_to_squeeze() -> None:
    policy = make_policy()
    det = context_detector()
    checks = {**policy.checks, Check.VIEWPOINT: replace(policy.checks[Check.VIEWPOINT], enabled=False)}
    no_view = replace(policy, references=replace(policy.references, squeeze_detector=det),
                      checks=checks)
    plan = no_view.cheap_plan(0)
    assert len(plan.views) == 6
    rng = np.random.default_rng(22)
    logits = rng.normal(size=(plan.rows, 10)).astype(np.float32)
    feats = rng.normal(size=policy.references.density.dim).astype(np.float32)
    run = GateRun.start(no_view, seed=0, certify=False).feed(logits, feats)
    for report in (score(logits, feats, plan, no_view), run.report()):
        by = {r.check: r for r in report.checks}
        assert by[Check.VIEWPOINT].status is CheckStatus.DISABLED
        assert by[Check.VIEWPOINT].forward_passes == 0 and by[Check.VIEWPOINT].score is None
        assert by[Check.SQUEEZE].forward_passes == len(plan.squeeze.names()) + 6
        assert sum(r.forward_passes for r in report.checks) == report.forward_passes - 1  # + base
    # With viewpoint on, the views are its own cost, and squeeze reads them for free.
    on = replace(no_view, checks=policy.checks)
    by = {r.check: r for r in score(logits, feats, on.cheap_plan(0), on).checks}
    assert by[Check.VIEWPOINT].forward_passes == 6
    assert by[Check.SQUEEZE].forward_passes == len(plan.squeeze.names())


def jitter_detector(seed: int = 30) -> SqueezeDetector:
    rng = np.random.default_rng(seed)
    probe = default_probe()
    k = F + len(CONTEXT_FEATURES) + len(JITTER_FEATURES)
    return fit_squeeze_detector(rng.normal(size=(300, k)), rng.normal(size=(100, k)) + 1.0,
                                context=CONTEXT_FEATURES + JITTER_FEATURES, views=len(probe.views),
                                jitter=(probe.jitter.count, probe.jitter.sigma))


def test_jitter_features_measure_the_copies() -> None:
    base = np.array([3.0, 1.0, 0.0, 0.0])
    # Copy 1 keeps the logits; copy 2 moves 3 from the top class to class 1 (top-1 flips).
    copies = np.vstack([base, base + np.array([-3.0, 3.0, 0.0, 0.0])])
    f = jitter_features(base, copies)
    assert f.shape == (len(JITTER_FEATURES),)
    assert f[0] == pytest.approx((np.log(1e-3) + np.log(np.sqrt(18) + 1e-3)) / 2)  # mean log L2
    assert f[1] == pytest.approx(1.5)  # mean centred top-1 drop: (0 + 3) / 2
    assert f[2] == pytest.approx(0.5)  # one copy of two keeps the top-1



def test_one_pass_over_every_variant_measures_each_section_as_alone() -> None:
    """The gateway measures a probe's variants once (``Moves``) and reads each section's
    rows; calibration and the studies measure a section alone. Both must give the same bits,
    or thresholds set on one would not hold on the other."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=10) * 3
    variants = base + rng.normal(size=(13, 10)) * rng.uniform(0.01, 2.0, size=(13, 1))
    variants[5] = base  # a variant that does not move
    sq, views, jit = slice(0, 3), slice(3, 9), slice(9, 13)
    moves = Moves.measure(base, variants)
    assert moves.squeeze(sq).features().tolist() == squeeze_features(base, variants[sq]).tolist()
    assert (moves.context(views, 0.25, 4.0).tolist()
            == context_features(base, variants[views], 0.25, 4.0).tolist())
    assert moves.jitter(jit).tolist() == jitter_features(base, variants[jit]).tolist()
    with pytest.raises(ValueError, match="logits"):
        Moves.measure(base, variants[:, :3])
    # Its sums stand in for numpy's norm and mean (per-call overhead, not arithmetic): the
    # same bits as the textbook forms, which the references of older policies were fitted on.
    d = variants - base
    d -= d.mean(axis=1, keepdims=True)
    assert moves.l2.tolist() == np.linalg.norm(d, axis=1).tolist()
    eps = 1e-3  # squeeze_detector's
    assert moves.jitter(jit).tolist() == [np.log(moves.l2[jit] + eps).mean(), moves.top_drop[jit].mean(),
                                          moves.keep[jit].mean()]

def test_a_jitter_detector_round_trips_and_names_its_copies() -> None:
    det = jitter_detector()
    assert det.context == CONTEXT_FEATURES + JITTER_FEATURES and det.jitter == (4, 0.03)
    data = json.loads(json.dumps(det.to_dict()))
    assert data["jitter"] == [4, 0.03]
    assert SqueezeDetector.from_dict(data) == det
    assert "jitter" not in context_detector().to_dict()  # older policies read the same
    assert det != replace(det, jitter=(3, 0.03))
    for bad, match in (({**data, "jitter": [0, 0.0]}, "jitter must be"),
                       ({**data, "jitter": [4, 0.0]}, "jitter must be"),
                       ({**data, "jitter": [4, 2.0]}, "jitter must be"),
                       ({**data, "jitter": [True, 0.03]}, "jitter must be"),
                       ({**data, "jitter": 4}, "jitter must be"),
                       ({**context_detector().to_dict(), "jitter": [4, 0.03]}, "jitter must be"),
                       ({**data, "context": list(JITTER_FEATURES)}, "context must be")):
        with pytest.raises(CalibrationError, match=match):
            SqueezeDetector.from_dict(bad)


def test_a_jitter_detector_gets_its_copies_and_only_it_does() -> None:
    policy = make_policy()
    assert policy.probe.jitter.count == 4
    assert policy.cheap_plan(0).jitter.count == 0  # no detector reads them: not sent
    assert policy.budget(Check.SQUEEZE) == 3
    det = jitter_detector()
    with_det = replace(policy, references=replace(policy.references, squeeze_detector=det))
    plan = with_det.cheap_plan(0)
    assert plan.jitter == policy.probe.jitter and plan.rows == 1 + 3 + 6 + 4
    assert with_det.budget(Check.SQUEEZE) == 3 + 4
    squeeze_off = {**with_det.checks, Check.SQUEEZE: replace(with_det.checks[Check.SQUEEZE], enabled=False)}
    assert replace(with_det, checks=squeeze_off).cheap_plan(0).jitter.count == 0
    # The probe must hold the copies the detector was fitted on.
    for jitter in (replace(policy.probe.jitter, count=2), replace(policy.probe.jitter, sigma=0.05)):
        with pytest.raises(PolicyError, match="4 jitter copies at sigma 0.03"):
            replace(with_det, probe=replace(with_det.probe, jitter=jitter))


def test_engine_feeds_the_jitter_to_the_detector_and_charges_it_to_squeeze() -> None:
    policy = make_policy()
    det = jitter_detector()
    noise_off = {**policy.checks, Check.NOISE: replace(policy.checks[Check.NOISE], enabled=False)}
    pol = replace(policy, references=replace(policy.references, squeeze_detector=det), checks=noise_off)
    spec = pol.cheap_plan(0)
    rng = np.random.default_rng(31)
    logits = rng.normal(size=(spec.rows, 10)).astype(np.float32)
    feats = rng.normal(size=policy.references.density.dim).astype(np.float32)
    raw = raw_scores(logits, feats, spec, pol.references.density)
    want = jitter_features(logits[0].astype(np.float64), logits[-4:].astype(np.float64))
    assert raw.jitter_features == pytest.approx(tuple(want))
    x = raw.squeeze_features + raw.context_features + raw.jitter_features
    assert detector_input(raw, det.context) == x
    assert detector_input(raw, CONTEXT_FEATURES) == raw.squeeze_features + raw.context_features
    got = check_scores(raw, spec, pol.references)[Check.SQUEEZE]
    assert got.score == det.clean.at(float(det.decision(x)))
    assert got.forward_passes == 3 + 4
    report = GateRun.start(pol, seed=0, certify=False).feed(logits, feats).report()
    assert report.forward_passes == spec.rows == 14
    assert sum(r.forward_passes for r in report.checks) == report.forward_passes - 1  # + base
    # Copies not measured as fitted (none, or fewer): squeeze is left out.
    for other in (replace(spec, jitter=replace(spec.jitter, count=0)),
                  replace(spec, jitter=replace(spec.jitter, count=2))):
        r = raw_scores(logits[:other.rows], feats, other, pol.references.density)
        assert Check.SQUEEZE not in check_scores(r, other, pol.references)


def test_jitter_is_compared_at_the_precision_the_wire_carries() -> None:
    det = jitter_detector()
    wire = float(np.float32(0.03))  # what a sigma read back from a ProbePlan holds
    assert wire != 0.03 and det.jitter_matches(4, wire) and det.jitter_matches(4, 0.03)
    assert not det.jitter_matches(3, 0.03) and not det.jitter_matches(4, 0.031)
    policy = make_policy()
    from_wire = replace(det, jitter=(4, wire))
    replace(policy, references=replace(policy.references, squeeze_detector=from_wire))  # loads
    for bad in ((4.7, 0.03), (True, 0.03), ("4", "0.03"), (4, True), (4, float("nan")), (4,)):
        with pytest.raises(CalibrationError, match="jitter must be"):
            replace(det, jitter=bad)


def test_calibration_probes_the_jitter_copies_only_where_it_fits_squeeze() -> None:
    from service.calibration import calibration_spec

    policy = make_policy()
    assert calibration_spec(policy, 0, [Check.SQUEEZE, Check.DENSITY]).jitter == policy.probe.jitter
    assert calibration_spec(policy, 0, [Check.VIEWPOINT, Check.DENSITY]).jitter.count == 0


def test_calibration_probes_each_image_with_the_seed_the_gateway_gives_it() -> None:
    """The detector is fitted on the jitter copies each image would get in serving: its own
    draw (the gateway's per-image seed), not one draw shared by every calibration image."""
    import asyncio

    from handlers.probe import count_rows
    from service.backend import ProbeOutput
    from service.calibration import calibration_spec, probe_all
    from service.pipeline import request_seed

    sent: list[tuple[bytes, int]] = []

    class Recorder:
        async def probe(self, model_name, image, plan, timeout_s, version=""):
            sent.append((image.tobytes(), plan.seed))
            return ProbeOutput(np.zeros((count_rows(plan), 10), np.float32),
                               np.zeros(4, np.float32), "cpu", "test")

    spec = calibration_spec(make_policy(), 7, [Check.SQUEEZE, Check.DENSITY])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 1, 28, 28), dtype=np.uint8)
    images[3] = images[0]  # the same image gets the same copies
    asyncio.run(probe_all(Recorder(), "m", images, spec, concurrency=2))
    seeds = dict(sent)
    assert len(sent) == 4 and len(seeds) == 3
    for im in images:
        assert seeds[im.tobytes()] == request_seed(7, im)  # what Pipeline.classify derives
    assert len(set(seeds.values())) == 3
