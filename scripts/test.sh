#!/usr/bin/env bash
# The test command: set up, build and calibrate the default model if missing, run the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k handler -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# The suite sets what each gateway and server it starts reads: a caller's ROBUSTGATE_*
# (exported for run.sh: a token, TLS files) or PYTHONPATH would change what they run.
for name in $(compgen -e); do
  [[ "$name" != ROBUSTGATE_* ]] || unset "$name"
done
unset PYTHONPATH
bash scripts/setup.sh
.venv/bin/python -m model_store.build --quiet
.venv/bin/python -m service.calibration --model fmnist-cnn --if-missing --start-torchserve
exec .venv/bin/python -m pytest "$@"
