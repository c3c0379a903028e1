"""Shared fixtures. Real data, real exports, real archives; nothing is mocked."""

from __future__ import annotations

from pathlib import Path

import pytest

from model_store import build, data


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def torchserve(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A real TorchServe on free loopback ports serving the tiny store's two archives."""
    from model_store import serve

    settings = serve.ServeSettings(
        store=tiny_store,
        run_dir=tmp_path_factory.mktemp("ts-run"),
        grpc_inference_port=free_port(),
        grpc_management_port=free_port(),
        inference_port=free_port(),
        management_port=free_port(),
        metrics_port=free_port(),
    )
    ts = serve.start(settings)
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
