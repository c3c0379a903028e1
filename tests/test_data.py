import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from model_store import data


def test_loads_real_files_with_expected_splits(fmnist: data.FashionMNIST) -> None:
    assert fmnist.train.images.shape == (55_000, 28, 28)
    assert fmnist.calib.images.shape == (5_000, 28, 28)
    assert fmnist.test.images.shape == (10_000, 28, 28)
    for split in (fmnist.train, fmnist.calib, fmnist.test):
        assert split.images.dtype == np.uint8
        assert set(np.unique(split.labels)) == set(range(10))
    # Fashion-MNIST is balanced: 6,000 training images per class before the split.
    counts = np.bincount(np.concatenate([fmnist.train.labels, fmnist.calib.labels]))
    assert counts.tolist() == [6000] * 10
    assert len(fmnist.sha256) == 64


def test_calibration_split_is_held_out_and_seeded() -> None:
    a, b = data.load(seed=0), data.load(seed=1)
    assert not np.array_equal(a.calib.labels, b.calib.labels) or not np.array_equal(a.calib.images, b.calib.images)
    # No calibration image is a training image (compare raw bytes of each image).
    train = {img.tobytes() for img in a.train.images[:20_000]}
    assert not any(img.tobytes() in train for img in a.calib.images[:500])


def test_to_tensor_is_the_model_input_spec(fmnist: data.FashionMNIST) -> None:
    x = data.to_tensor(fmnist.test.images[:4])
    assert tuple(x.shape) == (4, 1, 28, 28)
    assert x.dtype.is_floating_point and float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_missing_files_name_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(data.DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        data.load(tmp_path)


def test_modified_file_fails_the_sha256_check(tmp_path: Path) -> None:
    for name, _ in data.FILES.values():
        shutil.copy(data.DEFAULT_DIR / name, tmp_path / name)
    labels = tmp_path / data.FILES["test-labels"][0]
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(data.DatasetError, match="sha256"):
        data.load(tmp_path)


def test_test_split_alone_reads_only_its_files(tmp_path: Path, fmnist: data.FashionMNIST) -> None:
    for key in ("test-images", "test-labels"):
        shutil.copy(data.DEFAULT_DIR / data.FILES[key][0], tmp_path / data.FILES[key][0])
    test = data.load_test(tmp_path)  # no training files there: not needed, not read
    np.testing.assert_array_equal(test.images, fmnist.test.images)
    np.testing.assert_array_equal(test.labels, fmnist.test.labels)
    with pytest.raises(data.DatasetError, match="train-images"):
        data.load(tmp_path)
    labels = tmp_path / data.FILES["test-labels"][0]
    labels.write_bytes(gzip.compress(gzip.decompress(labels.read_bytes())[:-1] + b"\x00"))
    with pytest.raises(data.DatasetError, match="sha256"):
        data.load_test(tmp_path)


def test_idx_parser_rejects_bad_headers(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd"))  # float dtype code
    with pytest.raises(data.DatasetError, match="unsigned-byte"):
        data.read_idx(bad)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05ab"))  # says 5 bytes, has 2
    with pytest.raises(data.DatasetError, match="expected 5"):
        data.read_idx(short)
    whole = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x02ab")
    assert data.read_idx(_write(tmp_path / "ok.gz", whole)).tolist() == [97, 98]
    for name, raw, message in [
        ("cut.gz", whole[:-5], "not a whole gzip file"),  # cut short: EOFError inside gzip
        ("plain.idx", b"\x00\x00\x08\x01\x00\x00\x00\x02ab", "not a whole gzip file"),  # not gzip
        ("dims.gz", gzip.compress(b"\x00\x00\x08\x03\x00\x00"), "too short for its 3 dimensions"),
        ("scalar.gz", gzip.compress(b"\x00\x00\x08\x00a"), "at least one dimension"),
        ("huge.gz", gzip.compress(b"\x00\x00\x08\x04" + b"\xff" * 16 + b"ab"), "expected 3402823"),  # no wrap
    ]:
        with pytest.raises(data.DatasetError, match=message):
            data.read_idx(_write(tmp_path / name, raw))


def _write(path: Path, raw: bytes) -> Path:
    path.write_bytes(raw)
    return path
