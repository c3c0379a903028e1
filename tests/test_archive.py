import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from model_store import archive


@pytest.mark.parametrize("fmt,serialized", [("torchscript", "model.pt"), ("onnx", "model.onnx")])
def test_archive_carries_model_card_and_handler(tiny_store: Path, fmt: str, serialized: str) -> None:
    mar = tiny_store / "archives" / f"fmnist-cnn-{fmt}.mar"
    members = archive.archive_members(mar)
    entry = archive.FORMATS[fmt][1]
    for required in (serialized, "card.json", entry, f"handlers/{entry}", "handlers/__init__.py",
                     "robustgate/v1/probe_pb2.py", "MAR-INF/MANIFEST.json"):
        assert required in members, f"{required} missing from {mar.name}: {members}"
    import zipfile

    with zipfile.ZipFile(mar) as z:
        meta = json.loads(z.read("MAR-INF/MANIFEST.json"))
        card = json.loads(z.read("card.json"))
        assert z.read(serialized) == (tiny_store / "fmnist-cnn" / serialized).read_bytes()
    assert meta["model"]["modelName"] == f"fmnist-cnn-{fmt}"
    assert meta["model"]["handler"] == entry
    assert card["name"] == "fmnist-cnn" and len(card["labels"]) == 10
    assert not any(m.endswith((".pyc", ".pkl", ".pickle")) for m in members)


@pytest.fixture
def store_copy(tiny_store: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(tiny_store, dst)
    return dst


def test_manifest_lists_every_artifact_and_verifies(store_copy: Path) -> None:
    entries = archive.verify_manifest(store_copy)
    assert "archives/fmnist-cnn-torchscript.mar" in entries and "fmnist-cnn/model.onnx" in entries


def test_manifest_rejects_a_modified_archive(store_copy: Path) -> None:
    mar = store_copy / "archives" / "fmnist-cnn-onnx.mar"
    raw = bytearray(mar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    mar.write_bytes(bytes(raw))
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: archives/fmnist-cnn-onnx.mar"):
        archive.verify_manifest(store_copy)
    cli = subprocess.run([sys.executable, "-m", "model_store.build", "--verify", "--store", str(store_copy)],
                         capture_output=True, text=True)
    assert cli.returncode == 1 and "sha256 mismatch" in cli.stderr


def test_manifest_rejects_missing_and_unlisted_files(store_copy: Path) -> None:
    (store_copy / "fmnist-cnn" / "model.pt").unlink()
    (store_copy / "archives" / "intruder.mar").write_bytes(b"PK")
    with pytest.raises(archive.ManifestError) as err:
        archive.verify_manifest(store_copy)
    assert "missing: fmnist-cnn/model.pt" in str(err.value)
    assert "not in manifest: archives/intruder.mar" in str(err.value)


def test_an_archive_added_behind_a_symlinked_folder_is_unlisted(store_copy: Path, tmp_path: Path) -> None:
    """A store assembled with links (its archives/ elsewhere) is walked through them: an
    archive added there is not in the manifest, and ``serve start`` would have loaded it."""
    elsewhere = tmp_path / "shared-archives"
    (store_copy / "archives").rename(elsewhere)
    (store_copy / "archives").symlink_to(elsewhere, target_is_directory=True)
    (store_copy / "fmnist-cnn" / "loop").symlink_to(store_copy, target_is_directory=True)  # walked once
    assert "archives/fmnist-cnn-onnx.mar" in archive.verify_manifest(store_copy)  # the listed ones verify
    (elsewhere / "intruder.mar").write_bytes(b"PK")
    with pytest.raises(archive.ManifestError, match="not in manifest: archives/intruder.mar"):
        archive.verify_manifest(store_copy)


def test_a_new_manifest_approves_only_what_the_run_changed(store_copy: Path) -> None:
    """A build or calibration records the whole store again; a file changed by anyone else
    (an archive swapped, one added) must fail that, not be approved with the run's own."""
    mar = store_copy / "archives" / "fmnist-cnn-onnx.mar"
    mar.write_bytes(mar.read_bytes() + b"tampered")
    (store_copy / "fmnist-cnn" / "policy.json").write_text("{}")  # what a calibration rewrites
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: archives/fmnist-cnn-onnx.mar"):
        archive.approve_changes(store_copy, ["fmnist-cnn/policy.json"])
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: archives/fmnist-cnn-onnx.mar"):
        archive.verify_manifest(store_copy)  # and the old manifest was left as it was
    archive.approve_changes(store_copy, ["fmnist-cnn", "archives/fmnist-cnn-onnx.mar"])  # a rebuild of both
    archive.verify_manifest(store_copy)
    (store_copy / "archives" / "intruder.mar").write_bytes(b"PK")
    (store_copy / "fmnist-cnn" / "new-file").write_text("made by the run")
    with pytest.raises(archive.ManifestError, match="not in manifest: archives/intruder.mar"):
        archive.approve_changes(store_copy, ["fmnist-cnn"])


def test_archives_built_from_older_handler_code_are_rebuilt(store_copy: Path) -> None:
    """A store built before a handler change is re-archived (not retrained) by the build command."""
    from model_store import build

    mar = store_copy / "archives" / "fmnist-cnn-onnx.mar"
    assert archive.archive_is_current(mar)
    old = mar.with_suffix(".old")
    mar.rename(old)
    with zipfile.ZipFile(old) as src, zipfile.ZipFile(mar, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            if item.filename == "handlers/base.py":
                body += b"\n# an older handler\n"
            dst.writestr(item, body)
    old.unlink()
    archive.write_manifest(store_copy)
    assert not archive.archive_is_current(mar)
    model_before = archive.sha256_file(store_copy / "fmnist-cnn" / "model.onnx")
    assert build.main(["--store", str(store_copy), "--quiet"]) == 0
    assert archive.archive_is_current(mar)
    assert archive.sha256_file(store_copy / "fmnist-cnn" / "model.onnx") == model_before
    archive.verify_manifest(store_copy)
    assert build.rearchive_if_stale(store_copy, "fmnist-cnn") is False  # now current: nothing to do
