"""What the gate catches, end to end: the default model (fully trained, calibrated policy)
behind a real TorchServe and a real gateway. Small samples here; benchmarks/robustness.py
runs the full evaluation and writes the report. Every figure is printed (pytest -s)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import efficacy as ef
from benchmarks.report import store_with_policy
from model_store import data, serve
from robustgate.v1 import classifier_pb2 as pb
from service.client import Client
from service.gate.squeeze_detector import CONTEXT_FEATURES, JITTER_FEATURES
from tests.test_gateway import start_gateway, stop

MODEL = "fmnist-cnn"
CLEAN = 600  # clean test images: sd of a 5 % rate is 0.9 points
ATTACKED = 200  # images attacked per attack


@pytest.fixture(scope="module")
def default_torchserve(default_store: Path, tmp_path_factory):
    settings = serve.ServeSettings.on_free_ports(
        store=default_store, run_dir=tmp_path_factory.mktemp("ts-default"), models=(f"{MODEL}-onnx",))
    with serve.start(settings) as ts:
        yield ts


@pytest.fixture(scope="module")
def policy(default_store: Path) -> dict:
    return json.loads((default_store / MODEL / "policy.json").read_text())


@pytest.fixture(scope="module")
def client(default_store: Path, default_torchserve, tmp_path_factory):
    # Certified requests coalesce into calls of over a thousand variants: on a loaded 2-core
    # machine one may take longer than the 5 s default backend timeout (these tests are not
    # about latency).
    proc, address = start_gateway(default_store, default_torchserve, tmp_path_factory.mktemp("gw-default"),
                                  **{"backend-timeout-s": "30"})
    with Client(address) as c:
        yield c
    stop(proc)


@pytest.fixture(scope="module")
def clean(client: Client, fmnist: data.FashionMNIST) -> ef.Outcome:
    return ef.Outcome.of(ef.classify_all(client, fmnist.test.images[:CLEAN], MODEL))


@pytest.fixture(scope="module")
def attack_net(default_store: Path):
    return ef.load_attack_model(default_store, MODEL)


def test_the_calibrated_squeeze_detector_reads_the_context_and_the_jitter(policy: dict) -> None:
    """The default calibration (views, density and jitter copies in the probe) fits the
    detector with context and jitter, on the copies the probe holds."""
    det = policy["references"]["squeeze_detector"]
    assert det["context"] == list(CONTEXT_FEATURES + JITTER_FEATURES)
    assert det["jitter"] == [policy["probe"]["jitter"]["count"], policy["probe"]["jitter"]["sigma"]] == [4, 0.03]
    assert policy["calibration"]["squeeze_detector_context"] is True
    assert policy["calibration"]["squeeze_detector_jitter"] is True
    assert policy["calibration"]["jitter_draws"] == "per-image"  # each image probed with its own seed


def test_clean_flag_rate_is_near_the_calibrated_rate(clean: ef.Outcome, policy: dict) -> None:
    target = policy["calibration"]["flag_rate_target"]
    print(f"\nclean flag rate {clean.flagged:.3f} on {clean.n} test images (calibrated target {target})")
    # 3 sd of the test sample plus the calibration sample's own error (2,500 images).
    tolerance = 3 * np.sqrt(target * (1 - target) / clean.n) + 2 * np.sqrt(target * (1 - target) / 2500)
    assert abs(clean.flagged - target) <= tolerance
    assert clean.rejected <= clean.flagged


@pytest.mark.parametrize("name,eps", [("fgsm", 0.03), ("fgsm", 0.1), ("pgd", 0.03), ("pgd", 0.1)])
def test_successful_attacks_are_flagged(client: Client, fmnist: data.FashionMNIST, attack_net, clean: ef.Outcome,
                                        name: str, eps: float) -> None:
    images, labels = fmnist.test.images[CLEAN:CLEAN + ATTACKED], fmnist.test.labels[CLEAN:CLEAN + ATTACKED]
    adv, _ = ef.attack(attack_net, name, eps, images, labels)
    assert len(adv) >= 20, f"{name}@{eps}: only {len(adv)} successful attacks"
    out = ef.Outcome.of(ef.classify_all(client, adv, MODEL))
    aucs = {c: ef.auc(clean.scores[c], out.scores[c]) for c in out.scores if c in clean.scores}
    print(f"\n{name} eps={eps}: {len(adv)} successful, flagged {out.flagged:.3f}, rejected {out.rejected:.3f}; "
          f"AUC " + ", ".join(f"{c} {a:.3f}" for c, a in aucs.items()))
    # The gate must tell attacked from clean images: well above the clean flag rate, with at
    # least one check separating them well (density is aimed at strong attacks and
    # out-of-distribution inputs, so small-eps attacks may pass it: its AUC is reported).
    # The goals (>= 95 % at eps 0.03, >= 75 % at 0.1) are reported by
    # benchmarks/robustness.py, not asserted: the gate does not reach them yet.
    assert out.flagged >= max(0.3, 4 * clean.flagged)
    assert max(aucs.values()) > 0.85


@pytest.mark.parametrize("kind", ["rotate40", "tile_shuffle", "mnist_digits", "patch"])
def test_shifted_inputs(client: Client, fmnist: data.FashionMNIST, clean: ef.Outcome, kind: str) -> None:
    base = fmnist.test.images[1000:1200]
    images = {"rotate40": lambda: ef.rotate(base, 40), "tile_shuffle": lambda: ef.tile_shuffle(base),
              "mnist_digits": lambda: ef.mnist_digits(200), "patch": lambda: ef.patch(base)}[kind]()
    out = ef.Outcome.of(ef.classify_all(client, images, MODEL))
    print(f"\n{kind}: flagged {out.flagged:.3f}, rejected {out.rejected:.3f} (clean {clean.flagged:.3f})")
    if kind == "patch":  # reported only: the patch defences are off by default (they did not earn their share)
        assert 0.0 <= out.flagged <= 1.0
    else:
        assert out.flagged >= 3 * clean.flagged


def test_certified_accuracy_and_sequential_sampling(client: Client, fmnist: data.FashionMNIST, policy: dict) -> None:
    n = 24
    images, labels = fmnist.test.images[2000:2000 + n], fmnist.test.labels[2000:2000 + n]
    resp = ef.classify_all(client, images, MODEL, certify=True)
    budget = policy["noise"]["max_samples"]
    sigma = policy["noise"]["sigma"]
    acc = ef.certified_accuracy(resp, labels, (0.0, 0.25, 0.5))
    passes = np.array([r.gate.forward_passes for r in resp])
    print(f"\ncertified accuracy on {n}: " + ", ".join(f"r={r}: {a:.2f}" for r, a in acc.items())
          + f"; forward passes mean {passes.mean():.0f} (budget {budget} noise samples)")
    # Radius cannot exceed what the budget allows: sigma * Phi^-1(alpha^(1/n)) at n/n agreements.
    from scipy.stats import norm

    alpha = policy["noise"]["alpha"]
    r_max = sigma * norm.ppf(alpha ** (1 / budget))
    assert all(r.gate.certified_radius <= r_max + 1e-9 for r in resp)
    # Sequential sampling stops once radius 0.25 is out of reach and then counts the undrawn
    # copies as disagreeing, so the r=0 figure is a lower bound.
    assert acc[0.0] >= 0.4
    assert acc[0.0] >= acc[0.25] >= acc[0.5]
    # Sequential sampling stops early on images that cannot reach the target radius.
    assert passes.min() < passes.max() or passes.max() < budget


def test_enforce_withholds_the_label_and_monitor_answers(client: Client, default_store: Path, default_torchserve,
                                                         tmp_path: Path) -> None:
    digits = ef.mnist_digits(60)
    enforce = ef.classify_all(client, digits, MODEL)
    rejected = [i for i, r in enumerate(enforce) if r.gate.decision == pb.DECISION_REJECT]
    assert rejected, "no out-of-distribution image was rejected"
    assert all(not enforce[i].classes for i in rejected)  # label withheld
    store = store_with_policy(default_store, tmp_path / "store", MODEL, lambda pol: pol.update(mode="monitor"))
    proc, address = start_gateway(store, default_torchserve, tmp_path)
    try:
        with Client(address) as mon:
            monitored = ef.classify_all(mon, digits[rejected], MODEL)
    finally:
        stop(proc)
    for r in monitored:
        assert r.gate.mode == "monitor" and r.gate.decision == pb.DECISION_PASS
        assert r.gate.policy_decision == pb.DECISION_REJECT and len(r.classes) == 1
