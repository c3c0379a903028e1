"""Decoding one request's image into the model's input spec, with limits.

Encoded images (PNG or JPEG, told apart by content, not by name) go through Pillow:
bytes are capped first, the header's pixel count is checked before any pixel is decoded
(decompression bombs), and the size must be the card's. Pixels become the card's mode as
the gateway's decoder makes them (both call :func:`upright` and :func:`to_mode`): an EXIF
orientation is applied, 16-bit grey is scaled to 8 bits, and transparent pixels are black.
Raw tensors (``robustgate.v1.Tensor``) are
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
CHANNELS = {"L": 1, "RGB": 3}

ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation -> the transposition that makes the pixels upright (Pillow's exif_transpose)
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1: upright, as stored), 1 where there is none or it cannot be read."""
    try:
        return int(img.getexif().get(ORIENTATION, 1))
    except Exception:  # a caller's malformed EXIF block: viewers ignore it, and so do we
        return 1


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it. Cameras store a turned photo's rotation as an EXIF
    orientation instead of turning its pixels; a model trained on upright images must see
    them turned. Call after ``load()``: a PNG's eXIf chunk may follow its pixels."""
    turn = _UPRIGHT.get(orientation(img))
    return img if turn is None else img.transpose(turn)


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert to ``mode`` ("L" or "RGB") faithfully. 16- and 32-bit grey is scaled to 8 bits
    (Pillow's own conversion clips it); an alpha channel or a transparent colour (PNG tRNS in
    L, RGB or P) is composited over black, the training data's background."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        grey = (np.clip(arr, 0, top) * 255 // top).astype(np.uint8)
        if isinstance(transparent := img.info.get("transparency"), int):  # a 16-bit tRNS grey
            grey[arr == transparent] = 0
        img = Image.fromarray(grey, "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


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
        if (spec.w, spec.h) not in ((w, h), (h, w)):  # before decoding; turned (EXIF) below
            raise InputError(f"image is {w}x{h}; the model takes {spec.w}x{spec.h}")
        if getattr(img, "n_frames", 1) > 1:  # as the gateway: not its first frame in silence
            raise InputError("animated images are not accepted: send one frame")
        try:
            img.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise InputError("image is truncated or corrupt") from None
        img = upright(img)
        if img.size != (spec.w, spec.h):
            w, h = img.size
            raise InputError(f"image is {w}x{h} upright; the model takes {spec.w}x{spec.h}")
        arr = np.asarray(to_mode(img, spec.mode), dtype=np.uint8)
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
