"""Accuracy of a model on clean and perturbed images: the figures of the model card."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from model_store.augment import affine
from model_store.data import Split, to_tensor

Forward = Callable[[torch.Tensor], torch.Tensor]  # float32 [N,1,28,28] -> logits [N,C]


def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Logits of ``x`` (float32 [N, 1, 28, 28] in [0, 1]) in eval mode, without gradients."""
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            out.append(model(x[i : i + batch_size])[0])
    return torch.cat(out)


def accuracy(
    model: torch.nn.Module,
    split: Split,
    perturb: Callable[[torch.Tensor], torch.Tensor] | None = None,
    limit: int | None = None,
) -> float:
    x = to_tensor(split.images[:limit])
    y = torch.from_numpy(np.asarray(split.labels[:limit]))
    if perturb is not None:
        x = perturb(x)
    # a count over the images: a float32 mean made 9,000 of 10,000 0.89999998, below a 0.90 floor
    return int((predict(model, x).argmax(1) == y).sum()) / len(y)


def noise_sweep(
    model: torch.nn.Module, split: Split, sigmas: Sequence[float], seed: int = 0, limit: int | None = None
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(seed)
    return {
        f"{s:g}": accuracy(model, split, lambda x: x + s * torch.randn(x.shape, generator=gen), limit)
        for s in sigmas
    }


def rotation_sweep(
    model: torch.nn.Module, split: Split, angles: Sequence[float], limit: int | None = None
) -> dict[str, float]:
    return {f"{a:g}": accuracy(model, split, lambda x: affine(x, rotate_deg=a), limit) for a in angles}


def shift_sweep(
    model: torch.nn.Module, split: Split, shifts: Sequence[float], limit: int | None = None
) -> dict[str, float]:
    # Diagonal shift by s pixels in x and y.
    return {f"{s:g}": accuracy(model, split, lambda x: affine(x, shift_px=(s, s)), limit) for s in shifts}


CANDIDATE_TRANSFORMS: dict[str, dict[str, float | bool]] = {
    "rotate+10": {"rotate_deg": 10.0},
    "rotate-10": {"rotate_deg": -10.0},
    "shift+2x": {"shift_x": 2.0},
    "shift-2x": {"shift_x": -2.0},
    "shift+2y": {"shift_y": 2.0},
    "shift-2y": {"shift_y": -2.0},
    "scale0.9": {"scale": 0.9},
    "scale1.1": {"scale": 1.1},
    "hflip": {"hflip": True},
    "vflip": {"vflip": True},
}


def apply_view(x: torch.Tensor, t: dict[str, float | bool]) -> torch.Tensor:
    if t.get("hflip"):
        x = torch.flip(x, dims=[3])
    if t.get("vflip"):
        x = torch.flip(x, dims=[2])
    return affine(
        x,
        rotate_deg=float(t.get("rotate_deg", 0.0)),
        shift_px=(float(t.get("shift_x", 0.0)), float(t.get("shift_y", 0.0))),
        scale=float(t.get("scale", 1.0)) or 1.0,
    )


def label_preserving(
    model: torch.nn.Module, split: Split, max_drop: float = 0.03, limit: int | None = None
) -> dict[str, dict[str, object]]:
    """Each candidate transform with its accuracy and whether it preserves labels, which
    this build defines as costing at most ``max_drop`` of the clean accuracy on the same
    images (the first ``limit``: a whole split's accuracy beside a subset's would add the
    two samples' difference to every drop)."""
    clean = accuracy(model, split, limit=limit)
    out: dict[str, dict[str, object]] = {}
    for name, t in CANDIDATE_TRANSFORMS.items():
        acc = accuracy(model, split, lambda x, t=t: apply_view(x, t), limit)
        out[name] = {"transform": t, "accuracy": acc, "clean_accuracy": clean, "preserves_label": clean - acc <= max_drop}
    return out
