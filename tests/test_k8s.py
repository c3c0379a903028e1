"""Kubernetes manifests: every overlay renders with kustomize (``kubectl kustomize``) and each
object validates in strict mode against the pinned Kubernetes version's schemas
(``kubernetes-validate``; a kind without a schema fails) or, for prometheus-operator's CRDs,
against the strict schemas in ``k8s/schemas/``. Then the checks no schema makes: selectors,
ports, probes, GPU resources, autoscaling bounds, disruption budget, security settings.
"""

from __future__ import annotations

import json
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import dev_tool

REPO = Path(__file__).resolve().parent.parent
K8S = REPO / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ("gpu", "cpu")
KUBERNETES_VERSION = "1.33.0"  # the oldest minor the manifests promise to work on
TORCHSERVE_PORTS = {7070, 7071, 8080, 8081, 8082}
CONFIGMAP_MAX_BYTES = 1 << 20  # the API server's limit on a ConfigMap's data
CRD_GROUPS = {"monitoring.coreos.com"}
# Variables docker-entrypoint.sh reads itself; every other ROBUSTGATE_* must be a Settings field.

Doc = dict[str, Any]




@cache
def render(path: str) -> tuple[Doc, ...]:
    out = subprocess.run([dev_tool("kubectl"), "kustomize", str(K8S / path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kustomize {path}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def every(docs: tuple[Doc, ...], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(docs: tuple[Doc, ...]) -> Doc:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: tuple[Doc, ...], name: str) -> Doc:
    (c,) = [c for c in pod_spec(docs)["containers"] if c["name"] == name]
    return c


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) selects ``labels``."""
    if not selector:
        return False
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def declared_ports(c: Doc) -> dict[str | int, int]:
    """A container's ports by name and by number -> number."""
    ports: dict[str | int, int] = {}
    for p in c.get("ports", []):
        ports[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            ports[p["name"]] = p["containerPort"]
    return ports


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def docs(overlay: str) -> tuple[Doc, ...]:
    return render(f"overlays/{overlay}")


# --- render and schema -------------------------------------------------------------------

def test_overlay_renders_every_part(docs: tuple[Doc, ...]) -> None:
    kinds = sorted(d["kind"] for d in docs)
    for kind in ("Namespace", "ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler",
                 "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor", "PrometheusRule", "ConfigMap"):
        assert kind in kinds, f"{kind} missing from the render: {kinds}"
    names = {d["metadata"]["name"] for d in every(docs, "ConfigMap")}
    assert any(n.startswith("robustgate-torchserve-config-") for n in names), names
    assert any(n.startswith("robustgate-gate-policies-") for n in names), names
    dashboards = [d for d in every(docs, "ConfigMap") if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert dashboards, "no dashboard ConfigMap (label grafana_dashboard=1)"
    for d in dashboards:
        for key, text in d["data"].items():
            assert isinstance(json.loads(text), dict), f"{key} is not a JSON dashboard"
    namespaced = [d for d in docs if d["kind"] != "Namespace"]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"robustgate"}


def _crd_validator(doc: Doc):
    import jsonschema
    import kubernetes_validate
    from referencing import Registry, Resource

    group, version = doc["apiVersion"].split("/")
    path = SCHEMAS / group / f"{doc['kind'].lower()}_{version}.json"
    if not path.is_file():
        pytest.fail(f"no schema for {doc['kind']} {doc['apiVersion']} in {SCHEMAS}")
    defs_dir = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    defs = json.loads((defs_dir / f"v{KUBERNETES_VERSION}-local-strict" / "_definitions.json").read_text())
    registry = Registry().with_resource("/api/_definitions.json", Resource.from_contents(defs))
    return jsonschema.Draft202012Validator(json.loads(path.read_text()), registry=registry)


def test_every_object_validates_strictly(docs: tuple[Doc, ...]) -> None:
    import kubernetes_validate

    for d in docs:
        what = f"{d['kind']}/{d['metadata']['name']}"
        if d["apiVersion"].split("/")[0] in CRD_GROUPS:
            errors = sorted(_crd_validator(d).iter_errors(d), key=str)
            assert not errors, f"{what}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
            continue
        try:  # raises SchemaNotFoundError for a kind the pinned version does not know
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")


def test_strict_validation_rejects_unknown_fields_and_kinds() -> None:
    """The validators used above are strict: a misspelt field and an unknown kind fail."""
    import kubernetes_validate

    dep = json.loads(json.dumps(one(render("overlays/gpu"), "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBERNETES_VERSION, strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate({"apiVersion": "example.com/v1", "kind": "Nope", "metadata": {"name": "x"}},
                                     KUBERNETES_VERSION, strict=True)
    sm = json.loads(json.dumps(one(render("overlays/gpu"), "ServiceMonitor")))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    assert list(_crd_validator(sm).iter_errors(sm))
    rule = json.loads(json.dumps(one(render("overlays/gpu"), "PrometheusRule")))
    rule["spec"]["groups"][0]["rules"][0].update(alert="Both", record="alert_and:record")
    assert list(_crd_validator(rule).iter_errors(rule))


# --- what no schema checks ---------------------------------------------------------------

def test_selectors_match_the_pod_template(docs: tuple[Doc, ...]) -> None:
    dep = one(docs, "Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(dep["spec"]["selector"], labels), "Deployment selector does not match its template"
    for svc in every(docs, "Service"):
        assert selects({"matchLabels": svc["spec"]["selector"]}, labels), f"Service {svc['metadata']['name']}"
    assert selects(one(docs, "PodDisruptionBudget")["spec"]["selector"], labels), "PDB selects no pod of the Deployment"
    assert selects(one(docs, "NetworkPolicy")["spec"]["podSelector"], labels), "NetworkPolicy selects no pod"
    for tsc in dep["spec"]["template"]["spec"]["topologySpreadConstraints"]:
        assert selects(tsc["labelSelector"], labels), f"topology spread {tsc['topologyKey']} counts other pods"
    # Other Deployments' pods must not match (the selector is not just the shared name label).
    assert not selects(dep["spec"]["selector"], {"app.kubernetes.io/name": "robustgate"})


def test_servicemonitor_scrapes_the_gateway_metrics_port(docs: tuple[Doc, ...]) -> None:
    sm = one(docs, "ServiceMonitor")
    scraped = [s for s in every(docs, "Service") if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
    assert [s["metadata"]["name"] for s in scraped] == ["robustgate"], "exactly the main Service is scraped"
    port_names = {p["name"] for p in scraped[0]["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in port_names, f"ServiceMonitor port {ep['port']} not on the Service"
    # TorchServe's metrics through the gateway's relay (service/metrics_server.py), as job
    # "torchserve": the job the rules' RobustGateScrapeTargetDown matches.
    by_path = {ep["path"]: ep for ep in sm["spec"]["endpoints"]}
    assert set(by_path) == {"/metrics", "/metrics/torchserve"}
    from service import metrics_server

    assert metrics_server.TORCHSERVE_PATH == "/metrics/torchserve"
    relabel = by_path["/metrics/torchserve"]["relabelings"]
    assert {"action": "replace", "targetLabel": "job", "replacement": "torchserve"} in relabel
    assert int(by_path["/metrics/torchserve"]["scrapeTimeout"].rstrip("s")) > metrics_server.RELAY_TIMEOUT_S


def test_gpu_requests_equal_limits(overlay: str, docs: tuple[Doc, ...]) -> None:
    spec = pod_spec(docs)
    # the image's wheels are x86_64 only (requirements.lock)
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}, spec["nodeSelector"]
    for c in spec["containers"]:
        r = c["resources"]
        assert r["requests"] == r["limits"], f"{c['name']}: requests {r['requests']} != limits {r['limits']}"
    ts, gw = container(docs, "torchserve"), container(docs, "gateway")
    assert "nvidia.com/gpu" not in gw["resources"]["limits"], "the gateway holds no GPU"
    if overlay == "gpu":
        assert int(ts["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        # the GPU request alone places it (a label would ask for GPU feature discovery too)
        assert "nvidia.com/gpu.present" not in spec["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in spec["tolerations"])
    else:
        assert "nvidia.com/gpu" not in json.dumps(spec), "the cpu overlay asks for no GPU"


def test_hpa_bounds_and_target_resolve(docs: tuple[Doc, ...], overlay: str) -> None:
    hpa, dep = one(docs, "HorizontalPodAutoscaler"), one(docs, "Deployment")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"]), \
        f"the HPA scales {ref}, not the Deployment"
    lo, hi = hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]
    assert 2 <= lo <= hi, "at least two replicas, so that one survives a disruption"
    assert "replicas" not in dep["spec"], "every apply would reset the HPA's count to it"
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Pods"]["pods"]["metric"]["name"] == "robustgate_inflight_requests"
    assert kinds["Pods"]["pods"]["target"]["type"] == "AverageValue"
    containers = {c["name"]: c for c in pod_spec(docs)["containers"]}
    cpu = kinds.get("Resource", {}).get("resource") or kinds.get("ContainerResource", {}).get("containerResource")
    assert cpu and cpu["name"] == "cpu", "CPU is the fallback metric"
    # Where the gateway is the bottleneck (GPU: the model runs on the GPU) its own container's
    # CPU; where the model runs on the pod's CPU too, the pod's.
    assert cpu.get("container") == ("gateway" if overlay == "gpu" else None), cpu
    for c in containers.values() if "container" not in cpu else [containers[cpu["container"]]]:
        assert "cpu" in c["resources"]["requests"], c["name"]  # a Utilization target needs the request


def test_pdb_leaves_a_pod_serving(docs: tuple[Doc, ...]) -> None:
    pdb, hpa = one(docs, "PodDisruptionBudget"), one(docs, "HorizontalPodAutoscaler")
    spec = pdb["spec"]
    assert ("maxUnavailable" in spec) != ("minAvailable" in spec)
    if "maxUnavailable" in spec:
        assert 0 < int(spec["maxUnavailable"]) < hpa["spec"]["minReplicas"], "a drain can take every pod, or none"
    else:
        assert 0 < int(spec["minAvailable"]) < hpa["spec"]["minReplicas"], "a drain can take every pod, or none"


def test_probes_and_services_use_declared_ports(docs: tuple[Doc, ...]) -> None:
    from service.server import LIVENESS_SERVICE

    spec = pod_spec(docs)
    all_ports: dict[str | int, int] = {}
    for c in spec["containers"]:
        ports = declared_ports(c)
        all_ports.update(ports)
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(kind)
            if probe is None:
                continue
            for handler in ("grpc", "httpGet", "tcpSocket"):
                if handler in probe:
                    assert probe[handler]["port"] in ports, f"{c['name']} {kind} port {probe[handler]['port']} undeclared"
    gw = container(docs, "gateway")
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gw[kind]["grpc"]["port"] == 50051, f"gateway {kind} is a native gRPC probe on 50051"
    # startup and readiness follow the backend (the overall status); liveness the process alone
    assert "service" not in gw["readinessProbe"]["grpc"] and "service" not in gw["startupProbe"]["grpc"]
    assert gw["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    # TorchServe: started once every worker is READY; alive while each model has one READY
    ts = container(docs, "torchserve")
    assert "--live" not in ts["startupProbe"]["exec"]["command"]
    assert ts["livenessProbe"]["exec"]["command"][3:5] == ["status", "--live"]
    assert gw["startupProbe"]["periodSeconds"] * gw["startupProbe"]["failureThreshold"] >= 300, \
        "the startup probe allows at least 5 minutes for model loading"
    # The windows nest: TorchServe's load (timed by the entrypoint once the store is verified
    # and TorchServe launched) ends inside its startup probe's window with room for those, and
    # the gateway, which serves only once TorchServe's models answer, gets longer than that
    # (both probes gave 900 s: a load the entrypoint still waited for was killed by the probe)
    ts_window = ts["startupProbe"]["periodSeconds"] * ts["startupProbe"]["failureThreshold"]
    load = int(next(e["value"] for e in ts["env"] if e["name"] == "TORCHSERVE_STARTUP_TIMEOUT_S"))
    assert load + 60 <= ts_window, (load, ts_window)
    assert gw["startupProbe"]["periodSeconds"] * gw["startupProbe"]["failureThreshold"] >= ts_window + 60
    # TorchServe's liveness command: an interpreter and describe calls of up to 5 s each
    assert ts["livenessProbe"]["timeoutSeconds"] > 5
    for svc in every(docs, "Service"):
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            assert target in all_ports, f"Service {svc['metadata']['name']} targets undeclared port {target}"
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        for p in rule["ports"]:
            assert p["port"] in all_ports, f"NetworkPolicy admits undeclared port {p['port']}"


def test_no_torchserve_port_leaves_the_pod(docs: tuple[Doc, ...]) -> None:
    all_ports: dict[str | int, int] = {}
    for c in pod_spec(docs)["containers"]:
        all_ports.update(declared_ports(c))
    exposed: set[int] = set()
    exposed_targets: set[int] = set()
    for svc in every(docs, "Service"):
        for p in svc["spec"]["ports"]:
            exposed.add(p["port"])
            target = p.get("targetPort", p["port"])
            exposed_targets.add(all_ports.get(target, target if isinstance(target, int) else -1))
    assert not (exposed | exposed_targets) & TORCHSERVE_PORTS, "a Service exposes a TorchServe port"
    assert exposed_targets == {50051, 9464}
    assert not set(all_ports.values()) & TORCHSERVE_PORTS, "TorchServe's ports are not declared on any container"
    admitted = {all_ports[p["port"]] for r in one(docs, "NetworkPolicy")["spec"]["ingress"] for p in r["ports"]}
    assert admitted == {50051, 9464}


def test_pod_is_locked_down(docs: tuple[Doc, ...]) -> None:
    spec = pod_spec(docs)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], c["name"]
        for m in c["volumeMounts"]:
            if not m.get("readOnly"):
                assert "emptyDir" in volumes[m["name"]], f"{c['name']} writes to {m['mountPath']}: not an emptyDir"
        assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{c['name']} has no writable /tmp"
    ts, gw = container(docs, "torchserve"), container(docs, "gateway")
    run = [m for m in ts["volumeMounts"] if m["mountPath"] == "/run/torchserve"]
    shared = [m for m in gw["volumeMounts"] if m["name"] == run[0]["name"]]
    assert shared and shared[0].get("readOnly"), "the gateway reads TorchServe's run dir (key file), read-only"
    env = {e["name"]: e.get("value") for e in gw["env"]}
    assert env["ROBUSTGATE_TORCHSERVE_KEY_FILE"] == f"{shared[0]['mountPath']}/key_file.json"


def test_configmap_volumes_resolve(docs: tuple[Doc, ...]) -> None:
    names = {d["metadata"]["name"] for d in every(docs, "ConfigMap")}
    for v in pod_spec(docs)["volumes"]:
        if "configMap" in v:
            assert v["configMap"]["name"] in names, f"volume {v['name']} names a ConfigMap not in the render"


def test_gateway_env_names_real_settings(docs: tuple[Doc, ...]) -> None:
    import dataclasses

    from service.settings import ENV_PREFIX, OTHER_ENV, Settings

    known = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)} | OTHER_ENV
    for c in pod_spec(docs)["containers"]:
        for e in c.get("env", []):
            if e["name"].startswith(ENV_PREFIX):
                assert e["name"] in known, f"{c['name']}: {e['name']} is no gateway setting"


def test_torchserve_serves_only_what_the_gateway_calls(overlay: str, docs: tuple[Doc, ...]) -> None:
    """One archive per served model, in the gateway's backend format: a second, idle one
    doubled TorchServe's workers (CPU, memory, on a GPU CUDA contexts), and the status probes
    wait for every model it loads. On a GPU, TorchServe's system metrics are off (its GPU
    collector needs nvgpu, which the image does not carry: each minute a traceback, no figures)."""
    from service.settings import from_args

    ts, gw = container(docs, "torchserve"), container(docs, "gateway")
    settings = from_args([], {e["name"]: e["value"] for e in gw.get("env", []) if "value" in e})
    args = ts["args"]
    assert args[0] == "torchserve"
    served = [args[i + 1] for i, a in enumerate(args) if a == "--model"]
    assert served == [f"{m}-{settings.backend_format}" for m in settings.models]
    env = {e["name"]: e.get("value") for e in ts.get("env", [])}
    assert (env.get("TORCHSERVE_SYSTEM_METRICS", "on") == "off") == (overlay == "gpu")
    assert (env.get("TORCHSERVE_REQUIRE_GPU") == "true") == (overlay == "gpu")  # no silent CPU fallback


def test_grpc_is_open_only_to_its_namespace_and_namespaces_labelled_as_clients(docs: tuple[Doc, ...]) -> None:
    """The NetworkPolicy admitted gRPC from every namespace of the cluster (an empty
    namespaceSelector), the token alone between any pod and the gateway. Now this namespace's
    pods and namespaces labelled robustgate.io/client=true; no rule admits every namespace."""
    [grpc_rule] = [r for r in one(docs, "NetworkPolicy")["spec"]["ingress"]
                   if any(p["port"] == "grpc" for p in r["ports"])]
    peers = grpc_rule["from"]
    assert all(p.get("namespaceSelector") != {} for p in peers), "gRPC open to every namespace"
    assert {"podSelector": {}} in peers  # the gateway's own namespace
    assert {"namespaceSelector": {"matchLabels": {"robustgate.io/client": "true"}}} in peers
    assert len(peers) == 2
    for rule in one(docs, "NetworkPolicy")["spec"]["ingress"]:
        assert "from" in rule, "a rule without peers admits every source"


def test_the_gateway_takes_calls_only_with_its_token_from_a_secret(docs: tuple[Doc, ...]) -> None:
    """Each call that the NetworkPolicy lets through must carry the bearer token, read from a
    Secret mounted read-only for the gateway's group alone. Its optional seed key gives every
    pod one probe key, as a file beside the token (it came as env, which every process of
    the user reads in /proc/*/environ): a Secret without it leaves no file."""
    gw, spec = container(docs, "gateway"), pod_spec(docs)
    env = {e["name"]: e for e in gw["env"]}
    token_file = Path(env["ROBUSTGATE_AUTH_TOKEN_FILE"]["value"])
    seed_file = Path(env["ROBUSTGATE_SEED_FILE"]["value"])
    assert seed_file.parent == token_file.parent
    [mount] = [m for m in gw["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    assert mount.get("readOnly")
    [volume] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    projected = volume["projected"]
    token, seed = (s["secret"] for s in projected["sources"])
    assert token["name"] == seed["name"]
    assert token["items"] == [{"key": "token", "path": token_file.name}] and not token.get("optional")
    assert seed["items"] == [{"key": "seed", "path": seed_file.name}] and seed["optional"] is True
    assert projected["defaultMode"] == 0o440 and spec["securityContext"]["fsGroup"] == gw["securityContext"].get(
        "runAsUser", spec["securityContext"]["runAsUser"])
    assert not {"ROBUSTGATE_AUTH_TOKEN", "ROBUSTGATE_SEED"} & set(env), \
        "a secret in the manifest or env shows in `kubectl get`, ps and /proc/*/environ"


def test_gateway_has_a_core_per_worker(overlay: str, docs: tuple[Doc, ...]) -> None:
    """Each gateway worker process keeps one core busy under load (service/workers.py): the
    container's CPU must cover the workers it runs, and the GPU overlay runs several."""
    from service.settings import Settings, from_args

    gw = container(docs, "gateway")
    env = {e["name"]: e["value"] for e in gw.get("env", []) if "value" in e}
    workers = from_args([], env).workers
    cpu = gw["resources"]["limits"]["cpu"]
    cores = float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert cores >= workers, f"{workers} gateway workers on {cpu} CPU"
    if overlay == "gpu":
        assert workers > Settings().workers, "on a GPU node one gateway process is the limit (README)"


def test_torchserve_config_keeps_the_lockdown(docs: tuple[Doc, ...], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The rendered ConfigMap's config.properties renders with model_store.serve and keeps
    TorchServe on loopback, token auth on and model registration off."""
    from model_store import serve

    (cm,) = [d for d in every(docs, "ConfigMap") if d["metadata"]["name"].startswith("robustgate-torchserve-config-")]
    assert set(cm["data"]) == {"config.properties", "log4j2.xml"}
    (tmp_path / "config.properties").write_text(cm["data"]["config.properties"])
    monkeypatch.setattr(serve, "CONFIG_DIR", tmp_path)
    rendered = serve.render_config(serve.ServeSettings())
    props = dict(line.split("=", 1) for line in rendered.splitlines() if line and not line.startswith("#"))
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "false"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert props[key] == "127.0.0.1", key


def test_a_calibrated_policy_goes_into_a_configmap_as_the_readme_says(default_store: Path, tmp_path: Path) -> None:
    """README's way to change a gate policy without a new image: the overlay's
    configMapGenerator, merged into the policies ConfigMap. A calibrated policy is about
    1.5 MB and a ConfigMap holds at most 1 MiB: it goes in gzipped (binaryData; the
    entrypoint unpacks it). README's snippet, put into a copy of the gpu overlay, renders to a
    ConfigMap under the limit whose entry unpacks to the policy."""
    import base64
    import gzip
    import re
    import shutil

    readme = (REPO / "README.md").read_text()
    snippet = re.search(r"```yaml\n# k8s/overlays/gpu/kustomization.yaml\n(configMapGenerator:.*?)```", readme, re.S)
    assert snippet, "README's policy snippet for the gpu overlay is gone"
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    overlay = copy / "overlays" / "gpu"
    policy = (default_store / "fmnist-cnn" / "policy.json").read_bytes()
    (overlay / "policies").mkdir()
    (overlay / "policies" / "fmnist-cnn.json.gz").write_bytes(gzip.compress(policy, 9, mtime=0))
    with (overlay / "kustomization.yaml").open("a") as f:
        f.write(snippet.group(1))
    out = subprocess.run([dev_tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    (cm,) = [d for d in every(tuple(docs), "ConfigMap") if d["metadata"]["name"].startswith("robustgate-gate-policies-")]
    entries = {k: base64.b64decode(v) for k, v in cm.get("binaryData", {}).items()}
    entries.update({k: v.encode() for k, v in cm.get("data", {}).items()})
    assert set(entries) == {"fmnist-cnn.json.gz"}
    assert gzip.decompress(entries["fmnist-cnn.json.gz"]) == policy
    assert sum(map(len, entries.values())) < CONFIGMAP_MAX_BYTES, "the policy outgrew a ConfigMap, even gzipped"


def test_base_torchserve_config_is_the_project_config() -> None:
    """k8s/base/torchserve/ is a copy (kustomize reads no file outside k8s/): keep it in step."""
    for name in ("config.properties", "log4j2.xml"):
        assert (K8S / "base" / "torchserve" / name).read_text() == (REPO / "model_store" / "config" / name).read_text(), \
            f"k8s/base/torchserve/{name} differs from model_store/config/{name}: copy it over"


def test_rule_groups_are_unique() -> None:
    rule = one(render("overlays/gpu"), "PrometheusRule")
    names = [g["name"] for g in rule["spec"]["groups"]]
    assert len(names) == len(set(names)), names
