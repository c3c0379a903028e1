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
# foreground: sudo may ask for a password on the terminal.) A script started in the
# background by a non-interactive shell starts with SIGINT ignored, which no trap can undo and
# every step would inherit: the step's SIGINT is put back to its default (coreutils' env).
child=""
signal_to="INT group"
stopping=0  # once a signal came: 128 + its number, the exit status of a stop before the gateway runs
default_int=()
if env --default-signal=INT true 2>/dev/null; then default_int=(env --default-signal=INT); fi
# shellcheck disable=SC2329  # invoked by the traps below
on_signal() {
  stopping=$1
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
trap 'on_signal 143' TERM
trap 'on_signal 130' INT
trap 'on_signal 129' HUP
step() {  # "$@" in a session of its own, waited for; returns its exit status
  [ "$stopping" -eq 0 ] || return "$stopping"
  ( trap - INT TERM HUP; exec setsid "${default_int[@]}" "$@" ) &
  child=$!
  [ "$stopping" -eq 0 ] || on_signal "$stopping"  # a signal that came while it started
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
stop_if_asked() { [ "$stopping" -eq 0 ] || exit "$stopping"; }
# A set-up step: its failure ends the script with its status, a signal with the signal's (a
# step stopped by the SIGINT it was sent exits 130 even where this script got SIGTERM).
setup_step() { step "$@" || { local rc=$?; stop_if_asked; exit "$rc"; }; stop_if_asked; }

bash scripts/setup.sh; stop_if_asked
py=.venv/bin/python
model="${ROBUSTGATE_MODEL:-fmnist-cnn}"
setup_step $py -m model_store.build --model "$model"
setup_step $py -m service.calibration --model "$model" --if-missing --start-torchserve

trap '$py -m model_store.serve stop >/dev/null 2>&1 || true' EXIT  # from here on, whatever ends this
step $py -m model_store.serve stop >/dev/null 2>&1 || true
setup_step $py -m model_store.serve start --model "$model-torchscript" --model "$model-onnx"

bash scripts/banner.sh "$model"
# The gateway drains on SIGTERM and exits 0; its status is this script's.
rc=0
signal_to="TERM"
step $py -m service --models "$model" || rc=$?
exit "$rc"
