"""Decoding with limits: formats by content, pixel count before decoding, sizes, modes,
and raw tensors. Every refusal is an InputError with a 4xx code."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from handlers.decode import InputError, InputSpec, decode_image, decode_tensor, max_tensor_bytes
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
    refused(encode(Image.fromarray(grey), "BMP"), "neither PNG nor JPEG")
    refused(encode(Image.fromarray(grey), "GIF"), "neither PNG nor JPEG")
    refused(b"garbage bytes", "neither PNG nor JPEG")
    refused(b"", "empty")


def test_an_animated_png_is_refused_as_the_gateway_refuses_it(grey: np.ndarray) -> None:
    frames = [Image.fromarray(grey), Image.fromarray(255 - grey)]
    buf = io.BytesIO()
    frames[0].save(buf, "PNG", save_all=True, append_images=frames[1:])
    refused(buf.getvalue(), "animated images are not accepted: send one frame")


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
    refused(_png_claiming(3000, 3000, grey), "3000x3000 = 9000000 pixels; the limit is")  # 9 M pixels, never decoded
    refused(_png_claiming(60000, 60000, grey), "too many pixels")  # over Pillow's own bomb limit


def test_wrong_size_is_refused() -> None:
    refused(encode(Image.new("L", (32, 32))), "32x32; the model takes 28x28")


def test_sixteen_bit_and_cmyk_are_converted_not_refused(grey: np.ndarray) -> None:
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # mode I;16: scaled, not clipped
    assert np.array_equal(decode_image(encode(sixteen), SPEC)[0], grey)
    cmyk = Image.fromarray(grey).convert("CMYK")
    assert np.abs(decode_image(encode(cmyk, "JPEG", quality=95), SPEC)[0].astype(int) - grey).mean() < 20


def _turned(img: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    """``img`` stored as a camera stores a turned photo: pixels as taken, plus the EXIF
    orientation that tells a viewer how to show them upright."""
    undo = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_270}
    stored = img.transpose(undo[orientation]) if orientation in undo else img
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int, fmt: str) -> None:
    """A photo taken with the camera turned is classified as a viewer shows it, upright (as
    Pillow's ImageOps.exif_transpose turns it). The image is wider than tall: turned by a
    quarter, its stored pixels are taller than wide, and the size check takes them."""
    spec = InputSpec(mode="L", h=28, w=40, max_bytes=64 << 10, max_pixels=1 << 20)
    upright = np.zeros((28, 40), np.uint8)
    upright[:6, :10] = 255  # a block in the top left corner: every turn and flip moves it
    raw = _turned(Image.fromarray(upright), orientation, fmt)
    out = decode_image(raw, spec)[0]
    with Image.open(io.BytesIO(raw)) as stored:
        reference = np.asarray(ImageOps.exif_transpose(stored).convert("L"))
    assert np.array_equal(out, reference)
    assert np.abs(out.astype(int) - upright).mean() < 3  # JPEG: nearly exact


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("fmt,exif", [("PNG", b"Exif\x00\x00XX"),  # Pillow raises SyntaxError reading it
                                      ("JPEG", b"Exif\x00\x00MM\x00*garbage"),
                                      ("PNG", b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"
                                              b"\x00\x00\x00\x01\x00\x09\x00\x00\x00\x00\x00\x00")])  # orientation 9
def test_an_unreadable_exif_block_or_orientation_is_ignored(grey: np.ndarray, fmt: str, exif: bytes) -> None:
    """As viewers do: the pixels are good, the image is taken as stored (by both decoders)."""
    from service.decode import InputSpec as GatewaySpec
    from service.decode import Limits
    from service.decode import decode_image as gateway_decode

    raw = encode(Image.fromarray(grey), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    out = decode_image(raw, SPEC)[0]
    assert np.abs(out.astype(int) - grey).mean() < (20 if fmt == "JPEG" else 1)
    assert np.array_equal(gateway_decode(raw, GatewaySpec(), Limits())[0], out)


def test_the_handler_and_the_gateway_make_the_same_pixels(grey: np.ndarray) -> None:
    """Sent through the gateway or to TorchServe directly, an image is the same input: alpha
    and transparent colours over black, 16-bit scaled, EXIF orientation applied."""
    from service.decode import InputSpec as GatewaySpec
    from service.decode import Limits
    from service.decode import decode_image as gateway_decode
    from tests.nasty import corpus

    white = Image.new("L", (28, 28), 255)
    images = {name: raw for name, (raw, error) in corpus().items() if error is None and "resized" not in name}
    images |= {
        "grey tRNS": encode(white, transparency=255),
        "rgb tRNS": encode(white.convert("RGB"), transparency=(255, 255, 255)),
        "la": encode(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(255 - grey)])),
        "palette tRNS": encode(Image.fromarray(grey).convert("P"), transparency=7),
        "turned jpeg": _turned(Image.fromarray(grey), 6, "JPEG"),
        "flipped png": _turned(Image.fromarray(grey), 2),
        "16-bit tRNS": encode(Image.fromarray(np.full((28, 28), 65535, np.uint16)), transparency=65535),
    }
    for mode, channels in (("L", 1), ("RGB", 3)):
        spec = InputSpec(mode=mode, h=28, w=28, max_bytes=64 << 10, max_pixels=1 << 20)
        for name, raw in images.items():
            assert np.array_equal(decode_image(raw, spec), gateway_decode(raw, GatewaySpec(channels, 28, 28, mode),
                                                                           Limits())), (mode, name)
    for name in ("grey tRNS", "16-bit tRNS"):
        assert decode_image(images[name], SPEC).max() == 0, name  # the white was transparent: black


def test_the_handler_and_the_gateway_refuse_alike() -> None:
    """Both decoders go through one door (``load_pixels``): every hostile file is refused by
    each with the same message, and an image of another size only by the handler, which
    takes the card's size where the gateway resizes."""
    from service.decode import InputSpec as GatewaySpec
    from service.decode import Limits
    from service.decode import decode_image as gateway_decode
    from service.errors import InvalidInput
    from tests.nasty import corpus

    limits = Limits(max_bytes=SPEC.max_bytes, max_pixels=SPEC.max_pixels)
    refusals = 0
    for name, (raw, error) in corpus().items():
        if error is None:
            continue
        with pytest.raises(InputError) as by_handler:
            decode_image(raw, SPEC)
        with pytest.raises(InvalidInput) as by_gateway:
            gateway_decode(raw, GatewaySpec(), limits)
        assert by_handler.value.message == str(by_gateway.value), name
        assert error in by_handler.value.message, name
        refusals += 1
    assert refusals >= 8
    larger = corpus()["larger png, resized"][0]
    assert gateway_decode(larger, GatewaySpec(), limits).shape == (1, 28, 28)
    refused(larger, "image is 64x64; the model takes 28x28")


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


def test_a_tensor_is_refused_past_its_byte_bound_and_told_that_bound() -> None:
    """The bound is the data limit and 1 KiB for shape and dtype; the message names the bound
    it checks, not only the data limit (a tensor between the two passed with a message that
    said it could not)."""
    bound = max_tensor_bytes(SPEC)
    assert bound == SPEC.max_bytes + 1024

    def sized(n: int) -> bytes:  # a serialized tensor of exactly n bytes (its data is the wrong length)
        data = b"\0" * (n - 16)
        while len(raw := tensor(np.zeros((28, 28), np.uint8), data=data)) != n:
            data = data[: len(data) - (len(raw) - n)] if len(raw) > n else data + b"\0" * (n - len(raw))
        return raw

    refused(sized(bound), "tensor data is", decode_tensor)  # at the bound: checked further, not for its size
    refused(sized(bound + 1), f"^tensor is {bound + 1:,} bytes; the limit is {bound:,} "
            rf"\({SPEC.max_bytes:,} bytes of data and 1 KiB for its shape and dtype\)$", decode_tensor)
