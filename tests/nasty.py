"""A corpus of hostile image files, built in code (nothing binary is committed)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, kind, body and its CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_of(samples: np.ndarray, depth: int, colour: int, trns: tuple[int, ...]) -> bytes:
    """A PNG of ``samples`` as stored (grey [H, W] or RGB [H, W, 3] at ``depth`` bits), with a
    tRNS chunk naming ``trns`` as the transparent colour."""
    h, w = samples.shape[:2]
    if depth < 8:
        rows = [np.packbits(np.unpackbits(r.astype(np.uint8)[:, None], axis=1)[:, -depth:].ravel()).tobytes()
                for r in samples]
    else:
        rows = [r.astype(">u2" if depth == 16 else "u1").tobytes() for r in samples]
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tRNS", struct.pack(f">{len(trns)}H", *trns))
            + chunk(b"IDAT", zlib.compress(b"".join(b"\0" + r for r in rows))) + chunk(b"IEND", b""))


def bomb_png(side: int = 20_000) -> bytes:
    """A tiny file that claims side x side pixels (IHDR), with a highly compressed body."""
    raw = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # only a few rows: decoding would need far more
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def many_scans_jpeg(copies: int, side: int = 28) -> bytes:
    """A progressive JPEG whose last scan is repeated ``copies`` times more: each copy costs
    the decoder another pass over the image, at a few bytes each."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format="JPEG", progressive=True)
    raw = buf.getvalue()
    last = raw.rindex(b"\xff\xda")  # Pillow writes no EXIF: every FF DA is a start of scan
    end = raw.rindex(b"\xff\xd9")
    return raw[:end] + raw[last:end] * copies + raw[end:]


def png_with(before: list[tuple[bytes, bytes]] = (), after: list[tuple[bytes, bytes]] = (), side: int = 28) -> bytes:
    """A grey PNG with the chunks ``before`` between its header and its image data and
    ``after`` between the image data and its end."""
    rows = b"".join(b"\0" + bytes(range(side)) for _ in range(side))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(k, b) for k, b in before)
            + chunk(b"IDAT", zlib.compress(rows)) + b"".join(chunk(k, b) for k, b in after) + chunk(b"IEND", b""))


def png_row_by_row(width: int = 400, height: int = 300) -> bytes:
    """A grey PNG, one shade per row, as a streaming writer makes it: the image data flushed
    after every row, one IDAT chunk each (more chunks than one per KiB of the file)."""
    z = zlib.compressobj()
    rows = [z.compress(b"\0" + bytes([y % 256]) * width) + z.flush(zlib.Z_FULL_FLUSH)
            for y in range(height)]
    rows[-1] += z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunk(b"IDAT", r) for r in rows) + chunk(b"IEND", b"")


def camera_mpo(side: int = 28) -> bytes:
    """A JPEG with a second picture after it (MPF), as phones write a depth or gain map."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format="MPO", save_all=True,
                                         append_images=[Image.new("L", (side // 2, side // 2), 10)])
    return buf.getvalue()


def jpeg_with(header: bytes, side: int = 28) -> bytes:
    """A baseline grey JPEG with ``header`` (segments, padding) right after its start marker."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 90).save(buf, format="JPEG")
    raw = buf.getvalue()
    return raw[:2] + header + raw[2:]


def corpus() -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, None if it must be accepted else a substring of the expected error)."""
    rng = np.random.default_rng(0)
    grey = Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8), "L")
    good = _png(grey)
    cmyk = io.BytesIO()
    Image.new("CMYK", (28, 28), (10, 20, 30, 40)).save(cmyk, format="JPEG")
    gif = io.BytesIO()
    frames = [Image.new("L", (28, 28), v) for v in (0, 128, 255)]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    apng = io.BytesIO()
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])
    sixteen = Image.fromarray(rng.integers(0, 65536, (28, 28), dtype=np.uint16))  # mode I;16
    rgba = Image.fromarray(rng.integers(0, 256, (28, 28, 4), dtype=np.uint8), "RGBA")
    palette = grey.convert("P")
    return {
        "good grey png": (good, None),
        "16-bit png": (_png(sixteen), None),
        "rgba png": (_png(rgba), None),
        "palette png": (_png(palette), None),
        "cmyk jpeg": (cmyk.getvalue(), None),
        "camera jpeg with a second picture (MPO)": (camera_mpo(), None),
        "larger png flushed row by row, one IDAT each, resized": (png_row_by_row(), None),
        "larger png, resized": (_png(grey.resize((64, 64))), None),
        "empty": (b"", "empty"),
        "truncated png": (good[: len(good) // 2], "not a decodable PNG"),
        "png header only": (good[:8], "not a decodable PNG"),
        "bomb png": (bomb_png(), "pixels; the limit is"),
        "animated gif": (gif.getvalue(), "neither PNG nor JPEG"),
        "animated png": (apng.getvalue(), "animated"),
        "polyglot (zip after png magic)": (b"\x89PNG\r\n\x1a\nPK\x03\x04" + b"\x00" * 64, "not a decodable PNG"),
        "html claiming to be an image": (b"<html><script>alert(1)</script></html>", "neither PNG nor JPEG"),
        "jpeg magic then garbage": (b"\xff\xd8\xff" + bytes(rng.integers(0, 256, 500, dtype=np.uint8)), "not a decodable JPEG"),
        "jpeg of too many scans": (many_scans_jpeg(100), "scans; the limit is"),
        "jpeg of many empty comments": (jpeg_with(b"\xff\xfe\x00\x02" * 1000), "marker segments; the limit is"),
        "jpeg padded with fill bytes": (jpeg_with(b"\xff" * 4000), "bytes of padding"),
        "png of many icc profiles": (png_with(before=[(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * (1 << 20), 9))] * 20),
                                     "ICC profile twice"),
        "png with an empty icc profile after its pixels": (png_with(after=[(b"iCCP", b"")]), "after the image data"),
        "png of many unknown chunks": (png_with(before=[(b"quIt", b"")] * 2000), "chunks; the limit for a file of its size"),
        "16-bit colour png with a transparent colour": (
            png_of(np.full((28, 28, 3), 65535), 16, 2, (255, 255, 255)), "transparent colour"),
    }
