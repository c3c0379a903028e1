"""libspng's path for small plain PNGs (``handlers.decode.plain_png``) against Pillow's: the
same pixels, or the same refusal, for every file; the PNGs it must leave to Pillow (where
Pillow's image differs from the raw pixels, or the file is not whole) are left to it."""

from __future__ import annotations

import io
import struct
import zlib
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from handlers import decode
from handlers.decode import PLAIN_PNG_MAX_PIXELS, InputError, load_pixels, plain_png
from tests.nasty import chunk

MAGIC = b"\x89PNG\r\n\x1a\n"


def _filtered(rows: np.ndarray, filters: list[int], bpp: int) -> bytes:
    """The scanlines of uint8 ``rows`` [H, W * bpp], each under its own PNG filter (0-4)."""
    x = rows.astype(np.int64)
    out = bytearray()
    for r, f in enumerate(filters):
        cur = x[r]
        up = x[r - 1] if r else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), up[:-bpp]])
        if f == 0:
            pred = np.zeros_like(cur)
        elif f == 1:
            pred = left
        elif f == 2:
            pred = up
        elif f == 3:
            pred = (left + up) // 2
        else:  # Paeth
            p = left + up - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - up), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
        out.append(f)
        out += ((cur - pred) % 256).astype(np.uint8).tobytes()
    return bytes(out)


def png(pixels: np.ndarray, filters: list[int] | None = None, level: int = 6, before: list[bytes] = (),
        idat_parts: int = 1) -> bytes:
    """An 8-bit grey ([H, W]) or RGB ([H, W, 3]) PNG written here, each row under ``filters``
    (default: all five in turn), its zlib stream at ``level`` split over ``idat_parts`` IDAT
    chunks, with ``before`` (whole chunks) between IHDR and the image data."""
    h, w = pixels.shape[:2]
    bpp = 1 if pixels.ndim == 2 else 3
    filters = filters if filters is not None else [r % 5 for r in range(h)]
    data = zlib.compress(_filtered(pixels.reshape(h, w * bpp), filters, bpp), level)
    cut = [len(data) * i // idat_parts for i in range(idat_parts + 1)]
    return (MAGIC + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0 if bpp == 1 else 2, 0, 0, 0))
            + b"".join(before) + b"".join(chunk(b"IDAT", data[a:b]) for a, b in zip(cut, cut[1:]))
            + chunk(b"IEND", b""))


def pillow_png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


@contextmanager
def pillow_only():
    """Every PNG through Pillow, as before libspng's path."""
    with mock.patch.object(decode, "plain_png", lambda raw: None):
        yield


def outcome(raw: bytes, mode: str, max_pixels: int = 1 << 20) -> tuple:
    """("pixels", shape, bytes) or ("refused", message): what the one door makes of ``raw``."""
    try:
        px = load_pixels(raw, mode, 1 << 20, max_pixels, InputError)
    except InputError as e:
        return ("refused", e.message)
    assert px.dtype == np.uint8 and px.flags.c_contiguous
    return ("pixels", px.shape, px.tobytes())


def both(raw: bytes, mode: str, max_pixels: int = 1 << 20) -> tuple[tuple, tuple]:
    with pillow_only():
        by_pillow = outcome(raw, mode, max_pixels)
    return outcome(raw, mode, max_pixels), by_pillow


@pytest.fixture
def libspng_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The stored mode of each PNG libspng decoded."""
    calls: list[str] = []
    load = decode.pyspng.load

    def counted(raw: bytes, fmt: str):
        calls.append(fmt)
        return load(raw, fmt)
    monkeypatch.setattr(decode.pyspng, "load", counted)
    return calls


def _images(rng: np.random.Generator) -> dict[str, bytes]:
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (20, 33, 3), dtype=np.uint8)
    smooth = (np.add.outer(np.arange(28), np.arange(28)) * 4 % 256).astype(np.uint8)
    out = {f"pillow {m} level {lv}": pillow_png(Image.fromarray(a), compress_level=lv)
           for m, a in (("grey", grey), ("rgb", rgb), ("smooth", smooth)) for lv in (0, 1, 6, 9)}
    out |= {f"filter {f} {m}": png(a, [f] * a.shape[0]) for f in range(5) for m, a in (("grey", grey), ("rgb", rgb))}
    out |= {
        "every filter, 3 IDATs": png(grey, idat_parts=3),
        "one pixel": png(grey[:1, :1]),
        "one column": png(rgb[:, :1]),
        "64 x 64": png(rng.integers(0, 256, (64, 64), dtype=np.uint8)),
        "inert chunks": png(grey, before=[chunk(b"gAMA", struct.pack(">I", 45455)), chunk(b"sRGB", b"\0"),
                                          chunk(b"cHRM", bytes(range(32))), chunk(b"pHYs", bytes(9))]),
        "dpi": pillow_png(Image.fromarray(smooth), dpi=(300, 300)),
    }
    return out


def test_plain_pngs_take_libspng_to_pillows_pixels(libspng_calls: list[str]) -> None:
    """Every plain PNG, in both modes a card may ask for (grey and RGB both ways), decodes by
    libspng to the pixels Pillow makes of it."""
    images = _images(np.random.default_rng(0))
    for name, raw in images.items():
        assert plain_png(raw) is not None, name
        for mode in ("L", "RGB"):
            fast, by_pillow = both(raw, mode)
            assert fast[0] == "pixels" and fast == by_pillow, (name, mode)
    assert len(libspng_calls) == 2 * len(images)  # the plain path ran for each, not Pillow's


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_what_pillow_reads_differently_is_left_to_it(libspng_calls: list[str]) -> None:
    """Transparency, palettes, EXIF or XMP orientation, text, other bit depths and colour types,
    interlacing, animation, a file not whole (a bad CRC or Adler-32, no IEND, bytes after it,
    image data in two runs), a header that lies, or more than PLAIN_PNG_MAX_PIXELS: Pillow's path, and the
    outcome is Pillow's."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    plain = png(grey)
    ihdr, body = plain[:33], plain[33:]
    xmp = (b'XML:com.adobe.xmp\0\0\0\0\0<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf='
           b'"http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff='
           b'"http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')
    img = Image.fromarray(grey)
    cases = {
        "tRNS": pillow_png(img, transparency=255),
        "palette": pillow_png(img.convert("P")),
        "eXIf turned": ihdr + chunk(b"eXIf", _exif(6)) + body,
        "XMP turned": ihdr + chunk(b"iTXt", xmp) + body,
        "text": pillow_png(img, pnginfo=_text()),
        "16-bit": pillow_png(Image.fromarray(grey.astype(np.uint16) * 257)),
        "grey + alpha": pillow_png(Image.merge("LA", [img, img])),
        "rgba": pillow_png(img.convert("RGBA")),
        "1-bit": pillow_png(img.convert("1")),
        "interlaced": _fix_crcs(bytearray(plain[:28] + b"\1" + plain[29:])),
        "animated": pillow_png(img, save_all=True, append_images=[Image.fromarray(255 - grey)]),
        "bad IHDR CRC": plain[:29] + bytes([plain[29] ^ 1]) + plain[30:],
        "bad IDAT CRC": plain[:-13] + bytes([plain[-13] ^ 1]) + plain[-12:],
        "no IEND": plain[:-12],
        "bytes after IEND": plain + b"\0",
        "inert chunk of the wrong length": ihdr + chunk(b"gAMA", b"\0\0") + body,
        "inert chunk after the image data": plain[:-12] + chunk(b"sRGB", b"\0") + plain[-12:],
        "no image data": ihdr + chunk(b"IEND", b""),
        "larger than the fast path": png(rng.integers(0, 256, (65, 64), dtype=np.uint8)),
        "no pixels": png(np.zeros((0, 5), np.uint8)),
    }
    stored = bytearray(png(grey, level=0))  # zlib's stored blocks: the pixels as they are
    stored[41 + 7] ^= 1  # the first row's first byte: the Adler-32 is now wrong
    cases["bad Adler-32"] = _fix_crcs(stored)
    stream = zlib.compress(_filtered(grey, [1] * 28, 1))
    for name, idat in (("zlib stream without its Adler-32", stream[:-4]), ("bytes after the zlib stream", stream + b"\0"),
                       ("zlib stream of one row too many", zlib.compress(_filtered(np.vstack([grey, grey[:1]]), [1] * 29, 1)))):
        cases[name] = ihdr + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    two = png(grey, idat_parts=2)
    first_end = 33 + 12 + struct.unpack(">I", two[33:37])[0]
    cases["two runs of image data"] = two[:first_end] + chunk(b"sRGB", b"\0") + two[first_end:]
    for name, raw in cases.items():
        assert plain_png(raw) is None, name
        for mode in ("L", "RGB"):
            fast, by_pillow = both(raw, mode)
            assert fast == by_pillow, (name, mode)
    assert libspng_calls == []
    turned = both(cases["eXIf turned"], "L")[0]
    assert turned[0] == "pixels" and not np.array_equal(np.frombuffer(turned[2], np.uint8).reshape(28, 28), grey)


def _text():
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    return info


def test_limits_and_size_refusals_are_pillows(libspng_calls: list[str]) -> None:
    """A plain PNG over the pixel limit, or of a size the caller refuses, is refused with
    Pillow's path's message and never decoded."""
    raw = png(np.zeros((28, 28), np.uint8))
    for kwargs in ({"max_pixels": 28 * 28 - 1}, {"stored_size": lambda w, h: f"no {w}x{h}"}):
        with pytest.raises(InputError) as fast:
            load_pixels(raw, "L", 1 << 20, kwargs.get("max_pixels", 1 << 20), InputError, kwargs.get("stored_size", lambda w, h: None))
        with pillow_only(), pytest.raises(InputError) as by_pillow:
            load_pixels(raw, "L", 1 << 20, kwargs.get("max_pixels", 1 << 20), InputError, kwargs.get("stored_size", lambda w, h: None))
        assert fast.value.message == by_pillow.value.message
    assert libspng_calls == []
    assert PLAIN_PNG_MAX_PIXELS == 64 * 64


def test_what_libspng_refuses_pillow_decides(libspng_calls: list[str]) -> None:
    """A plain PNG whose scanline has an invalid filter byte (5) in a whole zlib stream:
    libspng refuses it, and the refusal is Pillow's, message included."""
    pixels = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    lines = bytearray(_filtered(pixels, [0] * 28, 1))
    lines[3 * 29] = 5  # the fourth row's filter byte
    raw = MAGIC + png(pixels)[8:33] + chunk(b"IDAT", zlib.compress(bytes(lines))) + chunk(b"IEND", b"")
    assert plain_png(raw) is not None
    fast, by_pillow = both(raw, "L")
    assert fast[0] == "refused" and fast == by_pillow
    assert libspng_calls == ["L"]


def _fix_crcs(raw: bytearray) -> bytes:
    """Every whole chunk's CRC recomputed, so that a mutation reaches the decoders."""
    pos = 8
    while pos + 12 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        end = pos + 12 + n
        if end > len(raw):
            break
        raw[end - 4:end] = struct.pack(">I", zlib.crc32(bytes(raw[pos + 4:end - 4])))
        pos = end
    return bytes(raw)


@given(st.integers(1, 40), st.integers(1, 40), st.booleans(), st.lists(st.integers(0, 4), min_size=40, max_size=40),
       st.integers(0, 9), st.integers(0, 2**32 - 1), st.data())
def test_mutated_plain_pngs_decode_alike(w: int, h: int, rgb: bool, filters: list[int], level: int, seed: int,
                                         data) -> None:
    """Bytes changed inside the chunks (the header's fields, the zlib stream), with the CRCs
    made right again; or the scanlines changed (filter bytes, invalid ones too, and pixels),
    cut short or run long, and compressed again with a right Adler-32: libspng's path gives
    Pillow's pixels or Pillow's refusal, always."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3) if rgb else (h, w), dtype=np.uint8)
    raw = bytearray(png(pixels, filters[:h], level, idat_parts=data.draw(st.integers(1, 3))))
    for _ in range(data.draw(st.integers(0, 4))):
        i = data.draw(st.integers(16, len(raw) - 13))  # past the magic and the IHDR's length and kind
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()) and _whole_stream(bytes(raw)):  # the scanlines changed, recompressed whole
        lines = bytearray(zlib.decompress(b"".join(_idat_bodies(bytes(raw)))))
        for _ in range(data.draw(st.integers(0, 3))):  # a filter byte (5 and up are invalid) or a pixel
            row = data.draw(st.integers(0, h - 1)) * (len(lines) // h)
            lines[data.draw(st.sampled_from([row, row + data.draw(st.integers(0, len(lines) // h - 1))]))] = \
                data.draw(st.integers(0, 255))
        lines = lines[:data.draw(st.integers(0, len(lines)))] + data.draw(st.binary(max_size=8))  # short or long
        raw = bytearray(bytes(raw[:33]) + chunk(b"IDAT", zlib.compress(bytes(lines))) + chunk(b"IEND", b""))
    raw = _fix_crcs(raw)
    for mode in ("L", "RGB"):
        fast, by_pillow = both(raw, mode)
        assert fast == by_pillow, mode


def _idat_bodies(raw: bytes) -> list[bytes]:
    out, pos = [], 8
    while pos + 12 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        if raw[pos + 4:pos + 8] == b"IDAT":
            out.append(raw[pos + 8:pos + 8 + n])
        pos += 12 + n
    return out


def _whole_stream(raw: bytes) -> bool:
    try:
        zlib.decompress(b"".join(_idat_bodies(raw)))
    except zlib.error:
        return False
    return True
