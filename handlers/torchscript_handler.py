"""TorchServe entry point for the TorchScript export (``model.pt``)."""

from __future__ import annotations

import torch

from handlers.base import ProbeHandler


class TorchScriptHandler(ProbeHandler):
    """Serves a frozen TorchScript module: ``x [N, C, H, W] -> (logits, features)``."""

    runtime = "torchscript"

    def load(self, path: str) -> torch.jit.ScriptModule:
        model = torch.jit.load(path, map_location=self.device)
        model.eval()
        return model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = self.model(x)
        return logits, features
