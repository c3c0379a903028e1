"""Observability, end to end with real parts: a real Prometheus (Debian's ``prometheus``) scrapes
a real gateway process and TorchServe and evaluates the shipped rules; ``promtool`` checks the
rules, unit-tests the alerts and lints both metrics endpoints; every dashboard query is checked
against the metrics really exported; an in-test OTLP/gRPC collector receives the gateway's
traces.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from model_store import data
from robustgate.v1 import classifier_pb2 as pb
from robustgate.v1 import classifier_pb2_grpc as pb_grpc
from service.client import Client
from tests.conftest import free_port
from tests.test_gateway import png, start_gateway, stop

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "k8s" / "monitoring"
RULES = MONITORING / "prometheus" / "robustgate.rules.yml"
RULE_TESTS = MONITORING / "prometheus" / "robustgate.rules.test.yml"
CHECKS = {"squeeze", "viewpoint", "density"}  # the cheap checks every calibrated request runs
SERVER_ERROR_CODES = {"INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN", "DATA_LOSS"}


def tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install Debian's prometheus package (scripts/setup.sh does)")
    return found


def load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dashboard_py = load(MONITORING / "dashboard.py", "robustgate_dashboard")
generate_py = load(MONITORING / "generate.py", "robustgate_monitoring_generate")


# --- PromQL: which metric names an expression reads ------------------------------------------

_NOT_METRICS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
                "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (function names, keywords, labels and
    Grafana variables left out)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1).lower() not in _NOT_METRICS:
            names.add(m.group(1))
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition can produce: each family's TYPE line
    (a family without samples yet still counts) with a histogram's and summary's suffixes,
    and each sample's name."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
            names.update(name + s for s in suffixes.get(kind.strip(), ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def recorded_names() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


def rule_exprs() -> list[tuple[str, str]]:
    return [(r.get("record") or r["alert"], r["expr"])
            for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    return dashboard_py.exprs(json.loads((MONITORING / "dashboard.json").read_text()))


def concrete(expr: str) -> str:
    """A dashboard query with Grafana's variables filled in, as Prometheus would receive it."""
    return (expr.replace("$__rate_interval", "1m").replace('"$model"', '".*"').replace('"$check"', '".*"'))


def declared_text() -> str:
    """The gateway's exposition before any request (every family, no samples) plus TorchServe's
    documented metrics (its ts/configs/metrics.yaml, the names its Prometheus endpoint uses)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from service.interceptors import ServerMetricsInterceptor
    from service.metrics import Metrics, SupervisorMetrics

    registry = CollectorRegistry()
    Metrics(registry)
    ServerMetricsInterceptor(registry)
    SupervisorMetrics(registry)  # the supervisor's own, with several workers
    import ts

    ts_config = yaml.safe_load((Path(ts.__file__).parent / "configs" / "metrics.yaml").read_text())
    lines = [f"# TYPE {m['name']} {kind}" for section in ("ts_metrics", "model_metrics")
             for kind, metrics in ts_config[section].items() for m in metrics]
    return generate_latest(registry).decode() + "\n".join(lines) + "\n"


# --- offline: rules, alert unit tests, generated files, dashboard queries ---------------------

def test_metric_names_of_promql() -> None:
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(a_seconds_bucket{model=~"$model", le!="1e3"}[5m])))'
            ' / on (model) group_left (x) max without (y) (b_ratio offset 5m) > bool 1e-3'
            ' and c:recorded:rate5m unless sum(rate(d_total[$__rate_interval])) * 2 or vector(1)')
    assert metric_names(expr) == {"a_seconds_bucket", "b_ratio", "c:recorded:rate5m", "d_total"}
    assert metric_names('max by (WorkerName) (WorkerLoadTime)') == {"WorkerLoadTime"}


def test_rules_pass_promtool_check() -> None:
    out = subprocess.run([tool("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_unit_tests_pass() -> None:
    out = subprocess.run([tool("promtool"), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_every_alert_fires_on_an_incident_and_stays_quiet_beside_it() -> None:
    """Each alert has a unit test where it fires, for only some of the models or instances its
    input series carry (the normal ones stay quiet), and one where it does not fire yet."""
    alerts = {name for name, _ in rule_exprs()} - recorded_names()
    fires: dict[str, bool] = {}
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        subjects = {v for s in case["input_series"] for v in re.findall(r'(?:model|instance)="([^"]+)"', s["series"])}
        for t in case.get("alert_rule_test", []):
            if not t["exp_alerts"]:
                quiet.add(t["alertname"])
                continue
            hit = {a["exp_labels"].get("model") or a["exp_labels"].get("instance") for a in t["exp_alerts"]}
            fires[t["alertname"]] = fires.get(t["alertname"], False) or bool(subjects - hit)
    assert set(fires) == alerts, f"alerts without a firing unit test: {alerts - set(fires)}"
    lonely = [a for a, ok in fires.items() if not ok]
    assert not lonely, f"alerts with no normal series that stays quiet: {lonely}"
    assert quiet == alerts, f"alerts without a quiet unit test: {alerts - quiet}"


def test_generated_files_are_current() -> None:
    for name, make in generate_py.OUTPUTS.items():
        assert (MONITORING / name).read_text() == make(), f"{name} is stale: run python k8s/monitoring/generate.py"
    rule = yaml.safe_load((MONITORING / "rules.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every panel's query (as a recording rule of a scratch file)."""
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    scratch = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": concrete(e)}
                                                          for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(scratch))
    out = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_covers_the_issue() -> None:
    titles = " | ".join(t for t, _ in dashboard_exprs()).lower()
    for what in ("requests", "latency", "error", "decisions", "score", "certified radius", "forward passes",
                 "torchserve queue", "worker"):
        assert what in titles, f"no panel on {what}"
    repeated = [p for p in json.loads((MONITORING / "dashboard.json").read_text())["panels"] if p.get("repeat")]
    assert [p["repeat"] for p in repeated] == ["check"], "score distributions: one heatmap per check"


def test_dashboard_and_rules_name_only_declared_metrics() -> None:
    declared = exported_names(declared_text()) | recorded_names()
    for where, exprs in (("panel", dashboard_exprs()), ("rule", rule_exprs())):
        for title, expr in exprs:
            unknown = metric_names(expr) - declared - {"up"}
            assert not unknown, f"{where} {title!r} reads {unknown}, which nothing exports"


def test_a_full_budget_of_forward_passes_has_a_bucket_of_its_own(default_store: Path) -> None:
    """The forward-passes histogram stopped at 400: every certified request of the shipped
    policy (418 passes of its 430) fell in +Inf and the dashboard's p99 read 400 whenever more
    than 1 % certified. The shipped budget now lies below the top bucket, with one between."""
    from service.metrics import PASSES_BUCKETS

    budget = json.loads((default_store / "fmnist-cnn" / "policy.json").read_text())["max_forward_passes"]
    assert budget > 400
    assert sum(b >= budget for b in PASSES_BUCKETS) >= 2, (budget, PASSES_BUCKETS)


def test_check_scores_have_buckets_between_flag_and_reject_thresholds(default_store: Path) -> None:
    """The shipped policy's flag and reject thresholds of squeeze (0.993, 0.9996), viewpoint (0.54, 0.64) and density (22.5, 28.7) shared a bucket, so the score heatmap could
    not show which requests were flagged and which rejected."""
    from service.metrics import SCORE_BUCKETS

    assert SCORE_BUCKETS[0] > 0  # the median of mostly-zero scores stays near 0, not negative
    policy = json.loads((default_store / "fmnist-cnn" / "policy.json").read_text())
    apart = 0
    for check, spec in policy["checks"].items():
        if spec.get("flag") is None or spec.get("reject") is None:
            continue
        bucket = [sum(b < spec[k] for b in SCORE_BUCKETS) for k in ("flag", "reject")]
        assert bucket[0] < bucket[1], (check, spec["flag"], spec["reject"], SCORE_BUCKETS)
        apart += 1
    assert apart >= 2, policy["checks"]


def test_tracing_is_off_and_free_by_default() -> None:
    from service.settings import Settings
    from service.tracing import NO_SPAN, OFF, setup

    tracing = setup(Settings())
    assert tracing is OFF and not tracing.enabled
    assert tracing.span("decode") is tracing.span("gate")  # one shared no-op context manager
    with tracing.request_span("classify", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")]) as span:
        assert span is NO_SPAN
    # With tracing off, the gateway never imports OpenTelemetry.
    code = ("import sys, service.server, service.pipeline\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_series_are_looked_up_once_and_count_where_labels_would() -> None:
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    m = Metrics()
    child = m.series(m.check_verdicts, "fmnist-cnn", "squeeze", "FLAG")
    assert child is m.series(m.check_verdicts, "fmnist-cnn", "squeeze", "FLAG")
    assert child is m.check_verdicts.labels(model="fmnist-cnn", check="squeeze", verdict="FLAG")
    assert child is not m.series(m.check_verdicts, "fmnist-cnn", "squeeze", "PASS")
    child.inc(2)
    text = generate_latest(m.registry).decode()
    assert 'robustgate_check_verdicts_total{check="squeeze",model="fmnist-cnn",verdict="FLAG"} 2.0' in text


# --- live: gateway + TorchServe + OTLP collector + Prometheus ----------------------------------

class Collector:
    """An OTLP/gRPC trace collector on loopback that keeps what it receives."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        self.spans: list[Any] = []
        collector = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):  # noqa: N802 (gRPC method name)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        collector.spans.extend(ss.spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    c = Collector()
    yield c
    c.server.stop(0)


TORCHSERVE_RELAY_PATH = "/metrics/torchserve"


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """The module gateway's metrics port, picked when the gateway starts (not at import)."""
    return free_port()


@pytest.fixture(scope="module")
def gateway(calibrated_store: Path, torchserve, collector: Collector, tmp_path_factory,
            metrics_port: int) -> Iterator[str]:
    proc, address = start_gateway(calibrated_store, torchserve, tmp_path_factory.mktemp("gw-obs"),
                                  **{"metrics-port": str(metrics_port),
                                     "torchserve-metrics-url": torchserve.metrics_url,
                                     "otlp-endpoint": f"http://127.0.0.1:{collector.port}"})
    yield address
    stop(proc)


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> dict[frozenset, float]:
        return {frozenset(r["metric"].items()): float(r["value"][1])
                for r in self.get("/api/v1/query", query=expr)["result"]}

    def until(self, read: Callable[[], Any], ok: Callable[[Any], bool], timeout_s: float = 30.0) -> Any:
        """Poll ``read()`` (1 s scrapes) until ``ok`` holds; its last value either way."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = read()
            if ok(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.5)


@pytest.fixture(scope="module")
def prometheus(gateway: str, torchserve, tmp_path_factory, metrics_port: int) -> Iterator[Prometheus]:
    """Debian's Prometheus server run directly on loopback (never the system service), 1 s
    scrapes of the gateway and TorchServe, the shipped rules evaluated every second."""
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {"job_name": "robustgate", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            # As in k8s (k8s/base/servicemonitor.yaml): TorchServe through the gateway's relay.
            {"job_name": "torchserve", "metrics_path": TORCHSERVE_RELAY_PATH,
             "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp / "prometheus.log").open("wb")
    proc = subprocess.Popen([tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prometheus did not start: {(tmp / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def checker() -> np.ndarray:
    """A checkerboard: no garment; the squeeze check scores it at its maximum (REJECT)."""
    return (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)


TRACE_ID, CALLER_SPAN_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def sent(gateway: str, prometheus: Prometheus, fmnist: data.FashionMNIST) -> dict[tuple[str, str], int]:
    """All the module's traffic, sent once: garments, checkerboards (rejected), malformed
    images, an unknown model, and two requests the trace test looks for (one joins a caller's
    trace). Returns {(decision, code): count} as the client saw the answers."""
    counts: dict[tuple[str, str], int] = {}
    # Prometheus has read both targets once before the first request, so rate() sees it all.
    targets = prometheus.until(lambda: prometheus.get("/api/v1/targets")["activeTargets"],
                               lambda ts: len(ts) == 2 and all(t["health"] == "up" for t in ts))
    assert sorted((t["labels"]["job"], t["health"]) for t in targets) == [("robustgate", "up"), ("torchserve", "up")]

    def note(decision: str, code: str) -> None:
        counts[(decision, code)] = counts.get((decision, code), 0) + 1

    with Client(gateway) as c:
        for i in range(12):
            r = c.classify(png(fmnist.test.images[200 + i]), model="fmnist-cnn", request_id=f"obs-{i}")
            note(pb.Decision.Name(r.gate.decision).removeprefix("DECISION_"), "OK")
        for i in range(4):
            r = c.classify(png(np.roll(checker(), i, axis=1)), model="fmnist-cnn")
            note(pb.Decision.Name(r.gate.decision).removeprefix("DECISION_"), "OK")
        for payload in (b"junk", b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30):
            with pytest.raises(grpc.RpcError) as err:
                c.classify(payload, model="fmnist-cnn")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            note("NONE", "INVALID_ARGUMENT")
        with pytest.raises(grpc.RpcError) as err:  # a long unknown name: its trace span is clipped
            c.classify(png(fmnist.test.images[0]), model="no-such-model-" + "m" * 5000, request_id="trace-unknown")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        note("NONE", "NOT_FOUND")
    with grpc.insecure_channel(gateway) as ch:
        stub = pb_grpc.ClassifierServiceStub(ch)
        r = stub.Classify(Client.request(png(fmnist.test.images[7]), "fmnist-cnn", request_id="trace-ok"),
                          metadata=[("traceparent", f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01")], timeout=30)
        note(pb.Decision.Name(r.gate.decision).removeprefix("DECISION_"), "OK")
        counts[("trace-ok", "forward_passes")] = r.gate.forward_passes
        with pytest.raises(grpc.RpcError):
            stub.Classify(Client.request(b"junk", "fmnist-cnn", request_id="trace-bad"), timeout=30)
        note("NONE", "INVALID_ARGUMENT")
    assert counts.get(("REJECT", "OK"), 0) >= 1, f"no request was rejected: {counts}"
    return counts


def requests_sent(sent: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {k: n for k, n in sent.items() if k[0] != "trace-ok"}


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def test_prometheus_sees_what_was_sent(prometheus: Prometheus, sent: dict[tuple[str, str], int]) -> None:
    # Health is the latest scrape's: one slow scrape on a loaded machine is not the failure sought
    targets = prometheus.until(lambda: prometheus.get("/api/v1/targets")["activeTargets"],
                               lambda ts: len(ts) == 2 and all(t["health"] == "up" for t in ts))
    assert sorted((t["labels"]["job"], t["health"]) for t in targets) == [("robustgate", "up"), ("torchserve", "up")]

    def requests() -> dict[tuple[str, str], int]:
        got = prometheus.query('sum by (decision, code) (robustgate_requests_total{job="robustgate"}) > 0')
        return {(dict(k)["decision"], dict(k)["code"]): int(v) for k, v in got.items()}

    expected = requests_sent(sent)
    assert prometheus.until(requests, lambda got: got == expected) == expected
    answered = sum(n for (_, code), n in expected.items() if code == "OK")
    total = sum(expected.values())

    def one(expr: str) -> float:
        values = prometheus.query(expr)
        assert len(values) == 1, f"{expr}: {values}"
        return next(iter(values.values()))

    # Histograms: one observation per answered request (per stage, per request); the
    # malformed images, a caller's error answered at once, are not timed (server faults are:
    # test_torchserve_killed_during_load_then_restarted).
    timed = answered
    assert one('sum(robustgate_request_duration_seconds_count{model="fmnist-cnn"})') == timed
    assert one('sum(robustgate_forward_passes_count{model="fmnist-cnn"})') == answered
    for stage in ("decode", "backend", "gate"):
        assert one(f'sum(robustgate_stage_duration_seconds_count{{stage="{stage}"}})') == answered
    assert one('sum(robustgate_request_duration_seconds_bucket{le="+Inf"})') == timed
    assert 0 < one("sum(robustgate_request_duration_seconds_sum)") < timed * 10
    assert one("sum(robustgate_forward_passes_sum)") >= answered  # at least the base row each
    # Robustness scores per check: every cheap check scored every answered request.
    scores = {dict(k)["check"]: v for k, v in prometheus.query(
        'sum by (check) (robustgate_check_score_count{model="fmnist-cnn"})').items()}
    assert CHECKS <= scores.keys() and all(scores[c] == answered for c in CHECKS), scores
    # Each rejected image has at least one check with a REJECT verdict (which check depends on
    # how calibration allocated the budget for this model).
    verdicts = prometheus.query('sum(robustgate_check_verdicts_total{verdict="REJECT"})')
    assert sum(verdicts.values()) >= sent[("REJECT", "OK")]
    # The interceptor's standard gRPC metrics see every Classify call, by status code.
    handled = {dict(k)["grpc_code"]: int(v) for k, v in prometheus.query(
        'sum by (grpc_code) (grpc_server_handled_total{grpc_method="Classify"})').items()}
    assert sum(handled.values()) == total and handled["OK"] == answered
    assert one('sum(grpc_server_started_total{grpc_method="Classify"})') == total
    # Baseline, info, health; TorchServe's inference counter ran at least once per answer.
    assert one('robustgate_gate_baseline_ratio{decision="FLAG"}') > 0
    assert one('count(robustgate_model_info{model="fmnist-cnn", policy_version!=""})') == 1
    assert one("robustgate_backend_up") == 1 and one("robustgate_inflight_requests") == 0
    assert one('sum(ts_inference_requests_total{job="torchserve"})') >= answered
    # Recording rules evaluate on the live data.
    # A scrape can land between the garments and the checkerboards: the rule then reads 0
    # until the next scrape and evaluation, so wait for those rather than take the first value.
    flagged = prometheus.until(lambda: prometheus.query('model:robustgate_requests_rejected:ratio_rate15m'),
                               lambda v: len(v) == 1 and next(iter(v.values())) > 0)
    assert 0 < next(iter(flagged.values())) <= 1


def test_rules_are_healthy_and_quiet_on_normal_traffic(prometheus: Prometheus, sent) -> None:
    groups = prometheus.until(lambda: prometheus.get("/api/v1/rules")["groups"],
                              lambda gs: all(r.get("lastEvaluation", "").startswith("2") and r["health"] == "ok"
                                             for g in gs for r in g["rules"]))
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(rule_exprs())
    assert [(r["name"], r["lastError"]) for r in rules if r["health"] != "ok"] == []
    assert [a["labels"]["alertname"] for a in prometheus.get("/api/v1/alerts")["alerts"] if a["state"] == "firing"] == []


def test_promtool_check_metrics_on_both_endpoints(prometheus: Prometheus, torchserve, sent, metrics_port: int) -> None:
    promtool = tool("promtool")
    gateway_text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    out = subprocess.run([promtool, "check", "metrics"], input=gateway_text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    assert "_created" not in gateway_text
    # TorchServe's names are its own (its Java frontend looks its metrics up by these names):
    # the only findings allowed are style lints on those names, never a malformed exposition.
    ts_text = scrape(f"http://127.0.0.1:{metrics_port}{TORCHSERVE_RELAY_PATH}")
    out = subprocess.run([promtool, "check", "metrics"], input=ts_text, capture_output=True, text=True, timeout=60)
    ts_names = {line.split()[2] for line in declared_text().splitlines() if line.startswith("# TYPE ")}
    allowed = re.compile(r"^(\S+) (metric names should be written in 'snake_case' not 'camelCase'|"
                         r"label names should be written in 'snake_case' not 'camelCase'|"
                         r'counter metrics should have "_total" suffix)$')
    for line in filter(None, (out.stdout + out.stderr).splitlines()):
        m = allowed.match(line)
        assert m and m.group(1) in ts_names, f"TorchServe exposition: {line}"


def test_dashboard_reads_metrics_that_are_really_exported(prometheus: Prometheus, torchserve, sent,
                                                          metrics_port: int) -> None:
    live = (exported_names(scrape(f"http://127.0.0.1:{metrics_port}/metrics"))
            | exported_names(scrape(f"http://127.0.0.1:{metrics_port}{TORCHSERVE_RELAY_PATH}"))
            | recorded_names() | {"up"})
    for title, expr in dashboard_exprs():
        missing = metric_names(expr) - live
        assert not missing, f"panel {title!r} reads {missing}: not exported by the gateway or TorchServe"

    def empty() -> set[tuple[str, str]]:  # every query, not each panel: one live line hides a dead one
        return {(title, expr) for title, expr in dashboard_exprs()
                if not prometheus.query(concrete(expr))}  # evaluates, else the API answers an error
    # Only queries whose data needs what this traffic does not make may be empty: a GPU,
    # certification, a REST call TorchServe refused. Waited for: run alone, this test may come
    # before Prometheus has scraped the traffic and evaluated its rules.
    needs_more = {"GPUUtilization", "GPUMemoryUtilization", "Requests4XX", "Requests5XX",
                  "robustgate_certified_radius_sum", "robustgate_certified_radius_bucket"}

    def unexplained(e: set[tuple[str, str]]) -> set[tuple[str, str]]:
        return {(title, expr) for title, expr in e if not metric_names(expr) & needs_more}
    left = prometheus.until(empty, lambda e: not unexplained(e), timeout_s=60)
    assert not unexplained(left), unexplained(left)


def test_traces_reach_the_otlp_collector(collector: Collector, sent: dict[tuple[str, str], int]) -> None:

    def roots() -> dict[str, Any]:
        return {a.value.string_value: s for s in list(collector.spans) if s.name == "classify"
                for a in s.attributes if a.key == "robustgate.request_id"}

    deadline = time.monotonic() + 20  # the batch processor exports every 5 s
    while not {"trace-ok", "trace-bad", "trace-unknown"} <= roots().keys() and time.monotonic() < deadline:
        time.sleep(0.25)
    found = roots()
    assert {"trace-ok", "trace-bad", "trace-unknown"} <= found.keys(), f"spans received: {[s.name for s in collector.spans]}"
    root = found["trace-ok"]
    from opentelemetry.proto.trace.v1 import trace_pb2

    assert root.trace_id.hex() == TRACE_ID and root.parent_span_id.hex() == CALLER_SPAN_ID  # joined the caller's trace
    assert root.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["robustgate.model"].string_value == "fmnist-cnn" and attrs["rpc.grpc.status_code"].int_value == 0
    assert attrs["robustgate.forward_passes"].int_value == sent[("trace-ok", "forward_passes")]
    children = [s for s in collector.spans if s.parent_span_id == root.span_id]
    names = [s.name for s in sorted(children, key=lambda s: s.start_time_unix_nano)]
    assert names[0] == "decode" and names[-1] == "gate" and "backend" in names, names
    assert all(s.trace_id == root.trace_id for s in children)
    for s in children:
        assert root.start_time_unix_nano <= s.start_time_unix_nano <= s.end_time_unix_nano <= root.end_time_unix_nano
    bad = found["trace-bad"]
    bad_attrs = {a.key: a.value for a in bad.attributes}
    assert bad_attrs["rpc.grpc.status_code"].int_value == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.code != trace_pb2.Status.STATUS_CODE_ERROR  # a client error is not a server failure
    bad_decode = [s for s in collector.spans if s.parent_span_id == bad.span_id and s.name == "decode"]
    assert len(bad_decode) == 1  # the stage the bad image ended: neither failed nor carrying its text
    assert bad_decode[0].status.code != trace_pb2.Status.STATUS_CODE_ERROR and not bad_decode[0].events
    from service.tracing import MAX_ATTRIBUTE_CHARS

    unknown = {a.key: a.value for a in found["trace-unknown"].attributes}
    assert unknown["rpc.grpc.status_code"].int_value == grpc.StatusCode.NOT_FOUND.value[0]
    assert unknown["robustgate.model"].string_value == ("no-such-model-" + "m" * 5000)[:MAX_ATTRIBUTE_CHARS]
