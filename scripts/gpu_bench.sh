#!/usr/bin/env bash
# The serving benchmark and the GPU tests on a machine with a GPU that can install nothing:
# the `device` tool's (its own python3 with torch and CUDA; no Java, no network).
#
#   scripts/gpu_bench.sh kit               # here, after scripts/setup.sh: packs .gpukit/ (~45 MB)
#   scripts/gpu_bench.sh run OUT [ARGS]    # there, in the repository root, with .gpukit and
#                                          # model_store/artifacts carried; ARGS go to the benchmark
#
# The kit holds what that machine lacks: the lock's gRPC, protobuf, Prometheus, OpenTelemetry
# and model-archiver wheels for its Python; TorchServe's Python package and its frontend's classes
# (packed solid: the jar deflates file by file, xz takes it from 46 to 20 MB); a Java 17
# runtime cut down by jlink to the modules the frontend uses; and the Fashion-MNIST test files.
# `run` unpacks it under /tmp, runs tests/test_gpu.py, then
# `python -m benchmarks.serving --format torchscript` (the TorchScript archive is the one a GPU
# runs without ONNX Runtime's CUDA provider), and leaves the logs and reports in OUT.
# To rehearse it here (no GPU: the GPU tests skip):
#   GPU_PYTHON_VERSION=3.11 scripts/gpu_bench.sh kit && PATH="$PWD/.venv/bin:$PATH" scripts/gpu_bench.sh run /tmp/gpu --smoke
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kit="$root/.gpukit"

case "${1:-}" in
kit)
  py=.venv/bin/python
  [ -x "$py" ] || { echo "gpu_bench: run scripts/setup.sh first (the kit is packed from .venv)" >&2; exit 1; }
  command -v jlink >/dev/null || { echo "gpu_bench: jlink not found: the kit's Java runtime needs a JDK 17 (openjdk-17-jdk-headless)" >&2; exit 1; }
  export XZ_OPT=-9  # the kit travels in a 64 MiB allowance: every MB counts
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  target_py="${GPU_PYTHON_VERSION:-3.12}"  # the device image's python3
  rm -rf "$kit"
  mkdir -p "$kit/wheels" "$kit/data"
  mapfile -t pins < <("$py" -m pip freeze | grep -iE '^(torch-model-archiver|grpcio|grpcio-health-checking|grpcio-reflection|protobuf|googleapis-common-protos|prometheus.client|opentelemetry-[a-z-]+)==')
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$target_py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$kit/wheels" "${pins[@]}"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  cp -r "$site/ts" "$tmp/ts"
  find "$tmp/ts" -name __pycache__ -prune -exec rm -rf {} +
  mkdir "$tmp/jar"
  "$py" -m zipfile -e "$site/ts/frontend/model-server.jar" "$tmp/jar"  # no unzip on a minimal Debian
  rm "$tmp/ts/frontend/model-server.jar"
  tar -cJf "$kit/torchserve.tar.xz" -C "$tmp" ts jar
  jdk="$(dirname "$(dirname "$(readlink -f "$(command -v jlink)")")")"
  [ -d "$jdk/jmods" ] || { echo "gpu_bench: $jdk has no jmods: jlink needs a JDK (openjdk-17-jdk-headless)" >&2; exit 1; }
  jlink --module-path "$jdk/jmods" --strip-debug --no-header-files --no-man-pages --output "$tmp/jre" \
    --add-modules java.base,java.logging,java.management,java.naming,java.sql,java.xml,jdk.unsupported,java.desktop,java.security.jgss,java.instrument,jdk.crypto.ec,java.net.http,jdk.management,java.scripting,jdk.zipfs
  tar -cJf "$kit/jre.tar.xz" -C "$tmp" jre
  cp /usr/share/datasets/fashion-mnist/t10k-*-idx?-ubyte.gz "$kit/data/"
  du -sh "$kit" model_store/artifacts
  ;;
run)
  out="${2:?usage: scripts/gpu_bench.sh run OUT [benchmark args]}"
  shift 2
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"
  [ -d "$kit" ] || { echo "gpu_bench: no .gpukit here: pack it with 'scripts/gpu_bench.sh kit' and carry it" >&2; exit 1; }
  # a fresh folder of this run's own (a fixed /tmp name another user could have made first)
  unpacked="$(mktemp -d /tmp/rg-gpukit.XXXXXX)"
  mkdir "$unpacked/site"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$unpacked/site" "$kit"/wheels/*.whl
  tar -xJf "$kit/torchserve.tar.xz" -C "$unpacked"
  tar -xJf "$kit/jre.tar.xz" -C "$unpacked"
  mv "$unpacked/ts" "$unpacked/site/ts"
  python3 - "$unpacked/jar" "$unpacked/site/ts/frontend/model-server.jar" <<'EOF'
import os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
    z.write(os.path.join(src, "META-INF", "MANIFEST.MF"), "META-INF/MANIFEST.MF")
    for d, _, files in os.walk(src):
        for f in files:
            path = os.path.join(d, f)
            name = os.path.relpath(path, src)
            if name != os.path.join("META-INF", "MANIFEST.MF"):
                z.write(path, name)
EOF
  data_dir=/usr/share/datasets/fashion-mnist
  if [ ! -f "$data_dir/t10k-images-idx3-ubyte.gz" ]; then mkdir -p "$data_dir" && cp "$kit"/data/* "$data_dir/"; fi
  export JAVA_HOME="$unpacked/jre" PYTHONPATH="$unpacked/site:$root:$root/proto" PYTHONUNBUFFERED=1
  export PATH="$JAVA_HOME/bin:$PATH"
  {  # what the machine is; none of it may stop the run
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv || true
    python3 -c 'import sys, torch, onnxruntime as ort, grpc, google.protobuf as pb; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "| onnxruntime", ort.__version__, ort.get_available_providers(), "| grpcio", grpc.__version__, "protobuf", pb.__version__)' || true
    java -version 2>&1 | head -1 || true
    nproc
  } 2>&1 | tee "$out/environment.txt"
  tests=0 bench=0  # a failing GPU test is reported, and the benchmark still runs
  python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$out/gpu-tests.log" || tests=$?
  python3 -m benchmarks.serving --format torchscript --out "$out" "$@" 2>&1 | tee "$out/serving.log" \
    | { grep -v -e FutureWarning -e 'warnings.warn' || true; } || bench=$?
  [ "$tests" -eq 0 ] || echo "gpu_bench: tests/test_gpu.py failed (exit $tests): $out/gpu-tests.log" >&2
  [ "$bench" -eq 0 ] || echo "gpu_bench: the benchmark failed (exit $bench): $out/serving.log" >&2
  exit $((tests || bench))
  ;;
*)
  echo "usage: scripts/gpu_bench.sh kit | run OUT [benchmark args]" >&2
  exit 2
  ;;
esac
