#!/usr/bin/env bash
# Real image smoke test: build the image, run TorchServe and the gateway from it as two
# containers sharing the host's loopback and a run-directory volume (as the pod shares its
# loopback and an emptyDir), wait for gRPC health SERVING, classify one Fashion-MNIST test
# image, stop both, and print the numbers the README (Deployment) records.
#
#   scripts/docker_smoke.sh [--store DIR] [--base-image IMAGE] [--keep-image]
#
# Needs a Docker engine (Debian: apt-get install docker.io; dockerd --iptables=false
# --bridge=none works where no bridge can be made), the project's venv (scripts/setup.sh)
# for the client, and a calibrated model store (default model_store/artifacts: build it with
# `python -m model_store.build`, then `python -m service.calibration --start-torchserve`).
#
# Where registry images cannot be pulled, the base image is made locally: with no
# --base-image, the script uses local/bookworm-python3.11-jre17 and builds it with
# debootstrap (root, Debian's mirror) when absent. Wheels come from a local wheelhouse
# ($WHEELHOUSE, filled from requirements.lock with hashes checked) served to the build on
# 127.0.0.1, so the build itself needs no network access beyond the loopback.
#
# Environment: IMAGE (default robustgate:smoke), WHEELHOUSE (~/.cache/robustgate/wheelhouse),
# PORT_BASE (default 27000: gateway PORT_BASE+51, metrics +464, TorchServe +70/+71/+80..+82,
# wheel index +99),
# DEBIAN_MIRROR (http://deb.debian.org/debian), HEALTH_TIMEOUT_S (600).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

store="$root/model_store/artifacts"
base_image=""
keep_image=0
while [ $# -gt 0 ]; do
  case "$1" in
    --store) store="$(cd "$2" && pwd)"; shift 2 ;;
    --base-image) base_image="$2"; shift 2 ;;
    --keep-image) keep_image=1; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

image="${IMAGE:-robustgate:smoke}"
wheelhouse="${WHEELHOUSE:-$HOME/.cache/robustgate/wheelhouse}"
port_base="${PORT_BASE:-27000}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
health_timeout_s="${HEALTH_TIMEOUT_S:-600}"
py="$root/.venv/bin/python"
docker="${DOCKER:-docker}"
name="rg-smoke-$$"
work="$(mktemp -d)"
gw_port=$((port_base + 51)); metrics_port=$((port_base + 464))
ts_grpc=$((port_base + 70)); ts_http=$((port_base + 80))
index_pid=""

say() { printf '[docker_smoke %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for c in "$name-gateway" "$name-torchserve"; do
      "$docker" logs --tail 60 "$c" 2>&1 | sed "s/^/[$c] /" || true
    done
  fi
  "$docker" rm -f "$name-gateway" "$name-torchserve" >/dev/null 2>&1 || true
  "$docker" volume rm -f "$name-run" >/dev/null 2>&1 || true
  [ -z "$index_pid" ] || kill "$index_pid" 2>/dev/null || true
  [ "$keep_image" -eq 1 ] || [ "$rc" -ne 0 ] || "$docker" rmi "$image" >/dev/null 2>&1 || true
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# --- preflight ---------------------------------------------------------------------------
"$docker" version --format 'engine {{.Server.Version}}' >/dev/null \
  || { echo "no Docker engine answers (start dockerd)" >&2; exit 1; }
[ -x "$py" ] || { echo "no .venv: run scripts/setup.sh" >&2; exit 1; }
"$py" -m model_store.build --store "$store" --verify
ls "$store"/*/policy.json >/dev/null 2>&1 \
  || { echo "$store has no calibrated gate policy: python -m service.calibration --start-torchserve" >&2; exit 1; }

# --- base image --------------------------------------------------------------------------
if [ -z "$base_image" ]; then
  base_image=local/bookworm-python3.11-jre17
  if ! "$docker" image inspect "$base_image" >/dev/null 2>&1; then
    say "building $base_image with debootstrap from $mirror"
    command -v debootstrap >/dev/null || { echo "needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }
    rootfs="$work/rootfs"
    # python3.11-venv's python3.11-distutils dependency is not resolved by debootstrap alone.
    debootstrap --variant=minbase \
      --include=python3.11,python3.11-venv,python3-distutils,python3-lib2to3,openjdk-17-jre-headless \
      bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
      "$mirror" "$mirror" "$mirror" >"$rootfs/etc/apt/sources.list"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "$docker" import \
      -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
      -c 'CMD ["/bin/bash"]' - "$base_image" >/dev/null
  fi
fi
say "base image $base_image"

# --- wheelhouse, served as a PEP 503 index on loopback -------------------------------------
mkdir -p "$wheelhouse"
"$py" -m pip download --quiet --no-deps --require-hashes --only-binary :all: \
  -d "$wheelhouse" -r requirements.lock >"$work/download.log" 2>&1 || { tail -20 "$work/download.log" >&2; exit 1; }
index="$work/index"
"$py" - "$wheelhouse" "$index" <<'EOF'
import re, sys
from pathlib import Path
wheels, index = Path(sys.argv[1]), Path(sys.argv[2])
for whl in wheels.glob("*.whl"):
    project = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    d = index / "simple" / project
    d.mkdir(parents=True, exist_ok=True)
    (d / whl.name).symlink_to(whl.resolve())
EOF
# A fixed port: the index URL is a build argument, and the same value keeps the venv layer cached.
index_port=$((port_base + 99))
"$py" -m http.server --bind 127.0.0.1 --directory "$index" "$index_port" >"$work/index.log" 2>&1 &
index_pid=$!

# --- build -------------------------------------------------------------------------------
context="$root"
if [ "$store" != "$root/model_store/artifacts" ]; then
  # Another store: stage the build context with it in place of model_store/artifacts.
  context="$work/context"
  mkdir -p "$context"
  tar -C "$root" --exclude=__pycache__ --exclude=model_store/artifacts -c \
    Dockerfile .dockerignore requirements.lock deploy/docker-entrypoint.sh service handlers proto model_store \
    | tar -C "$context" -x
  cp -a "$store" "$context/model_store/artifacts"
fi
say "building $image"
t0="$(now)"
DOCKER_BUILDKIT=0 "$docker" build --network host --quiet \
  --build-arg BASE_IMAGE="$base_image" \
  --build-arg PIP_INDEX_URL="http://127.0.0.1:$index_port/simple/" \
  -t "$image" "$context" >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; exit 1; }
build_s="$(secs "$t0" "$(now)")"
size_bytes="$("$docker" image inspect --format '{{.Size}}' "$image")"
kill "$index_pid" 2>/dev/null || true
index_pid=""
say "built in ${build_s}s, $((size_bytes / 1000000)) MB"

# --- run both containers as the pod does -------------------------------------------------
policies="$work/policies"
mkdir -p "$policies"
for p in "$store"/*/policy.json; do cp "$p" "$policies/$(basename "$(dirname "$p")").json"; done
chmod -R a+rX "$policies"
"$docker" volume create "$name-run" >/dev/null
locked=(--network host --read-only --tmpfs "/tmp:rw,exec,mode=1777" --cap-drop ALL
        --security-opt no-new-privileges --user 10001:10001)
t0="$(now)"
"$docker" run -d --name "$name-torchserve" "${locked[@]}" \
  -v "$name-run:/run/torchserve" \
  "$image" torchserve --grpc-port "$ts_grpc" --http-port "$ts_http" >/dev/null
"$docker" run -d --name "$name-gateway" "${locked[@]}" \
  -v "$name-run:/run/torchserve:ro" -v "$policies:/etc/robustgate/policies:ro" \
  -e ROBUSTGATE_HOST=127.0.0.1 -e ROBUSTGATE_PORT="$gw_port" -e ROBUSTGATE_METRICS_PORT="$metrics_port" \
  -e ROBUSTGATE_TORCHSERVE_ADDRESS="127.0.0.1:$ts_grpc" \
  -e ROBUSTGATE_TORCHSERVE_METRICS_URL="http://127.0.0.1:$((ts_http + 2))/metrics" \
  "$image" gateway >/dev/null
say "containers started; waiting for gRPC health SERVING on 127.0.0.1:$gw_port"
health_check() {
  "$py" - "127.0.0.1:$gw_port" <<'EOF'
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
    except grpc.RpcError:
        sys.exit(1)
sys.exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)
EOF
}
until health_check; do
  for c in "$name-torchserve" "$name-gateway"; do
    if [ "$("$docker" inspect --format '{{.State.Running}}' "$c")" != true ]; then
      echo "$c exited before the gateway was SERVING" >&2
      exit 1
    fi
  done
  if [ "$(secs "$t0" "$(now)" | cut -d. -f1)" -ge "$health_timeout_s" ]; then
    echo "not SERVING after ${health_timeout_s}s" >&2
    exit 1
  fi
  sleep 2
done
serving_s="$(secs "$t0" "$(now)")"
say "SERVING ${serving_s}s after start"

# --- one classification: a Fashion-MNIST test image, as a client sends it -----------------
"$py" - "$work/sample.png" <<'EOF'
import sys
from PIL import Image
from model_store import data
ds = data.load()
Image.fromarray(ds.test.images[0]).save(sys.argv[1])
print(f"sample: test image 0, true label {data.LABELS[int(ds.test.labels[0])]}")
EOF
t0="$(now)"
"$py" -m service.cli --address "127.0.0.1:$gw_port" classify "$work/sample.png" | tee "$work/classify.txt"
classify_s="$(secs "$t0" "$(now)")"
grep -q "^gate: " "$work/classify.txt"
policy_line="$("$docker" logs "$name-gateway" 2>&1 | grep -c 'gate policy from /etc/robustgate/policies' || true)"
# TorchServe logs to its container's stdout (its workers' start-up lines among them), and the
# gateway relays TorchServe's metrics on its own metrics port.
ts_log_lines="$("$docker" logs "$name-torchserve" 2>&1 | grep -c 'MODEL_LOG' || true)"
if [ "$ts_log_lines" -eq 0 ]; then
  echo "no TorchServe worker log line (MODEL_LOG) in \`docker logs $name-torchserve\`" >&2
  exit 1
fi
relay="$("$py" - "http://127.0.0.1:$metrics_port/metrics/torchserve" <<'EOF'
import sys
import urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
    text = resp.read().decode()
n = sum(1 for line in text.splitlines() if line.startswith("ts_inference_requests_total"))
print(f"{resp.status}, {n} ts_inference_requests_total series")
if not n:
    print(f"the relay answered no ts_inference_requests_total series:\n{text[:2000]}", file=sys.stderr)
    sys.exit(1)
EOF
)"

# --- stop as Kubernetes does: SIGTERM, gateway first ------------------------------------
t0="$(now)"
"$docker" stop --time 30 "$name-gateway" >/dev/null
gw_rc="$("$docker" inspect --format '{{.State.ExitCode}}' "$name-gateway")"
t1="$(now)"
"$docker" stop --time 40 "$name-torchserve" >/dev/null
ts_rc="$("$docker" inspect --format '{{.State.ExitCode}}' "$name-torchserve")"
gw_stop_s="$(secs "$t0" "$t1")"
ts_stop_s="$(secs "$t1" "$(now)")"
if [ "$gw_rc" != 0 ] || [ "$ts_rc" != 0 ]; then
  echo "exit codes: gateway $gw_rc, torchserve $ts_rc" >&2
  exit 1
fi

say "summary"
cat <<EOF
date:           $(date -u +%Y-%m-%dT%H:%MZ)
engine:         Docker $("$docker" version --format '{{.Server.Version}}'), $(nproc) cores
base image:     $base_image
image:          $image, $((size_bytes / 1000000)) MB
build:          ${build_s} s
start→SERVING:  ${serving_s} s (TorchServe verifies the store and loads the model; the gateway waits for its key file)
classify:       ${classify_s} s for one call through the CLI (process start included)
policy mount:   ${policy_line} model(s) served with the policy from the mounted directory
torchserve log: ${ts_log_lines} worker lines on the torchserve container's stdout
metrics relay:  /metrics/torchserve on the gateway's metrics port answered ${relay}
stop:           gateway ${gw_stop_s} s, torchserve ${ts_stop_s} s after SIGTERM (exit codes ${gw_rc}, ${ts_rc})
EOF
