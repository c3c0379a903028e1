"""Decode and validate an input image once, at the gateway, into the model's input spec.

Encoded images are accepted as PNG or JPEG, recognised by content (magic bytes), never by a
claimed type; the pixel count is checked from the header before any pixel is decoded
(decompression bombs); an EXIF orientation is applied, and palette, alpha, 16-bit, CMYK and
colour images are converted to the model's mode: the handlers' own ``load_pixels``, so an
image is refused, and becomes pixels, alike on both paths; then resized to the model's size. Raw
tensors are checked for shape, dtype, byte length and finite values.

The result is what crosses to TorchServe: ``uint8 [C, H, W]`` (encoded images, 0..255) or
``float32 [C, H, W]`` in [0, 1] (float tensors, kept exact so that small perturbations reach
the model unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from handlers.decode import image_array, load_pixels, pixels_image, shape_text
from service.errors import InvalidInput

# Register PIL's PNG and JPEG decoders now: left to the first Image.open, their imports added
# 12 ms to the first request after every start.
Image.preinit()

ENCODINGS = ("png", "jpeg")


@dataclass(frozen=True)
class InputSpec:
    """The model's input: ``channels x height x width`` in ``mode`` ("L" grey or "RGB")."""

    channels: int = 1
    height: int = 28
    width: int = 28
    mode: str = "L"

    @classmethod
    def from_card(cls, card: dict) -> "InputSpec":
        c, h, w = card["input"]["shape"]
        return cls(channels=int(c), height=int(h), width=int(w), mode=str(card["input"].get("mode", "L")))


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 4 * 1024 * 1024
    max_pixels: int = 4096 * 4096


class NotHere(Exception):
    """The image's header, as its decoder reads it, declares more pixels than the caller will
    decode where it runs (the event loop): decode it elsewhere. Raised before any pixel is
    decoded; never a caller's error."""


def decode_image(raw: bytes, spec: InputSpec, limits: Limits, here_pixels: int | None = None,
                 here_side: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> ``uint8 [C, H, W]`` in the model's mode and size (bilinear resize).
    ``here_pixels``, ``here_side``: raise :class:`NotHere` for an image of more pixels, or a
    longer side, by the header its decoder reads (a PNG's last IHDR, not its first), before
    decoding any."""
    def size_here(w: int, h: int) -> None:
        if (here_pixels is not None and w * h > here_pixels) or (here_side is not None and max(w, h) > here_side):
            raise NotHere(f"{w}x{h}")

    pixels = load_pixels(raw, spec.mode, limits.max_bytes, limits.max_pixels, InvalidInput, size_here)
    if pixels.shape[1:] == (spec.height, spec.width):
        return pixels
    return image_array(pixels_image(pixels).resize((spec.width, spec.height), Image.Resampling.BILINEAR))


_DTYPES = {"uint8": np.dtype("<u1"), "float32": np.dtype("<f4")}
TENSOR_DTYPES = tuple(_DTYPES)


def decode_tensor(shape: Sequence[int], dtype: str, data: bytes, spec: InputSpec) -> np.ndarray:
    """A raw tensor ([H, W] or [C, H, W], uint8 0..255 or float32 0..1) -> ``[C, H, W]``."""
    if dtype not in _DTYPES:
        raise InvalidInput(f"tensor dtype {dtype[:32]!r} is not supported; use uint8 or float32")
    want = (spec.channels, spec.height, spec.width)
    # converted only when its length can match: a caller's shape may hold millions of entries
    dims = tuple(int(d) for d in shape) if len(shape) in (2, 3) else None
    if dims == want[1:] and spec.channels == 1:
        dims = want
    if dims != want:
        raise InvalidInput(f"tensor shape {shape_text(shape)} does not match the model input {list(want)}")
    dt = _DTYPES[dtype]
    expected = math.prod(dims) * dt.itemsize
    if len(data) != expected:
        raise InvalidInput(f"tensor data is {len(data)} bytes; shape {list(dims)} of {dtype} needs {expected}")
    arr = np.frombuffer(data, dtype=dt).reshape(dims)
    if dt == np.float32:
        if not np.isfinite(arr).all():
            raise InvalidInput("tensor contains NaN or Inf")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise InvalidInput("float32 tensor values must be in [0, 1]")
    return arr
