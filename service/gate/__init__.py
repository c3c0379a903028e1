"""The robustness gate: pure, seedable scoring of probe logits under a per-model policy.

No grpc and no I/O beyond policy files. Modules, one job each:

- ``plan``: ProbeSpec (mirror of robustgate.v1.ProbePlan), row layout, JSON mapping.
- ``checks``: per-check score functions; ``density``: Mahalanobis model; ``quantile``:
  empirical CDFs for quantile mapping.
- ``smoothing``: Clopper-Pearson certificates; ``sequential``: stop-when-settled sampling.
- ``policy`` / ``policy_io``: the versioned policy and its JSON file.
- ``report``: GateReport and the decision rule; ``engine``: logits -> report;
  ``cascade``: the per-request state machine (cheap stage, then noise batches).
- ``calibrate`` / ``allocation``: thresholds at target clean rates, shared budget.
"""

from service.gate.allocation import Allocation, allocate
from service.gate.calibrate import (
    CalibrationResult, calibrate_thresholds, fit_squeeze_references, threshold_at_rate,
    thresholds_at_rates, with_thresholds,
)
from service.gate.cascade import GateRun, Stage, inconclusive
from service.gate.checks import CHEAP_CHECKS, Check, softmax
from service.gate.density import DensityModel, fit_density
from service.gate.engine import RawScores, check_scores, raw_scores, score
from service.gate.errors import (
    CalibrationError, GateError, PlanError, PolicyError, ScoreInputError,
)
from service.gate.plan import (
    NoiseSpec, OcclusionSpec, PlanLayout, ProbeSpec, ShuffleSpec, SqueezeSpec, ViewSpec,
    derive_seed,
)
from service.gate.policy import (
    CheckPolicy, Mode, NoiseSettings, Policy, References, Thresholds,
)
from service.gate.policy_io import load_policy, policy_from_dict, policy_to_dict, save_policy
from service.gate.quantile import EmpiricalCDF, max_quantile
from service.gate.report import (
    CheckResult, CheckScore, CheckStatus, Decision, GateReport, decide, verdict_of,
)
from service.gate.smoothing import (
    Certificate, certified_radius, certify, certify_counts, clopper_pearson_lower,
)

__all__ = [
    "Allocation", "CHEAP_CHECKS", "CalibrationError", "CalibrationResult", "Certificate",
    "Check", "CheckPolicy", "CheckResult", "CheckScore", "CheckStatus", "Decision",
    "DensityModel", "EmpiricalCDF", "GateError", "GateReport", "GateRun", "Mode",
    "NoiseSettings", "NoiseSpec", "OcclusionSpec", "PlanError", "PlanLayout", "Policy",
    "PolicyError", "ProbeSpec", "RawScores", "References", "ScoreInputError", "ShuffleSpec",
    "SqueezeSpec", "Stage", "Thresholds", "ViewSpec", "allocate", "calibrate_thresholds",
    "certified_radius", "certify", "certify_counts", "check_scores", "clopper_pearson_lower",
    "decide", "derive_seed", "fit_density", "fit_squeeze_references", "inconclusive",
    "load_policy", "max_quantile", "policy_from_dict", "policy_to_dict", "raw_scores",
    "save_policy", "score", "softmax", "threshold_at_rate", "thresholds_at_rates",
    "verdict_of", "with_thresholds",
]
