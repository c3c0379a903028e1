"""Label-changing-in-spirit perturbations of uint8 [N, 28, 28] images: the shifted inputs the
gate watches for. Calibration adds them to its reference set so the flag budget is allocated
to the checks that catch them; the evaluations use the same functions on the test split."""

from __future__ import annotations

import numpy as np
from PIL import Image


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """uint8 [N, H, W] rotated counter-clockwise about the centre (bilinear, black fill)."""
    return np.stack([np.asarray(Image.fromarray(im).rotate(degrees, resample=Image.BILINEAR)) for im in images])


def tile_shuffle(images: np.ndarray, grid: int = 2, seed: int = 0) -> np.ndarray:
    """Split each image into grid x grid tiles and permute them (never the identity)."""
    rng = np.random.default_rng(seed)
    n, h, w = images.shape
    th, tw = h // grid, w // grid
    out = images.copy()
    for k in range(n):
        tiles = [images[k, r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(grid) for c in range(grid)]
        perm = np.arange(len(tiles))
        while (perm == np.arange(len(tiles))).all():
            perm = rng.permutation(len(tiles))
        for j, t in enumerate(perm):
            r, c = divmod(j, grid)
            out[k, r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[t]
    return out
