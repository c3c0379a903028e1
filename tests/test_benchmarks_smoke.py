"""Smoke runs of the benchmark commands (tiny budgets), so they never rot."""

import json
import subprocess
import sys
from pathlib import Path


def _run(module: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", module, "--smoke", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stem = module.split(".")[-1]
    return json.loads((out / f"{stem}-smoke.json").read_text())


def test_serving_benchmark_smoke(default_store: Path, tmp_path: Path) -> None:
    report = _run("benchmarks.serving", tmp_path)
    names = {r["name"] for r in report["results"]}
    assert {"in-process TorchScript", "in-process ONNX Runtime", "TorchServe direct (plain)", "gateway, gate off",
            "gateway, gate off, coalescing", "gateway, calibrated gate (cascade)",
            "gateway, calibrated gate (cascade), coalescing", "gateway, every check on",
            "gateway, certify every request, sequential sampling", "gateway, certify every request, fixed budget",
            "TorchServe direct (plain), out-of-the-box settings", "TorchServe direct (plain), TorchScript archive",
            "gateway, gate off, TorchScript backend"} <= names
    assert all(r["errors"] == 0 and r["calls"] > 0 for r in report["results"])
    for ratio in ("throughput gateway gate-off / TorchServe direct (c=4)",
                  "throughput coalescing / TorchServe batching alone, gate off (c=4)",
                  "p50 certify sequential / fixed (c=1)", "throughput TorchServe project settings / out of the box (c=4)", "throughput on-device expansion / naive (c=4)"):
        assert report["ratios"][ratio] > 0, ratio
    assert (tmp_path / "serving-smoke.md").read_text().startswith("# Serving benchmark")
    assert (tmp_path / "serving-smoke.png").read_bytes()[:4] == b"\x89PNG"


def test_robustness_benchmark_smoke(default_store: Path, tmp_path: Path) -> None:
    report = _run("benchmarks.robustness", tmp_path)
    assert report["clean"]["n"] == 40 and 0 <= report["clean"]["flagged"] <= 1
    assert {row["set"] for row in report["sets"]} >= {"fgsm eps=0.03", "pgd eps=0.1", "mnist digits (OOD)"}
    assert set(report["certified"]["accuracy"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}
    assert (tmp_path / "robustness-smoke-roc.png").read_bytes()[:4] == b"\x89PNG"


def test_certified_accuracy_counts_withheld_labels_as_wrong() -> None:
    from benchmarks.efficacy import certified_accuracy
    from robustgate.v1 import classifier_pb2 as pb

    ok = pb.ClassifyResponse(classes=[pb.ClassScore(index=3)], gate=pb.GateReport(certified=True, certified_radius=0.3))
    withheld = pb.ClassifyResponse(gate=pb.GateReport(certified=True, certified_radius=0.3))
    acc = certified_accuracy([ok, withheld], [3, 3], (0.0, 0.5))
    assert acc == {0.0: 0.5, 0.5: 0.0}
