"""Smoke runs of the benchmark commands (tiny budgets), so they never rot."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch


# Left in the temporary folder by libraries, not by the benchmarks: ONNX Runtime's session id.
FOREIGN_TEMP_FILES = {".ses"}


def _run(module: str, out: Path, timeout_s: float = 600, *args: str, stem: str | None = None) -> dict:
    # The run's temporary folders: none may be left after a success. A short path of its own
    # (TorchServe's workers bind Unix sockets under it, whose paths are at most 107 bytes).
    scratch = Path(tempfile.mkdtemp(prefix="rg-smoke-"))
    proc = subprocess.Popen([sys.executable, "-m", module, "--smoke", "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        # SIGINT, not SIGKILL: the benchmark's own clean-up stops the TorchServe and gateway
        # it started (they run in sessions of their own and would outlive a killed parent).
        proc.send_signal(signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        raise AssertionError(f"{module} --smoke ran past {timeout_s} s:\n{stdout[-2000:]}{stderr[-3000:]}") from None
    assert proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    left = sorted(p.name for p in scratch.iterdir() if p.name not in FOREIGN_TEMP_FILES)
    assert not left, f"{module} left {left} in its temporary folder"
    shutil.rmtree(scratch)
    stem = stem or module.split(".")[-1]
    return json.loads((out / f"{stem}-smoke.json").read_text())


def _head() -> str:
    """This checkout's HEAD as a short commit hash."""
    from benchmarks.report import REPO

    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_serving_benchmark_smoke(default_store: Path, tmp_path: Path) -> None:
    from benchmarks import serving as b

    report = _run("benchmarks.serving", tmp_path)
    names = {r["name"] for r in report["results"]}
    assert {"in-process TorchScript", b.IN_PROCESS, b.DIRECT, b.DIRECT_BATCHING, b.DIRECT_OOTB, b.DIRECT_TS,
            b.GATE_OFF, b.GATE_OFF + b.UNCOALESCED, b.GATE_OFF_TS, b.CASCADE, b.CASCADE + b.UNCOALESCED,
            b.EVERY_CHECK, b.CERT_SEQ, b.CERT_FIXED} <= names
    assert any(n.startswith("naive: ") for n in names)
    # where a call's time goes at one client, from each gateway's own stage histograms
    stages = report["stages_ms_in_turns"]
    assert set(stages) == {b.GATE_OFF, b.CASCADE, b.EVERY_CHECK}
    in_turns = {r["name"].removeprefix(b.INTERLEAVED): r["calls"] for r in report["results"]
                if r["name"].startswith(b.INTERLEAVED)}
    for row, v in stages.items():  # the gateway counted exactly the calls the row answered, no warm-up
        assert v["requests"] == in_turns[row] and 0 < v["backend"] < v["pipeline"] < v["client"], (row, v)
        assert v["decode"] + v["backend"] + v["gate"] <= v["pipeline"] * 1.0001, (row, v)
        assert 0 < v["worker"] < v["backend"], (row, v)  # the worker's own clock, inside the call's
    assert stages[b.EVERY_CHECK]["gate"] > 0
    # the gated rows' workers run more variants, measured against the same probe in process
    for row in b.GATED:
        assert stages[row]["worker"] > stages[b.GATE_OFF]["worker"] and stages[row]["probe_in_process"] > 0
    md = (tmp_path / "serving-smoke.md").read_text()
    assert "| row | client sees | outside the pipeline | pipeline | decode | backend | in the worker | gate |" in md
    # what each gated row adds beyond its probe, split where it goes: the parts add up
    direct = report["direct_ms_in_turns"]  # the same plans straight to TorchServe, with the worker's clock
    assert set(direct) == {b.DIRECT} | {b.direct_plan_row(row) for row in b.GATED}
    for row, v in direct.items():
        assert 0 < v["worker"] < v["client"], (row, v)
    for row in b.GATED:
        assert direct[b.direct_plan_row(row)]["worker"] > direct[b.DIRECT]["worker"], row
    parts = b.surplus_parts(stages, direct)
    assert set(parts) == set(b.GATED) and all(b.DIRECT_AROUND in p for p in parts.values())
    assert f"| {b.DIRECT_AROUND} |" in md
    for row, p in parts.items():
        assert p["surplus"] == pytest.approx(sum(p[k] for k in b.SURPLUS_PARTS), abs=1e-9), (row, p)
        assert p["adds"] == pytest.approx(stages[row]["client"] - stages[b.GATE_OFF]["client"])
        assert f"| {row} | {p['adds']:.2f} | {p['probe']:.2f} | {p['surplus']:.2f} |" in md
    # out of the box: the worker count TorchServe chose itself (one per GPU, else one per core), named
    assert report["ootb_workers"] >= 1
    assert f"TorchServe started {report['ootb_workers']} worker(s)" in (tmp_path / "serving-smoke.md").read_text()
    # ClassifyStream: one stream of 4 items (the smoke window) beside 4 one-call clients
    streamed = [r for r in report["results"] if r["name"] == b.STREAMED]
    assert [r["concurrency"] for r in streamed] == [4] and report["stream_window"] == 4
    assert report["ratios"]["throughput gateway gate-off, streamed / unary calls (c=4)"] > 0
    assert all(r["errors"] == 0 and r["calls"] > 0 for r in report["results"])
    for ratio in ("throughput gateway gate-off / TorchServe direct, best-tuned (batching 32, 2 ms) (c=4)",
                  "throughput coalescing / TorchServe batching alone, gate off (c=4)",
                  "p50 certify sequential / fixed (c=1)", "throughput TorchServe direct, batching / out of the box (c=4)",
                  "throughput on-device expansion / naive, both on the batching archive (c=4)"):
        assert report["ratios"][ratio] > 0, ratio
    assert any(k.startswith("added p50 ms, gateway, gate off vs") for k in report["ratios"])
    # the gateway's added latency, from a direct call measured in the same turns
    assert f"added p50 ms, {b.INTERLEAVED}{b.GATE_OFF} vs {b.INTERLEAVED}{b.DIRECT} (c=1)" in report["ratios"]
    # The gate's cost against its first probe run in process, as the handler runs it.
    limits = {r["name"]: r for r in report["results"] if r["name"].startswith(b.IN_PROCESS_VARIANTS)}
    assert len(limits) == 2 and all(r["p50_ms"] > 0 for r in limits.values())
    from service.gate.policy_io import load_policy

    cheap = load_policy(default_store / "fmnist-cnn" / "policy.json").cheap_plan(0).rows
    assert any(n.endswith(f"(cascade) ({cheap} rows)") for n in limits), limits
    # the bytes of one gated image each way, the on-device target's bound beside its speed
    wire = report["wire_bytes"]
    assert wire["rows"] == cheap and wire["format"] == "onnx" and wire["request_ratio"] > 1
    assert "Bytes to TorchServe and back" in md and "(the bytes ratio, requests)" in md
    # ... and in turns with the gateways, which the ratios read
    turns = {r["name"]: r for r in report["results"] if r["name"].startswith(b.INTERLEAVED)}
    assert {b.INTERLEAVED + n for n in (b.DIRECT, b.GATE_OFF, b.BARE_CALL, *b.GATED)} <= set(turns)
    assert report["ratios"][f"p50 ms, {b.INTERLEAVED}{b.BARE_CALL} (c=1)"] > 0  # the hop under the added latency
    assert sum(n.startswith(b.INTERLEAVED + b.IN_PROCESS_VARIANTS) for n in turns) == 2
    assert b.INTERLEAVED + b.image_alone_row("onnx") in turns  # what the variants' time is net of
    assert all(r["concurrency"] == 1 and r["calls"] > 0 for r in turns.values())
    for gated in b.GATED:
        assert f"{b.GATE_COST} {gated} (c=1)" in report["ratios"]
        assert f"{b.GATE_COST_IDLE} {gated} (c=1)" in report["ratios"]
    # ... each with how far resampling the turns moves it, and only those
    spread = report["ratio_intervals"]
    assert f"{b.GATE_COST} {b.CASCADE} (c=1)" in spread and all(lo <= hi for lo, hi in spread.values())
    assert all(k.startswith(("p50", "added p50 ms, " + b.INTERLEAVED)) for k in spread), spread
    cpu = report["cpu_ms_per_call"]  # per process, from /proc, for the top concurrency
    assert set(cpu) == {f"{b.GATE_OFF} (c=4)", f"{b.STREAMED} (c=4)", f"{b.DIRECT} (c=4)", f"{b.DIRECT_TS} (c=4)",
                        f"{b.DIRECT_BATCHING} (c=4)"}
    gw = cpu[f"{b.GATE_OFF} (c=4)"]
    assert set(gw) == {"client", "gateway", "TorchServe Java", "TorchServe workers"}
    assert gw["gateway"] > 0 and gw["TorchServe Java"] > 0 and gw["TorchServe workers"] > 0
    assert "gateway" not in cpu[f"{b.DIRECT} (c=4)"]
    md = (tmp_path / "serving-smoke.md").read_text()
    assert md.startswith("# Serving benchmark") and "Targets (issue 8)" in md
    assert (tmp_path / "serving-smoke.png").read_bytes()[:4] == b"\x89PNG"
    # where TorchServe's workers and the in-process limits ran, as they said
    assert report["format"] == "onnx" and set(report["served_on"]) == set(report["runs_on"]) == {"torchscript", "onnx"}
    assert report["served_on"]["onnx"].startswith("onnxruntime:") and "serve the onnx archive" in md
    if not torch.cuda.is_available():
        assert report["served_on"] == {"torchscript": "torchscript on cpu",
                                       "onnx": "onnxruntime:CPUExecutionProvider on cpu"}
        assert report["runs_on"] == {"torchscript": "CPU", "onnx": "CPU"} and not b.on_gpu(report)


def test_serving_benchmark_smoke_on_the_torchscript_archive(default_store: Path, tmp_path: Path) -> None:
    """``--format torchscript``: every TorchServe and gateway row on the TorchScript archive (the
    one a GPU runs without ONNX Runtime's CUDA provider), the limits in process likewise."""
    from benchmarks import serving as b

    report = _run("benchmarks.serving", tmp_path, 600, "--format", "torchscript", "--gateway-workers", "2",
                  "--connections", "2", stem="serving-torchscript")
    assert report["format"] == "torchscript" and "--format torchscript" in report["command"]
    # every gateway as two worker processes, every row's callers over two connections
    assert report["gateway_workers"] == 2 and report["connections"] == 2
    assert report["command"].endswith("--gateway-workers 2 --connections 2")
    assert "Every gateway ran 2 worker process(es)" in (tmp_path / "serving-torchscript-smoke.md").read_text()
    assert report["ratios"]["throughput gateway gate-off, its workers / one process (c=4)"] > 0
    turns = {r["name"].removeprefix(b.INTERLEAVED): r["calls"] for r in report["results"]
             if r["name"].startswith(b.INTERLEAVED)}
    for row, v in report["stages_ms_in_turns"].items():  # both workers' counts, summed by the supervisor
        assert v["requests"] == turns[row] and 0 < v["backend"] < v["pipeline"] < v["client"], (row, v)
        assert 0 < v["worker"] < v["backend"], (row, v)
    gw = report["cpu_ms_per_call"][f"{b.GATE_OFF} (c=4)"]["gateway"]
    assert gw > 0.05  # the workers' CPU (a call costs tenths of a ms), not the idle supervisor's alone
    assert set(report["served_on"]) == {"torchscript"}  # the ONNX archive is not loaded
    assert not (tmp_path / "serving-smoke.json").exists()  # the ONNX report keeps its name
    names = {r["name"] for r in report["results"]}
    assert {b.DIRECT, b.DIRECT_BATCHING, b.DIRECT_OOTB, b.GATE_OFF, b.CASCADE, b.EVERY_CHECK} <= names
    assert not {b.DIRECT_TS, b.GATE_OFF_TS} & names  # the main rows are TorchScript's already
    limits = [n for n in names if n.startswith(b.variants_row("torchscript"))]
    assert len(limits) == 2 and not any(n.startswith(b.IN_PROCESS_VARIANTS) for n in names)
    assert all(r["errors"] == 0 and r["calls"] > 0 for r in report["results"])
    ratios = report["ratios"]
    assert ratios["p50 gateway gate-off / in-process TorchScript (c=1)"] > 0
    assert all(f"{b.GATE_COST} {g} (c=1)" in ratios for g in b.GATED)
    assert ratios[f"{b.FULL_GATE} (c=1)"] > 1  # every check costs more than none
    # the GPU's target is checked where TorchServe's worker ran on one, and only there
    assert any(k.startswith(b.FULL_GATE) for k, *_ in b.targets(ratios, b.on_gpu(report))) == b.on_gpu(report)
    assert b.on_gpu(report) == report["served_on"]["torchscript"].endswith(("cuda:0", "cuda"))


def test_robustness_benchmark_smoke(default_store: Path, tmp_path: Path) -> None:
    report = _run("benchmarks.robustness", tmp_path)
    assert report["clean"]["n"] == 40 and 0 <= report["clean"]["flagged"] <= 1
    assert {row["set"] for row in report["sets"]} >= {"fgsm eps=0.03", "pgd eps=0.1", "fgsm eps=0.1, 8-bit",
                                                       "mnist digits (OOD)"}
    assert set(report["certified"]["accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    offline = report["certified_in_process"]
    assert offline["n"] == 2 and offline["samples"] == 200
    noise = json.loads((default_store / "fmnist-cnn" / "policy.json").read_text())["noise"]
    assert (offline["sigma"], offline["alpha"]) == (noise["sigma"], noise["alpha"])  # the gateway's own
    assert set(offline["accuracy"]) == set(report["certified"]["accuracy"])
    assert all(0 <= a <= 1 for a in offline["accuracy"].values())
    assert (tmp_path / "robustness-smoke-roc.png").read_bytes()[:4] == b"\x89PNG"
    # natural corruptions too, with the model's error on them and the gate's flags split by it
    rows = {row["set"]: row for row in report["sets"]}
    for name in ("shift 4 px", "gaussian blur 1 px", "JPEG quality 25 (sent as JPEG)", "rotate 40°"):
        row = rows[name]
        assert row["n"] == 20 and 0 <= row["model_wrong"] <= 1, row
        assert any(row[k] is not None for k in ("flagged_where_wrong", "flagged_where_right"))
    assert "model_wrong" not in rows["fgsm eps=0.03"]
    # each check's own flag rate, on clean images and per set; a set is flagged at least as
    # often as any one check flags it (the gate flags where any check does)
    assert set(report["clean"]["checks_flagged"]) >= {"squeeze", "viewpoint", "density"}
    for row in rows.values():
        if row["n"]:
            assert all(0 <= c["flagged"] <= row["flagged"] + 1e-9 for c in row["checks"].values()), row
    assert "| JPEG quality 25 (sent as JPEG) | 20 |" in (tmp_path / "robustness-smoke.md").read_text()


def test_certified_accuracy_counts_withheld_labels_as_wrong() -> None:
    from benchmarks.efficacy import certified_accuracy
    from robustgate.v1 import classifier_pb2 as pb

    ok = pb.ClassifyResponse(classes=[pb.ClassScore(index=3)], gate=pb.GateReport(certified=True, certified_radius=0.3))
    withheld = pb.ClassifyResponse(gate=pb.GateReport(certified=True, certified_radius=0.3))
    acc = certified_accuracy([ok, withheld], [3, 3], (0.0, 0.5))
    assert acc == {0.0: 0.5, 0.5: 0.0}
    # Below the policy's target radius the gateway says certified=false; the radius still
    # certifies at r = 0 (and an abstention, radius 0, does not).
    below = pb.ClassifyResponse(classes=[pb.ClassScore(index=3)], gate=pb.GateReport(certified=False, certified_radius=0.18))
    abstained = pb.ClassifyResponse(classes=[pb.ClassScore(index=3)], gate=pb.GateReport(certified=False))
    assert certified_accuracy([below, abstained], [3, 3], (0.0, 0.25)) == {0.0: 0.5, 0.25: 0.0}


def test_certified_accuracy_judges_a_rejected_images_certified_class() -> None:
    """An enforce-mode REJECT withholds the classes, not the certificate: the certified class
    (the base top-1) given beside the answers is judged; the answer's own class where it has one."""
    from benchmarks.efficacy import certified_accuracy
    from robustgate.v1 import classifier_pb2 as pb

    rejected = pb.ClassifyResponse(gate=pb.GateReport(decision=pb.DECISION_REJECT, certified_radius=0.3))
    answered = pb.ClassifyResponse(classes=[pb.ClassScore(index=3)], gate=pb.GateReport(certified_radius=0.3))
    assert certified_accuracy([rejected, answered], [3, 3], (0.0, 0.5), np.array([3, 7])) == {0.0: 1.0, 0.5: 0.0}
    assert certified_accuracy([rejected, answered], [3, 3], (0.0,), np.array([5, 3])) == {0.0: 0.5}
    assert certified_accuracy([rejected, answered], [3, 3], (0.0,)) == {0.0: 0.5}  # not given: a lower bound


def test_certify_in_process_matches_the_bound_of_a_constant_classifier() -> None:
    """A classifier that always answers 3: every copy agrees, so each image gets the largest
    radius n samples allow, sigma * PhiInverse(alpha ** (1 / n)); right only where the label is 3."""
    from scipy.stats import norm

    from benchmarks.efficacy import certify_in_process

    def three(x: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
        return np.tile(np.eye(10, dtype=np.float32)[3], (x.shape[0], 1))

    n, alpha, sigma = 500, 0.001, 0.25
    best = sigma * norm.ppf(alpha ** (1 / n))
    images = np.zeros((4, 28, 28), np.uint8)
    acc = certify_in_process(three, images, np.array([3, 3, 3, 1]), sigma,
                             (0.0, best - 1e-6, best + 1e-6), n0=10, n=n, alpha=alpha, batch=128)
    assert acc == {0.0: 0.75, best - 1e-6: 0.75, best + 1e-6: 0.0}


def test_certify_in_process_abstains_at_a_coin_flip_and_bounds_the_radius() -> None:
    """A classifier whose answer depends on the noise: class 3 when the noise at pixel 0 is
    above -z (probability Phi(z)), class 5 otherwise. At Phi(z) = 0.5 the bound cannot exceed
    1/2: abstain. At 0.9 the radius is sigma * PhiInverse(Clopper-Pearson bound), about
    sigma * PhiInverse(0.9 - margin): right for label 3, wrong for label 5."""
    from scipy.stats import norm

    from benchmarks.efficacy import certify_in_process

    sigma, n = 0.25, 4000

    def classifier(p3: float):
        def logits(x: np.ndarray) -> np.ndarray:
            three = x[:, 0, 0, 0] / sigma > -norm.ppf(p3)  # the image is 0 there: pure noise
            out = np.zeros((x.shape[0], 10), np.float32)
            out[np.arange(x.shape[0]), np.where(three, 3, 5)] = 1.0
            return out
        return logits

    images = np.zeros((2, 28, 28), np.uint8)
    radii = (0.0, 0.2, 0.25)
    half = certify_in_process(classifier(0.5), images, np.array([3, 5]), sigma, radii, n=n, seed=1)
    assert half == {0.0: 0.0, 0.2: 0.0, 0.25: 0.0}
    # p_lower for 0.9 with 4,000 samples is about 0.89: radius about 0.25 * 1.23 = 0.31
    ninety = certify_in_process(classifier(0.9), images, np.array([3, 5]), sigma, radii, n=n, seed=1)
    assert ninety == {0.0: 0.5, 0.2: 0.5, 0.25: 0.5}
    assert certify_in_process(classifier(0.9), images, np.array([3, 5]), sigma, (0.4,), n=n) == {0.4: 0.0}


def test_input_statistics_study_smoke(default_store: Path, tmp_path: Path) -> None:
    report = _run("benchmarks.input_statistics", tmp_path)
    rows = report["flagged"]
    logit, pixels = "squeeze detector (logits)", "input residual (pixels)"
    assert rows["clean test images (PNG)"][logit] <= 0.15  # thresholds at 5 % on held-out clean
    attacks = [v for k, v in rows.items() if k.startswith(("fgsm@", "pgd@"))]
    assert len(attacks) == 4
    assert min(v[pixels] for v in attacks) >= 0.9  # what the pixels would buy
    # The study's finding: pixel statistics flag slightly noisy clean images, the logits do not.
    noisy = rows["clean, Gaussian noise sigma 0.02"]
    shipped = "squeeze detector with context and jitter (logits, as shipped)"
    assert noisy[pixels] > max(noisy[logit], noisy[shipped]) + 0.2
    assert (tmp_path / "input_statistics-smoke.md").read_text().startswith("# Input statistics")


def test_input_statistics_report_says_when_and_where_it_ran(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import input_statistics as b

    result = {"model": "m", "clean": 150, "attack_images": 120, "flag_rate_target": 0.05, "bit_depths": [2],
              "calibration_attacks": {"fgsm@0.03": 9}, "flagged": {"clean": {"squeeze": 0.05}}, "seconds": 1.0}
    monkeypatch.setattr(b, "run", lambda *a: dict(result))
    monkeypatch.setattr(b.torch, "set_num_threads", lambda n: None)  # the study's setting, not this process's
    b.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "input_statistics-smoke.json").read_text())
    assert report["command"] == "python -m benchmarks.input_statistics --smoke" and report["date"] and report["machine"]
    md = (tmp_path / "input_statistics-smoke.md").read_text()
    assert md.startswith(f"# Input statistics against the squeeze detector ({report['date']}, {report['machine']})")


def test_input_statistics_finds_each_attacks_source_and_keeps_it_within_eps() -> None:
    import torch

    from benchmarks.input_statistics import attacks_8bit

    pool = np.random.default_rng(0).integers(20, 230, size=(3, 4, 4)).astype(np.uint8)
    labels = np.array([5, 6, 7])
    adv = (pool[[2, 1]].astype(np.float32) / 255 + np.float32(0.03))[:, None]  # 7.65 levels up

    def always_zero(x: torch.Tensor) -> torch.Tensor:  # every attack fools it
        return torch.eye(10)[torch.zeros(len(x), dtype=torch.long)]

    out = attacks_8bit({"fgsm@0.03": adv}, pool, labels, always_zero)["fgsm@0.03"]
    assert np.array_equal(out.astype(int), pool[[2, 1]].astype(int) + 7)
    with pytest.raises(RuntimeError, match="no source within eps"):
        attacks_8bit({"fgsm@0.03": adv + 0.05}, pool, labels, always_zero)


def test_robustness_report_renders_the_committed_figures_and_says_when_certification_did_not_run() -> None:
    from benchmarks.robustness import render

    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    r = json.loads((results / "robustness.json").read_text())
    assert render(r) == (results / "robustness.md").read_text()  # the Markdown is the JSON's
    r["certified"] = {"n": 0, "accuracy": dict.fromkeys(r["certified"]["accuracy"], float("nan")),
                      "mean_forward_passes": float("nan")}
    r["certified_in_process"]["n"] = 0
    out = render(r)
    assert "nan" not in out and out.count("| 0 | not run |") == 2


def test_corruptions_keep_shape_and_move_what_they_say() -> None:
    from benchmarks.efficacy import as_pixels, blur, jpeg, shift

    images = np.zeros((6, 28, 28), np.uint8)
    images[:, 10:18, 10:18] = 200
    moved = shift(images, 4)
    assert moved.shape == images.shape and moved.dtype == np.uint8
    for im in moved:  # the square moved 4 px along each axis, nothing else appeared
        rows, cols = np.nonzero(im)
        assert {rows.min(), cols.min()} <= {6, 14} and rows.max() - rows.min() == 7 and im.sum() == images[0].sum()
    blurred = blur(images, 1.0)
    assert blurred.shape == images.shape and blurred[0, 9, 14] > 0 and blurred[0, 10, 14] < 200  # the edge spreads
    files = jpeg(images, 25)
    assert len(files) == 6 and all(f[:2] == b"\xff\xd8" for f in files)  # JPEG's SOI marker
    px = as_pixels(files)
    assert px.shape == (6, 1, 28, 28) and px.dtype == np.float32
    assert 0 < np.abs(px[:, 0] - images / 255.0).max() < 0.5  # lossy, but the same picture
    assert np.array_equal(as_pixels(images), (images / np.float32(255))[:, None])


def test_outcome_counts_each_checks_own_verdict_over_all_images() -> None:
    from benchmarks.efficacy import Outcome
    from robustgate.v1 import classifier_pb2 as pb

    def resp(decision: int, *checks: tuple[str, bool, int]) -> pb.ClassifyResponse:
        return pb.ClassifyResponse(gate=pb.GateReport(policy_decision=decision, checks=[
            pb.CheckResult(name=n, ran=ran, score=1.0, verdict=v) for n, ran, v in checks]))

    out = Outcome.of([
        resp(pb.DECISION_REJECT, ("squeeze", True, pb.DECISION_REJECT), ("noise", False, pb.DECISION_PASS)),
        resp(pb.DECISION_FLAG, ("squeeze", True, pb.DECISION_PASS), ("noise", True, pb.DECISION_FLAG)),
        resp(pb.DECISION_PASS, ("squeeze", True, pb.DECISION_PASS), ("noise", False, pb.DECISION_PASS)),
        resp(pb.DECISION_PASS, ("squeeze", True, pb.DECISION_PASS), ("noise", False, pb.DECISION_PASS)),
    ])
    assert out.check_flagged == {"squeeze": 0.25, "noise": 0.25}  # over all 4 images, not the 1 noise ran on
    assert out.flagged == 0.5 and out.rejected == 0.25


def test_as_8bit_keeps_whole_grey_levels_within_eps_and_only_attacks_that_still_succeed() -> None:
    """Each pixel's move from the clean image rounded toward zero: FGSM's 7.65-level step at
    eps 0.03 becomes 7 levels, never 8 (which would be outside the eps-ball)."""
    import torch

    from benchmarks.efficacy import as_8bit

    class MeanNet(torch.nn.Module):  # class 0 when the mean pixel is above 1/2, else class 1
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1)
            return torch.stack([m, 1 - m], 1)

    clean = np.array([0, 255, 120, 250], dtype=np.uint8)[:, None, None] * np.ones((4, 4, 4), np.uint8)
    step = np.float32(0.03)
    adv = np.stack([np.full((1, 4, 4), v, dtype=np.float32) for v in
                    (0 + step, 1 - step, np.float32(127 / 255), np.float32(1.0))])
    kept = as_8bit(MeanNet(), adv, np.array([0, 1, 0, 0]), clean)
    # 0.03 from 0 is class 1 (its label 0 is wrong: kept); 1 - 0.03 from 255 is class 0 (kept);
    # 127/255 from 120 (an on-grid move of exactly 7 levels) is class 1 (kept); the last is class 0 = its label
    assert kept.dtype == np.uint8 and kept.shape == (3, 4, 4)
    assert [int(k.flat[0]) for k in kept] == [7, 248, 127]
    moved = np.abs(kept.astype(int) - clean[:3].astype(int)).max()
    assert moved <= 0.03 * 255  # within the attack's eps
    assert as_8bit(MeanNet(), adv[:0], np.array([], dtype=np.int64), clean[:0]).shape == (0, 4, 4)


def test_detector_study_smoke(default_store: Path, tmp_path: Path) -> None:
    from benchmarks.detector_study import VARIANTS

    report = _run("benchmarks.detector_study", tmp_path)
    assert [row["variant"] for row in report["rows"]] == [v.name for v in VARIANTS]
    sets = set(report["measured_sets"])
    assert {"clean test images", "fgsm@0.03", "pgd@0.1", "rotate 40°", "mnist digits (OOD)"} <= sets
    for row in report["rows"]:
        assert set(row["flagged"]) == sets and all(0 <= x <= 1 for x in row["flagged"].values())
        # each check's own clean rate stays within the one budget the union shares
        assert all(0 <= b <= report["flag_rate_calibrated"] + 1e-9 for b in row["budget"].values())
    shipped = [v for v in VARIANTS if v.name.endswith("(shipped)")]
    assert [v.fitter for v in shipped] == ["hidden"]  # calibration's own form, layer and all
    assert f"| {shipped[0].name} |" in (tmp_path / "detector_study-smoke.md").read_text()


def test_detector_study_jitter_sweep_smoke(default_store: Path, tmp_path: Path) -> None:
    """``--jitter``: the shipped form at each setting, on probes that carry that setting."""
    import argparse

    from benchmarks.detector_study import SWEEP_VARIANTS, Prober, jitter_setting
    from service.gate.plan import NoiseSpec

    report = _run("benchmarks.detector_study", tmp_path, 600, "--jitter", "2x0.03", "6x0.06",
                  stem="detector_study-jitter")
    assert [(row["jitter"]["count"], row["jitter"]["sigma"], row["variant"]) for row in report["rows"]] == [
        (count, sigma, v.name) for count, sigma in ((2, 0.03), (6, 0.06)) for v in SWEEP_VARIANTS]
    for row in report["rows"]:
        assert all(0 <= x <= 1 for x in row["flagged"].values())
        assert all(0 <= b <= report["flag_rate_calibrated"] + 1e-9 for b in row["budget"].values())
    md = (tmp_path / "detector_study-jitter-smoke.md").read_text()
    assert md.splitlines()[0].endswith(f"({report['date']}, {report['machine']})")  # when and where it ran
    assert "--smoke --jitter 2x0.03 6x0.06`" in md and f"| jitter 6 × σ 0.06, {SWEEP_VARIANTS[1].name} |" in md
    assert not (tmp_path / "detector_study-smoke.json").exists()  # the study's own report is left alone
    # the setting reaches each image's plan, so the handler draws those copies
    base = Prober(default_store, "fmnist-cnn")
    swept = Prober(default_store, "fmnist-cnn", NoiseSpec(sigma=0.06, count=6))
    image = np.zeros((28, 28), dtype=np.uint8)
    assert (swept.plan(image).jitter.count, swept.plan(image).jitter.sigma) == (6, pytest.approx(0.06))
    assert swept.spec.rows == base.spec.rows + 6 - base.spec.jitter.count
    assert jitter_setting("8x0.03") == NoiseSpec(sigma=0.03, count=8)
    for bad in ("4x0", "0x0.03", "4", "x0.03", "4x1.5", "fourx0.03"):
        with pytest.raises(argparse.ArgumentTypeError):
            jitter_setting(bad)


def test_the_in_process_limit_is_timed_after_a_warm_up() -> None:
    """The in-process rows (the limit every served row is held against) timed their first
    calls, where TorchScript specialises and ONNX Runtime allocates, while every served row
    had an unmeasured warm-up: slow first calls made a slower limit."""
    from benchmarks.serving import timed_loop

    calls = []

    def fn(i: int) -> None:
        calls.append(i)
        time.sleep(0.03 if len(calls) <= 2 else 0.001)  # two slow first calls, then fast ones

    r = timed_loop("limit", fn, 10, 0.2)
    assert len(calls) > r.calls + 1  # the warm-up's calls are not counted
    assert r.p99_ms < 10, r  # nor timed


def test_serving_targets_read_each_bound_the_right_way() -> None:
    from benchmarks import serving as b

    got = b.targets({"throughput gateway gate-off / TorchServe direct, best-tuned (batching 32, 2 ms) (c=64)": 0.95,
                     f"{b.GATE_COST} {b.CASCADE} (c=1)": 1.5, f"{b.GATE_COST} {b.EVERY_CHECK} (c=1)": 1.1,
                     "p50 certify sequential / fixed (c=1)": 9.0})
    assert [(op, bound, met) for _, op, bound, met in got] == [(">=", 0.9, True), ("<=", 1.2, False), ("<=", 1.2, True)]
    full = {f"{b.FULL_GATE} (c=1)": 1.6}
    assert b.targets(full) == []  # a GPU's target, not a CPU's
    assert b.targets(full, gpu=True) == [(f"{b.FULL_GATE} (c=1)", "<=", 1.5, False)]
    served = {"torchscript": "torchscript on cuda:0", "onnx": "onnxruntime:CPUExecutionProvider on cpu"}
    assert b.on_gpu({"format": "torchscript", "served_on": served})
    assert not b.on_gpu({"format": "onnx", "served_on": served})
    assert not b.on_gpu({"format": "onnx"})  # reports from before the workers were asked


def test_the_on_device_bound_is_the_bytes_each_path_sends_for_one_gated_image(default_store: Path) -> None:
    """The on-device expansion's target reads the bytes measured from the real messages (the
    gateway's call with the cascade's first plan against that many plain calls), which equal
    a hand count by protobuf's wire format; answers from the real handler carry every row."""
    from benchmarks import serving as b
    from benchmarks.wire_bytes import SEED_KEY, wire_bytes
    from model_store import data
    from service.backend import encode_tensor
    from service.gate.policy_io import load_policy
    from service.pipeline import request_seed, spec_to_proto

    image = data.load_test().images[0][None]
    w = wire_bytes(default_store, "fmnist-cnn", "onnx", image)
    policy = load_policy(default_store / "fmnist-cnn" / "policy.json")
    rows = policy.cheap_plan(0).rows
    assert w["rows"] == rows > 1

    def field(n: int) -> int:  # a length-delimited field numbered below 16: tag, length (a varint), bytes
        return 1 + (n.bit_length() + 6) // 7 + n

    tensor = len(encode_tensor(image))
    assert tensor == field(3) + field(len("uint8")) + field(28 * 28)  # shape [1, 28, 28], dtype, pixels
    plan = spec_to_proto(policy.cheap_plan(request_seed(SEED_KEY, image))).ByteSize()
    name = field(len("fmnist-cnn-onnx"))  # PredictionsRequest.model_name

    def entry(key: str, value: int) -> int:  # one entry of the map<string, bytes> input
        return field(field(len(key)) + field(value))

    naive_call, on_device = name + entry("tensor", tensor), name + entry("tensor", tensor) + entry("plan", plan)
    assert (w["naive_request"], w["on_device_request"]) == (rows * naive_call, on_device)
    assert w["request_ratio"] == round(rows * naive_call / on_device, 3)
    assert 5 < w["request_ratio"] < rows  # the plan costs a little, so under one image per row saved
    # the answers: every row's logits and the base's features in one, one row in each of the others
    card = json.loads((default_store / "fmnist-cnn" / "card.json").read_text())
    classes = len(card["labels"])
    payload = rows * classes * 4 + card["feature_dim"] * 4
    assert 0 < w["on_device_answer"] - payload < 100
    assert 0 < w["naive_answer"] - rows * classes * 4 < rows * 100
    assert w["total_ratio"] == round((w["naive_request"] + w["naive_answer"])
                                     / (w["on_device_request"] + w["on_device_answer"]), 3) < w["request_ratio"]
    assert w["naive_variants_request"] > w["naive_request"]  # the variants themselves: most need float32
    # the bound of the on-device target, in the rendered report; none in reports without the bytes
    speed = {"throughput on-device expansion / naive, both on the batching archive (c=64)": 6.0,
             "throughput on-device expansion, coalescing / naive (c=64)": 13.0}
    assert [(op, bound, met) for _, op, bound, met in b.targets(speed, wire=w)] == [
        (">=", w["request_ratio"], False), (">=", w["request_ratio"], True)]
    assert b.targets(speed) == []
    report = {"date": "d", "machine": "m", "seconds_per_measurement": 1, "results": [], "ratios": speed}
    assert "Bytes to TorchServe" not in b.render(report)
    md = b.render({**report, "wire_bytes": w})
    assert f"| naive, {rows} calls | {w['naive_request']:,} ({w['naive_variants_request']:,}) |" in md
    assert f"| >= {w['request_ratio']} (the bytes ratio, requests) | 6.0 | **missed** |" in md


def test_serving_refuses_rows_the_shipped_gateway_would_shed() -> None:
    from benchmarks import serving as b
    from service.settings import Settings

    shipped = Settings(max_inflight=256, max_inflight_per_connection=128)
    assert b.admission_overrun(128, 1, 1, shipped) == ""
    assert "--connections 2 or more" in b.admission_overrun(129, 1, 1, shipped)
    assert "--connections 3 or more" in b.admission_overrun(300, 2, 4, shipped)  # 150 on one
    assert b.admission_overrun(256, 2, 1, shipped) == ""
    assert "max_inflight (256)" in b.admission_overrun(257, 4, 1, shipped)
    assert b.admission_overrun(512, 4, 2, shipped) == ""  # several processes share it out
    assert b.admission_overrun(1000, 1, 1, Settings(max_inflight=1000, max_inflight_per_connection=0)) == ""
    with pytest.raises(SystemExit):  # refused before anything starts
        b.main(["--concurrency", "1,200"])


def test_the_surplus_over_the_gates_variants_leaves_out_the_image_alone() -> None:
    """The surplus table counts the variants as the gate-cost ratio does: the first probe in
    process less the image alone, whose row the plain call runs too."""
    from benchmarks import serving as b

    off = {"client": 4.0, "pipeline": 3.0, "backend": 2.8, "gate": 0.0, "worker": 1.0}
    cascade = {"client": 10.0, "pipeline": 8.5, "backend": 7.6, "gate": 0.5, "worker": 5.5,
               "probe_in_process": 4.3, "image_alone_in_process": 0.3}
    p = b.surplus_parts({b.GATE_OFF: off, b.CASCADE: cascade})[b.CASCADE]
    assert p["probe"] == pytest.approx(4.0) and p["surplus"] == pytest.approx(2.0)  # 6 added, 4 of it variants
    assert p["worker"] == pytest.approx(0.5)  # 4.5 more in the worker than gate off, 4 of it the variants
    assert p["surplus"] == pytest.approx(sum(p[k] for k in b.SURPLUS_PARTS))
    md = "\n".join(b.surplus_table({b.GATE_OFF: off, b.CASCADE: cascade}))
    assert "| its variants in process |" in md and f"| {b.CASCADE} | 6.00 | 4.00 | 2.00 | 0.50 |" in md
    # reports whose stages lack the image alone get no table, not one a row's forward off
    del cascade["image_alone_in_process"]
    assert b.surplus_parts({b.GATE_OFF: off, b.CASCADE: cascade}) == {}


def test_coalesce_wait_benchmark_smoke(default_store: Path, tmp_path: Path) -> None:
    report = _run("benchmarks.coalesce_wait", tmp_path)
    keys = {(r["policy"], r["wait_ms"], r["max_calls"], r["concurrency"]) for r in report["rows"]}
    assert keys == {(p, *v, c) for p in ("gate off", "cascade") for v in ((2.0, 3), (10.0, 0)) for c in (1, 4)}
    assert all(r["per_s"] > 0 and r["errors"] == 0 for r in report["rows"])
    md = (tmp_path / "coalesce_wait-smoke.md").read_text()
    assert md.startswith("# Coalescing wait") and "| cascade | 4 |" in md and "(1.00)" in md
    assert "2 ms, <= 3 calls: calls/s" in md and "10 ms, no call limit: p50" in md


def test_serving_targets_read_the_added_latency_from_the_rows_in_turns() -> None:
    from benchmarks import serving as b

    seq = f"added p50 ms, {b.GATE_OFF} vs {b.DIRECT} (c=1)"  # rows measured minutes apart
    turns = f"added p50 ms, {b.INTERLEAVED}{b.GATE_OFF} vs {b.INTERLEAVED}{b.DIRECT} (c=1)"
    assert b.targets({seq: 5.0, turns: 1.5}) == [(turns, "<=", 2.0, True)]
    assert b.targets({seq: 1.0, turns: 2.5}) == [(turns, "<=", 2.0, False)]


def test_ratios_in_turns_carry_how_far_resampling_the_turns_moves_them() -> None:
    from benchmarks import serving as b

    probe = f"{b.variants_row('onnx')} {b.CASCADE} (14 rows)"
    ms = {b.DIRECT: 2.0, b.GATE_OFF: 3.0, b.CASCADE: 6.0, probe: 3.0, b.image_alone_row("onnx"): 0.5}  # every turn alike
    steady_turns = {name: [[v / 1e3] * 5 for _ in range(8)] for name, v in ms.items()}
    cost = f"{b.GATE_COST} {b.CASCADE} (c=1)"
    added = f"added p50 ms, {b.INTERLEAVED}{b.GATE_OFF} vs {b.INTERLEAVED}{b.DIRECT} (c=1)"
    steady = b.turn_intervals(steady_turns, resamples=200)
    assert steady[cost] == (1.2, 1.2) and steady[added] == (1.0, 1.0)  # no noise: (6 - 3) / (3 - 0.5), 3 - 2
    # the gated row drifting from turn to turn: the interval widens around the pooled value
    drifting = {**steady_turns, b.CASCADE: [[v / 1e3] * 5 for v in (5.0, 5.5, 6.0, 6.5, 7.0, 5.2, 6.8, 6.1)]}
    pooled = b.ratios([b.Result.of(b.INTERLEAVED + name, 1, [x for t in turns for x in t], 1.0)
                       for name, turns in drifting.items()], [1])
    spread = b.turn_intervals(drifting, resamples=200)
    lo, hi = spread[cost]
    assert lo < pooled[cost] < hi and hi - lo > 0.2
    assert spread[added] == (1.0, 1.0)  # rows that held still keep theirs
    # rendered beside the value, and a verdict whose interval holds the bound says so
    report = {"date": "d", "machine": "m", "seconds_per_measurement": 1, "results": [],
              "ratios": {cost: pooled[cost], added: 1.0}, "ratio_intervals": {cost: [lo, hi], added: [1.0, 1.0]}}
    md = b.render(report)
    assert pooled[cost] > 1.2  # a miss, by less than the noise
    assert f"| {cost} | <= 1.2 | {pooled[cost]} ({lo}–{hi}) | **missed**, within this run's noise |" in md
    assert f"| {added} | <= 2.0 | 1.0 (1.0–1.0) | met |" in md


def test_rows_in_turns_rotate_their_order_and_skip_rows_that_never_answered() -> None:
    import asyncio

    from benchmarks import serving as b

    seen: list[str] = []

    def row(name: str):
        def call(i: int) -> None:
            if not seen or seen[-1] != name:
                seen.append(name)
            if name == "broken":
                raise RuntimeError("no answer")
        return call

    got = asyncio.run(b.interleaved({n: row(n) for n in ("a", "b", "broken")}, rounds=3, round_s=0.002))
    assert seen == ["a", "b", "broken", "b", "broken", "a", "broken", "a", "b"]
    rows = {r.name.removeprefix(b.INTERLEAVED): r for r in got}
    assert rows["a"].calls > 0 and rows["broken"].calls == 0 and rows["broken"].errors > 0
    # a row without an answered call yields no ratio, not a NaN one
    broken = b.Result.of(b.INTERLEAVED + b.GATE_OFF, 1, [], 1.0, errors=3)
    assert not any("added p50" in k for k in b.ratios([broken, b.Result.of(b.INTERLEAVED + b.DIRECT, 1, [0.001], 1.0)], [1]))
    # nor does a row whose answered calls are the survivors of many failed ones (an overload)
    direct = b.Result.of(b.DIRECT, 64, [0.01] * 200, 1.0)
    for errors, ratio in ((2, True), (29, False)):
        gate_off = b.Result.of(b.GATE_OFF, 64, [0.01] * 200, 1.0, errors=errors)
        got = b.ratios([gate_off, direct], [64])
        assert ("throughput gateway gate-off / TorchServe direct, same archive (c=64)" in got) is ratio, errors


def test_a_row_after_idle_sleeps_before_each_call_outside_its_time() -> None:
    import asyncio

    from benchmarks import serving as b

    def work(i: int) -> None:
        end = time.perf_counter() + 0.001
        while time.perf_counter() < end:
            pass

    got = asyncio.run(b.interleaved({"busy": work, "idle": b.AfterIdle(0.02, work)}, rounds=2, round_s=0.1))
    rows = {r.name.removeprefix(b.INTERLEAVED): r for r in got}
    assert rows["idle"].p50_ms < 10  # the sleep is not the call's time ...
    assert rows["idle"].calls <= 12 < rows["busy"].calls  # ... but it spaces the calls out
    assert rows["idle"].per_s > 0.5 * rows["busy"].per_s  # and its calls/s is the rate while it works
    # the ratio against the probe after idle, beside (not instead of) the target's
    probe, alone = f"{b.variants_row('onnx')} {b.CASCADE} (14 rows)", b.image_alone_row("onnx")
    rows_ms = {b.GATE_OFF: 3.0, b.CASCADE: 9.0, probe: 5.5, alone: 0.5, f"{b.AFTER_IDLE}{probe}": 7.0,
               f"{b.AFTER_IDLE}{alone}": 1.0}
    got = b.ratios([b.Result.of(b.INTERLEAVED + n, 1, [v / 1e3], 1.0) for n, v in rows_ms.items()], [1])
    # (9 - 3) / (5.5 - 0.5) and / (7 - 1): the variants' time, the image's own row (which the
    # plain call pays too) taken out; without the image-alone row no ratio is claimed
    assert got[f"{b.GATE_COST} {b.CASCADE} (c=1)"] == 1.2 and got[f"{b.GATE_COST_IDLE} {b.CASCADE} (c=1)"] == 1.0
    assert [t[0] for t in b.targets(got)] == [f"{b.GATE_COST} {b.CASCADE} (c=1)"]
    del rows_ms[alone]
    got = b.ratios([b.Result.of(b.INTERLEAVED + n, 1, [v / 1e3], 1.0) for n, v in rows_ms.items()], [1])
    assert f"{b.GATE_COST} {b.CASCADE} (c=1)" not in got


def test_cascade_benchmark_smoke(default_store: Path, tmp_path: Path) -> None:
    from benchmarks import cascade as b

    report = _run("benchmarks.cascade", tmp_path)
    rows = {(r["policy"], r["set"]): r for r in report["rows"]}
    noise = report["noise_policy"]
    assert noise["noise_enabled"] and noise["noise_budgets"] == [32]
    cascade, full = b.cascade_name(32), b.full_name(32)
    sets = ("clean", "fgsm eps=0.03", "fgsm eps=0.1", "pgd eps=0.03", "pgd eps=0.1", "rotate 40°")
    assert set(rows) == {(p, s) for p in (b.SHIPPED, cascade, full) for s in sets}
    clean = {p: rows[(p, "clean")] for p in (b.SHIPPED, cascade, full)}
    assert all(r["n"] == 24 for r in clean.values())
    from service.gate.policy_io import load_policy

    cheap = load_policy(default_store / "fmnist-cnn" / "policy.json").cheap_plan(0).rows
    assert cheap <= 15  # the budget for a clean image
    assert clean[b.SHIPPED]["mean_forward_passes"] == cheap  # no noise detection: never escalates
    # The full budget draws all 32 noise copies for every image the cheap checks do not reject.
    assert clean[full]["mean_forward_passes"] >= cheap + 32 * (1 - clean[full]["flagged"])
    assert clean[cascade]["mean_forward_passes"] < clean[full]["mean_forward_passes"]
    assert all(0 <= r["differ_from_full_budget"] <= 1 for (p, _), r in rows.items() if p == cascade)
    assert all(r["differ_from_full_budget"] is None for (p, _), r in rows.items() if p != cascade)
    assert f"| {cascade} | clean | 24 |" in (tmp_path / "cascade-smoke.md").read_text()


def test_the_full_budget_escalates_every_image_in_one_batch(default_store: Path) -> None:
    from benchmarks.cascade import full_budget
    from service.gate.cascade import GateRun
    from service.gate.checks import Check
    from service.gate.policy_io import policy_from_dict

    raw = json.loads((default_store / "fmnist-cnn" / "policy.json").read_text())
    raw["checks"]["noise"].update(enabled=True, flag=0.3, reject=0.6)
    full_budget(raw)
    policy = policy_from_dict(raw)
    assert policy.noise.first_batch == policy.noise.detect_samples  # the copies the check scores
    plan = policy.cheap_plan(0)
    # Logits that every cheap check finds unremarkable: all rows the same confident answer.
    logits = np.tile(np.eye(10, dtype=np.float32)[3] * 8, (plan.rows, 1))
    feats = policy.references.density.means[3].astype(np.float32)
    run = GateRun.start(policy, seed=1, certify=False).feed(logits, feats)
    nxt = run.next_plan()
    assert nxt is not None and nxt.noise.count == policy.noise.detect_samples
    # The calibration may leave a check without thresholds (its share of the flag budget 0:
    # viewpoint, in some builds of the model); such a check never decides an image.
    calibrated = [c for c in (Check.SQUEEZE, Check.VIEWPOINT, Check.DENSITY) if raw["checks"][c]["flag"] is not None]
    assert calibrated and all(policy.thresholds(c).escalate == 0.0 for c in calibrated)


def test_the_studies_probe_each_image_as_the_gateway_does(default_store: Path) -> None:
    """In process, the detector and input-statistics studies give every image the plan the
    gateway (and calibration) would send it: its own seed, so its own jitter copies."""
    from benchmarks.detector_study import Prober
    from service.pipeline import request_seed

    prober = Prober(default_store, "fmnist-cnn")
    images = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    for im in images:
        # the gateway decodes a PNG to uint8 [1, H, W]: the same bytes, so the same seed
        assert prober.plan(im).seed == request_seed(0, im[None]) == request_seed(0, im)
    assert prober.plan(images[0]).seed != prober.plan(images[1]).seed
    assert prober.plan(images[0]).jitter.count == prober.spec.jitter.count > 0


def test_expand_ab_smoke(default_store: Path, tmp_path: Path) -> None:
    """The expansion A/B against HEAD's handlers/probe.py (a shallow clone has that revision)."""
    report = _run("benchmarks.expand_ab", tmp_path, 300, "--against", "HEAD")
    head = _head()
    assert report["against"] == head and report["command"] == f"python -m benchmarks.expand_ab --against {head}"
    assert report["plain_forward_p50_ms"] > 0
    assert [(r["plan"].split(",")[0], r["forward"]) for r in report["rows"]] == [
        ("cascade", False), ("cascade", True), ("every check", False), ("every check", True)]
    assert all(r["old_p50_ms"] > 0 and r["new_p50_ms"] > 0 and r["calls"] >= 4 for r in report["rows"])
    rows = {r["plan"].split(",")[0]: int(r["plan"].split(", ")[1].split()[0]) for r in report["rows"]}
    assert rows["every check"] > rows["cascade"] >= 2  # occlusion and structure add rows
    for r in report["rows"]:  # each ratio with how far its 2 resampled turns move it (the pooled one inside:
        low, high = r["interval"]  # it is one of the draws; the bounds are rounded to 3 decimals, so it is too)
        assert 0 < low <= round(r["new_over_old"], 3) <= high, r
    md = (tmp_path / "expand_ab-smoke.md").read_text()
    assert "| first probe | with forward |" in md
    assert f"{report['rows'][0]['new_over_old']:.2f} ({report['rows'][0]['interval'][0]:.2f}–" in md


def test_gate_logic_smoke(default_store: Path, tmp_path: Path) -> None:
    """The gateway's own work for the gate, in process, back to back and after idle."""
    report = _run("benchmarks.gate_logic", tmp_path, 300)
    assert report["command"].startswith("python -m benchmarks.gate_logic --smoke --out ")  # what reproduces this run
    names = [r["row"] for r in report["rows"]]
    assert names == ["gate logic, cascade", "gate logic, every check", "answer, gated (cascade)", "answer, gate off"]
    passes = {r["row"]: r["passes"] for r in report["rows"]}
    assert passes["gate logic, every check"] > passes["gate logic, cascade"] >= 2  # occlusion and structure add rows
    assert report["idle_ms"] == [1, 2, 5, 8]  # the sweep
    for r in report["rows"]:
        assert r["p50_ms"] > 0 and r["calls"] >= 4 * 5, r
        assert [a["idle_ms"] for a in r["after_idle"]] == report["idle_ms"], r
        for a in r["after_idle"]:
            low, high = a["interval"]
            assert a["p50_ms"] > 0 and 0 < low <= round(a["over_back_to_back"], 3) <= high, r
    md = (tmp_path / "gate_logic-smoke.md").read_text()
    first = report["rows"][0]
    assert "| after 1 ms idle | after 2 ms idle | after 5 ms idle | after 8 ms idle |" in md
    cell = lambda a: f"{a['p50_ms']:.3f} ms, {a['over_back_to_back']:.2f}×"  # noqa: E731
    assert (f"| gate logic, cascade | {first['passes']:.1f} | {first['p50_ms']:.3f} | {cell(first['after_idle'][0])} ("
            in md)
    assert f"{report['gated_answer_over_off']:.2f}×" in md


def test_batch_parse_smoke(default_store: Path, tmp_path: Path) -> None:
    """The handler's ProbeBatch parse, walked item by item against whole, and a hostile batch."""
    report = _run("benchmarks.batch_parse", tmp_path, 300)
    assert [(r["batch"], r["items"]) for r in report["rows"]] == [
        ("1 item", 1), ("8 items", 8), ("32 items", 32), ("256 items", 256), ("0.25 MiB of empty items", 131072)]
    for r in report["rows"]:
        assert r["whole_p50_us"] > 0 and r["walked_p50_us"] > 0 and r["calls"] >= 2, r
        low, high = r["interval"]
        assert 0 <= low <= round(r["walked_over_whole"], 3) <= high, r
    assert report["rows"][1]["bytes"] > 8 * 784  # each item a whole 28x28 tensor and its plan
    # 131,072 empty items built by the whole parse; the walk stops at the 257th
    assert report["rows"][-1]["walked_over_whole"] < 0.5, report["rows"][-1]
    md = (tmp_path / "batch_parse-smoke.md").read_text()
    first = report["rows"][0]
    assert f"| 1 item | {first['bytes']:,} | {first['whole_p50_us']:.1f} | {first['walked_p50_us']:.1f} |" in md


def test_gateway_ab_smoke(default_store: Path, tmp_path: Path) -> None:
    """Two gateways, HEAD's tree and this checkout, in turns in front of one TorchServe."""
    report = _run("benchmarks.gateway_ab", tmp_path, 300, "--against", "HEAD")
    head = _head()
    assert report["against"] == head
    assert report["command"] == f"python -m benchmarks.gateway_ab --against {head} --smoke"
    assert [(r["mode"], r["concurrency"]) for r in report["rows"]] == [
        (m, c) for m in ("gate off", "calibrated gate (cascade)") for c in (1, 4)]
    for r in report["rows"]:
        assert r["errors"] == 0
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in r if k.startswith(("old_", "new_")) or "over" in k), r
    assert "| gate | clients | old calls/s |" in (tmp_path / "gateway_ab-smoke.md").read_text()


def test_gateway_ab_sends_the_same_images_as_tensors_or_png_files() -> None:
    """``--input png``: each request carries the image as a PNG file that decodes to the
    pixels the tensor request carries."""
    from benchmarks.gateway_ab import requests
    from service.decode import InputSpec, Limits, decode_image

    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    tensors, pngs = requests(images, "m"), requests(images, "m", "png")
    assert [r.WhichOneof("input") for r in tensors + pngs] == ["tensor"] * 3 + ["image"] * 3
    for t, p, im in zip(tensors, pngs, images):
        assert t.tensor.data == im.tobytes() and p.image.startswith(b"\x89PNG")
        assert np.array_equal(decode_image(p.image, InputSpec(), Limits())[0], im)


def test_gateway_ab_runs_the_old_revision_from_its_own_tree(tmp_path: Path) -> None:
    """The old gateway's code and protos are the revision's, not this checkout's installed ones."""
    from benchmarks.gateway_ab import tree_at
    from tests.test_gateway import source_env

    tree = tree_at("HEAD", tmp_path / "old")
    where = subprocess.run(
        [sys.executable, "-c", "import service.server, robustgate.v1.classifier_pb2 as m; "
                               "print(service.server.__file__); print(m.__file__)"],
        cwd=tree, env=source_env(tree), capture_output=True, text=True, check=True).stdout.split()
    assert [Path(w).resolve().is_relative_to(tree.resolve()) for w in where] == [True, True], where
    with pytest.raises(SystemExit, match="cannot read revision 'no-such-rev'"):
        tree_at("no-such-rev", tmp_path / "bad")


@pytest.mark.parametrize("module", ["gateway_ab", "expand_ab"])
def test_ab_benchmarks_resolve_the_revision_to_the_commit_they_read(module: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``--against HEAD`` (and the default) names the commit it was when the run read it, in
    the report and its reproduce command alike (both read the parsed revision)."""
    import importlib

    from benchmarks import report

    mod = importlib.import_module(f"benchmarks.{module}")

    class Parsed(Exception):
        pass

    def parser(*a):  # the benchmark's own parser, stopping the run once it has parsed
        p = report.parser(*a)
        parse = p.parse_args

        def parsed(argv=None):
            raise Parsed(parse(argv))
        p.parse_args = parsed
        return p
    monkeypatch.setattr(mod, "parser", parser)
    head = _head()
    for argv in (["--against", "HEAD"], [], ["--against", head]):
        with pytest.raises(Parsed) as got:
            mod.main(argv)
        assert got.value.args[0].against == head, argv
    with pytest.raises(SystemExit) as bad:  # argparse's error, before anything runs
        mod.main(["--against", "no-such-rev"])
    assert bad.value.code == 2


def test_decode_png_smoke(tmp_path: Path) -> None:
    """The PNG decode A/B: every kind measured on both paths, a ratio with its interval, and a
    control kind over the plain limit, whose two rows take the same path."""
    report = _run("benchmarks.decode_png", tmp_path, 300)
    kinds = [r["image"] for r in report["rows"]]
    assert kinds[0].startswith("28x28 grey") and kinds[-1].startswith("over the plain limit")
    for r in report["rows"]:
        assert r["libspng_p50_us"] > 0 and r["pillow_p50_us"] > 0 and r["calls"] >= 2
        low, high = r["interval"]
        assert 0 < low <= round(r["pillow_over_libspng"], 3) <= high, r
    md = (tmp_path / "decode_png-smoke.md").read_text()
    first = report["rows"][0]
    assert f"| {first['image']} | {first['bytes_mean']} | {first['libspng_p50_us']:.1f} |" in md


def test_versus_direct_smoke(default_store: Path, tmp_path: Path) -> None:
    """The gate-off gateway and TorchServe called directly (the same archive, and its best
    setting on a second TorchServe), all up at once, in turns: every row at every level, and
    each pair at its level with the range of its turns."""
    from benchmarks import versus_direct as v

    report = _run("benchmarks.versus_direct", tmp_path, 300)
    assert [(r["row"], r["concurrency"]) for r in report["rows"]] == [
        (row, c) for c in (1, 4) for row in (v.GATEWAY, v.SHIPPED, v.BEST)]
    for r in report["rows"]:
        assert r["errors"] == 0 and r["calls_per_s"] > 0 and r["p50_ms"] > 0 and r["cpu_ms_per_call"] > 0, r
    assert [(p["pair"], p["concurrency"]) for p in report["pairs"]] == [
        (v.PAIRS[2][0], 1), (v.PAIRS[0][0], 4), (v.PAIRS[1][0], 4)]
    for p in report["pairs"]:
        assert p["low"] <= p["value"] <= p["high"], p
    md = (tmp_path / "versus_direct-smoke.md").read_text()
    assert f"| {v.GATEWAY} | 4 | {report['rows'][3]['calls_per_s']:.0f} |" in md


def test_versus_direct_pairs_read_each_turn_against_its_own_and_each_bound_the_right_way() -> None:
    from benchmarks import versus_direct as v
    from benchmarks.serving import Turn

    def turns(per_s: list[float], p50: list[float]) -> list[Turn]:
        return [Turn(a, b, float("nan"), 0) for a, b in zip(per_s, p50)]

    # turn by turn the gateway reads 0.9, 1.0 and 0.5 of the best: median 0.9, met; over a
    # pooled mean (240 / 300) it would read 0.8
    seen = {v.GATEWAY: turns([90, 150, 50], [5.0, 3.0, 9.0]), v.BEST: turns([100, 150, 100], [1.0, 1.0, 1.0]),
            v.SHIPPED: turns([100, 100, 100], [2.5, 1.0, 6.0])}
    top = {p["pair"]: p for p in v.pair_rows(seen, 64, [1, 64])}
    assert set(top) == {v.PAIRS[0][0], v.PAIRS[1][0]}
    best = top[v.PAIRS[0][0]]
    assert (best["value"], best["low"], best["high"], best["met"]) == (0.9, 0.5, 1.0, True)
    assert top[v.PAIRS[1][0]]["met"] is None  # no target
    (added,) = v.pair_rows(seen, 1, [1, 64])
    assert (added["pair"], added["value"], added["low"], added["high"], added["met"]) == (
        v.PAIRS[2][0], 2.5, 2.0, 3.0, False)  # p50 differences 2.5, 2.0, 3.0 ms: over 2 ms
    assert v.pair_rows(seen, 16, [1, 16, 64]) == []


def test_closed_loops_in_turns_rotate_their_order_and_read_cpu_per_call() -> None:
    import asyncio

    from benchmarks import serving as b

    order: list[str] = []
    used = [0.0]

    def row(name: str):
        async def call(i: int) -> None:
            if not order or order[-1] != name:
                order.append(name)
            used[0] += 0.001  # 1 ms of CPU a call, by this row's clock
        return call

    seen = asyncio.run(b.closed_loops_in_turns({n: row(n) for n in "abc"}, 1, 3, 0.002, {"a": lambda: used[0]}))
    assert order == list("abcbcacab")
    assert [len(seen[n]) for n in "abc"] == [3, 3, 3]
    assert all(abs(t.cpu_ms_per_call - 1.0) < 1e-6 and t.per_s > 0 and t.errors == 0 for t in seen["a"])
    assert all(np.isnan(t.cpu_ms_per_call) for t in seen["b"])
