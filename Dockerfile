# RobustGate: one image, two roles. The first argument picks the role:
#   torchserve  TorchServe on the baked model store (loopback only, token auth on)
#   gateway     the gRPC gateway beside it (default)
# Build:  docker build --build-arg BASE_IMAGE=<Debian bookworm + Python 3.11> -t robustgate:TAG .
# The build context needs the model store: `python -m model_store.build` (and calibration)
# first; see README.md, Deployment.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: a virtual environment holding exactly the locked wheels --------------------
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Where the wheels come from; every one is checked against its sha256 in the lock, so a
# mirror (or a local wheelhouse served on loopback, scripts/docker_smoke.sh) is safe.
ARG PIP_INDEX_URL=https://pypi.org/simple
COPY requirements.lock /tmp/requirements.lock
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
      --require-hashes --no-deps --only-binary :all: -r /tmp/requirements.lock \
 && /opt/venv/bin/python -m pip uninstall --yes --disable-pip-version-check pip \
 && rm -rf /root/.cache /tmp/requirements.lock

# --- runtime: Java 17, the venv, the code and the model store; no compilers, no caches ---
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Java 17 runs TorchServe's frontend; a base that already has it (a local bookworm base built
# with openjdk-17-jre-headless) skips the install. Slim images lack the man1 directory that
# the JRE's postinst writes into.
RUN if ! command -v java >/dev/null; then \
      mkdir -p /usr/share/man/man1 \
      && apt-get update \
      && apt-get install -y --no-install-recommends openjdk-17-jre-headless \
      && apt-get clean \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && java -version 2>&1 | grep -q '"17\.' \
 && groupadd --system --gid 10001 robustgate \
 && useradd --system --uid 10001 --gid robustgate --home-dir /home/robustgate --create-home \
      --shell /usr/sbin/nologin robustgate

COPY --from=builder /opt/venv /opt/venv
# The source tree runs from /app (model_store reads its config templates beside its code);
# root owns it and the store, so the serving user can read but not change them.
COPY service/ /app/service/
COPY handlers/ /app/handlers/
COPY proto/ /app/proto/
COPY model_store/ /app/model_store/
COPY deploy/docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:/app/proto \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/robustgate \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    ROBUSTGATE_STORE=/app/model_store/artifacts \
    ROBUSTGATE_HOST=0.0.0.0 \
    TORCHSERVE_RUN_DIR=/run/torchserve

# Code and store readable by all, writable by none but root (a calibrated policy.json is
# written 0600). The run directory is shared by both containers of a pod (TorchServe writes
# its key file there, the gateway reads it); it exists in the image for a plain `docker run`.
RUN chmod -R a+rX,go-w /app \
 && python -m compileall -q /app/service /app/model_store /app/proto \
 && mkdir -p /run/torchserve \
 && chown robustgate:robustgate /run/torchserve

USER 10001:10001
WORKDIR /app
EXPOSE 50051 9464
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["gateway"]
