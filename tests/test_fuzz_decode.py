"""Fuzzing the gateway's decode path in process: every input is either decoded into the model's
spec or refused with InvalidInput, never anything else. CI runs a few hundred examples; set
HYPOTHESIS_PROFILE=nightly for 10,000."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from service.decode import InputSpec, Limits, decode_image, decode_tensor
from service.errors import InvalidInput
from tests.nasty import corpus

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


def test_decoders_are_registered_at_import_not_on_the_first_request() -> None:
    # Left to the first Image.open, PIL's plugin imports added 12 ms to the first request.
    import subprocess
    import sys

    code = ("import service.server\nfrom PIL import Image\n"
            "print('PNG' in Image.OPEN and 'JPEG' in Image.OPEN)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stdout + out.stderr


@pytest.mark.parametrize("mode,white", [("L", 255), ("RGB", (255, 255, 255)), ("LA", (255, 0)),
                                        ("RGBA", (255, 255, 255, 0))])
def test_transparent_pixels_are_black_however_the_png_says_so(mode: str, white) -> None:
    """An alpha channel or a transparent colour (tRNS in a grey or RGB PNG): the model sees
    the same black either way, as on its training data; a grey PNG's tRNS was dropped."""
    buf = io.BytesIO()
    extra = {"transparency": white} if mode in ("L", "RGB") else {}
    Image.new(mode, (28, 28), white).save(buf, format="PNG", **extra)
    assert decode_image(buf.getvalue(), SPEC, LIMITS).max() == 0


@pytest.mark.parametrize("mode,size,fmt,options", [
    ("L", (28, 28), "PNG", {}), ("I;16", (4096, 4096), "PNG", {}), ("RGBA", (640, 480), "PNG", {}),
    ("L", (640, 480), "JPEG", {}), ("RGB", (300, 200), "JPEG", {"progressive": True}),
    ("L", (28, 28), "JPEG", {"quality": 10})])
def test_declared_pixels_read_from_the_header(mode: str, size: tuple[int, int], fmt: str, options: dict) -> None:
    from service.decode import declared_pixels

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt, **options)
    assert declared_pixels(buf.getvalue()) == size[0] * size[1]
    assert declared_pixels(buf.getvalue()[:12]) is None  # cut before the header: unknown
    assert declared_pixels(b"not an image") is None


def test_a_small_file_declaring_many_pixels_is_decoded_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4096x4096 16-bit PNG of one grey is 32 KB (under the byte threshold) and takes about
    a second to decode: in a thread, other requests go on meanwhile."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    from service import pipeline as pipeline_module
    from service.pipeline import ClassifyInput, Pipeline

    decoded_in: list[int] = []

    def recording_decode(*args, **kwargs):
        decoded_in.append(threading.get_ident())
        return decode_image(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "decode_image", recording_decode)

    buf = io.BytesIO()
    Image.new("I;16", (4096, 4096), 300).save(buf, format="PNG")
    raw = buf.getvalue()
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
        out = await pipeline._decode(ClassifyInput(model="m", image=raw), SimpleNamespace(input=SPEC))
        await asyncio.sleep(0.02)  # the ticker's next turn measures a stall that just ended
        ticker.cancel()
        assert out.shape == (1, 28, 28)
        return longest

    assert len(raw) < 64 * 1024 and alone > 0.05
    stall = asyncio.run(main())
    assert len(decoded_in) == 1 and decoded_in[0] != threading.get_ident()  # not on the loop's thread
    # The effect, loosely (a loaded machine's scheduling is in it): the loop kept running
    assert stall < alone / 2, f"the event loop stood still {stall:.2f} s of the decode's {alone:.2f} s"
