#!/usr/bin/env bash
# The image's entrypoint: `torchserve` or `gateway` (the default), then that role's flags.
#
#   torchserve [--model NAME ...]   python -m model_store.serve start on $ROBUSTGATE_STORE with
#                                   the run directory $TORCHSERVE_RUN_DIR; stays in the
#                                   foreground until TorchServe exits or SIGTERM stops it;
#                                   TORCHSERVE_SYSTEM_METRICS=off turns its system metrics off;
#                                   TORCHSERVE_REQUIRE_GPU=true refuses to start without a
#                                   usable CUDA device (else TorchServe would run on the CPU;
#                                   the ONNX handler reads it too: no CUDA provider, no load)
#   gateway [FLAGS]                 python -m service (flags and ROBUSTGATE_* variables), once
#                                   TorchServe's key file exists in $TORCHSERVE_RUN_DIR
#   anything else                   run as given (a shell, python -m service.cli, ...)
#
# In a pod the two containers share $TORCHSERVE_RUN_DIR (an emptyDir) and the loopback.
# Gate policies mounted in $ROBUSTGATE_POLICY_DIR as <model>.json, or <model>.json.gz (a
# ConfigMap holds at most 1 MiB; a calibrated policy is about 1.5 MB, 0.5 MB gzipped),
# replace the baked ones.
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) (store_with_policies) ends it too

store="${ROBUSTGATE_STORE:-/app/model_store/artifacts}"
run_dir="${TORCHSERVE_RUN_DIR:-/run/torchserve}"
policy_dir="${ROBUSTGATE_POLICY_DIR:-/etc/robustgate/policies}"

log() { printf '%s docker-entrypoint: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }

# shellcheck disable=SC2317,SC2329  # runs from the trap in run_torchserve
stop_torchserve() {
  log "stopping TorchServe"
  python -m model_store.serve stop --run-dir "$run_dir" || true
  exit 0
}

run_torchserve() {
  local launcher extra=()
  trap stop_torchserve TERM INT
  [ "${TORCHSERVE_SYSTEM_METRICS:-on}" = on ] || extra+=(--no-system-metrics)
  # A pod given a GPU whose node runtime did not inject the driver (no NVIDIA container
  # toolkit as the default runtime, no runtimeClassName) sees no CUDA device: TorchServe would
  # serve on the CPU, its probes passing, the GPU held and idle. Stop here instead.
  if [ "${TORCHSERVE_REQUIRE_GPU:-false}" = true ] \
    && ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    log "TORCHSERVE_REQUIRE_GPU=true but no CUDA device is usable in this container (is the NVIDIA" \
      "container toolkit the node's runtime, or does the pod need a runtimeClassName?); not starting" \
      "TorchServe on the CPU"
    exit 1
  fi
  # `start` returns once every model's workers are READY; it runs in the background so that
  # a SIGTERM during model loading reaches the trap. TorchServe logs to this container's
  # stdout, which the runtime collects and rotates (`--console inherit`); the run directory
  # keeps only a rolling copy (logs/ts_log.log, at most 4 x 20 MB).
  python -m model_store.serve start --store "$store" --run-dir "$run_dir" --console inherit \
    --timeout "${TORCHSERVE_STARTUP_TIMEOUT_S:-900}" "${extra[@]}" "$@" &
  if ! wait $!; then
    log "TorchServe did not start"
    exit 1
  fi
  launcher="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["pid"])' "$run_dir/serve.json")"
  log "TorchServe ready (launcher pid $launcher)"
  while kill -0 "$launcher" 2>/dev/null; do
    sleep 2 &
    wait $! || true
  done
  log "TorchServe exited"
  exit 1
}

# A store whose policies come from $policy_dir: every entry of the baked store linked, each
# <model>/policy.json replaced by $policy_dir/<model>.json or <model>.json.gz (unpacked; both
# for one model is refused). The gateway still refuses a policy calibrated for another model
# (its model sha256 must match the model card's).
store_with_policies() {
  local view="${TMPDIR:-/tmp}/robustgate-store" f model entry
  rm -rf "$view"
  mkdir -p "$view"
  for entry in "$store"/*; do ln -s "$entry" "$view/"; done
  for f in "$policy_dir"/*.json "$policy_dir"/*.json.gz; do
    [ -e "$f" ] || continue # a pattern that matched nothing
    model="$(basename "$f")"
    model="${model%.gz}"
    model="${model%.json}"
    if [ ! -d "$store/$model" ]; then
      log "policy $f names no model of the store $store"
      exit 1
    fi
    if [ ! -L "$view/$model" ]; then
      log "two policies for model $model in $policy_dir ($model.json and $model.json.gz): mount one"
      exit 1
    fi
    rm "$view/$model"
    mkdir "$view/$model"
    for entry in "$store/$model"/*; do ln -s "$entry" "$view/$model/"; done
    rm -f "$view/$model/policy.json"
    case "$f" in
      *.gz)
        if ! gzip -dc -- "$f" >"$view/$model/policy.json"; then
          log "policy $f is not a gzip file"
          exit 1
        fi
        ;;
      *) cp "$f" "$view/$model/policy.json" ;;
    esac
    log "model $model: gate policy from $f"
  done
  printf '%s\n' "$view"
}

run_gateway() {
  # PID 1 ignores a signal it has no handler for: without this, a pod deleted while the
  # gateway waits for the key file (up to 15 minutes) waited out its grace period and was
  # killed. The exec below replaces the handler with the gateway's own drain.
  trap 'exit 143' TERM INT
  local key_file="${ROBUSTGATE_TORCHSERVE_KEY_FILE:-$run_dir/key_file.json}"
  local wait_s="${ROBUSTGATE_KEY_FILE_WAIT_S:-900}" waited=0 gateway_store="$store"
  # The gateway reads TorchServe's token once at start: wait until TorchServe has written it.
  until python -c 'import json, sys; json.load(open(sys.argv[1]))["inference"]["key"]' "$key_file" 2>/dev/null; do
    if [ "$waited" -ge "$wait_s" ]; then
      log "no TorchServe key file at $key_file after ${wait_s}s"
      exit 1
    fi
    [ $((waited % 30)) -ne 0 ] || log "waiting for TorchServe's key file $key_file"
    sleep 1
    waited=$((waited + 1))
  done
  if compgen -G "$policy_dir/*.json" >/dev/null || compgen -G "$policy_dir/*.json.gz" >/dev/null; then
    gateway_store="$(store_with_policies)"
  fi
  exec python -m service --store "$gateway_store" --torchserve-key-file "$key_file" "$@"
}

role="${1:-gateway}"
[ "$#" -eq 0 ] || shift
case "$role" in
  torchserve) run_torchserve "$@" ;;
  gateway) run_gateway "$@" ;;
  *) exec "$role" "$@" ;;
esac
