"""The gate's verdict as data: per-check results and the decision under the policy's mode.

Decision rule: REJECT if any enabled check's score crosses its reject threshold, FLAG if any
crosses its flag threshold, else PASS; a score crosses a threshold when ``score > threshold``
(``None`` never crosses). Modes: ``enforce`` acts on that decision (a REJECT withholds the
label); ``monitor`` always answers (``decision`` is PASS) and keeps what it would have done in
``would_be``; ``off`` runs nothing (``would_be`` is None).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from service.gate.checks import Check
from service.gate.policy import Mode, Policy, Thresholds
from service.gate.smoothing import Certificate


class Decision(StrEnum):
    """Outcome of the gate, also used per check."""

    PASS = "PASS"
    FLAG = "FLAG"
    REJECT = "REJECT"


_RANK = {Decision.PASS: 0, Decision.FLAG: 1, Decision.REJECT: 2}


class CheckStatus(StrEnum):
    """scored: the check ran and has a verdict. disabled: the policy switches it off (a score
    may still be shown, with no verdict). skipped: enabled but not run on this request (mode
    off, the cascade did not escalate, or the forward-pass ceiling left no room)."""

    SCORED = "scored"
    DISABLED = "disabled"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class CheckScore:
    """What one check measured. score: in the units its thresholds use (policy docstring).
    forward_passes: rows it cost. detail: named sub-scores (e.g. per-squeezer quantiles)."""

    score: float
    forward_passes: int = 0
    detail: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class CheckResult:
    """One line of the report. verdict is None unless status is ``scored``."""

    check: Check
    status: CheckStatus
    score: float | None
    flag_threshold: float | None
    reject_threshold: float | None
    verdict: Decision | None
    forward_passes: int = 0
    detail: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class GateReport:
    """The gate's answer for one image.

    decision: what the gateway acts on. would_be: what the checks concluded (equal to
    decision in enforce mode; None in off mode). checks: every check, in :class:`Check`
    order. certificate: the randomized-smoothing certificate when the noise stage ran.
    certified: whether it reached the policy's target radius (None when not run).
    forward_passes: rows the handler ran for this image, base rows included. escalated: the
    noise stage ran.
    """

    decision: Decision
    would_be: Decision | None
    mode: Mode
    policy_version: str
    checks: tuple[CheckResult, ...]
    forward_passes: int
    certificate: Certificate | None = None
    certified: bool | None = None
    escalated: bool = False

    @property
    def withhold_label(self) -> bool:
        """True when the label must not be returned (a REJECT in enforce mode)."""
        return self.decision is Decision.REJECT

    def result(self, check: Check) -> CheckResult:
        """The line for ``check``."""
        return next(r for r in self.checks if r.check is check)


def verdict_of(score: float, thresholds: Thresholds) -> Decision:
    """REJECT if ``score > reject``, FLAG if ``score > flag``, else PASS (None never crosses)."""
    if thresholds.reject is not None and score > thresholds.reject:
        return Decision.REJECT
    if thresholds.flag is not None and score > thresholds.flag:
        return Decision.FLAG
    return Decision.PASS


def decide(scores: Mapping[Check, CheckScore | float], policy: Policy, *,
           certificate: Certificate | None = None, forward_passes: int = 0,
           escalated: bool = False) -> GateReport:
    """Apply ``policy`` to the scores of one image; never raises for a verdict.

    scores: the checks that ran (a float is a score with no detail). Enabled checks absent
    from ``scores`` are reported ``skipped``; disabled ones ``disabled``.
    """
    results: list[CheckResult] = []
    worst = Decision.PASS
    for check in Check:
        cp = policy.checks[check]
        raw = scores.get(check)
        cs = raw if raw is None or isinstance(raw, CheckScore) else CheckScore(float(raw))
        if policy.mode is Mode.OFF:
            status, verdict = CheckStatus.SKIPPED, None
        elif not cp.enabled:
            status, verdict = CheckStatus.DISABLED, None
        elif cs is None:
            status, verdict = CheckStatus.SKIPPED, None
        else:
            status, verdict = CheckStatus.SCORED, verdict_of(cs.score, cp.thresholds)
            worst = max(worst, verdict, key=_RANK.__getitem__)
        results.append(CheckResult(
            check=check, status=status,
            score=None if cs is None or policy.mode is Mode.OFF else cs.score,
            flag_threshold=cp.thresholds.flag, reject_threshold=cp.thresholds.reject,
            verdict=verdict, forward_passes=0 if cs is None else cs.forward_passes,
            detail=() if cs is None else cs.detail))
    if policy.mode is Mode.OFF:
        decision, would_be = Decision.PASS, None
    elif policy.mode is Mode.MONITOR:
        decision, would_be = Decision.PASS, worst
    else:
        decision, would_be = worst, worst
    certified = (None if certificate is None
                 else certificate.certifies(policy.noise.target_radius))
    return GateReport(decision=decision, would_be=would_be, mode=policy.mode,
                      policy_version=policy.version, checks=tuple(results),
                      forward_passes=forward_passes, certificate=certificate,
                      certified=certified, escalated=escalated)


_OFF_REPORTS: dict[int, tuple[Policy, GateReport]] = {}


def off_report(policy: Policy) -> GateReport:
    """:func:`decide` for a policy in mode off, where no check runs and the image costs one
    forward pass, the plain call: the same report for every request, so it is built once per
    policy (the gate-off path answers thousands of calls a second, and building it costs more
    than the rest of the gate's work on that path)."""
    hit = _OFF_REPORTS.get(id(policy))
    if hit is None or hit[0] is not policy:
        if len(_OFF_REPORTS) >= 64:  # policies loaded and dropped (tests, reloads): keep it small
            _OFF_REPORTS.clear()
        hit = _OFF_REPORTS[id(policy)] = (policy, decide({}, policy, forward_passes=1))
    return hit[1]
