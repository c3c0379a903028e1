"""``python -m service.sample_image OUT.png [--index N]``: write a Fashion-MNIST test image as
PNG (from Debian's dataset-fashion-mnist), to try the service with."""

import argparse
import sys
from pathlib import Path

from PIL import Image

from model_store import data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.sample_image")
    p.add_argument("out", type=Path)
    p.add_argument("--index", type=int, default=0, help="test-set index (0..9999)")
    args = p.parse_args(argv)
    try:
        test = data.load_test()  # the test files alone: the training set is not read
    except data.DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not 0 <= args.index < len(test.images):
        p.error(f"--index must be in 0..{len(test.images) - 1}")
    try:
        Image.fromarray(test.images[args.index]).save(args.out, format="PNG")  # whatever the name says
    except OSError as e:  # a folder that is not there, not writable
        print(f"error: cannot write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{args.out}: test image {args.index}, label {data.LABELS[test.labels[args.index]]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
