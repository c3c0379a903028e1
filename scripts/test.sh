#!/usr/bin/env bash
# The test command: set up, build the default model if it is missing, run the suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k handler -x).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -m model_store.build --quiet
exec .venv/bin/python -m pytest "$@"
