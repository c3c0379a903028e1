"""The gateway's decode of PNG images: libspng's path for small plain PNGs against Pillow's,
side by side in one process.

    python -m benchmarks.decode_png            # ~15 s
    python -m benchmarks.decode_png --smoke    # a second (the test suite runs this)

``service.decode.decode_image`` (what the gateway runs on every image a client sends) on
Fashion-MNIST test images encoded as clients encode them (Pillow's defaults, as
``service.sample_image`` writes them): at the model's size, in grey and in RGB (converted to
the model's grey), at the plain path's pixel limit (the gateway resizes), and over it (the
control: both rows take Pillow's path, so their ratio shows what the measuring adds). Each
kind once as it is, and once with ``handlers.decode.plain_png`` answering None, so that every
PNG takes Pillow's path, as before libspng's. One caller, the rows in turns of ``--turn-s`` seconds, so
a shared machine's drift falls on each alike.

Writes benchmarks/results/decode_png[-smoke].{md,json}.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

from benchmarks.report import invocation, parser, report_stem, run_facts, write_report
from benchmarks.serving import INTERVAL_NOTE, ab_in_turns

LIBSPNG, PILLOW = "libspng's path", "Pillow's path"
CONTROL = "over the plain limit, Pillow's path in both rows"


def encoded(images: np.ndarray, side: int, rgb: bool = False) -> list[bytes]:
    """Each grey ``[28, 28]`` image as a PNG, ``side`` pixels square (bilinear), RGB if asked."""
    out = []
    for a in images:
        img = Image.fromarray(a)
        if side != a.shape[0]:
            img = img.resize((side, side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        (img.convert("RGB") if rgb else img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.decode_png", __doc__)
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--turn-s", type=float, default=0.1)
    args = p.parse_args(argv)
    if args.smoke:
        args.turns, args.turn_s = 2, 0.01

    from handlers import decode
    from model_store import data
    from service.decode import InputSpec, Limits, decode_image

    images = data.load_test().images[:64]
    kinds = {"28x28 grey (the model's size)": encoded(images, 28),
             "28x28 RGB, to grey": encoded(images, 28, rgb=True),
             "64x64 grey, resized to 28x28": encoded(images, 64),
             f"{CONTROL}: 96x96 grey, resized": encoded(images, 96)}
    spec, limits = InputSpec(), Limits()
    plain = decode.plain_png

    def none(raw: bytes) -> None:
        return None

    def call(pngs: list[bytes], path: str) -> Callable[[int], object]:
        if path == LIBSPNG:
            return lambda i: decode_image(pngs[i % len(pngs)], spec, limits)

        def via_pillow(i: int) -> object:
            decode.plain_png = none  # two attribute stores a call: nothing next to a decode
            try:
                return decode_image(pngs[i % len(pngs)], spec, limits)
            finally:
                decode.plain_png = plain
        return via_pillow

    for kind, pngs in kinds.items():  # the two paths make the same pixels (tests/test_plain_png.py, fully)
        assert (plain(pngs[0]) is None) == kind.startswith(CONTROL), kind
        assert np.array_equal(call(pngs, LIBSPNG)(0), call(pngs, PILLOW)(0)), kind
    calls = {f"{kind}, {path}": call(pngs, path) for kind, pngs in kinds.items() for path in (LIBSPNG, PILLOW)}
    for c in calls.values():
        for i in range(5 if args.smoke else 200):
            c(i)
    pairs = {f"{k}, {PILLOW}": f"{k}, {LIBSPNG}" for k in kinds}  # Pillow's / libspng's, per kind
    measured, ratio, spread = ab_in_turns(calls, args.turns, args.turn_s, pairs, "decode_png")
    rows = [{"image": k, "bytes_mean": round(float(np.mean([len(b) for b in pngs]))),
             "libspng_p50_us": measured[f"{k}, {LIBSPNG}"].p50_ms * 1e3,
             "pillow_p50_us": measured[f"{k}, {PILLOW}"].p50_ms * 1e3,
             "calls": min(measured[f"{k}, {path}"].calls for path in (LIBSPNG, PILLOW)),
             "pillow_over_libspng": ratio[f"{k}, {PILLOW}"], "interval": list(spread[f"{k}, {PILLOW}"])}
            for k, pngs in kinds.items()]
    report = {**run_facts(invocation("benchmarks.decode_png", argv)), "turns": args.turns, "turn_s": args.turn_s,
              "rows": rows}
    write_report(args.out, report_stem("benchmarks.decode_png", args.smoke), report, render(report))
    return 0


def render(r: dict) -> str:
    lines = [f"# The gateway's PNG decode: libspng's path against Pillow's ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r['command']}` (one caller, {r['turns']} turns of {r['turn_s']} s each, the rows in "
             "turns). `service.decode.decode_image` per image, microseconds at the median; Pillow's path: "
             "`handlers.decode.plain_png` off, every PNG through Pillow as before libspng's path. " + INTERVAL_NOTE, "",
             "| PNG | bytes (mean) | libspng's path, µs | Pillow's path, µs | Pillow's / libspng's |",
             "|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['image']} | {x['bytes_mean']} | {x['libspng_p50_us']:.1f} | {x['pillow_p50_us']:.1f} | "
                     f"{x['pillow_over_libspng']:.2f} ({x['interval'][0]:.2f}–{x['interval'][1]:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
