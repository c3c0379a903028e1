#!/usr/bin/env bash
# The main command: set up, build and calibrate the default model if missing, then serve it:
# TorchServe on loopback (token auth on) and the RobustGate gateway in the foreground.
# Ctrl-C (or SIGTERM) at any point stops it: during set-up, the build or the calibration it
# stops that step; once serving, it drains the gateway; TorchServe is stopped either way.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# One instance per checkout: a second would stop the first one's TorchServe (one run dir) and
# then fail to bind the first one's port, leaving it up without a backend.
mkdir -p var
exec 9>var/run.lock
flock -n 9 || { echo "scripts/run.sh already runs from $root (var/run.lock); stop it first" >&2; exit 1; }

# Every step runs in the background and is waited for, so that a SIGTERM to this script (not
# only a terminal's Ctrl-C, which reaches the whole group) reaches the step that runs: bash
# defers a trap until a foreground command ends, and dies of an untrapped TERM, leaving that
# command (a training run, TorchServe being started) running without it.
child=""
stopping=0
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
  stopping=1
  if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null || true; fi
}
trap on_signal TERM INT
step() {  # "$@" in the background; returns its exit status
  "$@" &
  child=$!
  local rc
  while :; do
    # A trapped signal interrupts wait (status > 128) while the step may still run: wait
    # again. Once it has ended, wait gives its own status (bash keeps it), signal or not.
    if wait "$child"; then rc=0; else rc=$?; fi
    [ "$rc" -gt 128 ] || break
    if ! kill -0 "$child" 2>/dev/null; then
      if wait "$child"; then rc=0; else rc=$?; fi
      break
    fi
  done
  child=""
  return "$rc"
}
stop_if_asked() { [ "$stopping" -eq 0 ] || exit 143; }

step bash scripts/setup.sh; stop_if_asked
py=.venv/bin/python
model="${ROBUSTGATE_MODEL:-fmnist-cnn}"
step $py -m model_store.build --model "$model"; stop_if_asked
step $py -m service.calibration --model "$model" --if-missing --start-torchserve; stop_if_asked

trap '$py -m model_store.serve stop >/dev/null 2>&1 || true' EXIT  # from here on, whatever ends this
$py -m model_store.serve stop >/dev/null 2>&1 || true
step $py -m model_store.serve start --model "$model-torchscript" --model "$model-onnx"; stop_if_asked

port="${ROBUSTGATE_PORT:-50051}"
cat <<MSG

RobustGate is starting on 127.0.0.1:$port (metrics on :${ROBUSTGATE_METRICS_PORT:-9464}/metrics).
Call it from another shell:
  .venv/bin/robustgate classify some.png --model $model
  .venv/bin/grpcurl -plaintext -d '{"model":"$model","image":"'"\$(base64 -w0 some.png)"'"}' 127.0.0.1:$port robustgate.v1.ClassifierService/Classify
Make a test image:  .venv/bin/python -m service.sample_image some.png
MSG
# The gateway drains on SIGTERM and exits 0; its status is this script's.
rc=0
step $py -m service --models "$model" || rc=$?
exit "$rc"
