"""Domain -> protobuf conversion of an answer (service/convert.py)."""

from __future__ import annotations

from dataclasses import replace

from service import convert
from service.gate.cascade import GateRun
from service.gate.checks import Check
from service.gate.policy import Mode
from service.gate.report import decide, off_report
from service.pipeline import ClassifyResult, ClassScore
from tests.test_gate_engine import make_policy


def answer(report, request_id: str) -> ClassifyResult:
    return ClassifyResult(request_id, "m", "1", (ClassScore(3, "Dress", 0.9),), report)


def test_a_gate_off_answer_carries_its_policy_report_converted_once_and_never_shared() -> None:
    policy = make_policy(Mode.OFF)
    report = GateRun.start(policy, 0).report()
    assert report is off_report(policy)
    first, second = convert.to_pb(answer(report, "a")), convert.to_pb(answer(report, "b"))
    assert first.gate == convert.report_to_pb(report) == second.gate
    assert first.gate.mode == "off" and len(first.gate.checks) == len(report.checks)
    assert first.request_id == "a" and second.request_id == "b"
    first.gate.checks[0].name = "changed"  # an answer is the caller's to change
    assert convert.to_pb(answer(report, "c")).gate == second.gate != first.gate
    other = GateRun.start(replace(make_policy(Mode.OFF), version="4"), 0).report()
    assert convert.to_pb(answer(other, "d")).gate.policy_version == "4"


def test_gated_answers_carry_their_own_reports() -> None:
    policy = make_policy()
    low, high = decide({Check.DENSITY: 1.0}, policy), decide({Check.DENSITY: 9.0}, policy)
    a, b = convert.to_pb(answer(low, "a")), convert.to_pb(answer(high, "b"))
    assert a.gate.decision != b.gate.decision
    assert a.gate == convert.report_to_pb(low) and b.gate == convert.report_to_pb(high)
