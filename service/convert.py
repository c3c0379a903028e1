"""Protobuf <-> domain conversions. Protobuf types stop here; the core speaks dataclasses."""

from __future__ import annotations

import functools

from robustgate.v1 import classifier_pb2 as pb
from service.gate.checks import Check
from service.gate.policy import Mode
from service.gate.report import CheckStatus, Decision, GateReport
from service.pipeline import ClassifyInput, ClassifyResult, RawTensor, certify_allowed
from service.registry import ServedModel
from service.decode import ENCODINGS, TENSOR_DTYPES
from service.errors import InvalidInput
from service.settings import MAX_REQUEST_ID_CHARS

_DECISION = {Decision.PASS: pb.DECISION_PASS, Decision.FLAG: pb.DECISION_FLAG, Decision.REJECT: pb.DECISION_REJECT}


def to_domain(req: pb.ClassifyRequest) -> ClassifyInput:
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(f"request_id is {len(req.request_id)} characters; the limit is {MAX_REQUEST_ID_CHARS}")
    which = req.WhichOneof("input")
    tensor = None
    if which == "tensor":
        tensor = RawTensor(req.tensor.shape, req.tensor.dtype, req.tensor.data)  # not copied: decode checks its length first
    return ClassifyInput(
        model=req.model,
        version=req.version,
        image=req.image if which == "image" else None,
        tensor=tensor,
        top_k=req.top_k,
        request_id=req.request_id,
        certify=req.certify if req.HasField("certify") else None,
    )


def report_to_pb(report: GateReport | None) -> pb.GateReport:
    if report is None:
        return pb.GateReport()
    checks = [
        pb.CheckResult(
            name=r.check.value,
            ran=r.status is CheckStatus.SCORED,
            score=r.score if r.score is not None else 0.0,
            flag_threshold=r.flag_threshold if r.flag_threshold is not None else float("inf"),
            reject_threshold=r.reject_threshold if r.reject_threshold is not None else float("inf"),
            verdict=_DECISION[r.verdict] if r.verdict is not None else pb.DECISION_UNSPECIFIED,
            forward_passes=r.forward_passes,
        )
        for r in report.checks
    ]
    cert = report.certificate
    radius = cert.radius if cert is not None and cert.radius is not None else 0.0
    return pb.GateReport(
        decision=_DECISION[report.decision],
        policy_decision=_DECISION[report.would_be] if report.would_be is not None else pb.DECISION_UNSPECIFIED,
        mode=report.mode.value,
        checks=checks,
        certified=bool(report.certified),
        certified_radius=radius,
        forward_passes=report.forward_passes,
        policy_version=report.policy_version,
    )


@functools.lru_cache(maxsize=16)
def _off_gate_pb(report: GateReport) -> pb.GateReport:
    """A gate-off report converted once: it is one object per policy (``gate.report.off_report``).
    Read-only: the answer's constructor copies it."""
    return report_to_pb(report)


def to_pb(res: ClassifyResult) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        request_id=res.request_id,
        model=res.model,
        version=res.version,
        classes=[pb.ClassScore(index=c.index, label=c.label, probability=c.probability) for c in res.classes],
        gate=_off_gate_pb(res.report) if res.report is not None and res.report.mode is Mode.OFF
        else report_to_pb(res.report),
        timings=pb.Timings(
            decode_seconds=res.timings.decode,
            backend_seconds=res.timings.backend,
            gate_seconds=res.timings.gate,
            total_seconds=res.timings.total,
        ),
    )


def model_to_pb(m: ServedModel, max_image_bytes: int, allow_certify: bool = True) -> pb.GetModelResponse:
    p = m.policy
    return pb.GetModelResponse(
        name=m.name,
        version=m.version,
        labels=list(m.labels),
        input=pb.InputSpec(shape=[m.input.channels, m.input.height, m.input.width], dtype="float32",
                           mode=m.input.mode, encodings=list(ENCODINGS), max_image_bytes=max_image_bytes,
                           tensor_dtypes=list(TENSOR_DTYPES)),
        policy=pb.PolicySummary(
            version=p.version,
            mode=p.mode.value,
            enabled_checks=[c.value for c in Check if p.enabled(c)],
            max_forward_passes=p.max_forward_passes,
            noise_sigma=p.noise.sigma,
            model_sha256=p.model_sha256,
            certify_default=p.noise.certify,
            certify_refused=not certify_allowed(m, allow_certify),
        ),
        formats=list(m.formats),
    )
