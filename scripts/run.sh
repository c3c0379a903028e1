#!/usr/bin/env bash
# The main command: set up, build and calibrate the default model if missing, then serve it:
# TorchServe on loopback (token auth on) and the RobustGate gateway in the foreground.
# Ctrl-C (or SIGTERM) drains the gateway and stops TorchServe.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# One instance per checkout: a second would stop the first one's TorchServe (one run dir) and
# then fail to bind the first one's port, leaving it up without a backend.
mkdir -p var
exec 9>var/run.lock
flock -n 9 || { echo "scripts/run.sh already runs from $root (var/run.lock); stop it first" >&2; exit 1; }
bash scripts/setup.sh
py=.venv/bin/python
model="${ROBUSTGATE_MODEL:-fmnist-cnn}"
$py -m model_store.build --model "$model"
$py -m service.calibration --model "$model" --if-missing --start-torchserve

$py -m model_store.serve stop >/dev/null 2>&1 || true
$py -m model_store.serve start --model "$model-torchscript" --model "$model-onnx"
trap '$py -m model_store.serve stop >/dev/null 2>&1 || true' EXIT

port="${ROBUSTGATE_PORT:-50051}"
cat <<MSG

RobustGate is starting on 127.0.0.1:$port (metrics on :${ROBUSTGATE_METRICS_PORT:-9464}/metrics).
Call it from another shell:
  .venv/bin/robustgate classify some.png --model $model
  .venv/bin/grpcurl -plaintext -d '{"model":"$model","image":"'"\$(base64 -w0 some.png)"'"}' 127.0.0.1:$port robustgate.v1.ClassifierService/Classify
Make a test image:  .venv/bin/python -m service.sample_image some.png
MSG
# In the background and waited for, so that a SIGTERM to this script (not only a terminal's
# Ctrl-C, which reaches the whole group) drains the gateway before TorchServe stops; in the
# foreground bash would run the EXIT trap and leave the gateway running.
$py -m service --models "$model" &
gateway=$!
trap 'kill -TERM "$gateway" 2>/dev/null || true' TERM INT
rc=0
while kill -0 "$gateway" 2>/dev/null; do
  # A trapped signal interrupts wait (status > 128) while the gateway still drains: wait
  # again; the last wait's status is the gateway's own exit status.
  if wait "$gateway"; then rc=0; else rc=$?; fi
done
exit "$rc"
