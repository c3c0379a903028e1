"""TorchServe entry point for the ONNX export (``model.onnx``), run by ONNX Runtime.

Variants are built with torch on the model's device, then fed to ONNX Runtime: on CPU as
zero-copy NumPy views, on CUDA through IO binding (no host round trip). Given a GPU whose
CUDA provider does not load (a cuDNN or CUDA library mismatch), it serves on the CPU with a
warning, unless ``TORCHSERVE_REQUIRE_GPU=true`` (the GPU overlay; TorchServe's workers inherit
its environment): then the model does not load, rather than holding the GPU idle.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import onnxruntime as ort
import torch

from handlers.base import ProbeHandler

logger = logging.getLogger(__name__)

REQUIRE_GPU_ENV = "TORCHSERVE_REQUIRE_GPU"  # as deploy/docker-entrypoint.sh reads it
INPUT = "images"
OUTPUTS = ("logits", "features")


class OnnxHandler(ProbeHandler):
    """Serves an ONNX model with input ``images`` and outputs ``logits``, ``features``."""

    runtime = "onnxruntime"

    def load(self, path: str) -> ort.InferenceSession:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.settings.intra_op_threads > 0:
            opts.intra_op_num_threads = self.settings.intra_op_threads
            opts.inter_op_num_threads = 1
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
        session = ort.InferenceSession(path, sess_options=opts, providers=providers)
        got = session.get_providers()
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in got:
            if os.environ.get(REQUIRE_GPU_ENV, "false") == "true":
                raise RuntimeError(f"ONNX Runtime's CUDAExecutionProvider does not load (got {got}) and "
                                   f"{REQUIRE_GPU_ENV}=true: not serving on the CPU")
            logger.warning("CUDAExecutionProvider unavailable (got %s); serving on CPU", got)
            self.device = torch.device("cpu")
        self.provider = got[0]
        self.runtime = f"onnxruntime:{self.provider}"
        return session

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.contiguous()
        if self.device.type == "cuda":
            return self._forward_cuda(x)
        logits, features = self.model.run(list(OUTPUTS), {INPUT: x.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(features)

    def _forward_cuda(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, dev = x.shape[0], self.device.index or 0
        logits = torch.empty((n, self.card.classes), dtype=torch.float32, device=self.device)
        features = torch.empty((n, self.card.feature_dim), dtype=torch.float32, device=self.device)
        binding = self.model.io_binding()
        binding.bind_input(INPUT, "cuda", dev, np.float32, tuple(x.shape), x.data_ptr())
        for name, t in zip(OUTPUTS, (logits, features)):
            binding.bind_output(name, "cuda", dev, np.float32, tuple(t.shape), t.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # variants are built on torch's stream
        self.model.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return logits, features
