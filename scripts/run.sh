#!/usr/bin/env bash
# The main command: set up, build and calibrate the default model if missing, then serve it:
# TorchServe on loopback (token auth on) and the RobustGate gateway in the foreground.
# Ctrl-C (or SIGTERM, or a hangup) at any point stops it: during the build, the calibration or
# TorchServe's start it stops that step (set-up finishes first); once serving, it drains the
# gateway; TorchServe is stopped either way.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# One instance per checkout: a second would stop the first one's TorchServe (one run dir) and
# then fail to bind the first one's port, leaving it up without a backend.
mkdir -p var
exec 9>var/run.lock
flock -n 9 || { echo "scripts/run.sh already runs from $root (var/run.lock); stop it first" >&2; exit 1; }

# Every step after set-up runs in the background and is waited for, so that a SIGTERM to
# this script (not only a terminal's Ctrl-C) reaches the step that runs: bash defers a trap
# until a foreground command ends, and dies of an untrapped TERM, leaving that command (a
# training run, TorchServe being started) running without it. A step runs in a session of
# its own and gets SIGINT, all of its processes at once: Python runs its finally blocks on
# it (its default SIGTERM ends it on the spot), and a background command would otherwise
# ignore SIGINT. The gateway gets SIGTERM, on which it drains. (Set-up runs in the
# foreground: sudo may ask for a password on the terminal.)
child=""
signal_to="INT group"
stopping=0
# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
  stopping=1
  [ -n "$child" ] || return 0
  if [ "$signal_to" = "INT group" ]; then
    # the group exists once setsid ran; before, the signal reaches the one process there is
    kill -INT -- "-$child" 2>/dev/null || kill -INT "$child" 2>/dev/null || true
  else
    kill -TERM "$child" 2>/dev/null || true
  fi
}
# HUP too: a closed terminal or a lost ssh session. Untrapped, bash died of it and its EXIT trap
# stopped TorchServe, while the step (in a session of its own, out of the terminal's reach)
# ran on: a gateway without a backend, holding the port and the lock.
trap on_signal TERM INT HUP
step() {  # "$@" in a session of its own, waited for; returns its exit status
  [ "$stopping" -eq 0 ] || return 143
  ( trap - INT TERM HUP; exec setsid "$@" ) &
  child=$!
  [ "$stopping" -eq 0 ] || on_signal  # a signal that came while it started
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

bash scripts/setup.sh; stop_if_asked
py=.venv/bin/python
model="${ROBUSTGATE_MODEL:-fmnist-cnn}"
step $py -m model_store.build --model "$model"; stop_if_asked
step $py -m service.calibration --model "$model" --if-missing --start-torchserve; stop_if_asked

trap '$py -m model_store.serve stop >/dev/null 2>&1 || true' EXIT  # from here on, whatever ends this
step $py -m model_store.serve stop >/dev/null 2>&1 || true
step $py -m model_store.serve start --model "$model-torchscript" --model "$model-onnx"; stop_if_asked

bash scripts/banner.sh "$model"
# The gateway drains on SIGTERM and exits 0; its status is this script's.
rc=0
signal_to="TERM"
step $py -m service --models "$model" || rc=$?
exit "$rc"
