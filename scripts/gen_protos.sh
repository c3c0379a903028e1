#!/usr/bin/env bash
# Regenerate the Python stubs from proto/ (run from anywhere; uses the project's venv).
# CI runs it and fails when the committed stubs differ (tests/test_protos.py).
#
#   proto/robustgate/**/*.proto   -> beside each file (package robustgate.*)
#   proto/torchserve/*.proto      -> proto/robustgate/torchserve/ (TorchServe 0.12.0's
#                                    pinned inference/management API; client stubs only)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-$root/.venv/bin/python}"
cd "$root/proto"
mapfile -t files < <(find robustgate -name '*.proto' | sort)
"$py" -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "${files[@]}"

# TorchServe's protos import "google/rpc/status.proto" (googleapis-common-protos) and
# declare themselves as top-level files ("inference.proto"); protoc writes absolute
# imports for them, rewritten here to package-relative ones.
ts_out=robustgate/torchserve
mkdir -p "$ts_out"
rm -f "$ts_out"/*_pb2*.py "$ts_out"/*_pb2*.pyi
gapi="$("$py" -c 'import google.rpc.status_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[2])')"
mapfile -t ts_files < <(find torchserve -name '*.proto' -printf '%f\n' | sort)
"$py" -m grpc_tools.protoc -I torchserve -I "$gapi" --python_out="$ts_out" --pyi_out="$ts_out" \
  --grpc_python_out="$ts_out" "${ts_files[@]}"
sed -i -E 's/^import (inference|management)_pb2 as /from . import \1_pb2 as /' "$ts_out"/*_pb2_grpc.py

# grpc_tools writes empty *_pb2_grpc.py for protos without services: drop them.
while IFS= read -r -d '' f; do
  grep -q 'class ' "$f" || rm -f "$f"
done < <(find robustgate -name '*_pb2_grpc.py' -print0)
while IFS= read -r -d '' d; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done < <(find robustgate -type d -not -name __pycache__ -print0)
