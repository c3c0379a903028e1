"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package (IDX format, gzipped).

Nothing is downloaded: the files come from ``apt-get install dataset-fashion-mnist``,
and their sha256 must match the digests below (the upstream release's files).

Splits (deterministic for a seed):

- ``train``: 55,000 of the 60,000 training images;
- ``calib``: the other 5,000, held out from training for the gate's threshold calibration;
- ``test``: the 10,000 official test images.

Images are ``uint8 [N, 28, 28]``; :func:`to_tensor` turns them into
``float32 [N, 1, 28, 28]`` in ``[0, 1]``, the models' input spec.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model_store.archive import sha256_file

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"

FILES: dict[str, tuple[str, str]] = {
    # split: (file name, sha256)
    "train-images": (
        "train-images-idx3-ubyte.gz",
        "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    ),
    "train-labels": (
        "train-labels-idx1-ubyte.gz",
        "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    ),
    "test-images": (
        "t10k-images-idx3-ubyte.gz",
        "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    ),
    "test-labels": (
        "t10k-labels-idx1-ubyte.gz",
        "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    ),
}

LABELS: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

CALIB_SIZE = 5_000


class DatasetError(RuntimeError):
    """The data files are missing, corrupt or not in IDX format."""


@dataclass(frozen=True)
class Split:
    """One split: ``images`` uint8 [N, 28, 28], ``labels`` int64 [N]."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class FashionMNIST:
    train: Split
    calib: Split
    test: Split
    sha256: str  # one digest over the four source files, for model cards and policies


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file (unsigned-byte data only, at least one dimension) into an array
    of its shape; DatasetError for anything else (not gzip, cut short, a wrong header)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # BadGzipFile is an OSError
        raise DatasetError(f"{path}: not a whole gzip file ({type(e).__name__})") from None
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise DatasetError(f"{path}: not an unsigned-byte IDX file of at least one dimension")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: too short for its {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(dims)  # a Python int: numpy's prod wraps four dimensions of 2^32 - 1
    if len(raw) - header != expected:
        raise DatasetError(f"{path}: {len(raw) - header} data bytes, expected {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def verify(data_dir: Path = DEFAULT_DIR, keys: tuple[str, ...] = tuple(FILES)) -> str:
    """Check that the files of ``keys`` (all four by default) exist with the expected sha256;
    return a combined digest."""
    files = [FILES[k] for k in keys]
    missing = [name for name, _ in files if not (data_dir / name).is_file()]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST files missing in {data_dir}: {', '.join(missing)}. "
            f"Install them with: sudo apt-get install -y {DEBIAN_PACKAGE}"
        )
    combined = hashlib.sha256()
    for name, digest in files:
        actual = sha256_file(data_dir / name)
        if actual != digest:
            raise DatasetError(
                f"{data_dir / name}: sha256 {actual} does not match the expected {digest}; "
                f"reinstall the package: sudo apt-get install --reinstall -y {DEBIAN_PACKAGE}"
            )
        combined.update(digest.encode())
    return combined.hexdigest()


def load(data_dir: Path = DEFAULT_DIR, seed: int = 0, calib_size: int = CALIB_SIZE) -> FashionMNIST:
    """Load, verify and split the data set. The calibration split is drawn with ``seed``."""
    data_dir = Path(data_dir)
    digest = verify(data_dir)
    train = _read_split(data_dir, "train")
    tr_x, tr_y = train.images, train.labels
    order = np.random.default_rng(seed).permutation(tr_x.shape[0])
    calib_idx, train_idx = np.sort(order[:calib_size]), np.sort(order[calib_size:])
    return FashionMNIST(
        train=Split(tr_x[train_idx], tr_y[train_idx]),
        calib=Split(tr_x[calib_idx], tr_y[calib_idx]),
        test=_read_split(data_dir, "test"),
        sha256=digest,
    )


def load_test(data_dir: Path = DEFAULT_DIR) -> Split:
    """The test split alone, its two files verified: for readers that never touch the
    training images (the serving benchmark), which need not read and hash 47 MB."""
    data_dir = Path(data_dir)
    verify(data_dir, ("test-images", "test-labels"))
    return _read_split(data_dir, "test")


def _read_split(data_dir: Path, split: str) -> Split:
    """``split`` ("train" or "test") as its two files hold it (already verified)."""
    images, labels = (read_idx(data_dir / FILES[f"{split}-{kind}"][0]) for kind in ("images", "labels"))
    if images.shape[0] != labels.shape[0]:
        raise DatasetError("image and label counts differ")
    return Split(images, labels.astype(np.int64))


def to_tensor(images: np.ndarray):  # -> torch.Tensor
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28] in [0, 1]."""
    import torch

    return torch.from_numpy(np.array(images, copy=True)).float().div_(255.0).unsqueeze(1)
