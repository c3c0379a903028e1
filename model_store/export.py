"""Export to TorchScript and ONNX (one file each, dynamic batch), and the parity check.

Both exports keep the eager model's interface:
``images float32 [N, 1, 28, 28] in [0, 1] -> (logits [N, C], features [N, D])``.
ONNX names them ``images`` -> ``logits``, ``features``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

ONNX_INPUT = "images"
ONNX_OUTPUTS = ("logits", "features")
ONNX_OPSET = 18


class ParityError(RuntimeError):
    """An export disagrees with the eager model beyond the tolerance."""


def export_torchscript(model: nn.Module, path: Path) -> None:
    model.eval()
    example = torch.rand(2, 1, 28, 28)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    traced = torch.jit.freeze(traced)
    traced.save(str(path))


def export_onnx(model: nn.Module, path: Path) -> None:
    """Write one self-contained ONNX file (weights inline, no external-data side file)."""
    import onnx

    model.eval()
    example = (torch.rand(2, 1, 28, 28),)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            example,
            input_names=[ONNX_INPUT],
            output_names=list(ONNX_OUTPUTS),
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.optimize()
    buf = io.BytesIO()
    onnx.save_model(program.model_proto, buf)
    proto = onnx.load_model_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(buf.getvalue())


@dataclass(frozen=True)
class ParityReport:
    images: int
    max_logit_diff: float
    max_feature_diff: float
    top1_agreement: float
    tolerance: float
    min_agreement: float

    @property
    def ok(self) -> bool:
        return (
            self.max_logit_diff <= self.tolerance
            and self.max_feature_diff <= self.tolerance
            and self.top1_agreement >= self.min_agreement
        )

    def as_dict(self) -> dict[str, float | int | bool]:
        return {**asdict(self), "ok": self.ok}


def _compare(
    ref: tuple[np.ndarray, np.ndarray],
    got: tuple[np.ndarray, np.ndarray],
    tolerance: float,
    min_agreement: float,
) -> ParityReport:
    return ParityReport(
        images=int(ref[0].shape[0]),
        max_logit_diff=float(np.abs(ref[0] - got[0]).max()),
        max_feature_diff=float(np.abs(ref[1] - got[1]).max()),
        top1_agreement=float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
        tolerance=tolerance,
        min_agreement=min_agreement,
    )


def _run_batches(fn, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    logits, feats = [], []
    for i in range(0, x.shape[0], batch_size):
        lo, fe = fn(x[i : i + batch_size])
        logits.append(np.asarray(lo))
        feats.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(feats)


def parity(
    model: nn.Module,
    torchscript_path: Path,
    onnx_path: Path,
    images: torch.Tensor,
    tolerance: float = 1e-3,
    min_agreement: float = 0.999,
    batch_size: int = 500,
) -> dict[str, ParityReport]:
    """Compare both exports with the eager model on ``images`` (float32 [N, 1, 28, 28])."""
    import onnxruntime as ort

    model.eval()
    with torch.inference_mode():
        ref = _run_batches(lambda b: [t.numpy() for t in model(b)], images, batch_size)
        ts = torch.jit.load(str(torchscript_path), map_location="cpu")
        got_ts = _run_batches(lambda b: [t.numpy() for t in ts(b)], images, batch_size)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got_onnx = _run_batches(
        lambda b: sess.run(list(ONNX_OUTPUTS), {ONNX_INPUT: b.numpy()}), images, batch_size
    )
    return {
        "torchscript": _compare(ref, got_ts, tolerance, min_agreement),
        "onnx": _compare(ref, got_onnx, tolerance, min_agreement),
    }
