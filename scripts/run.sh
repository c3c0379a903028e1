#!/usr/bin/env bash
# The main command: set up, build the default model if it is missing, and serve it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
.venv/bin/python -m model_store.build
