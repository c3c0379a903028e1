"""Fuzzing the gateway's decode path in process: every input is either decoded into the model's
spec or refused with InvalidInput, never anything else. CI runs a few hundred examples; set
HYPOTHESIS_PROFILE=nightly for 10,000."""

from __future__ import annotations

import io
import zlib
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from service.decode import InputSpec, Limits, decode_image, decode_tensor
from service.errors import InvalidInput
from tests.nasty import corpus, png_of

SPEC = InputSpec()
LIMITS = Limits(max_bytes=1 << 20, max_pixels=1 << 22)


def _check(out: np.ndarray) -> None:
    assert out.shape == (1, 28, 28) and out.dtype in (np.uint8, np.float32)


@given(st.binary(max_size=4096))
def test_arbitrary_bytes_decode_or_invalid(raw: bytes) -> None:
    try:
        _check(decode_image(raw, SPEC, LIMITS))
    except InvalidInput:
        pass


def _encoded(draw_arr: np.ndarray, mode: str, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(draw_arr, mode).save(buf, format=fmt)
    return buf.getvalue()


@given(st.integers(1, 80), st.integers(1, 80), st.sampled_from(["L", "RGB", "RGBA", "P"]),
       st.sampled_from(["PNG", "JPEG"]), st.integers(0, 2**32 - 1), st.data())
def test_mutated_real_images_decode_or_invalid(w: int, h: int, mode: str, fmt: str, seed: int, data) -> None:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "P": 1, "RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, (h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)
    if fmt == "JPEG" and mode in ("RGBA", "P"):
        mode = "RGB"
        arr = arr[..., :3] if arr.ndim == 3 else np.stack([arr] * 3, -1)
    img = Image.fromarray(arr)  # L, RGB or RGBA from the array's shape
    if mode == "P":
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    raw = bytearray(buf.getvalue())
    # Flip some bytes and maybe truncate: the decoder must never fail any other way.
    for _ in range(data.draw(st.integers(0, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        _check(decode_image(bytes(raw[:cut] if cut else raw), SPEC, LIMITS))
    except InvalidInput:
        pass


@given(st.lists(st.integers(0, 64), max_size=4), st.sampled_from(["uint8", "float32", "float64", "int8", ""]),
       st.binary(max_size=4000))
def test_raw_tensors_decode_or_invalid(shape: list[int], dtype: str, raw: bytes) -> None:
    try:
        out = decode_tensor(shape, dtype, raw, SPEC)
    except InvalidInput:
        return
    _check(out)
    if out.dtype == np.float32:
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", sorted(corpus()))
def test_nasty_corpus(name: str) -> None:
    raw, error = corpus()[name]
    if error is None:
        _check(decode_image(raw, SPEC, Limits()))
    else:
        with pytest.raises(InvalidInput, match=error):
            decode_image(raw, SPEC, Limits())


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    arr = np.full((28, 28), 65535, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")  # mode I;16
    assert decode_image(buf.getvalue(), SPEC, Limits()).min() == 255


def test_sixteen_bit_grey_is_scaled_exactly_in_little_memory() -> None:
    """16-bit grey (and 32-bit "I") to 8 bits: v * 255 // 65535 exactly, negatives 0, and in
    32-bit arithmetic: a 4096x4096 one held 305 MB in 64-bit (17.5 bytes a pixel at the peak,
    numpy's allocations as tracemalloc counts them; now 8.5)."""
    import tracemalloc

    from handlers.decode import to_mode

    values = np.arange(1024 * 1024, dtype=np.uint32) % 65536
    img = Image.fromarray(values.astype(np.uint16).reshape(1024, 1024))
    img.load()
    tracemalloc.start()
    try:
        out = to_mode(img, "L")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert img.mode == "I;16" and peak < 10 * 1024 * 1024, f"{peak / 2**20:.1f} bytes a pixel"
    assert np.array_equal(np.asarray(out).ravel(), (values * 255 // 65535).astype(np.uint8))
    wide = Image.fromarray(np.array([[-5, 0, 255, 70000]], dtype=np.int32), "I")  # over 255: 16-bit scale
    assert np.asarray(to_mode(wide, "L")).tolist() == [[0, 0, 0, 255]]


def test_decoders_are_registered_at_import_not_on_the_first_request() -> None:
    # Left to the first Image.open, PIL's plugin imports added 12 ms to the first request.
    import subprocess
    import sys

    code = ("import service.server\nfrom PIL import Image\n"
            "print('PNG' in Image.OPEN and 'JPEG' in Image.OPEN)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stdout + out.stderr


@pytest.mark.parametrize("depth,stored,transparent,decoded", [
    (2, [3, 2, 1, 0], 3, [0, 170, 85, 0]),
    (2, [3, 2, 1, 0], 2, [255, 0, 85, 0]),
    (4, [15, 8, 0, 15], 15, [0, 136, 0, 0]),
    (1, [1, 0, 1, 0], 1, [0, 0, 0, 0]),
    (8, [255, 7, 0, 7], 7, [255, 0, 0, 0]),
])
def test_a_low_bit_depth_greys_transparent_colour_is_black(depth, stored, transparent, decoded) -> None:
    """Pillow scales 1-, 2- and 4-bit grey to 0..255 but keeps a tRNS grey as stored: the
    transparent colour is compared at the pixels' scale, so it is black as in 8 bits."""
    raw = png_of(np.tile(stored, (28, 7)), depth, 0, (transparent,))
    assert decode_image(raw, SPEC, LIMITS)[0, 0, :4].tolist() == decoded


def test_a_16_bit_colour_pngs_transparent_colour_is_refused_not_guessed() -> None:
    """Pillow keeps 16-bit colour's high bytes and compared a tRNS colour's low bytes with
    them: opaque white turned black. No 8-bit value stands for a 16-bit colour: refused."""
    samples = np.full((28, 28, 3), 65535)
    for trns in ((255, 255, 255), (65535, 65535, 65535)):
        with pytest.raises(InvalidInput, match="16-bit colour PNGs with a transparent colour"):
            decode_image(png_of(samples, 16, 2, trns), InputSpec(channels=3, mode="RGB"), LIMITS)


@pytest.mark.parametrize("mode,white", [("L", 255), ("RGB", (255, 255, 255)), ("LA", (255, 0)),
                                        ("RGBA", (255, 255, 255, 0))])
def test_transparent_pixels_are_black_however_the_png_says_so(mode: str, white) -> None:
    """An alpha channel or a transparent colour (tRNS in a grey or RGB PNG): the model sees
    the same black either way, as on its training data; a grey PNG's tRNS was dropped."""
    buf = io.BytesIO()
    extra = {"transparency": white} if mode in ("L", "RGB") else {}
    Image.new(mode, (28, 28), white).save(buf, format="PNG", **extra)
    assert decode_image(buf.getvalue(), SPEC, LIMITS).max() == 0


def _two_headers_png(side: int = 4096, depth: int = 8) -> bytes:
    """A PNG whose first IHDR says 1x1 and whose second, the one Pillow decodes by, side x side
    (grey, of ``depth`` bits, all black)."""
    import struct
    import zlib

    from tests.nasty import chunk

    ihdr = [struct.pack(">IIBBBBB", w, w, depth, 0, 0, 0, 0) for w in (1, side)]
    rows = zlib.compress(bytes((side * depth // 8 + 1) * side), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr[0]) + chunk(b"IHDR", ihdr[1])
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


@pytest.mark.parametrize("make,pixels", [
    (lambda: _encoded_image("I;16", (4096, 4096), "PNG"), 4096 * 4096),
    (lambda: _two_headers_png(), 4096 * 4096),
    (lambda: _encoded_image("L", (2048, 2048), "JPEG"), 2048 * 2048),
    (lambda: b"\xff\xd8\xff\xd0" + _encoded_image("L", (2048, 2048), "JPEG")[2:], 2048 * 2048),  # RST0 first
], ids=["16-bit png", "png with a second IHDR", "jpeg", "jpeg with a marker without length first"])
def test_decoding_here_stops_at_the_header_its_decoder_reads(make, pixels: int) -> None:
    """The gateway decodes a small image where it runs (the event loop) only if it holds few
    pixels, by the header its decoder reads: before decoding any, NotHere for more."""
    from service.decode import NotHere

    raw, limits = make(), Limits(max_bytes=1 << 20, max_pixels=pixels)
    assert len(raw) < 64 * 1024
    with pytest.raises(NotHere):
        decode_image(raw, SPEC, limits, here_pixels=pixels - 1)
    assert decode_image(raw, SPEC, limits, here_pixels=pixels).shape == (1, 28, 28)


def _encoded_image(mode: str, size: tuple[int, int], fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 200).save(buf, format=fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize("two_headers", [False, True], ids=["16-bit png", "16-bit png behind a 1x1 IHDR"])
def test_a_small_file_declaring_many_pixels_is_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch,
                                                                          two_headers: bool) -> None:
    """A 4096x4096 16-bit PNG of one grey is 32 KB (under the byte threshold) and takes about
    a second to decode: in a thread, other requests go on meanwhile. Also where its first
    IHDR says 1x1 (Pillow decodes by the last)."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    from service import pipeline as pipeline_module
    from service.pipeline import ClassifyInput, Pipeline

    decoded_in: list[int] = []  # the threads where decode_image returned pixels

    def recording_decode(*args, **kwargs):
        out = decode_image(*args, **kwargs)  # NotHere on the loop's thread: not recorded
        decoded_in.append(threading.get_ident())
        return out

    monkeypatch.setattr(pipeline_module, "decode_image", recording_decode)

    raw = _two_headers_png(depth=16) if two_headers else _encoded_image("I;16", (4096, 4096), "PNG")
    limits = Limits(max_bytes=1 << 20, max_pixels=4096 * 4096)
    alone = float("inf")
    for _ in range(2):  # warm
        t0 = time.perf_counter()
        decode_image(raw, SPEC, limits)
        alone = min(alone, time.perf_counter() - t0)
    pipeline = Pipeline(registry=None, backend=None, limits=limits, backend_timeout_s=1.0)  # type: ignore[arg-type]

    async def main() -> float:
        longest, last = 0.0, time.perf_counter()

        async def tick() -> None:
            nonlocal longest, last
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                longest, last = max(longest, now - last), now

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        out = await pipeline._decode(ClassifyInput(model="m", image=raw), SimpleNamespace(input=SPEC),
                                     time.monotonic() + 60)
        await asyncio.sleep(0.02)  # the ticker's next turn measures a stall that just ended
        ticker.cancel()
        assert out.shape == (1, 28, 28)
        return longest

    assert len(raw) < 64 * 1024 and alone > 0.05
    stall = asyncio.run(main())
    assert len(decoded_in) == 1 and decoded_in[0] != threading.get_ident()  # not on the loop's thread
    # The effect, loosely (a loaded machine's scheduling is in it): the loop kept running
    assert stall < alone / 2, f"the event loop stood still {stall:.2f} s of the decode's {alone:.2f} s"


def test_a_long_side_is_decoded_off_the_event_loop() -> None:
    """Few pixels but a side over 256 (8x8192 here): a PNG may carry a chunk per row, each
    parsed in Python, so such an image is not decoded on the event loop; a square one is."""
    from service.decode import NotHere

    limits, here = Limits(max_bytes=1 << 20, max_pixels=4096 * 4096), {"here_pixels": 256 * 256, "here_side": 256}
    for size in ((8, 8192), (8192, 8), (257, 255)):
        with pytest.raises(NotHere):
            decode_image(_encoded_image("L", size, "PNG"), SPEC, limits, **here)
    assert decode_image(_encoded_image("L", (256, 256), "PNG"), SPEC, limits, **here).shape == (1, 28, 28)
    # the side is a bound of its own: pixels alone let a long image through
    assert decode_image(_encoded_image("L", (8, 8192), "PNG"), SPEC, limits, here_pixels=256 * 256).shape == (1, 28, 28)


class _CountingDecodes:
    """``decode_image`` for the pipeline, counting the decodes of big images (those it is asked
    to decode whole, with no ``here_*`` bound) running at once; each takes ``hold_s`` longer, and
    ``meet`` threads wait for each other first (so that a bound is reached, on a slow machine too)."""

    def __init__(self, hold_s: float, meet: int = 1) -> None:
        import threading

        self.lock, self.running, self.most, self.started = threading.Lock(), 0, 0, 0
        self.hold_s, self.barrier = hold_s, threading.Barrier(meet, timeout=10)

    def __call__(self, *args, **kwargs):
        import time

        if kwargs.get("here_pixels") is not None or kwargs.get("here_side") is not None:  # the loop's, the small pool's
            return decode_image(*args, **kwargs)
        with self.lock:
            self.running += 1
            self.started += 1
            self.most = max(self.most, self.running)
        try:
            self.barrier.wait()
            time.sleep(self.hold_s)
            return decode_image(*args, **kwargs)
        finally:
            with self.lock:
                self.running -= 1


def _pipeline(monkeypatch: pytest.MonkeyPatch, decodes: _CountingDecodes, threads: int):
    from service import pipeline as pipeline_module
    from service.pipeline import Pipeline

    monkeypatch.setattr(pipeline_module, "decode_image", decodes)
    return Pipeline(registry=None, backend=None, limits=Limits(), backend_timeout_s=1.0,  # type: ignore[arg-type]
                    decode_threads=threads)


def _decode(pipeline, raw: bytes, within_s: float = 60.0):
    import time
    from types import SimpleNamespace

    from service.pipeline import ClassifyInput

    return pipeline._decode(ClassifyInput(model="m", image=raw), SimpleNamespace(input=SPEC), time.monotonic() + within_s)


BIG = _encoded_image("L", (1100, 1000), "PNG")  # over a million pixels: a big decode


async def _first_decoding(pipeline, decodes: _CountingDecodes):
    """A request for BIG, once its decode runs (its thread's place taken)."""
    import asyncio
    import time

    first = asyncio.create_task(_decode(pipeline, BIG))
    t0 = time.monotonic()
    while not decodes.running and time.monotonic() - t0 < 10:
        await asyncio.sleep(0.01)
    return first


@pytest.mark.parametrize("threads", [1, 2])
def test_big_decodes_at_once_are_bounded_by_decode_threads(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Each big decode may hold hundreds of MB: at most ``decode_threads`` run at once per
    process, the rest wait their turn, and every one is answered."""
    import asyncio

    decodes = _CountingDecodes(hold_s=0.05, meet=threads)
    pipeline = _pipeline(monkeypatch, decodes, threads)

    async def main() -> list:
        return await asyncio.gather(*(_decode(pipeline, BIG) for _ in range(6)))

    assert [o.shape for o in asyncio.run(main())] == [(1, 28, 28)] * 6
    assert decodes.most == threads and decodes.started == 6


def test_a_request_whose_deadline_passed_while_it_waited_is_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose caller set no gRPC deadline (the gateway's request_timeout_s applies)
    waited for a decode thread however long the queue, then decoded its image and only after
    that was answered DEADLINE_EXCEEDED: under overload every decode was of a request already
    lost. It now gives its place back undecoded."""
    import asyncio

    from service.errors import DeadlineExceeded

    decodes = _CountingDecodes(hold_s=0.5)
    pipeline = _pipeline(monkeypatch, decodes, 1)

    async def main() -> None:
        first = await _first_decoding(pipeline, decodes)
        with pytest.raises(DeadlineExceeded):
            await _decode(pipeline, BIG, within_s=0.1)  # its place comes after the first decode's 0.5 s
        assert (await first).shape == (1, 28, 28)
        assert (await _decode(pipeline, BIG)).shape == (1, 28, 28)  # the place it gave back serves

    asyncio.run(main())
    assert decodes.started == 2  # the first and the last: not the one past its deadline


def test_a_cancelled_request_keeps_its_big_decode_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request cancelled (its deadline, its client gone) while its image decodes does not
    free the decode's place: the decode runs on, and holds its memory, until it ends. A
    client sending huge images with 10 ms deadlines started any number of them at once. Those
    cancelled while they wait hold nothing, not even their bytes."""
    import asyncio

    decodes = _CountingDecodes(hold_s=1.0)
    pipeline = _pipeline(monkeypatch, decodes, 1)

    async def main() -> int:
        first = await _first_decoding(pipeline, decodes)
        tasks = [asyncio.create_task(_decode(pipeline, BIG)) for _ in range(4)]
        await asyncio.sleep(0.05)
        for task in (first, *tasks):
            task.cancel()
        await asyncio.gather(first, *tasks, return_exceptions=True)
        late = asyncio.create_task(_decode(pipeline, BIG))  # waits for the cancelled one's decode
        await asyncio.sleep(0.1)
        # while the first decode still runs: nothing handed to the pool's threads waits there
        # (an executor's queued work item keeps its image until a thread takes it off)
        queued = pipeline._big_decodes._threads._work_queue.qsize()
        assert decodes.running == 1 and (await late).shape == (1, 28, 28)
        return queued

    queued = asyncio.run(main())
    # the first ran to its end, the four behind it were dropped with their requests, and the
    # late one came after the first, never beside it
    assert (decodes.most, decodes.started, queued) == (1, 2, 0)


def test_ordinary_images_do_not_wait_behind_huge_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """An image of at most a million pixels has threads of its own, whatever its shape: a
    300x200 one and a 1280x720 frame are answered while the one big-decode thread is busy."""
    import asyncio

    decodes = _CountingDecodes(hold_s=2.0)
    pipeline = _pipeline(monkeypatch, decodes, 1)
    small = _encoded_image("L", (300, 200), "PNG")  # a side over 256: off the loop, not big
    frame = _encoded_image("L", (1280, 720), "PNG")  # a side over 1024, under a million pixels

    async def main() -> list[str]:
        order: list[str] = []

        async def one(name: str, raw: bytes) -> None:
            await _decode(pipeline, raw)
            order.append(name)

        big = asyncio.create_task(one("big", BIG))
        while not decodes.running:
            await asyncio.sleep(0.01)
        await asyncio.gather(big, one("small", small), one("frame", frame))
        return order

    assert asyncio.run(main())[-1] == "big"


def test_jpeg_scans_are_counted_as_a_decoder_meets_them() -> None:
    """Baseline: one scan; progressive: one per FF DA (Pillow writes no EXIF, and a scan's
    data stuffs every FF); an appended copy of the last scan is one more; the count stops at
    its bound, however many there are."""
    from handlers.decode import MAX_JPEG_SCANS, jpeg_layout
    from tests.nasty import many_scans_jpeg

    def scans(raw: bytes) -> int:
        return jpeg_layout(raw).scans

    assert scans(_encoded_image("L", (64, 64), "JPEG")) == 1
    progressive = _encoded_image("RGB", (64, 64), "JPEG", progressive=True)
    assert scans(progressive) == progressive.count(b"\xff\xda") > 1
    base = scans(many_scans_jpeg(0))
    assert scans(many_scans_jpeg(3)) == base + 3
    assert scans(many_scans_jpeg(100_000)) == MAX_JPEG_SCANS + 1
    assert scans(b"\xff\xd8\xff\xd0" + many_scans_jpeg(3)[2:]) == base + 3  # RST0: no length
    padded = many_scans_jpeg(3)
    padded = padded[:2] + b"\xff" * 5 + padded[2:]  # fill bytes before a marker: skipped, counted
    assert jpeg_layout(padded) == replace(jpeg_layout(many_scans_jpeg(3)), stray=5)
    # FF 00 between segments is no marker: decoders discard it and read what follows. Read as a
    # segment, its next two bytes (FF FF) were a length that skipped 64 KiB unread, where
    # thousands of scans decoded past every limit.
    hidden = b"\xff\xd8\xff\x00\xff\xff" + many_scans_jpeg(100_000)[2:]
    assert jpeg_layout(hidden).scans == MAX_JPEG_SCANS + 1
    assert jpeg_layout(b"\xff\xd8\xff\x00\xff\xff" + many_scans_jpeg(3)[2:]) == replace(
        jpeg_layout(many_scans_jpeg(3)), stray=4)  # FF 00, then a fill byte before the real marker


_SCAN_BYTES = st.lists(st.sampled_from([b"\xff", b"\x00", b"\xd0", b"\xd7", b"\xd9", b"\xda", b"\x41"]),
                      max_size=64).map(b"".join)


@given(_SCAN_BYTES, st.integers(0, 64))
def test_a_scans_end_is_the_marker_a_decoder_stops_at(raw: bytes, pos: int) -> None:
    """The scan-end search (linear, by the code byte after a 0xFF) finds the marker the plain
    pattern ``\\xff+`` + code byte finds: its last 0xFF, from the scan's start on."""
    import re

    from handlers.decode import _JPEG_NEXT_MARKER

    plain = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]").search(raw, pos)
    found = _JPEG_NEXT_MARKER.search(raw, pos + 1)
    assert (found.start() - 1 if found else None) == (plain.end() - 2 if plain else None)


def test_a_scan_of_fill_bytes_is_read_in_linear_time() -> None:
    """A JPEG whose scan data is one long run of 0xFF (then 00) was read in quadratic time
    before any limit applied: 64 KiB held the gateway's event loop 17 s, 4 MiB would have
    taken about a day. A megabyte of it must be refused in well under the 30 s given."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("from service.decode import InputSpec, Limits, decode_image\n"
            "from service.errors import InvalidInput\n"
            "raw = b'\\xff\\xd8\\xff\\xda\\x00\\x02' + b'\\xff' * (1 << 20) + b'\\x00'\n"
            "try:\n    decode_image(raw, InputSpec(), Limits())\n"
            "except InvalidInput as e:\n    print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0 and done.stdout.startswith("refused:"), done.stderr[-2000:]


def test_a_jpeg_or_png_whose_layout_costs_more_than_its_pixels_is_refused_and_an_ordinary_one_is_not() -> None:
    """Pillow parses a JPEG's header and a PNG's chunks in Python and inflates every compressed
    PNG chunk it meets: a small file of many segments, padding or ICC profiles held it seconds.
    The limits leave room for what encoders write."""
    from handlers.decode import (MAX_JPEG_SEGMENTS, MAX_JPEG_STRAY_BYTES, MAX_PNG_PACKED_CHUNKS, PNG_CHUNKS_BASE,
                                 jpeg_layout)
    from tests.nasty import jpeg_with, png_with

    comment = b"\xff\xfe\x00\x02"  # an empty COM segment
    base = jpeg_layout(jpeg_with(b"")).segments
    _check(decode_image(jpeg_with(comment * (MAX_JPEG_SEGMENTS - base)), SPEC, LIMITS))
    with pytest.raises(InvalidInput, match=f"more than {MAX_JPEG_SEGMENTS} marker segments"):
        decode_image(jpeg_with(comment * (MAX_JPEG_SEGMENTS - base + 1)), SPEC, LIMITS)
    _check(decode_image(jpeg_with(b"\xff" * MAX_JPEG_STRAY_BYTES), SPEC, LIMITS))
    with pytest.raises(InvalidInput, match=f"more than {MAX_JPEG_STRAY_BYTES} bytes of padding"):
        decode_image(jpeg_with(b"\xff" * (MAX_JPEG_STRAY_BYTES + 1)), SPEC, LIMITS)
    with pytest.raises(InvalidInput, match="bytes of padding"):
        decode_image(jpeg_with(comment + b"\x00" * (MAX_JPEG_STRAY_BYTES + 1)), SPEC, LIMITS)  # junk

    icc = (b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 4096))
    text = (b"zTXt", b"note\0\0" + zlib.compress(b"x" * 4096))
    _check(decode_image(png_with(before=[icc] + [text] * (MAX_PNG_PACKED_CHUNKS - 1)), SPEC, LIMITS))
    with pytest.raises(InvalidInput, match="compressed metadata chunks"):
        decode_image(png_with(before=[icc] + [text] * MAX_PNG_PACKED_CHUNKS), SPEC, LIMITS)
    with pytest.raises(InvalidInput, match="ICC profile twice"):
        decode_image(png_with(before=[icc, icc]), SPEC, LIMITS)
    with pytest.raises(InvalidInput, match="after the image data"):
        decode_image(png_with(after=[(b"iCCP", b"")]), SPEC, LIMITS)  # Pillow: an IndexError
    plain_text = (b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + b"<x/>" * 100)  # uncompressed: not inflated
    packed_text = (b"iTXt", b"note\0\1\0\0\0" + zlib.compress(b"x" * 4096))
    _check(decode_image(png_with(before=[icc] + [plain_text] * (MAX_PNG_PACKED_CHUNKS + 4)), SPEC, LIMITS))
    with pytest.raises(InvalidInput, match="compressed metadata chunks"):
        decode_image(png_with(before=[icc] + [packed_text] * MAX_PNG_PACKED_CHUNKS), SPEC, LIMITS)
    inert = (b"tIME", b"\x07\xea\x0c\x06\x00\x00\x00")
    small = png_with(before=[inert] * (PNG_CHUNKS_BASE - 4))  # with IHDR, IDAT, IEND: within the base
    _check(decode_image(small, SPEC, LIMITS))
    with pytest.raises(InvalidInput, match="chunks; the limit for a file of its size"):
        decode_image(png_with(before=[inert] * (PNG_CHUNKS_BASE + 64)), SPEC, LIMITS)  # + 6 KiB, 28 rows


def test_a_jpeg_of_many_scans_is_refused_before_its_decode_and_one_at_the_limit_is_not() -> None:
    from handlers.decode import MAX_JPEG_SCANS, jpeg_layout
    from tests.nasty import many_scans_jpeg

    extra = MAX_JPEG_SCANS - jpeg_layout(many_scans_jpeg(0)).scans
    assert decode_image(many_scans_jpeg(extra), SPEC, LIMITS).shape == (1, 28, 28)
    with pytest.raises(InvalidInput, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(many_scans_jpeg(extra + 1), SPEC, LIMITS)
    # behind an FF 00 after SOI, which Pillow discards (the same pixels), the count is the same
    hide = b"\xff\xd8\xff\x00\xff\xff"
    assert np.array_equal(decode_image(hide + many_scans_jpeg(extra)[2:], SPEC, LIMITS),
                          decode_image(many_scans_jpeg(extra), SPEC, LIMITS))
    with pytest.raises(InvalidInput, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(hide + many_scans_jpeg(extra + 1)[2:], SPEC, LIMITS)


def test_a_tensor_shape_of_millions_of_entries_is_refused_by_its_length_and_quoted_short() -> None:
    """A Tensor whose shape field holds millions of entries (4 MiB on the wire) was converted
    entry by entry and quoted whole: 0.6 s of the event loop and a 12 MB message per request.
    Its number of dimensions refuses it first; the message quotes its start."""
    from handlers.decode import InputError
    from handlers.decode import InputSpec as CardSpec
    from handlers.decode import tensor_array
    from robustgate.v1 import probe_pb2

    huge = probe_pb2.Tensor(shape=[1] * 2_000_000, dtype="uint8", data=bytes(784))
    with pytest.raises(InvalidInput) as gateway:
        decode_tensor(huge.shape, "uint8", huge.data, InputSpec())
    with pytest.raises(InputError) as handler:
        tensor_array(huge, CardSpec(mode="L", h=28, w=28, max_bytes=1 << 20, max_pixels=1 << 20))
    for err in (gateway.value, handler.value):
        assert "[1, 1, 1, ...] (2000000 dimensions)" in str(err) and len(str(err)) < 200, str(err)[:300]
    with pytest.raises(InvalidInput, match=r"tensor shape \[1, 2, 28, 28\] does not match"):
        decode_tensor([1, 2, 28, 28], "uint8", bytes(784), InputSpec())  # short shapes: whole
    with pytest.raises(InvalidInput) as long_dtype:
        decode_tensor([28, 28], "x" * 100_000, bytes(784), InputSpec())
    assert len(str(long_dtype.value)) < 200
