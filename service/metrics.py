"""The gateway's Prometheus metrics, in one place.

Names follow Prometheus conventions: ``robustgate_<name>_<unit>``, base units (seconds),
``_total`` on counters. Label values come from fixed sets (model names from the registry,
decisions, status codes, check names, stages) — never a request id, client or image hash.
The registry is a parameter, so tests and several gateways in one process do not collide.

Every metric also works in prometheus_client's multiprocess mode (``--workers`` > 1,
``service/workers.py``): counters and histograms add up over the processes, each gauge says how
its processes' values combine, and the model's info is a gauge of value 1 (``Info`` has no
multiprocess mode; the exposition's series is the same ``robustgate_model_info{...} 1``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from service.gate.checks import Check

# Latency buckets for the measured range: a plain call ~1-3 ms, the full gate ~10-60 ms on
# CPU, certification up to ~0.5 s; up to 10 s for deadlines.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Check scores: squeeze, structure and noise lie in [0, 1], viewpoint in [0, 2], density
# (Mahalanobis distance) in tens to hundreds; one bucket set covers them with resolution where
# each lives, the calibrated flag and reject thresholds in buckets apart (squeeze's near 0.993
# and 0.9996, viewpoint's 0.54 and 0.64, density's 22 and 29). Occlusion's negative scores (an
# occluded copy surer than the image: far from suspicious) fall in the lowest bucket with the
# zeros: a bound at 0 would have read the median of mostly-zero scores (noise) as negative.
SCORE_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
                 0.99, 0.995, 0.999, 1.0, 1.5, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 50.0, 100.0, 200.0, 500.0)
RADIUS_BUCKETS = (0.0, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75, 1.0, 1.5)
# a certified request of the shipped policy takes 418 (max_forward_passes 430)
PASSES_BUCKETS = (1, 2, 5, 8, 11, 15, 20, 30, 50, 75, 100, 200, 300, 450, 600, 1000, 2000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("decode", "backend", "gate")
CHECK_NAMES = tuple(c.value for c in Check)  # a fixed label set


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("robustgate_requests", "Classification requests by model, gate decision and status code.",
                                ["model", "decision", "code"], registry=r)
        self.request_duration = Histogram("robustgate_request_duration_seconds",
                                          "Time to answer an admitted classification request, failed by the server or cut short too.",
                                          ["model"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.stage_duration = Histogram("robustgate_stage_duration_seconds", "Time spent per stage of a request.",
                                        ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.check_score = Histogram("robustgate_check_score", "Gate check scores (in each check's threshold units).",
                                     ["model", "check"], buckets=SCORE_BUCKETS, registry=r)
        self.check_verdicts = Counter("robustgate_check_verdicts", "Per-check verdicts of the checks that ran.",
                                      ["model", "check", "verdict"], registry=r)
        self.certified_radius = Histogram("robustgate_certified_radius",
                                          "Certified L2 radius (pixel units in [0, 1]) where certification ran; 0 = abstained.",
                                          ["model"], buckets=RADIUS_BUCKETS, registry=r)
        self.forward_passes = Histogram("robustgate_forward_passes", "Forward passes (variants) spent per request.",
                                        ["model"], buckets=PASSES_BUCKETS, registry=r)
        self.backend_requests = Counter("robustgate_backend_requests", "Calls to TorchServe by status code.",
                                        ["code"], registry=r)
        self.backend_worker_duration = Histogram(
            "robustgate_backend_worker_seconds", "Time the TorchServe worker spent on the batch that answered "
            "each call, by its own clock (decode, variants, forward); the rest of the call is transport, "
            "TorchServe's frontend and queue.", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.backend_batch_images = Histogram(
            "robustgate_backend_batch_images", "Images per TorchServe call sent by the coalescer.", ["model"],
            buckets=BATCH_BUCKETS, registry=r)
        self.inflight = Gauge("robustgate_inflight_requests", "Requests being processed.", registry=r,
                              multiprocess_mode="livesum")
        shed = Counter("robustgate_shed_requests", "Requests refused with RESOURCE_EXHAUSTED (overload), by the "
                       "limit reached: server (max_inflight), connection (max_inflight_per_connection), "
                       "stream (a stream refused as it opened: max_streams_per_connection) or backend "
                       "(TorchServe's job queue full).",
                       ["limit"], registry=r)
        self.shed = {limit: shed.labels(limit=limit)  # all exported from 0
                     for limit in ("server", "connection", "stream", "backend")}
        self.backend_up = Gauge("robustgate_backend_up", "1 while TorchServe answers the health probe.", registry=r,
                                multiprocess_mode="livemin")  # several processes: 1 while every one's probe answers
        self.gate_baseline = Gauge("robustgate_gate_baseline_ratio",
                                   "Share of clean traffic the calibrated policy may decide FLAG or worse "
                                   "(decision=FLAG) or REJECT (decision=REJECT): the calibration's targets.",
                                   ["model", "decision"], registry=r, multiprocess_mode="livemax")
        self.model_info = Gauge("robustgate_model_info", "Served model, its gate policy version and model sha256.",
                                ["model", "policy_version", "model_sha256", "mode"], registry=r,
                                multiprocess_mode="livemax")
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._models: dict[str, str] = {}  # TorchServe archive name -> the model it serves (declare)

    def series(self, metric: Any, *values: str) -> Any:
        """``metric.labels(*values)``, looked up once per label set: prometheus_client's
        ``labels()`` costs microseconds and an answered request touches a dozen series. Only for
        label values from fixed sets (module docstring), so the cache stays small."""
        key = (id(metric), values)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*values)
        return child

    def model_of(self, backend_name: str) -> str:
        """The ``model`` label for a call to TorchServe archive ``backend_name`` (what the
        backend and the coalescer know): the served model's name, as every other series has it."""
        return self._models.get(backend_name, backend_name)

    def declare(self, models: Iterable[tuple[str, str, str, str]], backends: Mapping[str, str] | None = None) -> None:
        """Publish each (model, policy_version, model_sha256, mode) and pre-create series;
        ``backends`` maps each TorchServe archive name to the model it serves."""
        self._models.update(backends or {})
        for name, policy_version, sha, mode in models:
            self.model_info.labels(model=name, policy_version=policy_version, model_sha256=sha, mode=mode).set(1)
            self.request_duration.labels(model=name)
            for decision in ("PASS", "FLAG", "REJECT"):  # rates count from the first request
                self.requests.labels(model=name, decision=decision, code="OK")
                for check in CHECK_NAMES:
                    self.check_verdicts.labels(model=name, check=check, verdict=decision)
            for check in CHECK_NAMES:
                self.check_score.labels(model=name, check=check)
            self.forward_passes.labels(model=name)
            self.backend_batch_images.labels(model=name)
            self.backend_worker_duration.labels(model=name)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)
        self.backend_requests.labels(code="OK")

    def baseline(self, model: str, calibration: Mapping[str, object]) -> None:
        """Publish the clean FLAG and REJECT rates the policy was calibrated for (its targets),
        the alerts' baseline."""
        for decision, key in (("FLAG", "flag_rate_target"), ("REJECT", "reject_rate_target")):
            value = calibration.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.gate_baseline.labels(model=model, decision=decision).set(float(value))


class SupervisorMetrics:
    """What only the supervisor of several workers knows (``service/workers.py``), served beside
    the workers' sums; a single-process gateway serves them too (1 worker, no restarts), so a
    dashboard reads every pod alike."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.workers = Gauge("robustgate_workers", "Gateway worker processes running on this port.",
                             registry=registry)
        self.restarts = Counter("robustgate_worker_restarts",
                                "Gateway worker processes that exited unasked, or hung and were killed, "
                                "and were replaced.", registry=registry)
