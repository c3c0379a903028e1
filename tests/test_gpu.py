"""The handlers on a GPU, where torch sees one: the machines the `device` tool lends
(scripts/gpu_bench.sh runs this file there). CI has no GPU, and there these tests are
skipped: the CPU paths they compare against are covered by test_handler_batch.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import json_format

from handlers import probe
from model_store import data
from robustgate.v1 import probe_pb2
from tests.test_handler_batch import handle, load_handler, logits, png

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

EXAMPLES = Path(__file__).resolve().parent.parent / "proto" / "examples"


def example(name: str) -> probe_pb2.ProbePlan:
    return json_format.Parse((EXAMPLES / name).read_text(), probe_pb2.ProbePlan())


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return data.load_test().images[:8]


def gpu_device(fmt: str) -> str:
    """Where the handler of ``fmt`` should run when TorchServe gives its worker GPU 0: an
    ONNX Runtime built without the CUDA provider serves on the CPU (the handler says so in
    a warning), and then this test checks that fallback."""
    if fmt == "torchscript":
        return "cuda"
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_handler_on_the_gpu_answers_as_on_the_cpu(tmp_path: Path, default_store: Path, images: np.ndarray,
                                                  fmt: str) -> None:
    gpu, gpu_ctx = load_handler(tmp_path / "gpu", default_store, fmt, gpu_id=0)
    cpu, cpu_ctx = load_handler(tmp_path / "cpu", default_store, fmt)
    assert gpu.device.type == gpu_device(fmt) and cpu.device.type == "cpu"
    assert gpu.runtime.endswith("CPUExecutionProvider") == (gpu.device.type == "cpu" and fmt == "onnx")
    # squeezes and views are deterministic: the same rows, the same logits up to rounding. The
    # traced model's convolutions allow TF32 on the GPU (10-bit mantissas: logits move by up to
    # about 3e-3 on this model), so the bound is TF32's, not float32's.
    plan = example("squeeze_view.json")
    requests = [{"data": png(a), "plan": plan.SerializeToString()} for a in images]
    for on_gpu, on_cpu in zip(handle(gpu, gpu_ctx, requests), handle(cpu, cpu_ctx, requests)):
        assert on_gpu.rows == on_cpu.rows == probe.count_rows(plan)
        assert on_gpu.device == str(gpu.device) and on_cpu.device == "cpu"
        np.testing.assert_allclose(logits(on_gpu), logits(on_cpu), rtol=0, atol=2e-2)
    # every section, noise and shuffles drawn on the GPU's generator: every row answered
    full = example("full.json")
    for res in handle(gpu, gpu_ctx, [{"data": png(a), "plan": full.SerializeToString()} for a in images]):
        assert res.rows == probe.count_rows(full) and np.isfinite(logits(res)).all()
        assert len(res.features) > 0


def test_handler_on_the_gpu_answers_a_plain_batch(tmp_path: Path, default_store: Path, images: np.ndarray) -> None:
    gpu, ctx = load_handler(tmp_path, default_store, "torchscript", gpu_id=0)
    got = handle(gpu, ctx, [{"data": png(a)} for a in images])
    top1 = [int(logits(r)[0].argmax()) for r in got]
    ref = torch.jit.load(str(default_store / "fmnist-cnn" / "model.pt")).eval()
    with torch.inference_mode():
        want = ref(data.to_tensor(images))[0].argmax(1).tolist()
    assert top1 == want


def test_expansion_on_the_gpu_matches_the_cpu_but_for_the_noise(images: np.ndarray) -> None:
    """Every deterministic section (squeezes, views, occlusions, and the shuffles, whose
    permutations are drawn on the CPU) gives on the GPU the rows it gives on the CPU; the
    noise and jitter sections draw on the device's own generator."""
    plan = example("full.json")
    noise, jitter = plan.noise.count, plan.jitter.count
    for a in images:
        base = data.to_tensor(a[None])[0]
        with torch.inference_mode():
            cpu = probe.expand(base, plan)
            gpu = probe.expand(base.cuda(), plan).cpu()
        assert gpu.shape == cpu.shape
        keep = [0, *range(1 + noise, cpu.shape[0] - jitter)]
        # grid_sample may round differently on the GPU; the other sections are exact
        np.testing.assert_allclose(gpu[keep].numpy(), cpu[keep].numpy(), rtol=0, atol=1e-5)
        shuffled = slice(cpu.shape[0] - jitter - plan.shuffle.count, cpu.shape[0] - jitter)
        assert torch.equal(gpu[shuffled], cpu[shuffled])


def test_the_noise_stream_on_the_gpu_is_one_stream_whatever_the_pieces(images: np.ndarray) -> None:
    """Plan version 3 on the device's generator: copies 12..35 asked for alone are rows
    12..35 of one plan for 0..35, as the gateway's sequential batches need."""
    base = data.to_tensor(images[:1])[0].cuda()
    whole = probe_pb2.ProbePlan(version=3, seed=5, noise=probe_pb2.NoiseProbe(sigma=0.25, count=36))
    piece = probe_pb2.ProbePlan(version=3, seed=5, noise=probe_pb2.NoiseProbe(sigma=0.25, count=24, offset=12))
    with torch.inference_mode():
        a, b = probe.expand(base, whole), probe.expand(base, piece)
    assert b.device.type == "cuda" and torch.equal(a[13:], b[1:])
