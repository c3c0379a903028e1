"""Decoding one request's image into the model's input spec, with limits.

Encoded images (PNG or JPEG, told apart by content, not by name) go through Pillow:
bytes are capped first, the header's pixel count is checked before any pixel is decoded
(decompression bombs), and the size must be the card's. A small plain PNG (8-bit grey or
RGB, whole, nothing in it that changes what Pillow makes of it: :func:`plain_png`) is
decoded by libspng instead, to the same pixels, after the same checks; anything libspng
does not take goes to Pillow, which decides. The gateway's decoder goes through
the same :func:`load_pixels` (refusals and their messages, pixels in the card's mode): an EXIF
orientation is applied, 16-bit grey is scaled to 8 bits, and transparent pixels are black
(a 16-bit colour PNG's transparent colour, which no 8-bit one stands for, is refused).
Raw tensors (``robustgate.v1.Tensor``) are
checked for shape, dtype, byte length and non-finite or out-of-range values.
Every refusal is an :class:`InputError` with an HTTP-style code and a message for the
caller.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image

from robustgate.v1 import probe_pb2

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
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
        arr = np.asarray(img)  # uint16 or int32: scaled in 32 bits (a 4096x4096 image: 67 MB, not 134 per copy)
        top = 65535 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        scaled = np.clip(arr, 0, top).astype(np.uint32)
        scaled *= 255
        scaled //= top
        grey = scaled.astype(np.uint8)
        del scaled
        if isinstance(transparent := img.info.get("transparency"), int):  # a 16-bit tRNS grey
            grey[arr == transparent] = 0
        img = Image.fromarray(grey, "L")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == mode else img.convert(mode)


def sniff(raw: bytes) -> str | None:
    """"PNG" or "JPEG" by the bytes' magic number (never by a claimed type), else None."""
    if raw.startswith(PNG_MAGIC):
        return "PNG"
    if raw.startswith(JPEG_MAGIC):
        return "JPEG"
    return None


# Small plain PNGs go to libspng: Pillow's PNG reader parses chunks in Python, a fixed cost
# that dominates a small image's decode. The gateway's decode of a 28x28 grey test image: 31 us
# by libspng, 79 us by Pillow; 64x64, resized: 143 against 174 us. Small only: the zlib stream
# is inflated twice on this path (libspng, as pyspng sets it up, checks no Adler-32, so
# :func:`plain_png` does), which from about 128x128 costs what Pillow's fixed cost saves; and
# libspng holds the GIL while it decodes, where Pillow lets the event loop run
# (``benchmarks/decode_png.py``).
PLAIN_PNG_MAX_PIXELS = 64 * 64
_PLAIN_COLOURS = {0: "L", 2: "RGB"}  # IHDR colour type -> the mode Pillow gives it, at 8 bits
# Chunks that change nothing Pillow makes of the pixels (it reads them into ``info``), at the
# only length it accepts them in. Any other (tRNS, PLTE, eXIf, text that may carry EXIF or XMP
# orientation, iCCP, APNG's) sends the PNG to Pillow.
_INERT_CHUNKS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}


def plain_png(raw: bytes) -> tuple[int, int, str] | None:
    """``(width, height, mode)`` of a PNG that libspng decodes to exactly Pillow's pixels, else
    None: 8-bit grey or RGB, not interlaced, at most :data:`PLAIN_PNG_MAX_PIXELS`; whole (IHDR
    first, :data:`_INERT_CHUNKS` only, one run of IDAT, then IEND with nothing after it, every
    chunk's CRC right; its zlib stream whole and as long as the scanlines). Reads the chunks'
    headers and CRCs and inflates the image data (at most 12 KiB)."""
    if len(raw) < 45 or raw[8:16] != b"\0\0\0\rIHDR":
        return None
    w, h, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", raw, 16)
    stored = _PLAIN_COLOURS.get(colour)
    if stored is None or depth != 8 or compression or filtering or interlace \
            or not 0 < w * h <= PLAIN_PNG_MAX_PIXELS:
        return None
    view, pos, last, data = memoryview(raw), 8, b"", []  # last: the kind of the chunk before
    while pos + 12 <= len(raw):
        n = int.from_bytes(raw[pos:pos + 4], "big")
        end = pos + 12 + n
        kind = raw[pos + 4:pos + 8]
        if end > len(raw) or zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(raw[end - 4:end], "big"):
            return None
        if kind == b"IEND":
            break
        if kind == b"IHDR":
            if last:
                return None  # a second header
        elif last == b"IDAT" and kind != b"IDAT":
            return None  # after the image data, only IEND
        elif kind == b"IDAT":
            data.append(view[pos + 8:end - 4])
        elif _INERT_CHUNKS.get(kind) != n:
            return None
        last, pos = kind, end
    else:
        return None  # no IEND
    if end != len(raw) or n != 0 or last != b"IDAT":
        return None
    # The zlib stream whole, its Adler-32 right and its length the scanlines': pyspng tells
    # libspng to ignore CRCs, and with them the Adler-32, where Pillow refuses a bad one.
    rows = h * (1 + w * (1 if stored == "L" else 3))
    z = zlib.decompressobj()
    try:
        if len(z.decompress(b"".join(data), rows + 1)) != rows or not z.eof or z.unused_data:
            return None
    except zlib.error:
        return None
    return w, h, stored


def _decode_plain(raw: bytes, stored: str) -> np.ndarray | None:
    """A :func:`plain_png`'s pixels by libspng, uint8 ``[H, W]`` or ``[H, W, 3]``; None where
    libspng refuses them (a bad zlib stream or filter byte, short or long data): Pillow decides."""
    try:
        return pyspng.load(raw, stored)
    except Exception:  # pybind11's RuntimeError from libspng, whatever its wording
        return None


# A progressive JPEG's decode costs a pass over the image per scan, and nothing in the bytes or
# pixel limits bounds the number of scans: a 2048x2048 one repeating its last 16-byte scan
# costs about 2.5 ms per copy (a 4 MiB file: minutes). Encoders write 1 (baseline) to about 12.
MAX_JPEG_SCANS = 100
# Pillow reads a JPEG's header (everything before its first scan) in Python, a marker and a
# byte of padding at a time: a 4 MiB file of empty comment segments held it 1.1 s, of fill bytes
# 1.6 s. Encoders write a few dozen segments (APPn, DQT, DHT, SOF, SOS) and no stray bytes.
MAX_JPEG_SEGMENTS = 256
MAX_JPEG_STRAY_BYTES = 1024  # fill (FF FF) and junk bytes between segments, all told
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0-7, SOI: no length follows
# Where a scan's entropy-coded data ends: the next marker that is neither a stuffed 0xFF (FF 00)
# nor a restart (FF D0-D7), after any fill bytes: the first such code byte right after a 0xFF.
# Found by the code byte, looking one back (linear); ``\xff+[^...]`` backtracked through every
# run of 0xFF bytes from each of its bytes, quadratic: 64 KiB of FF held a decode for 17 s.
_JPEG_NEXT_MARKER = re.compile(rb"(?<=\xff)[^\x00\xd0-\xd7\xff]")
_FF_RUN = re.compile(rb"\xff+")


@dataclass(frozen=True)
class JpegLayout:
    scans: int  # start-of-scan markers
    segments: int  # markers outside a scan's data, standalone ones too
    stray: int  # fill and junk bytes between segments


def jpeg_layout(raw: bytes) -> JpegLayout:
    """A JPEG's markers counted as libjpeg meets them (segments by their lengths, markers
    without one, a scan's data up to the next marker, bytes between segments skipped); stops
    at EOI, or once a count passes its limit (:data:`MAX_JPEG_SCANS`, :data:`MAX_JPEG_SEGMENTS`,
    :data:`MAX_JPEG_STRAY_BYTES`), so its cost is bounded whatever the bytes."""
    pos, scans, segments, stray, n = 2, 0, 0, 0, len(raw)
    while (pos + 1 < n and scans <= MAX_JPEG_SCANS and segments <= MAX_JPEG_SEGMENTS
           and stray <= MAX_JPEG_STRAY_BYTES):
        if raw[pos] != 0xFF:  # not a marker: libjpeg skips to the next 0xFF
            found = raw.find(b"\xff", pos)
            stray += (found if found >= 0 else n) - pos
            if found < 0:
                break
            pos = found
            continue
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill bytes: the run's last 0xFF starts the marker
            end = _FF_RUN.match(raw, pos).end()
            stray += end - 1 - pos
            pos = end - 1
            continue
        if marker == 0x00:  # no marker (a stuffed 0xFF): libjpeg and Pillow discard both bytes and
            stray += 2      # read on; taken for a segment, its "length" skipped up to 64 KiB unread
            pos += 2        # (scans hidden there were decoded, past every limit)
            continue
        segments += 1
        if marker == 0xD9:  # EOI
            break
        elif marker in _JPEG_STANDALONE:
            pos += 2
        else:
            pos += 2 + int.from_bytes(raw[pos + 2:pos + 4], "big")  # past the segment
            if marker == 0xDA:  # and past the scan's data, to the next marker
                scans += 1
                # from pos + 1: the look back may see raw[pos], never a byte before it
                found = _JPEG_NEXT_MARKER.search(raw, pos + 1)
                if found is None:
                    break
                pos = found.start() - 1  # the marker's 0xFF
    return JpegLayout(scans, segments, stray)


def jpeg_refusal(raw: bytes) -> str | None:
    """Why a JPEG's layout is refused before it is decoded (:func:`jpeg_layout`), else None."""
    layout = jpeg_layout(raw)
    if layout.scans > MAX_JPEG_SCANS:
        return f"image is a JPEG of more than {MAX_JPEG_SCANS} scans; the limit is {MAX_JPEG_SCANS}"
    if layout.segments > MAX_JPEG_SEGMENTS:
        return f"image is a JPEG of more than {MAX_JPEG_SEGMENTS} marker segments; the limit is {MAX_JPEG_SEGMENTS}"
    if layout.stray > MAX_JPEG_STRAY_BYTES:
        return (f"image is a JPEG with more than {MAX_JPEG_STRAY_BYTES} bytes of padding between its "
                f"segments; the limit is {MAX_JPEG_STRAY_BYTES}")
    return None


# Pillow reads a PNG's chunks in Python (about 3 us each) and inflates every compressed one it
# meets whole: an ICC profile (iCCP) or a compressed text (zTXt, an iTXt whose flag says so) of
# up to 1 MiB, about 2 ms each. A 1 MiB file of a thousand 1 KiB ICC profiles held it 2.2 s.
# The standard allows one ICC profile, before the image data. Encoders write the image data in
# chunks of 8 KiB or more, or, flushing after every row (streaming writers), one per row.
PNG_CHUNKS_BASE = 256  # chunks, plus one per KiB of the file and one per row (up to PNG_ROW_CHUNKS)
PNG_ROW_CHUNKS = 8192
MAX_PNG_PACKED_CHUNKS = 8  # compressed metadata, all told


def _packed(kind: bytes, body: bytes) -> bool:
    """Whether Pillow inflates this chunk: an ICC profile, a zTXt, an iTXt whose compression
    flag (the byte after its keyword's NUL) is 1."""
    if kind in (b"iCCP", b"zTXt"):
        return True
    if kind == b"iTXt":
        nul = body.find(b"\0", 0, 80)
        return 0 <= nul < len(body) - 1 and body[nul + 1] == 1
    return False


def png_refusal(raw: bytes) -> str | None:
    """Why a PNG's chunk layout is refused before it is decoded, else None: more chunks than
    :data:`PNG_CHUNKS_BASE` plus one per KiB and one per row, more than
    :data:`MAX_PNG_PACKED_CHUNKS` compressed ones, or an ICC profile twice or after the image
    data. Reads chunk headers (lengths and kinds; Pillow checks the rest) and an iTXt's flag,
    at most the limit's number."""
    rows = int.from_bytes(raw[20:24], "big") if raw[12:16] == b"IHDR" else 0
    limit = PNG_CHUNKS_BASE + len(raw) // 1024 + min(rows, PNG_ROW_CHUNKS)
    pos, chunks, packed, pixels_seen, icc = 8, 0, 0, False, False
    while pos + 8 <= len(raw):
        n, kind = int.from_bytes(raw[pos:pos + 4], "big"), raw[pos + 4:pos + 8]
        chunks += 1
        if chunks > limit:
            return f"image is a PNG of more than {limit} chunks; the limit for a file of its size is {limit}"
        if kind == b"IEND":
            break
        if kind == b"IDAT":
            pixels_seen = True
        elif kind == b"iCCP":
            if icc or pixels_seen:
                return "image is not a decodable PNG (an ICC profile twice, or after the image data)"
            icc = True
        if _packed(kind, raw[pos + 8:pos + 8 + min(n, 82)]):
            packed += 1
            if packed > MAX_PNG_PACKED_CHUNKS:
                return (f"image is a PNG of more than {MAX_PNG_PACKED_CHUNKS} compressed metadata chunks "
                        f"(iCCP, zTXt, compressed iTXt); the limit is {MAX_PNG_PACKED_CHUNKS}")
        pos += 12 + n
    return None


# Pillow decodes 2- and 4-bit grey to 0..255 but keeps a tRNS grey as stored (0..3, 0..15),
# so no decoded pixel matched it; 16-bit colour it decodes to the high bytes, and compares a
# tRNS colour's low bytes with them: white turned black, or a transparent colour kept.
_SCALED_GREY = {"L;2": 3, "L;4": 15}


def _transparent_as_decoded(value: object, stored_as: str | None, fail: type[Exception]) -> object:
    """A PNG's transparent colour (tRNS) as a value of the pixels Pillow decoded (``stored_as``:
    how it unpacked them); a 16-bit colour one, which no 8-bit value stands for, is refused."""
    if stored_as in _SCALED_GREY and isinstance(value, int):
        return value * 255 // _SCALED_GREY[stored_as]
    if stored_as is not None and stored_as.startswith("RGB;16") and isinstance(value, tuple):
        raise fail("16-bit colour PNGs with a transparent colour (tRNS) are not accepted: "
                   "send 8 bits per channel, or an alpha channel")
    return value


def load_pixels(raw: bytes, mode: str, max_bytes: int, max_pixels: int, fail: type[Exception],
                stored_size: Callable[[int, int], str | None] = lambda w, h: None) -> np.ndarray:
    """PNG or JPEG bytes decoded, upright and in ``mode``, as uint8 ``[C, H, W]``: both
    decoders' one door (the gateway's, which then resizes, and the handler's, which takes the
    card's size only), so an image is refused, and becomes pixels, alike whichever path it
    takes.

    Every limit is checked before a pixel is decoded. Refusals raise ``fail(message)``:
    empty, over ``max_bytes``, neither PNG nor JPEG by content, no pixels, over
    ``max_pixels`` by the header (and by Pillow's own bomb check), whatever
    ``stored_size(width, height)`` says of the size as stored (None: accepted; it may also
    raise), animated, a layout whose parse alone would cost more than a decode
    (:func:`jpeg_refusal`, :func:`png_refusal`), truncated or corrupt."""
    if not raw:
        raise fail("image is empty")
    if len(raw) > max_bytes:
        raise fail(f"image is {len(raw)} bytes; the limit is {max_bytes}")
    fmt = sniff(raw)
    if fmt is None:
        raise fail("image is neither PNG nor JPEG (checked by content)")

    def check_size(w: int, h: int) -> None:  # the header's size, before any pixel: both decoders
        if w <= 0 or h <= 0:
            raise fail("image has no pixels")
        if w * h > max_pixels:
            raise fail(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        if (refused := stored_size(w, h)) is not None:
            raise fail(refused)

    if (refused := png_refusal(raw) if fmt == "PNG" else jpeg_refusal(raw)) is not None:
        raise fail(refused)  # from the layout alone, before a decoder reads it
    if fmt == "PNG" and (plain := plain_png(raw)) is not None:
        check_size(plain[0], plain[1])
        if (pixels := _decode_plain(raw, plain[2])) is not None:  # no EXIF, no transparency
            return chw(pixels) if plain[2] == mode else image_array(to_mode(Image.fromarray(pixels), mode))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw), formats=[fmt])  # reads the header only
            check_size(*img.size)
            # Never an animation's first frame in silence. A camera's JPEG with a second picture
            # (MPF: a depth map, an HDR gain map) opens as MPO: its first frame is the photo.
            if getattr(img, "n_frames", 1) > 1 and img.format != "MPO":
                raise fail("animated images are not accepted: send one frame")
            stored_as = img.tile[0].args if fmt == "PNG" and img.tile else None  # gone once loaded
            img.load()
            if "transparency" in img.info:
                img.info["transparency"] = _transparent_as_decoded(img.info["transparency"], stored_as, fail)
            return image_array(to_mode(upright(img), mode))
    except fail:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise fail(f"image has too many pixels; the limit is {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, EOFError,  # UnidentifiedImageError is an OSError
            IndexError, KeyError, TypeError, struct.error) as e:  # Pillow's parsers on malformed chunks
        raise fail(f"image is not a decodable {fmt} ({type(e).__name__})") from None


class InputError(ValueError):
    """A client error in one request, with the HTTP-style status it maps to. Its message is
    kept ASCII (others escaped): in a worker batch of several requests it is the response's
    status phrase, whose length TorchServe (0.12, ``create_predict_response``) writes in
    characters and its text in UTF-8 bytes, so a caller's non-ASCII text (a tensor's dtype)
    shifted every field after it and broke the whole batch's answer."""

    def __init__(self, message: str, code: int = 400) -> None:
        message = message.encode("ascii", "backslashreplace").decode("ascii")
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
    """PNG/JPEG bytes -> uint8 ``[C, H, W]`` in the card's mode and size (never resized)."""
    def card_size(w: int, h: int) -> str | None:  # as stored, before decoding; an EXIF turn may swap it
        return None if (spec.w, spec.h) in ((w, h), (h, w)) else f"image is {w}x{h}; the model takes {spec.w}x{spec.h}"

    pixels = load_pixels(raw, spec.mode, spec.max_bytes, spec.max_pixels, InputError, card_size)
    if pixels.shape[1:] != (spec.h, spec.w):
        h, w = pixels.shape[1:]
        raise InputError(f"image is {w}x{h} upright; the model takes {spec.w}x{spec.h}")
    return pixels


def chw(arr: np.ndarray) -> np.ndarray:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> ``[C, H, W]``."""
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def image_array(img: Image.Image) -> np.ndarray:
    """An "L" or "RGB" image -> uint8 ``[C, H, W]``."""
    return chw(np.asarray(img, dtype=np.uint8))


def pixels_image(pixels: np.ndarray) -> Image.Image:
    """uint8 ``[1, H, W]`` or ``[3, H, W]`` -> an "L" or "RGB" image (:func:`image_array`'s inverse)."""
    return Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(pixels.transpose(1, 2, 0))


DTYPES = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}


def shape_text(shape: Sequence[int]) -> str:
    """A tensor's shape for a message: whole up to four dimensions, else its start and its
    length (a caller's shape of millions of entries was quoted whole, megabytes of text)."""
    if len(shape) <= 4:
        return str([int(d) for d in shape])
    return f"[{', '.join(str(int(d)) for d in shape[:3])}, ...] ({len(shape)} dimensions)"


def max_tensor_bytes(spec: InputSpec) -> int:
    """The most bytes a serialized ``robustgate.v1.Tensor`` may take: ``max_bytes`` of data and
    1 KiB for its shape and dtype. Checked before it is parsed (a repeated ``shape`` parses to
    8 bytes for each byte sent), alone and inside a batch item."""
    return spec.max_bytes + 1024


def decode_tensor(raw: bytes, spec: InputSpec) -> np.ndarray:
    """Serialized ``robustgate.v1.Tensor`` -> ``[C, H, W]``: uint8 as sent, or float32 in [0, 1]."""
    if len(raw) > max_tensor_bytes(spec):
        raise InputError(f"tensor is {len(raw):,} bytes; the limit is {max_tensor_bytes(spec):,} "
                         f"({spec.max_bytes:,} bytes of data and 1 KiB for its shape and dtype)")
    try:
        t = probe_pb2.Tensor.FromString(raw)
    except Exception:  # protobuf raises DecodeError, or RuntimeWarning-like errors on garbage
        raise InputError("tensor is not a valid robustgate.v1.Tensor") from None
    return tensor_array(t, spec)


def tensor_array(t: probe_pb2.Tensor, spec: InputSpec) -> np.ndarray:
    """A parsed ``robustgate.v1.Tensor`` -> ``[C, H, W]``, checked as :func:`decode_tensor` does."""
    want = [spec.channels, spec.h, spec.w]
    # copied only when its length can match: a caller's shape may hold millions of entries
    shape = list(t.shape) if len(t.shape) in (2, 3) else None
    if shape is not None and len(shape) == 2:
        shape = [1, *shape]
    if shape != want:
        raise InputError(f"tensor shape {shape_text(t.shape)}; the model takes {want} (or [H, W] for one channel)")
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        raise InputError(f"tensor dtype {t.dtype[:32]!r} is not supported; use 'uint8' or 'float32'")
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
