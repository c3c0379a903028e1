"""Shared fixtures. Real data, real exports, real archives; nothing is mocked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import shutil
import sys

from hypothesis import HealthCheck, settings

from model_store import build, data

REPO = Path(__file__).resolve().parent.parent

# Property tests: a few hundred examples in CI; HYPOTHESIS_PROFILE=nightly for 10,000.
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def dev_tool(name: str) -> str:
    """Path of a command-line tool from the dev extra (the venv's bin first, then PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


@pytest.fixture(scope="session")
def fmnist() -> data.FashionMNIST:
    """The real Fashion-MNIST splits from Debian's dataset-fashion-mnist."""
    return data.load()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, fmnist: data.FashionMNIST) -> Path:
    """A model store built by the real pipeline with a tiny budget (1 epoch on 2,000 images):
    ``fmnist-cnn/`` (model.pt, model.onnx, card.json), ``archives/*.mar``, ``manifest.json``."""
    store = tmp_path_factory.mktemp("store")
    opts = build.BuildOptions(
        store=store,
        sweep_limit=200,
        parity_limit=2000,
        check_floor=False,
        progress=False,
        overrides={"epochs": 1, "limit": 2000},
    )
    build.build_model(build.DEFAULT_MODEL, opts, dataset=fmnist)
    return store


@pytest.fixture(scope="session")
def default_store() -> Path:
    """The default model store, built by the test command before pytest starts."""
    store = build.DEFAULT_STORE
    if not build.is_built(store, build.DEFAULT_MODEL):
        pytest.fail(f"default model not built in {store}: run `python -m model_store.build` (scripts/test.sh does)")
    return store


from model_store.serve import free_port  # noqa: E402,F401  (tests import it from here)


@pytest.fixture(scope="session")
def torchserve(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real TorchServe on free loopback ports serving the tiny store's two archives."""
    from model_store import serve

    settings = serve.ServeSettings.on_free_ports(store=tiny_store, run_dir=tmp_path_factory.mktemp("ts-run"))
    # started from an environment whose PYTHONPATH holds this checkout, as the image's does
    # (/app:/app/proto): its workers must still run the archives' own handler code
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join((str(REPO), str(REPO / "proto")))
    try:
        ts = serve.start(settings)
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    try:
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def calibrated_store(tiny_store: Path, torchserve) -> Path:
    """The tiny store with a gate policy calibrated through the real TorchServe (small budget)."""
    import asyncio

    from model_store import serve
    from service import calibration

    asyncio.run(
        calibration.calibrate(
            tiny_store, "fmnist-cnn", torchserve.grpc_inference_target,
            torchserve.settings.run_dir / serve.KEY_FILE, images=600, attack_images=150, log=lambda *a: None,
        )
    )
    return tiny_store


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch):
    """Every proxy variable HTTP clients and gRPC read points at a listener on loopback that
    records each connection it gets (and closes it); ``no_proxy`` unset, as in a pod that sets
    a proxy for its egress. Yields the list of recorded connections: a client that keeps to
    its loopback peer leaves it empty."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(1.0)
                try:
                    seen.append(conn.recv(4096))
                except OSError:
                    seen.append(b"")

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "grpc_proxy", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(var, url)
    for var in ("no_proxy", "NO_PROXY", "no_grpc_proxy"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield seen
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not, on Linux)
        listener.close()
        thread.join(5)
