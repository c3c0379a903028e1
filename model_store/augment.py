"""Batched image transforms on tensors, used by training and by the model card's sweeps.

All work on ``float32 [N, C, H, W]`` in [0, 1], on whatever device the batch is on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine(
    x: torch.Tensor,
    rotate_deg: torch.Tensor | float = 0.0,
    shift_px: tuple[torch.Tensor | float, torch.Tensor | float] = (0.0, 0.0),
    scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Rotate (degrees, counter-clockwise), scale and shift (pixels, +x right, +y down)
    each image about its centre; bilinear, zero fill. Scalars or per-image [N] tensors."""
    n, _, h, w = x.shape
    dev = x.device

    def col(v: torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(v, dtype=torch.float32, device=dev).expand(n).reshape(n)

    theta_r = col(rotate_deg) * (math.pi / 180.0)
    s = col(scale)
    tx, ty = col(shift_px[0]), col(shift_px[1])
    cos, sin = torch.cos(theta_r), torch.sin(theta_r)
    # affine_grid maps output coords to input coords (normalised to [-1, 1]); the inverse
    # of "scale then rotate CCW (on screen, y down) then shift".
    mat = torch.zeros(n, 2, 3, device=dev)
    mat[:, 0, 0] = cos / s
    mat[:, 0, 1] = -sin / s
    mat[:, 1, 0] = sin / s
    mat[:, 1, 1] = cos / s
    ox, oy = -2.0 * tx / w, -2.0 * ty / h
    mat[:, 0, 2] = mat[:, 0, 0] * ox + mat[:, 0, 1] * oy
    mat[:, 1, 2] = mat[:, 1, 0] * ox + mat[:, 1, 1] * oy
    grid = F.affine_grid(mat, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_rotate_deg: float = 10.0,
    max_shift_px: float = 2.0,
    scale_range: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Small random rotation, shift and scale per image (the training augmentation)."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=x.device) * (hi - lo) + lo

    return affine(
        x,
        rotate_deg=uniform(-max_rotate_deg, max_rotate_deg),
        shift_px=(uniform(-max_shift_px, max_shift_px), uniform(-max_shift_px, max_shift_px)),
        scale=uniform(*scale_range),
    )


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, sigma^2), not clamped (the smoothing classifier of Cohen et al. is not)."""
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
