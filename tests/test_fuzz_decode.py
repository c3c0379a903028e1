"""Fuzzing the gateway's decode path in process: every input is either decoded into the model's
spec or refused with InvalidInput, never anything else. CI runs a few hundred examples; set
HYPOTHESIS_PROFILE=nightly for 10,000."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.decode import InputSpec, Limits, decode_image, decode_tensor
from service.errors import InvalidInput
from tests.nasty import corpus

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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
