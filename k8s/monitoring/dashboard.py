"""The RobustGate Grafana dashboard, as code: :func:`build` returns the dashboard JSON model
(Grafana schema 39, plain dicts, no dependency). ``python k8s/monitoring/generate.py`` writes
it to ``dashboard.json``; tests/test_observability.py checks every panel's PromQL names only
metrics the gateway, its gRPC interceptor, TorchServe or the recording rules export.

Rows: traffic, latency, errors, robustness (decisions, per-check score distributions,
certified radius, forward passes) and TorchServe (throughput, queue and worker times, host).
"""

from __future__ import annotations

from typing import Any

Panel = dict[str, Any]

UID = "robustgate"
TITLE = "RobustGate"
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'  # the model selector every gateway query carries
RATE = "$__rate_interval"


def target(expr: str, legend: str = "") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend or "__auto", "range": True}


DASHED_BASELINE = {"matcher": {"id": "byRegexp", "options": "^baseline.*"},
                   "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}]}


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
               stack: bool = False, w: int = 8, h: int = 8, overrides: list[dict[str, Any]] | None = None,
               **extra: Any) -> Panel:
    custom: dict[str, Any] = {"fillOpacity": 20 if stack else 5, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets, "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}, **extra}


def stat(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short", w: int = 4,
         h: int = 4, thresholds: list[dict[str, Any]] | None = None) -> Panel:
    steps = thresholds or [{"color": "green", "value": None}]
    return {"type": "stat", "title": title, "description": description, "datasource": DS, "targets": targets,
            "gridPos": {"w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto"}}


def heatmap(title: str, description: str, expr: str, unit: str, **extra: Any) -> Panel:
    t = {**target(expr, "{{le}}"), "format": "heatmap"}
    return {"type": "heatmap", "title": title, "description": description, "datasource": DS, "targets": [t],
            "gridPos": {"w": 6, "h": 8},
            "options": {"calculate": False, "yAxis": {"unit": unit}, "cellGap": 1,
                        "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5, "steps": 64}},
            **extra}


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def quantiles(metric: str, by: str, selector: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> list[dict[str, Any]]:
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
                   f"{prefix}p{round(q * 100)}") for q in qs]


def panels() -> list[Panel]:
    return [
        row("Traffic"),
        timeseries("Requests by status code", "Classification requests per second, by gRPC status code.",
                   [target(f"sum by (code) (rate(robustgate_requests_total{{{M}}}[{RATE}]))", "{{code}}")],
                   "reqps", stack=True),
        timeseries("Gate decisions", "Answered requests per second by gate decision (PASS, FLAG, REJECT).",
                   [target(f'sum by (decision) (rate(robustgate_requests_total{{{M}, code="OK"}}[{RATE}]))',
                           "{{decision}}")], "reqps", stack=True),
        timeseries("In flight and shed", "Requests being processed per gateway, and requests refused with "
                   "RESOURCE_EXHAUSTED because the gateway was at max_inflight (server: scale out) or a client "
                   "connection at its share, max_inflight_per_connection (connection: that client sends more "
                   "at once than its share; the gateway's log names it), and streams refused as they opened "
                   "on a connection with max_streams_per_connection open (stream: a client that leaves "
                   "streams open, or a proxy carrying more; the log names the connection), and requests "
                   "TorchServe refused with its job queue full (backend: its workers fall behind).",
                   [target("sum by (instance) (robustgate_inflight_requests)", "in flight {{instance}}"),
                    target(f"sum by (instance, limit) (rate(robustgate_shed_requests_total[{RATE}]))",
                           "shed/s {{instance}} ({{limit}})")]),
        timeseries("Gateway worker processes", "Worker processes running per pod, and those replaced after "
                   "exiting unasked over 15 min (ROBUSTGATE_WORKERS; 4 in the GPU overlay, else 1; alert at 3 "
                   "replaced).",
                   [target("sum by (instance) (robustgate_workers)", "running {{instance}}"),
                    target("sum by (instance) (increase(robustgate_worker_restarts_total[15m]))",
                           "replaced in 15 min {{instance}}")]),
        row("Latency"),
        timeseries("Request latency", "End-to-end time to answer a classification, p50/p90/p99.",
                   quantiles("robustgate_request_duration_seconds", "", M), "s", w=6),
        timeseries("Latency per stage (p99)", "Decode, TorchServe calls (all of a request's probes) and the "
                   "gate's own maths.", quantiles("robustgate_stage_duration_seconds", "stage", "", (0.99,)), "s",
                   w=6),
        timeseries("TorchServe worker time per call", "What the TorchServe worker spent on the batch that "
                   "answered each call, by its own clock (decode, variants, forward), p50/p99. The rest of "
                   "the backend stage is the gRPC hop, TorchServe's frontend and its queue: a backend stage "
                   "rising while this holds is queueing (workers saturated), not a slower model.",
                   quantiles("robustgate_backend_worker_seconds", "model", M, (0.5, 0.99)), "s", w=6),
        timeseries("gRPC handling time (p99)", "Per unary gRPC method, from the server interceptor (a "
                   "ClassifyStream lasts as long as its client keeps it open: not a latency).",
                   quantiles("grpc_server_handling_seconds", "grpc_method", 'grpc_type="unary"', (0.99,)), "s", w=6),
        row("Errors"),
        timeseries("Server-side error ratio", "Share of requests ending in INTERNAL, UNAVAILABLE, "
                   "DEADLINE_EXCEEDED, UNKNOWN or DATA_LOSS (recording rule; alert above 5 %).",
                   [target(f"model:robustgate_requests_errors:ratio_rate5m{{{M}}}", "{{model}}")], "percentunit"),
        timeseries("gRPC status codes", "RPCs completed per second by method and status code.",
                   [target(f"sum by (grpc_method, grpc_code) (rate(grpc_server_handled_total[{RATE}]))",
                           "{{grpc_method}} {{grpc_code}}")], "reqps"),
        timeseries("TorchServe calls by status", "The gateway's calls to TorchServe per second, by status.",
                   [target(f"sum by (code) (rate(robustgate_backend_requests_total[{RATE}]))", "{{code}}")],
                   "reqps"),
        stat("Backend up", "1 while every gateway's health probe of TorchServe answers.",
             [target("min(robustgate_backend_up)", "backend up")], w=4, h=8,
             thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]),
        stat("Scrape targets up", "Gateway and TorchServe metrics endpoints Prometheus can read.",
             [target('sum(up{job=~"robustgate|torchserve"})', "up")], w=4, h=8),
        timeseries("Images per TorchServe call (coalescing)",
                   "Mean and p99 images the gateway's coalescer sent per TorchServe call; empty while "
                   "coalescing is off (coalesce_max_batch 0). Near 1 under load: the backend keeps up.",
                   [target(f"sum by (model) (rate(robustgate_backend_batch_images_sum{{{M}}}[{RATE}])) / "
                           f"sum by (model) (rate(robustgate_backend_batch_images_count{{{M}}}[{RATE}]))",
                           "{{model}} mean")]
                   + quantiles("robustgate_backend_batch_images", "model", M, (0.99,)), w=8),
        row("Robustness"),
        timeseries("Flag and reject ratio vs calibrated baseline",
                   "Share of answered requests the gate flagged (FLAG or REJECT) or rejected, over 15 min, "
                   "with the policy's calibrated clean rates as dashed baselines. Far above baseline: an "
                   "attack campaign or data drift.",
                   [target(f"model:robustgate_requests_flagged:ratio_rate15m{{{M}}}", "flagged {{model}}"),
                    target(f"model:robustgate_requests_rejected:ratio_rate15m{{{M}}}", "rejected {{model}}"),
                    target(f"max by (model, decision) (robustgate_gate_baseline_ratio{{{M}}})",
                           "baseline {{decision}} {{model}}")], "percentunit", w=12,
                   overrides=[DASHED_BASELINE]),
        timeseries("Check verdicts", "Per-check verdicts per second (checks that ran).",
                   [target(f"sum by (check, verdict) (rate(robustgate_check_verdicts_total{{{M}}}[{RATE}]))",
                           "{{check}} {{verdict}}")], "reqps", w=12),
        heatmap("Score distribution: $check", "Distribution of this check's scores, in the check's "
                "threshold units (squeeze, structure, noise in [0, 1], occlusion in [-1, 1] with its "
                "negatives in the lowest bucket, viewpoint in [0, 2], density a Mahalanobis "
                "distance). A shift to the right is traffic the gate finds suspicious.",
                f'sum by (le) (increase(robustgate_check_score_bucket{{{M}, check=~"$check"}}[{RATE}]))',
                "short", repeat="check", repeatDirection="h", maxPerRow=4),
        timeseries("Check score median and p90", "Per check, p50 and p90 of the scores.",
                   quantiles("robustgate_check_score", "check", M, (0.5, 0.9)), w=8),
        timeseries("Certified radius", "Mean certified L2 radius (pixel units) where certification ran, "
                   "and the share that abstained (radius 0).",
                   [target(f"sum by (model) (rate(robustgate_certified_radius_sum{{{M}}}[{RATE}])) / "
                           f"sum by (model) (rate(robustgate_certified_radius_count{{{M}}}[{RATE}]))",
                           "mean {{model}}"),
                    target(f'sum by (model) (rate(robustgate_certified_radius_bucket{{{M}, le="0.0"}}[{RATE}])) / '
                           f"sum by (model) (rate(robustgate_certified_radius_count{{{M}}}[{RATE}]))",
                           "abstained {{model}}")], w=8),
        timeseries("Forward passes per request", "Variants TorchServe ran per request (p50, p99, mean): "
                   "the cost of the gate.",
                   quantiles("robustgate_forward_passes", "", M, (0.5, 0.99))
                   + [target(f"sum(rate(robustgate_forward_passes_sum{{{M}}}[{RATE}])) / "
                             f"sum(rate(robustgate_forward_passes_count{{{M}}}[{RATE}]))", "mean")], w=8),
        row("TorchServe"),
        timeseries("TorchServe inferences", "Inference requests per second TorchServe answered, per archive "
                   "(each carries a whole probe plan).",
                   [target(f"sum by (model_name) (rate(ts_inference_requests_total[{RATE}]))", "{{model_name}}")],
                   "reqps"),
        timeseries("TorchServe queue and worker time", "QueueTime: last job's wait in the queue; "
                   "WorkerThreadTime: last job's time in the frontend worker thread (both TorchServe's "
                   "gauges). Mean backend time per request: the gateway's clock over all of a request's "
                   "TorchServe calls (coalescer wait, transport, queue, worker). TorchServe's own latency "
                   "counters (ts_*_latency_microseconds) count REST predictions only, not the gateway's "
                   "gRPC calls, so they are not drawn. All milliseconds.",
                   [target("max by (instance) (QueueTime)", "queue {{instance}}"),
                    target("max by (instance) (WorkerThreadTime)", "worker thread {{instance}}"),
                    target(f'sum(rate(robustgate_stage_duration_seconds_sum{{stage="backend"}}[{RATE}])) * 1000 / '
                           f'sum(rate(robustgate_stage_duration_seconds_count{{stage="backend"}}[{RATE}]))',
                           "mean backend time per request")], "ms"),
        timeseries("TorchServe worker load time", "Milliseconds each worker took to load its model.",
                   [target("max by (WorkerName) (WorkerLoadTime)", "{{WorkerName}}")], "ms"),
        timeseries("TorchServe responses", "HTTP responses per second by class (REST and management API).",
                   [target(f"sum(rate(Requests2XX[{RATE}]))", "2xx"),
                    target(f"sum(rate(Requests4XX[{RATE}]))", "4xx"),
                    target(f"sum(rate(Requests5XX[{RATE}]))", "5xx")], "reqps"),
        timeseries("TorchServe host", "CPU and memory use of TorchServe's host (percent; TorchServe's system "
                   "metrics, off in the gpu overlay: there read the kubelet's container metrics).",
                   [target("max by (instance) (CPUUtilization)", "CPU {{instance}}"),
                    target("max by (instance) (MemoryUtilization)", "memory {{instance}}")], "percent"),
        timeseries("TorchServe GPU", "GPU and GPU-memory use per device (percent; TorchServe's system metrics, "
                   "which the gpu overlay turns off: there read NVIDIA's DCGM exporter).",
                   [target("max by (instance, DeviceId) (GPUUtilization)", "GPU {{DeviceId}}"),
                    target("max by (instance, DeviceId) (GPUMemoryUtilization)", "memory {{DeviceId}}")],
                   "percent"),
    ]


def layout(items: list[Panel]) -> list[Panel]:
    """Give each panel an id and an x/y position, filling rows of 24 columns left to right."""
    x = y = row_h = 0
    for i, p in enumerate(items, start=1):
        p["id"] = i
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24 or p["type"] == "row":
            x, y = 0, y + row_h
            row_h = 0
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        x, row_h = x + w, max(row_h, h)
        if p["type"] == "row":
            x, y, row_h = 0, y + h, 0
    return items


def variables() -> list[dict[str, Any]]:
    def query(name: str, label: str, q: str) -> dict[str, Any]:
        return {"type": "query", "name": name, "label": label, "datasource": DS, "query": {"query": q,
                "refId": name}, "definition": q, "refresh": 2, "includeAll": True, "multi": True,
                "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "sort": 1}

    return [
        {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
         "current": {}, "hide": 0},
        query("model", "Model", "label_values(robustgate_model_info, model)"),
        query("check", "Check", 'label_values(robustgate_check_score_count{model=~"$model"}, check)'),
    ]


def build() -> dict[str, Any]:
    """The dashboard JSON model."""
    return {
        "uid": UID,
        "title": TITLE,
        "description": "RobustGate: traffic, latency, errors, how robust the traffic is per model, and TorchServe.",
        "tags": ["robustgate", "torchserve"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": variables()},
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "links": [],
        "panels": layout(panels()),
    }


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query target of every panel, rows' children included."""
    out = []
    for p in dashboard["panels"]:
        for q in [p, *p.get("panels", [])]:
            out += [(q["title"], t["expr"]) for t in q.get("targets", [])]
    return out
