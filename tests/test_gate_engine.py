"""Scoring one probe result, and the cascade driven by a fake (pure) model."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from service.gate.cascade import GateRun, Stage, inconclusive
from service.gate.checks import Check
from service.gate.defaults import default_probe
from service.gate.density import fit_density
from service.gate.engine import raw_scores, score
from service.gate.errors import GateError, ScoreInputError
from service.gate.plan import NoiseSpec, ProbeSpec
from service.gate.policy import (
    CheckPolicy, Mode, NoiseSettings, Policy, References, Thresholds,
)
from service.gate.quantile import EmpiricalCDF
from service.gate.report import CheckScore, CheckStatus, Decision, decide
from service.gate.sequential import disagreement_share
from service.gate.smoothing import certify_counts

C = 10
CHEAP_ROWS = 1 + 3 + 6  # base, three bit depths, six views


def row(shift: float = 0.0, top: int = 0) -> np.ndarray:
    """Softmax row: 0.9 on ``top`` (class 0 unless told), moved ``shift / 2`` to class 1, so
    its L1 distance to ``row()`` is ``shift``."""
    p = np.full(C, 0.1 / (C - 1))
    p[top] = 0.9
    p[top] -= shift / 2
    p[1 if top == 0 else 0] += shift / 2
    return p


def logits_at(distance: float) -> np.ndarray:
    """Logits of ``row()`` moved up on class 2 and down on class 3 by ``distance / sqrt(2)``:
    their centred L2 distance to ``log(row())`` is ``distance``, the top class stays 0."""
    z = np.log(row())
    z[2] += distance / np.sqrt(2)
    z[3] -= distance / np.sqrt(2)
    return z


class FakeModel:
    """A pure stand-in for the handler: answers a plan with logits of known softmax rows
    (squeeze rows: logits at a known distance, the unit the squeeze check measures)."""

    def __init__(self, squeeze_l2: float = 0.0, view_l1: float = 0.0,
                 occlusion_drop: float = 0.0, shuffle_keep: float = 0.9,
                 stream: np.ndarray | None = None, features: np.ndarray | None = None):
        self.squeeze_l2, self.view_l1 = squeeze_l2, view_l1
        self.occlusion_drop, self.shuffle_keep = occlusion_drop, shuffle_keep
        self.stream = np.ones(1000, bool) if stream is None else stream
        self.used = 0
        self.features = np.eye(C)[0] * 10.0 if features is None else features
        self.plans: list[ProbeSpec] = []

    def __call__(self, plan: ProbeSpec) -> tuple[np.ndarray, np.ndarray | None]:
        self.plans.append(plan)
        rows = [row()]
        for _ in range(plan.noise.count):
            rows.append(row() if self.stream[self.used] else row(top=2))
            self.used += 1
        n_squeeze = len(plan.squeeze.bit_depths) + len(plan.squeeze.median_sizes)
        squeezed = [logits_at(self.squeeze_l2)] * n_squeeze
        rest = [row(self.view_l1)] * len(plan.views)
        windows = plan.occlusion.grid ** 2
        rest += [row(2 * self.occlusion_drop)] + [row()] * (windows - 1) if windows else []
        rest += [row(2 * (0.9 - self.shuffle_keep))] * plan.shuffle.count
        logits = np.vstack([np.log(np.stack(rows))] + squeezed
                           + ([np.log(np.stack(rest))] if rest else [])).astype(np.float32)
        return logits, (self.features.astype(np.float32) if plan.return_features else None)


def make_policy(mode: Mode = Mode.ENFORCE, *, certify: bool = False,
                max_passes: int = 300, occlusion: bool = False, detect_samples: int = 32) -> Policy:
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(C), 30)
    feats = np.eye(C)[labels] * 10.0 + rng.normal(size=(labels.size, C))
    refs = References(squeeze=tuple(EmpiricalCDF.from_samples(np.linspace(0, 1, 101))
                                    for _ in default_probe().squeeze.names()),
                      density=fit_density(feats, labels),
                      squeezers=default_probe().squeeze.names())
    return Policy(
        model_name="m", model_sha256="a" * 64, data_sha256="b" * 64, version="3", mode=mode,
        probe=default_probe(), noise=NoiseSettings(sigma=0.25, alpha=0.001,
                                                   target_radius=0.25, certify=certify,
                                                   detect_samples=detect_samples),
        checks={Check.SQUEEZE: CheckPolicy(True, Thresholds(0.95, 0.99, 0.8)),
                Check.VIEWPOINT: CheckPolicy(True, Thresholds(0.5, 1.0, 0.3)),
                Check.DENSITY: CheckPolicy(True, Thresholds(6.0, 10.0, 5.0)),
                Check.OCCLUSION: CheckPolicy(occlusion, Thresholds(0.5, 0.8, 0.3)),
                Check.STRUCTURE: CheckPolicy(occlusion, Thresholds(0.85, 0.95, 0.8)),
                Check.NOISE: CheckPolicy(True, Thresholds(0.3, 0.6))},
        max_forward_passes=max_passes, references=refs)


def drive(policy: Policy, model: FakeModel, seed: int = 1, **kw: bool) -> GateRun:
    run = GateRun.start(policy, seed, **kw)
    while (plan := run.next_plan()) is not None:
        run = run.feed(*model(plan))
    return run


def test_score_one_matrix_with_every_section() -> None:
    policy = make_policy(occlusion=True)
    spec = replace(policy.cheap_plan(5), noise=NoiseSpec(sigma=0.25, count=20))
    model = FakeModel(squeeze_l2=0.905, view_l1=0.4, occlusion_drop=0.6, shuffle_keep=0.7,
                      stream=np.r_[np.ones(15, bool), np.zeros(5, bool)])
    logits, feats = model(spec)
    assert logits.shape == (spec.rows, C) == (1 + 20 + 3 + 6 + 16 + 4, C)
    report = score(logits, feats, spec, policy)
    sq = report.result(Check.SQUEEZE)
    assert sq.score == pytest.approx(91 / 101) and sq.verdict is Decision.PASS
    assert dict(sq.detail)["bits2_l2"] == pytest.approx(0.905, abs=1e-5)  # float32 logits
    assert report.result(Check.VIEWPOINT).score == pytest.approx(0.4)
    assert report.result(Check.OCCLUSION).score == pytest.approx(0.6)
    assert report.result(Check.OCCLUSION).verdict is Decision.FLAG
    assert report.result(Check.STRUCTURE).score == pytest.approx(0.7)
    assert report.result(Check.NOISE).score == pytest.approx(0.25)
    dens = policy.references.density
    assert dens is not None
    assert report.result(Check.DENSITY).score == pytest.approx(dens.distance(feats, 0))
    assert report.decision is Decision.FLAG and report.forward_passes == spec.rows
    assert report.certificate == certify_counts(0, 15, 20, 20, 0.25, 0.001)


def test_bad_inputs_raise_score_input_error() -> None:
    policy = make_policy()
    spec = policy.cheap_plan(0)
    logits, feats = FakeModel()(spec)
    with pytest.raises(ScoreInputError, match="rows|\\["):
        score(logits[:-1], feats, spec, policy)
    bad = logits.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ScoreInputError, match="non-finite"):
        score(bad, feats, spec, policy)
    with pytest.raises(ScoreInputError, match="features"):
        score(logits, None, spec, policy)
    with pytest.raises(ScoreInputError, match="features"):
        score(logits, feats[:3], spec, policy)


def test_clear_pass_skips_noise() -> None:
    model = FakeModel(squeeze_l2=0.1, view_l1=0.1)
    run = drive(make_policy(), model)
    report = run.report()
    assert len(model.plans) == 1 and report.forward_passes == CHEAP_ROWS
    assert report.decision is Decision.PASS and not report.escalated
    assert report.result(Check.NOISE).status is CheckStatus.SKIPPED
    assert report.certificate is None and report.certified is None


def test_cheap_reject_skips_noise() -> None:
    model = FakeModel(squeeze_l2=0.995, view_l1=1.5)
    report = drive(make_policy(), model).report()
    assert len(model.plans) == 1 and report.decision is Decision.REJECT


@pytest.mark.parametrize("p_agree", [0.95, 0.75, 0.5, 0.2])
def test_inconclusive_escalates_and_matches_full_budget(p_agree: float) -> None:
    stream = np.random.default_rng(int(p_agree * 100)).random(1000) < p_agree
    policy = make_policy()
    model = FakeModel(squeeze_l2=0.9, view_l1=0.1, stream=stream)
    run = drive(policy, model)
    report = run.report()
    # the check scores the 32 copies its thresholds were calibrated on (noise.detect_samples),
    # though 290 passes are left after the 10 cheap rows
    assert report.escalated and run.budget == run.detect_budget == 32
    full = disagreement_share(int(stream[:32].sum()), 32)
    noise = report.result(Check.NOISE)
    assert noise.status is CheckStatus.SCORED and noise.score is not None
    assert (noise.score > 0.3) == (full > 0.3) and (noise.score > 0.6) == (full > 0.6)
    assert report.forward_passes == CHEAP_ROWS + sum(p.rows for p in model.plans[1:])
    assert report.forward_passes <= policy.max_forward_passes
    # one stream, not the cheap probe's seed, each batch where the last one stopped
    noise = [p.noise for p in model.plans[1:]]
    assert len({p.seed for p in model.plans[1:]}) == 1 and model.plans[1].seed != 1
    assert [n.offset for n in noise] == [sum(n.count for n in noise[:i]) for i in range(len(noise))]
    assert all(p.noise.sigma == 0.25 and p.views == () for p in model.plans[1:])


def test_noise_stage_saves_passes_on_clear_noise_verdicts() -> None:
    model = FakeModel(squeeze_l2=0.9, stream=np.ones(1000, bool))
    run = drive(make_policy(detect_samples=200), model)
    assert run.samples < run.budget == 200  # settled before the budget: share 0 can't exceed 0.3
    assert run.report().result(Check.NOISE).verdict is Decision.PASS
    # Copies drawn for the check alone certify nothing: stopped early, their bound would read
    # "not certified" (and fill the radius metric) where a request that asked would be.
    assert run.certificate() is None and run.report().certified is None


def test_noise_score_counts_the_calibrated_copies_when_a_certificate_draws_more() -> None:
    """Thresholds hold at the copy count they were calibrated on: a certificate's 400 copies
    must not dilute (or sharpen) the share the noise check reads. Copies 24-31 disagree (in
    the third batch, which runs past copy 32), and half of those after."""
    stream = np.r_[np.ones(24, bool), np.zeros(8, bool), np.random.default_rng(5).random(968) < 0.5]
    policy = make_policy(max_passes=500)
    run = drive(policy, FakeModel(squeeze_l2=0.9, stream=stream), certify=True)
    report = run.report()
    assert run.budget > 300 and run.detect_budget == 32 and run.samples > 32
    noise = report.result(Check.NOISE)
    assert noise.score == pytest.approx(8 / 32) and noise.verdict is Decision.PASS
    assert dict(noise.detail)["samples"] == 32 and dict(noise.detail)["budget"] == 32
    full = certify_counts(0, int(stream[:run.budget].sum()), run.budget, run.budget, 0.25, 0.001)
    assert report.certified == full.certifies(0.25)
    # the same image without a certificate draws only what the score needs (the fake model
    # answers copy i alike whatever the batches; the gateway's batches draw their own noise)
    alone = drive(policy, FakeModel(squeeze_l2=0.9, stream=stream), certify=False)
    lone = alone.report().result(Check.NOISE)
    assert alone.samples == alone.budget == 32
    assert (lone.score, lone.verdict, lone.detail) == (noise.score, noise.verdict, noise.detail)


@pytest.mark.parametrize("p_agree", [0.9, 0.7, 0.45])
def test_certify_and_detect_each_match_their_full_budget(p_agree: float) -> None:
    stream = np.random.default_rng(int(p_agree * 100)).random(1000) < p_agree
    policy = make_policy(max_passes=500)
    run = drive(policy, FakeModel(squeeze_l2=0.9, stream=stream), certify=True)
    report = run.report()
    share = disagreement_share(int(stream[:32].sum()), 32)
    noise = report.result(Check.NOISE)
    assert noise.score is not None
    assert (noise.score > 0.3) == (share > 0.3) and (noise.score > 0.6) == (share > 0.6)
    full = certify_counts(0, int(stream[:run.budget].sum()), run.budget, run.budget, 0.25, 0.001)
    assert report.certified == full.certifies(0.25)


def test_certification_opt_in_runs_on_clean_images() -> None:
    stream = np.random.default_rng(9).random(1000) < 0.999
    policy = make_policy(certify=True, max_passes=500)
    run = drive(policy, FakeModel(stream=stream))
    report = run.report()
    assert report.escalated and report.certificate is not None
    full = certify_counts(0, int(stream[:run.budget].sum()), run.budget, run.budget,
                          0.25, 0.001)
    assert report.certified == full.certifies(0.25)
    if report.certificate.radius is not None and full.radius is not None:
        assert report.certificate.radius <= full.radius
    no_cert = drive(policy, FakeModel(stream=stream), certify=False).report()
    assert no_cert.certificate is None and not no_cert.escalated


def test_ceiling_too_low_for_noise_skips_it() -> None:
    policy = make_policy(certify=True, max_passes=CHEAP_ROWS)
    model = FakeModel(squeeze_l2=0.9)
    report = drive(policy, model).report()
    assert len(model.plans) == 1 and report.forward_passes == CHEAP_ROWS
    assert report.result(Check.NOISE).status is CheckStatus.SKIPPED


@pytest.mark.parametrize("max_passes", [CHEAP_ROWS, CHEAP_ROWS + 9, 120, 500])
@pytest.mark.parametrize("agree", [1.0, 0.6, 0.52])
def test_no_plan_asks_more_rows_than_max_plan_rows(max_passes: int, agree: float) -> None:
    """The gateway holds ``max_plan_rows`` against the archive's max_variants at start-up, so
    it must bound every plan a request can send, certified or not, however the copies vote."""
    policy = make_policy(certify=True, max_passes=max_passes)
    model = FakeModel(squeeze_l2=0.9, stream=np.random.default_rng(3).random(1000) < agree)
    drive(policy, model)
    assert max(p.rows for p in model.plans) <= policy.max_plan_rows
    assert CHEAP_ROWS <= policy.max_plan_rows <= max(CHEAP_ROWS, max_passes - CHEAP_ROWS + 1)


def test_max_plan_rows_is_the_cheap_probe_or_the_whole_noise_budget() -> None:
    assert make_policy(max_passes=CHEAP_ROWS).max_plan_rows == CHEAP_ROWS  # no room for noise
    assert make_policy(max_passes=500).max_plan_rows == 1 + 400  # noise.max_samples in one batch
    assert make_policy(Mode.OFF, max_passes=500).max_plan_rows == 1  # plain calls only


def test_off_mode_sends_no_plan() -> None:
    policy = make_policy(Mode.OFF)
    run = GateRun.start(policy, 0, certify=True)
    assert run.next_plan() is None and run.stage is Stage.DONE
    report = run.report()
    assert report.decision is Decision.PASS and report.would_be is None
    # the same report for every request, built once per policy; the plain call is its one pass
    assert report == decide({}, policy, forward_passes=1) and GateRun.start(policy, 7).report() is report
    other = replace(make_policy(Mode.OFF), version="4")
    assert GateRun.start(other, 0).report().policy_version == "4"


def test_monitor_mode_runs_the_cascade_and_answers() -> None:
    report = drive(make_policy(Mode.MONITOR), FakeModel(squeeze_l2=0.995)).report()
    assert report.decision is Decision.PASS and report.would_be is Decision.REJECT


def test_runs_are_deterministic() -> None:
    stream = np.random.default_rng(4).random(1000) < 0.7
    a = drive(make_policy(), FakeModel(squeeze_l2=0.9, stream=stream), seed=11).report()
    b = drive(make_policy(), FakeModel(squeeze_l2=0.9, stream=stream), seed=11).report()
    assert a == b


def test_run_misuse_is_an_error() -> None:
    run = GateRun.start(make_policy(), 0)
    with pytest.raises(GateError):
        run.report()
    done = drive(make_policy(), FakeModel())
    with pytest.raises(GateError):
        done.feed(np.zeros((1, C), np.float32))


def test_inconclusive_band() -> None:
    policy = make_policy()

    def cs(**v: float) -> dict[Check, CheckScore]:
        return {Check(k): CheckScore(x) for k, x in v.items()}

    assert not inconclusive(cs(squeeze=0.5, viewpoint=0.1), policy)
    assert inconclusive(cs(squeeze=0.85, viewpoint=0.1), policy)
    assert inconclusive(cs(squeeze=0.97, viewpoint=0.1), policy)  # flagged, not rejected
    assert not inconclusive(cs(squeeze=0.85, viewpoint=1.2), policy)  # a reject settles it
    assert not inconclusive(cs(occlusion=0.9), policy)  # disabled checks do not count


def test_a_policy_of_the_noise_check_alone_runs_it_on_every_image() -> None:
    """``calibration --checks noise`` wrote a policy whose noise stage nothing could open (no
    cheap check to escalate): every image passed unscored, most of its copies changing answer."""
    base = make_policy()
    off = CheckPolicy(False, Thresholds(None, None))
    policy = replace(base, checks={**{c: off for c in Check}, Check.NOISE: base.checks[Check.NOISE]})
    assert inconclusive({}, policy)
    mostly_changed = np.random.default_rng(3).random(1000) < 0.2  # 4 copies in 5 change the answer
    report = drive(policy, FakeModel(stream=mostly_changed)).report()
    noise = report.result(Check.NOISE)
    assert report.escalated and noise.status is CheckStatus.SCORED and noise.verdict is Decision.REJECT
    assert report.decision is Decision.REJECT
    # a cheap check enabled with only a reject threshold cannot escalate either, and settles
    # the image where it rejects
    only_reject = replace(policy, checks={**policy.checks, Check.SQUEEZE: CheckPolicy(True, Thresholds(None, 0.99))})
    assert inconclusive({Check.SQUEEZE: CheckScore(0.5)}, only_reject)
    assert not inconclusive({Check.SQUEEZE: CheckScore(0.999)}, only_reject)


def test_asking_for_a_certificate_never_changes_the_decision() -> None:
    """Certification drew noise copies for an image the cheap checks had settled, and the noise
    check's verdict on them then counted: the same image passed without a certificate and was
    rejected with one (and certify traffic's clean flag rate was not the calibrated one)."""
    half = np.random.default_rng(4).random(1000) < 0.5
    policy = make_policy(max_passes=500)
    plain = drive(policy, FakeModel(squeeze_l2=0.1, view_l1=0.1, stream=half)).report()
    asked = drive(policy, FakeModel(squeeze_l2=0.1, view_l1=0.1, stream=half), certify=True)
    report = asked.report()
    assert plain.decision is report.decision is Decision.PASS
    assert report.result(Check.NOISE).status is CheckStatus.SKIPPED
    assert asked.samples > 0 and report.certificate is not None and report.certified is False
    assert not plain.escalated


class SeededModel(FakeModel):
    """As the handler draws them (plan version 3): copy i of a plan is copy offset + i of its
    seed's stream, so which copies agree depends on the seed and the index alone. A plan
    with another seed draws other copies (FakeModel's one stream, shared by every plan, does
    not tell them apart)."""

    def __init__(self, agree: float, **kw) -> None:
        super().__init__(**kw)
        self.agree = agree

    def __call__(self, plan: ProbeSpec) -> tuple[np.ndarray, np.ndarray | None]:
        stop = plan.noise.offset + plan.noise.count
        self.stream = (np.random.default_rng(plan.seed).random(stop) < self.agree)[plan.noise.offset:]
        self.used = 0
        return super().__call__(plan)


def test_sequential_noise_settles_exactly_the_full_budgets_verdicts() -> None:
    """Batches are pieces of one stream of copies, so stopping early settles the verdict the
    whole budget would give on the same image: with each batch its own seed (as before plan
    version 3) 2.1 % of clean decisions differed from the full budget's at 32 copies
    (benchmarks/results/cascade.md as of aef7a3c~1, 2026-12-06); here none may."""
    policy = make_policy(max_passes=500)
    policy = replace(policy, checks={**policy.checks, Check.NOISE: CheckPolicy(True, Thresholds(0.25, 0.6))})
    full = replace(policy, noise=replace(policy.noise, first_batch=policy.noise.detect_samples))
    batches = differ = 0
    for seed in range(300):
        for agree in (0.6, 0.75, 0.9):
            seq = drive(policy, SeededModel(agree, squeeze_l2=0.85), seed=seed)
            whole = drive(full, SeededModel(agree, squeeze_l2=0.85), seed=seed)
            assert whole.batches == 1
            batches += seq.batches
            differ += seq.report().decision is not whole.report().decision
    assert batches > 900  # sequential runs that cut their copies into several batches
    assert differ == 0


def test_asking_for_a_certificate_never_changes_the_noise_checks_verdict() -> None:
    """With the noise check open, a certified run cut its batches for the certificate's 400
    copies, so its first 32 (the scored ones) were other noise than a plain run's: 108 of 300
    images changed decision when a certificate was asked for (review, with the handler's
    seeded draws). The scored copies now come first, in a plain run's batches; the check's
    forward passes are its own copies, not the certificate's too."""
    policy = make_policy(max_passes=500)
    policy = replace(policy, checks={**policy.checks, Check.NOISE: CheckPolicy(True, Thresholds(0.25, 0.6))})
    opened = changed = 0
    for seed in range(200):
        # the cheap checks inconclusive (squeeze in its escalation band): the noise stage opens
        plain = drive(policy, SeededModel(0.75, squeeze_l2=0.85), seed=seed)
        asked = drive(policy, SeededModel(0.75, squeeze_l2=0.85), seed=seed, certify=True)
        p, a = plain.report(), asked.report()
        assert a.certificate is not None and asked.samples >= plain.samples
        if p.result(Check.NOISE).status is CheckStatus.SCORED:
            opened += 1
            pn, an = p.result(Check.NOISE), a.result(Check.NOISE)
            assert (an.score, an.verdict, an.forward_passes) == (pn.score, pn.verdict, pn.forward_passes), seed
            assert an.forward_passes == plain.detect_samples <= 32
        changed += p.decision is not a.decision
    assert opened == 200 and changed == 0


def test_a_certified_run_with_the_noise_check_open_stays_within_its_ceiling() -> None:
    """The scored copies first, on their own schedule, then the certificate's: that can take
    one batch (one base row) more than the plain schedule the budget was sized for, and a
    review found 61 passes under a ceiling of 60. The budget is sized for both schedules."""
    from service.gate.policy import MAX_NOISE_BATCHES

    over = []
    for ceiling in (40, 60, 64, 90, 130):
        for detect in (1, 3, 10, 16, 32):
            policy = make_policy(max_passes=ceiling, detect_samples=detect)
            policy = replace(policy, checks={**policy.checks,
                                             Check.NOISE: CheckPolicy(True, Thresholds(0.1, 0.3))})
            for agree in (0.6, 0.97, 1.0):
                for seed in range(6):
                    run = drive(policy, SeededModel(agree, squeeze_l2=0.85), seed=seed, certify=True)
                    if run.forward_passes > ceiling or run.batches > MAX_NOISE_BATCHES:
                        over.append((ceiling, detect, agree, seed, run.forward_passes, run.batches))
    assert not over, over[:5]
    # the review's case: a budget of 47 sized for 3 batches, drawn in 4
    policy = make_policy(max_passes=60, detect_samples=32)
    policy = replace(policy, checks={**policy.checks, Check.NOISE: CheckPolicy(True, Thresholds(0.1, 0.3))})
    run = drive(policy, SeededModel(0.97, squeeze_l2=0.85), seed=1, certify=True)
    assert run.batches == 4 and run.forward_passes <= 60 and run.report().certificate is not None


def test_raw_scores_without_density_model() -> None:
    spec = ProbeSpec(return_features=True)
    raw = raw_scores(np.log(row()[None, :]), None, spec, density=None)
    assert raw.top_class == 0 and raw.density is None and raw.squeeze is None


def test_a_settled_certificate_draws_no_copy_past_the_scored_ones() -> None:
    """A target radius no budget reaches settles the certificate at once ("not certified"):
    what remains is the noise check's 32 copies, and no batch runs past them."""
    stream = np.random.default_rng(3).random(1000) < 0.7
    policy = make_policy(max_passes=500)
    policy = replace(policy, noise=replace(policy.noise, target_radius=0.6))
    model = FakeModel(squeeze_l2=0.9, stream=stream)
    run = drive(policy, model, certify=True)
    assert run.budget > 300 and run.samples == run.detect_budget == 32
    assert run.report().certified is False


def test_a_certificate_takes_the_rest_of_its_budget_rather_than_stop_just_short() -> None:
    """Every copy agreeing, the verdict (certified at the target radius) settles 8 copies short
    of 400; the bound counts those as disagreeing, which cut the radius from 0.53 to 0.41. The
    last batch takes the rest instead, in as many round trips: the full budget's radius."""
    from service.gate.sequential import batch_schedule

    policy = make_policy(certify=True, max_passes=500)
    model = FakeModel(stream=np.ones(1000, dtype=bool))
    run = drive(policy, model)
    cert = run.report().certificate
    full = certify_counts(0, run.budget, run.budget, run.budget, 0.25, 0.001)
    assert run.budget == 400 and run.samples == 400
    assert cert is not None and cert.radius == full.radius and full.radius > 0.5
    assert run.batches <= len(batch_schedule(run.budget))
    assert [p.noise.count for p in model.plans[1:]][-1] > [p.noise.count for p in model.plans[1:]][-2]
