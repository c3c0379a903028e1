"""TorchServe entry point for the TorchScript export (``model.pt``)."""

from __future__ import annotations

import logging

import torch

from handlers.base import ProbeHandler
from handlers.probe import Shape

logger = logging.getLogger(__name__)


def load(path: str, device: torch.device, shape: Shape) -> torch.jit.ScriptModule:
    """The TorchScript module at ``path`` on ``device``, in eval mode, as a worker serves it.

    On the CPU it goes through ``torch.jit.optimize_for_inference``: oneDNN convolutions with
    prepacked weights and no layout conversion around each one (fmnist-cnn, 34 rows at one
    thread: 5.8 ms against 14.2, about ONNX Runtime's 5.5). That module runs on the CPU only,
    so the archive keeps the export and each CPU worker optimizes it at load. It is kept only
    where it answers as the export does on a random batch of images of the card's ``shape``;
    otherwise the export is served as it is, with a warning that says why."""
    model = torch.jit.load(path, map_location=device).eval()
    if device.type != "cpu":
        return model
    x = torch.rand(4, shape.c, shape.h, shape.w)
    try:
        with torch.inference_mode():
            want = [t.clone() for t in model(x)]
        fast = torch.jit.optimize_for_inference(model)  # may change ``model`` in place
        with torch.inference_mode():
            got = fast(x)
        diff = max(float((a - b).abs().max()) for a, b in zip(want, got))
        scale = max(1.0, max(float(a.abs().max()) for a in want))
        if not diff <= 1e-4 * scale:  # NaN fails too
            raise ValueError(f"its outputs differ from the export's by {diff:.2e}")
        return fast
    except Exception as e:  # an optional speed-up failed: serve the export as it is
        logger.warning("TorchScript not optimized for the CPU (%s): serving the module as exported", e)
        return torch.jit.load(path, map_location=device).eval()


class TorchScriptHandler(ProbeHandler):
    """Serves a frozen TorchScript module: ``x [N, C, H, W] -> (logits, features)``."""

    runtime = "torchscript"

    def load(self, path: str) -> torch.jit.ScriptModule:
        return load(path, self.device, self.card.shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.model(x)
        return logits, features
