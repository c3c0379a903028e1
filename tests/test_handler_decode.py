"""Decoding with limits: formats by content, pixel count before decoding, sizes, modes,
and raw tensors. Every refusal is an InputError with a 4xx code."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from handlers.decode import InputError, InputSpec, decode_image, decode_tensor
from robustgate.v1 import probe_pb2

SPEC = InputSpec(mode="L", h=28, w=28, max_bytes=64 << 10, max_pixels=1 << 20)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)


def refused(raw: bytes, match: str, decoder=decode_image) -> None:
    with pytest.raises(InputError, match=match) as err:
        decoder(raw, SPEC)
    assert 400 <= err.value.code < 500


def test_png_grey_round_trips(grey: np.ndarray) -> None:
    out = decode_image(encode(Image.fromarray(grey)), SPEC)
    assert out.shape == (1, 28, 28) and out.dtype == np.uint8
    assert np.array_equal(out[0], grey)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "1"])
def test_convertible_modes_become_the_cards_mode(grey: np.ndarray, mode: str) -> None:
    img = Image.fromarray(grey).convert(mode)
    out = decode_image(encode(img), SPEC)
    assert np.array_equal(out[0], np.asarray(img.convert("L")))


def test_jpeg_is_decoded(grey: np.ndarray) -> None:
    raw = encode(Image.fromarray(grey), "JPEG", quality=95)
    out = decode_image(raw, SPEC)
    assert np.abs(out[0].astype(int) - grey).mean() < 20


def test_format_is_told_by_content_not_allowed_otherwise(grey: np.ndarray) -> None:
    refused(encode(Image.fromarray(grey), "BMP"), "not a decodable PNG or JPEG")
    refused(encode(Image.fromarray(grey), "GIF"), "not a decodable PNG or JPEG")
    refused(b"garbage bytes", "not a decodable PNG or JPEG")
    refused(b"", "empty")


def test_truncated_png_is_refused(grey: np.ndarray) -> None:
    raw = encode(Image.fromarray(grey))
    refused(raw[: len(raw) // 2], "truncated or corrupt|not a decodable")


def test_byte_limit(grey: np.ndarray) -> None:
    refused(b"\x89PNG" + b"\0" * (SPEC.max_bytes + 1), "bytes; the limit is")


def _png_claiming(width: int, height: int, grey: np.ndarray) -> bytes:
    """A valid small PNG whose header is rewritten to claim ``width`` x ``height``."""
    raw = bytearray(encode(Image.fromarray(grey)))
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    raw[ihdr + 8 : ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(raw[ihdr + 4 : ihdr + 8 + 13]))
    raw[ihdr + 21 : ihdr + 25] = struct.pack(">I", crc)
    return bytes(raw)


def test_decompression_bomb_refused_from_the_header(grey: np.ndarray) -> None:
    refused(_png_claiming(3000, 3000, grey), "3000x3000 pixels; the limit is")  # 9 M pixels, never decoded
    refused(_png_claiming(60000, 60000, grey), "too many pixels")  # over Pillow's own bomb limit


def test_wrong_size_is_refused() -> None:
    refused(encode(Image.new("L", (32, 32))), "32x32; the model takes 28x28")


def test_wrong_modes_are_refused(grey: np.ndarray) -> None:
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16
    refused(encode(sixteen), "mode I;16 is not supported")
    cmyk = Image.fromarray(grey).convert("CMYK")
    refused(encode(cmyk, "JPEG"), "mode CMYK is not supported")


def tensor(arr: np.ndarray, dtype: str | None = None, shape: list[int] | None = None, data: bytes | None = None) -> bytes:
    return probe_pb2.Tensor(
        shape=shape if shape is not None else list(arr.shape),
        dtype=dtype or str(arr.dtype),
        data=data if data is not None else arr.astype("<f4" if arr.dtype == np.float32 else "u1").tobytes(),
    ).SerializeToString()


def test_tensors_uint8_and_float32(grey: np.ndarray) -> None:
    assert np.array_equal(decode_tensor(tensor(grey), SPEC)[0], grey)
    assert np.array_equal(decode_tensor(tensor(grey[None]), SPEC)[0], grey)
    f = grey.astype(np.float32) / 255
    assert np.array_equal(decode_tensor(tensor(f), SPEC)[0], f)


def test_bad_tensors_are_refused(grey: np.ndarray) -> None:
    f = grey.astype(np.float32) / 255
    refused(tensor(grey, shape=[28, 27]), "shape", decode_tensor)
    refused(tensor(np.zeros((3, 28, 28), np.uint8)), "shape", decode_tensor)
    refused(tensor(grey, dtype="float64"), "dtype", decode_tensor)
    refused(tensor(grey, data=grey.tobytes()[:-1]), "bytes", decode_tensor)
    nan = f.copy()
    nan[3, 3] = np.nan
    refused(tensor(nan), "NaN", decode_tensor)
    refused(tensor(f * 2), r"\[0, 1\]", decode_tensor)
    refused(b"\xff\xff\xff", "not a valid", decode_tensor)
