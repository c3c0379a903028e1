"""Decoding one request's image into the model's input spec, with limits.

Encoded images (PNG or JPEG, told apart by content, not by name) go through Pillow:
bytes are capped first, the header's pixel count is checked before any pixel is decoded
(decompression bombs), the size must be the card's, and only modes that convert
faithfully to the card's mode are accepted. Raw tensors (``robustgate.v1.Tensor``) are
checked for shape, dtype, byte length and non-finite or out-of-range values.
Every refusal is an :class:`InputError` with an HTTP-style code and a message for the
caller.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from robustgate.v1 import probe_pb2

FORMATS = ("PNG", "JPEG")
# Source modes that convert faithfully to "L" or "RGB" (alpha is dropped). 16-bit and
# float modes are refused: Pillow's conversion clips them instead of scaling.
CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA"}
CHANNELS = {"L": 1, "RGB": 3}


class InputError(ValueError):
    """A client error in one request, with the HTTP-style status it maps to."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class InputSpec:
    """What the model takes, from its card: ``mode`` "L" or "RGB", size ``h`` x ``w``."""

    mode: str
    h: int
    w: int
    max_bytes: int
    max_pixels: int

    @property
    def channels(self) -> int:
        return CHANNELS[self.mode]


def decode_image(raw: bytes, spec: InputSpec) -> np.ndarray:
    """PNG/JPEG bytes -> uint8 ``[C, H, W]`` in the card's mode."""
    if len(raw) == 0:
        raise InputError("image is empty")
    if len(raw) > spec.max_bytes:
        raise InputError(f"image is {len(raw)} bytes; the limit is {spec.max_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=FORMATS)  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # Pillow's own, higher limit
        raise InputError(f"image has too many pixels; the limit is {spec.max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError):  # UnidentifiedImageError is an OSError
        raise InputError("image is not a decodable PNG or JPEG") from None
    with img:
        w, h = img.size
        if w * h > spec.max_pixels:
            raise InputError(f"image is {w}x{h} pixels; the limit is {spec.max_pixels} pixels")
        if (w, h) != (spec.w, spec.h):
            raise InputError(f"image is {w}x{h}; the model takes {spec.w}x{spec.h}")
        if img.mode not in CONVERTIBLE:
            raise InputError(
                f"image mode {img.mode} is not supported; send 8-bit grey, palette, RGB or RGBA"
            )
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise InputError("image is truncated or corrupt") from None
        if img.mode != spec.mode:
            img = img.convert(spec.mode)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


DTYPES = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}


def decode_tensor(raw: bytes, spec: InputSpec) -> np.ndarray:
    """Serialized ``robustgate.v1.Tensor`` -> ``[C, H, W]``: uint8 as sent, or float32 in [0, 1]."""
    if len(raw) > spec.max_bytes + 1024:
        raise InputError(f"tensor is {len(raw)} bytes; the limit is {spec.max_bytes}")
    try:
        t = probe_pb2.Tensor.FromString(raw)
    except Exception:  # protobuf raises DecodeError, or RuntimeWarning-like errors on garbage
        raise InputError("tensor is not a valid robustgate.v1.Tensor") from None
    return tensor_array(t, spec)


def tensor_array(t: probe_pb2.Tensor, spec: InputSpec) -> np.ndarray:
    """A parsed ``robustgate.v1.Tensor`` -> ``[C, H, W]``, checked as :func:`decode_tensor` does."""
    shape = list(t.shape)
    if len(shape) == 2:
        shape = [1, *shape]
    want = [spec.channels, spec.h, spec.w]
    if shape != want:
        raise InputError(f"tensor shape {list(t.shape)}; the model takes {want} (or [H, W] for one channel)")
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise InputError(f"tensor dtype {t.dtype!r} is not supported; use 'uint8' or 'float32'")
    n = int(np.prod(shape))
    if len(t.data) != n * dtype.itemsize:
        raise InputError(f"tensor data is {len(t.data)} bytes; shape {shape} {t.dtype} needs {n * dtype.itemsize}")
    arr = np.frombuffer(t.data, dtype=dtype).reshape(shape)
    if dtype == DTYPES["uint8"]:
        return arr
    if not np.isfinite(arr).all():
        raise InputError("tensor holds NaN or infinite values")
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise InputError("float32 tensor values must lie in [0, 1]")
    return arr.astype(np.float32)
