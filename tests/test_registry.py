"""The model registry's start-up reads: card and policy must agree, and stale policies say so."""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from model_store.archive import write_manifest
from service.errors import ModelNotFound, PolicyMismatch
from service.gate.policy import Mode, Policy
from service.gate.policy_io import save_policy
from service.registry import JITTER_DRAWS, Registry, archive_path, load_model
from tests.test_gate_policy import SHA_M, make_policy
from tests.test_gate_squeeze_detector import detector_policy, jitter_detector


def store_with(tmp_path: Path, policy: Policy, model_sha: str = SHA_M) -> Path:
    model_dir = tmp_path / "fmnist-cnn"
    model_dir.mkdir(parents=True)
    card = {"hashes": {"model.pt": model_sha}, "labels": [str(i) for i in range(10)],
            "input": {"shape": [1, 28, 28], "mode": "L"}, "noise_sigma": 0.25, "version": "3"}
    (model_dir / "card.json").write_text(json.dumps(card))
    save_policy(policy, model_dir / "policy.json")
    write_manifest(tmp_path)  # the gateway verifies the card (and archives) it reads
    return tmp_path


def test_loads_a_matching_policy_without_warning(tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    policy = make_policy()
    policy = replace(policy, references=replace(policy.references, squeeze_detector=jitter_detector()),
                     calibration={"flag_rate_target": 0.05, JITTER_DRAWS[0]: JITTER_DRAWS[1]})
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        model = load_model(store_with(tmp_path, policy), "fmnist-cnn", "torchscript")
    assert model.backend_name == "fmnist-cnn-torchscript" and model.version == "3"
    assert model.policy.references.squeeze_detector is not None
    assert not [r for r in caplog.records if r.name == "service.registry"]


def test_a_policy_calibrated_on_one_shared_jitter_draw_serves_and_is_named_at_start_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Calibrated before each image got its own jitter draw: no record in its calibration."""
    policy = make_policy()
    policy = replace(policy, references=replace(policy.references, squeeze_detector=jitter_detector()),
                     calibration={"flag_rate_target": 0.05, "squeeze_detector_jitter": True})
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        model = load_model(store_with(tmp_path, policy), "fmnist-cnn", "torchscript")
    assert model.policy.references.squeeze_detector.reads_jitter  # served as calibrated
    [record] = [r for r in caplog.records if r.name == "service.registry"]
    assert "one draw of the jitter copies for every image" in record.getMessage()
    assert "'fmnist-cnn'" in record.getMessage() and "recalibrating" in record.getMessage()


def test_an_enabled_check_that_can_never_fire_is_named_at_start_up(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from service.gate.checks import Check
    from service.gate.policy import CheckPolicy, Thresholds

    policy = make_policy()
    policy = replace(policy, checks={**policy.checks, Check.VIEWPOINT: CheckPolicy(True, Thresholds())})
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        load_model(store_with(tmp_path, policy), "fmnist-cnn", "torchscript")  # served as it is
    [record] = [r for r in caplog.records if r.name == "service.registry" and "enables" in r.getMessage()]
    assert record.getMessage().startswith("model 'fmnist-cnn': policy 7 enables the viewpoint check with no flag, "
                                          f"reject or escalate threshold: it costs {len(policy.probe.views)} forward")


@pytest.mark.parametrize("changes, message", [
    # the noise check enabled, but no copy fits after the cheap probe: skipped on every request
    (lambda p: {"max_forward_passes": p.cheap_plan(0).rows}, "leaves no forward pass for a noise copy"),
    # 400 unanimous copies certify at most 0.53 at sigma 0.25, alpha 0.001
    (lambda p: {"noise": replace(p.noise, target_radius=0.6), "max_forward_passes": 500}, "certifies at most radius 0.529"),
    # room for 16 copies, the thresholds calibrated on 32: the check would flag off its rate
    (lambda p: {"max_forward_passes": p.cheap_plan(0).rows + 18},
     "room for 16 noise copies after the cheap probe, fewer than the 32 its noise thresholds"),
    # calibrated on 32 copies, edited to score 64
    (lambda p: {"noise": replace(p.noise, detect_samples=64),
                "calibration": {**p.calibration, "noise_copies": 32}},
     "scores the noise check on 64 copies, but its thresholds were calibrated on 32"),
    # noise not the card's (0.25): certificates for a smoothed model it was not trained as
    (lambda p: {"noise": replace(p.noise, sigma=0.5)}, "draws noise at sigma 0.5, the model was trained at 0.25"),
])
def test_a_noise_stage_that_cannot_do_what_its_policy_asks_is_named_at_start_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, changes, message: str) -> None:
    policy = make_policy()
    policy = replace(policy, **changes(policy))
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        load_model(store_with(tmp_path, policy), "fmnist-cnn", "torchscript")  # served as it is
    assert any(message in r.getMessage() for r in caplog.records if r.name == "service.registry"), caplog.text


def test_a_detector_fitted_without_jitter_serves_and_is_named_at_start_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy, _ = detector_policy()
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        model = load_model(store_with(tmp_path, policy), "fmnist-cnn", "torchscript")
    assert model.policy.cheap_plan(0).jitter.count == 0  # served as fitted
    [record] = [r for r in caplog.records if r.name == "service.registry"]
    assert "without jitter copies" in record.getMessage() and "recalibrating" in record.getMessage()


def test_a_policy_without_the_squeeze_detector_is_named_at_start_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        model = load_model(store_with(tmp_path, make_policy()), "fmnist-cnn", "torchscript")
    assert model.policy.references.squeeze_detector is None  # it still serves
    [record] = [r for r in caplog.records if r.name == "service.registry"]
    assert "no fitted detector" in record.getMessage()
    assert "'fmnist-cnn'" in record.getMessage() and "recalibrating" in record.getMessage()
    caplog.clear()
    off = replace(make_policy(), mode=Mode.OFF)  # the gate does not run: nothing to say
    with caplog.at_level(logging.WARNING, logger="service.registry"):
        load_model(store_with(tmp_path / "off", off), "fmnist-cnn", "torchscript")
    assert not [r for r in caplog.records if r.name == "service.registry"]


def test_a_policy_for_other_weights_or_a_missing_card_is_refused(tmp_path: Path) -> None:
    store = store_with(tmp_path, make_policy(), model_sha="c" * 64)
    with pytest.raises(PolicyMismatch, match="fmnist-cnn"):
        load_model(store, "fmnist-cnn", "torchscript")
    with pytest.raises(ModelNotFound, match="no card"):
        load_model(store, "other", "torchscript")


def edited_store(tmp_path: Path, edit) -> Path:
    """A store whose policy is ``make_policy()``'s JSON as ``edit`` leaves it (hand-edited)."""
    from service.gate.policy_io import policy_to_dict

    raw = policy_to_dict(make_policy())
    edit(raw)
    store = store_with(tmp_path, make_policy())
    (store / "fmnist-cnn" / "policy.json").write_text(json.dumps(raw))
    return store


@pytest.mark.parametrize("edit, field", [
    (lambda p: p["probe"]["views"][0].update(shift_x=40.0), "shift"),
    (lambda p: p["probe"]["occlusion"].update(grid=29), "occlusion.grid"),
    (lambda p: p["probe"]["shuffle"].update(grid=5, count=2), "shuffle.grid"),
])
def test_a_probe_the_handler_would_refuse_for_the_cards_image_size_is_refused_at_load(
        tmp_path: Path, edit, field: str) -> None:
    """The schema cannot know the image size, the card does: a probe that cannot fit the
    model's 28x28 images would be refused by the handler on every gated call."""
    with pytest.raises(PolicyMismatch, match=rf"'fmnist-cnn'.*does not fit the card's input: .*{field}"):
        load_model(edited_store(tmp_path, edit), "fmnist-cnn", "torchscript")


@pytest.mark.parametrize("edit, field", [
    (lambda p: p["noise"].update(sigma=20.0), "noise.sigma"),
    (lambda p: p["probe"]["views"][0].update(scale=20.0), "scale"),
])
def test_limits_the_handler_enforces_on_every_plan_are_refused_at_load(tmp_path: Path, edit, field: str) -> None:
    with pytest.raises(PolicyMismatch, match=rf"'fmnist-cnn'.*{field}"):
        load_model(edited_store(tmp_path, edit), "fmnist-cnn", "torchscript")


def with_archive(store: Path, handler: object, fmt: str = "torchscript", config: bytes | None = None) -> Path:
    """Put an archive for fmnist-cnn in ``store``: a zip whose model-config.yaml has this
    ``handler:`` section (or is ``config``, verbatim)."""
    path = archive_path(store, "fmnist-cnn", fmt)
    path.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model-config.yaml", config if config is not None else
                   yaml.safe_dump({"minWorkers": 2, "batchSize": 1, "handler": handler}))
    write_manifest(store)
    return store


def test_a_policy_asking_more_variants_than_its_archive_allows_is_refused_at_load(tmp_path: Path) -> None:
    """make_policy: a 10-row cheap probe and max_forward_passes 64, so a certified request
    can send one noise batch of 51 copies (52 rows). The handler would refuse that plan on
    every certified call; the gateway refuses the policy before it serves."""
    policy = make_policy()
    assert policy.max_plan_rows == 52
    fits = with_archive(store_with(tmp_path / "fits", policy), {"max_variants": 51, "max_batch_rows": 8192})
    model = load_model(fits, "fmnist-cnn", "torchscript")
    assert model.limits is not None and model.limits.max_variants == 51
    assert model.limits.max_batch_items == 256 and model.limits.defaults == ("max_batch_items",)  # the handler's
    short = with_archive(store_with(tmp_path / "short", policy), {"max_variants": 50})
    with pytest.raises(PolicyMismatch, match=r"'fmnist-cnn': its policy can ask 51 variants in one probe .*"
                                             r"fmnist-cnn-torchscript.mar allows at most 50 \(handler.max_variants"):
        load_model(short, "fmnist-cnn", "torchscript")
    # Only the archive of the format served is read; a store without it is not checked.
    assert load_model(short, "fmnist-cnn", "onnx").limits is None
    assert load_model(store_with(tmp_path / "none", policy), "fmnist-cnn", "torchscript").limits is None
    off = with_archive(store_with(tmp_path / "off", replace(policy, mode=Mode.OFF)), {"max_variants": 1})
    assert load_model(off, "fmnist-cnn", "torchscript").limits.max_variants == 1  # plain calls: 0 variants


@pytest.mark.parametrize("config, why", [
    (b"PK not really a zip", "not a zip"),
    (None, "no model-config.yaml"),
    (b"handler: [1, 2]", "handler section is not a mapping"),
    (b"handler:\n  max_variants: many", "handler.max_variants must be an integer >= 1"),
    (b"handler:\n  max_batch_rows: 0", "handler.max_batch_rows must be an integer >= 1"),
    (b"handler: {max_variants: [unclosed", "not YAML"),
])
def test_an_archive_whose_limits_cannot_be_read_is_refused_at_load(tmp_path: Path, config: bytes | None,
                                                                     why: str) -> None:
    store = with_archive(store_with(tmp_path, make_policy()), None, config=config or b"{}")
    path = archive_path(store, "fmnist-cnn", "torchscript")
    if why == "not a zip":
        path.write_bytes(config)
    elif config is None:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("card.json", b"{}")
    with pytest.raises(PolicyMismatch, match=r"cannot read model-config.yaml from the archive .*fmnist-cnn-torchscript"):
        load_model(store, "fmnist-cnn", "torchscript")
    if why.startswith("handler."):
        with pytest.raises(PolicyMismatch, match=why.replace(".", r"\.")):
            load_model(store, "fmnist-cnn", "torchscript")


def test_coalescing_beyond_the_archives_batch_limits_is_refused(tmp_path: Path) -> None:
    store = with_archive(store_with(tmp_path, make_policy()), {"max_batch_items": 8, "max_batch_rows": 100})
    registry = Registry({"fmnist-cnn": load_model(store, "fmnist-cnn", "torchscript")})
    registry.check_coalescing(8, 100)
    registry.check_coalescing(0, 10**6)  # coalescing off: one image a call
    with pytest.raises(PolicyMismatch, match=r"up to 9 images a call .*takes at most 8 \(handler.max_batch_items"):
        registry.check_coalescing(9, 100)
    with pytest.raises(PolicyMismatch, match=r"up to 101 rows a call .*takes at most 100 \(handler.max_batch_rows"):
        registry.check_coalescing(8, 101)
    tight = with_archive(store_with(tmp_path / "tight", make_policy()), {"max_batch_rows": 51})
    registry = Registry({"fmnist-cnn": load_model(tight, "fmnist-cnn", "torchscript")})
    with pytest.raises(PolicyMismatch, match=r"up to 52 rows a call"):  # one certified request's noise batch
        registry.check_coalescing(2, 40)


def test_limits_an_archive_leaves_unset_are_the_handlers_defaults_not_none(tmp_path: Path) -> None:
    """An archive whose model-config.yaml sets no limit read as "no limit" to the gateway,
    while the handler enforced its defaults (handlers/limits.py): coalescing past them started,
    and every such call then failed INTERNAL. They are the defaults now, named as such."""
    from handlers import limits

    store = with_archive(store_with(tmp_path, make_policy()), {"intra_op_threads": 1})
    registry = Registry({"fmnist-cnn": load_model(store, "fmnist-cnn", "torchscript")})
    lim = registry.get("fmnist-cnn").limits
    assert (lim.max_variants, lim.max_batch_items, lim.max_batch_rows) == (
        limits.MAX_VARIANTS, limits.MAX_BATCH_ITEMS, limits.MAX_BATCH_ROWS)
    registry.check_coalescing(32, limits.MAX_BATCH_ROWS)
    with pytest.raises(PolicyMismatch, match=rf"takes at most {limits.MAX_BATCH_ROWS} \(the handler's default "
                                             r"handler.max_batch_rows, which its model-config.yaml leaves unset"):
        registry.check_coalescing(32, limits.MAX_BATCH_ROWS + 1)


def test_a_gateway_that_cannot_start_says_why_in_one_line(tmp_path: Path) -> None:
    """Status 2 and one line naming the reason, never a traceback: a policy the handlers would
    refuse, an archive that would refuse the policy's or the coalescer's calls, an unreadable
    TorchServe key file, a port already taken."""
    import socket
    import subprocess
    import sys

    good = store_with(tmp_path / "good", make_policy())
    bad = edited_store(tmp_path / "bad", lambda p: p["probe"]["views"][0].update(shift_x=40.0))
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "i"}, "management": {"key": "m"}, "API": {"key": "a"}}))

    small = with_archive(store_with(tmp_path / "small", make_policy()), {"max_variants": 30})
    few = with_archive(store_with(tmp_path / "few", make_policy()), {"max_batch_items": 4})

    def start(store: Path, key_file: Path, port: int = 0, *flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service", "--store", str(store), "--models", "fmnist-cnn",
                               "--backend-format", "torchscript", "--port", str(port), "--metrics-port", "-1",
                               "--torchserve-key-file", str(key_file), *flags],
                              capture_output=True, text=True, timeout=60)

    with socket.create_server(("127.0.0.1", 0)) as taken:
        runs = {"cannot start: model 'fmnist-cnn': the probe of": start(bad, keys),
                "cannot start: model 'fmnist-cnn': its policy can ask 51 variants": start(small, keys),
                "cannot start: model 'fmnist-cnn': coalescing sends up to 8 images a call":
                    start(few, keys, 0, "--coalesce-max-batch", "8"),
                "cannot start: cannot read TorchServe's key file": start(good, tmp_path / "none"),
                f"cannot start: cannot listen on 127.0.0.1:{taken.getsockname()[1]}":
                    start(good, keys, taken.getsockname()[1])}
    for reason, out in runs.items():
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert reason in out.stderr, out.stderr
    assert "larger than the 28x28 image" in next(iter(runs.values())).stderr


def test_only_a_failure_to_start_reads_cannot_start(monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """`python -m service` answers a refusal to start with status 2 and one line; a fault
    after the gateway listened (here: while draining on SIGINT) is not dressed up as one."""
    import asyncio
    import os
    import signal

    import service.__main__ as entry
    from service import server

    async def refuses(settings, **_):
        raise PolicyMismatch("model 'fmnist-cnn': does not fit")

    monkeypatch.setattr(server, "start", refuses)
    with caplog.at_level(logging.ERROR, logger="service"):
        assert entry.main(["--metrics-port", "-1"]) == 2
    assert "cannot start: model 'fmnist-cnn': does not fit" in caplog.text

    class Listening:
        async def stop(self, grace_s: float) -> None:
            raise OSError("disk gone while draining")

    async def starts(settings, **_):
        asyncio.get_running_loop().call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        return Listening()

    caplog.clear()
    monkeypatch.setattr(server, "start", starts)
    with pytest.raises(OSError, match="disk gone while draining"):
        entry.main(["--metrics-port", "-1"])
    assert "cannot start" not in caplog.text


@pytest.mark.parametrize("card", ["{", "[]", '{"hashes": {}}', '{"hashes": {"model.pt": "x"}, "input": {"shape": [28]}}'])
def test_a_card_that_is_no_card_is_refused_with_its_path(tmp_path: Path, card: str) -> None:
    """Not JSON, or not a card's shape: a one-line start refusal naming the file, not a traceback."""
    from service.errors import GatewayError

    store = store_with(tmp_path, make_policy())
    (store / "fmnist-cnn" / "card.json").write_text(card)
    with pytest.raises(GatewayError, match=r"model 'fmnist-cnn': .*card\.json is not a valid model card \("):
        load_model(store, "fmnist-cnn", "onnx")


@pytest.mark.parametrize("labels", [[], ["only"]])
def test_a_model_of_fewer_than_two_classes_is_refused_at_load(tmp_path: Path, labels: list[str]) -> None:
    """Its gated requests all failed INTERNAL (the squeeze detector measures moves between
    classes); it is refused at start, naming the card."""
    from service.errors import GatewayError

    store = store_with(tmp_path, make_policy())
    card_path = store / "fmnist-cnn" / "card.json"
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "labels": labels}))
    write_manifest(store)
    with pytest.raises(GatewayError, match=rf"model 'fmnist-cnn': .*card\.json lists {len(labels)} label\(s\); "
                                           "a classifier the gate serves has at least 2"):
        load_model(store, "fmnist-cnn", "onnx")


def test_if_missing_keeps_a_policy_only_for_these_weights_and_this_code(tmp_path: Path) -> None:
    """``calibration --if-missing`` (run.sh, test.sh) kept any policy that loaded for the
    weights, also one calibrated before a change of the gate's scores or the handler's
    variants: thresholds fitted to the old code, served by the new. The policy records the
    calibrating code's digest; another digest (or none) is calibrated again."""
    import shutil

    from service.calibration import CALIBRATOR_KEY, calibrator_digest, stale_reason

    assert stale_reason(tmp_path, "fmnist-cnn") == "no policy"
    current = replace(make_policy(), calibration={"flag_rate_target": 0.05, CALIBRATOR_KEY: calibrator_digest()})
    store = store_with(tmp_path / "current", current)
    assert stale_reason(store, "fmnist-cnn") is None
    store = store_with(tmp_path / "unrecorded", make_policy())
    assert "calibrated by other code (calibrator unrecorded" in stale_reason(store, "fmnist-cnn")
    store = store_with(tmp_path / "other-weights", current, model_sha="c" * 64)
    assert "existing policy unusable" in stale_reason(store, "fmnist-cnn")
    # the digest follows the code: a copy of the sources reads the same, one changed byte not
    copy = tmp_path / "tree"
    for rel in ("service/calibration.py", "service/gate", "handlers"):
        src, dst = Path(__file__).resolve().parent.parent / rel, copy / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    assert calibrator_digest(copy) == calibrator_digest()
    engine = copy / "service" / "gate" / "engine.py"
    engine.write_text(engine.read_text() + "\n")
    assert calibrator_digest(copy) != calibrator_digest()
