import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest

from model_store import archive
from tests.conftest import REPO


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
    assert build.main(["--store", str(store_copy), "--quiet", "--no-floor"]) == 0  # a smoke store's model
    assert archive.archive_is_current(mar)
    assert archive.sha256_file(store_copy / "fmnist-cnn" / "model.onnx") == model_before
    archive.verify_manifest(store_copy)
    assert build.rearchive_if_stale(store_copy, "fmnist-cnn") is False  # now current: nothing to do


def test_an_archiver_that_fails_leaves_the_archives_as_they_were_and_says_why(
        store_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Re-archiving wrote straight over the store's archives, and a failing archiver left a
    traceback that dropped its stderr; the store then failed verification (found by review)."""
    from model_store import build

    before = {p.name: archive.sha256_file(p) for p in (store_copy / "archives").glob("*.mar")}
    real_build = archive.build_archive
    made: list[str] = []
    card_only = tmp_path / "fmnist-cnn"  # the card, no weights: the archiver fails
    card_only.mkdir()
    shutil.copy(store_copy / "fmnist-cnn" / "card.json", card_only / "card.json")

    def second_fails(model_dir, fmt, export_dir, *args, **kwargs):
        if made:  # the first archive is written, then the archiver fails on the second
            return real_build(card_only, fmt, export_dir, *args, **kwargs)
        made.append(fmt)
        return real_build(model_dir, fmt, export_dir, *args, **kwargs)

    monkeypatch.setattr(archive, "build_archive", second_fails)
    monkeypatch.setattr(archive, "archive_is_current", lambda path: False)
    assert build.main(["--store", str(store_copy), "--quiet", "--no-floor"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    archive.verify_manifest(store_copy)  # untouched
    assert {p.name: archive.sha256_file(p) for p in (store_copy / "archives").glob("*.mar")} == before
    assert not list(store_copy.glob(".fmnist-cnn-staging-*"))
    # the archiver's own failure, with its reason
    with pytest.raises(archive.ManifestError, match=r"could not write fmnist-cnn-onnx.mar .*\(exit \d+\): FileNotFoundError.*model.onnx"):
        real_build(card_only, "onnx", tmp_path / "out")


def test_a_change_made_while_a_run_writes_is_not_approved(store_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new manifest keeps the digests the run verified before it wrote: a card changed
    while the archives were being rebuilt is caught, not hashed into the new manifest."""
    from model_store import build

    card = store_copy / "fmnist-cnn" / "card.json"
    real_build = archive.build_archive

    def build_while_someone_edits(*args, **kwargs):  # the seconds model-archiver runs
        card.write_text(card.read_text().replace('"T-shirt/top"', '"TAMPERED"'))
        return real_build(*args, **kwargs)

    monkeypatch.setattr(archive, "build_archive", build_while_someone_edits)
    monkeypatch.setattr(archive, "archive_is_current", lambda path: False)
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: fmnist-cnn/card.json"):
        build.rearchive_if_stale(store_copy, "fmnist-cnn")
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: fmnist-cnn/card.json"):
        archive.verify_manifest(store_copy)


def test_a_broken_manifest_is_a_manifest_error_and_is_replaced_whole(store_copy: Path) -> None:
    from model_store import build

    manifest = store_copy / archive.MANIFEST
    good = manifest.read_text()
    for broken in (good[: len(good) // 2], '{"sha256": ["a"]}', '{"version": 1}', '{"sha256": {"a": 1}}'):
        manifest.write_text(broken)
        with pytest.raises(archive.ManifestError, match="is not a readable manifest"):
            archive.verify_manifest(store_copy)
        assert build.main(["--store", str(store_copy), "--verify"]) == 1  # a message, not a traceback
        assert not build.is_built(store_copy, "fmnist-cnn")
    manifest.write_text(good)
    archive.write_manifest(store_copy)
    assert [p.name for p in store_copy.iterdir() if p.name.startswith(".")] == []  # no temporary left
    assert oct(manifest.stat().st_mode & 0o777) == "0o644"


def test_only_the_stores_own_manifest_is_left_out(store_copy: Path) -> None:
    """A file named manifest.json anywhere but the store's root is an artifact like any other."""
    (store_copy / "archives" / archive.MANIFEST).write_text("{}")
    (store_copy / "fmnist-cnn" / archive.MANIFEST).write_text("{}")
    with pytest.raises(archive.ManifestError) as err:
        archive.verify_manifest(store_copy)
    assert "not in manifest: archives/manifest.json" in str(err.value)
    assert "not in manifest: fmnist-cnn/manifest.json" in str(err.value)


def _rebuild_options(store: Path, check_floor: bool):
    from model_store import build

    return build.BuildOptions(store=store, sweep_limit=50, parity_limit=100, check_floor=check_floor,
                              progress=False, overrides={"epochs": 1, "limit": 300})


def test_a_rebuild_that_fails_its_checks_leaves_the_built_model_as_it_was(
        store_copy: Path, fmnist, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the accuracy floor nothing is written (before, the failed model was approved by
    the manifest, and the next build took it as built); a failed parity check leaves the
    model that was there, its archives and its manifest untouched."""
    from model_store import build, export

    before = archive.verify_manifest(store_copy)
    with pytest.raises(build.BuildError, match="below the floor"):  # 300 images, 1 epoch: far below
        build.build_model("fmnist-cnn", _rebuild_options(store_copy, check_floor=True), dataset=fmnist)
    assert archive.verify_manifest(store_copy) == before

    real_parity = export.parity

    def failing_parity(*args, **kwargs):
        reports = real_parity(*args, **kwargs)
        import dataclasses

        return {**reports, "onnx": dataclasses.replace(reports["onnx"], max_logit_diff=1.0)}  # a broken export

    monkeypatch.setattr(export, "parity", failing_parity)
    with pytest.raises(build.BuildError, match="export parity failed"):
        build.build_model("fmnist-cnn", _rebuild_options(store_copy, check_floor=False), dataset=fmnist)
    assert archive.verify_manifest(store_copy) == before
    assert build.is_built(store_copy, "fmnist-cnn")
    assert [p.name for p in store_copy.iterdir() if p.name.startswith(".")] == []  # no staging left

    def parity_while_someone_adds_an_archive(*args, **kwargs):  # the store changes during the build
        (store_copy / "archives" / "intruder.mar").write_bytes(b"PK")
        return real_parity(*args, **kwargs)

    monkeypatch.setattr(export, "parity", parity_while_someone_adds_an_archive)
    with pytest.raises(archive.ManifestError, match="not in manifest: archives/intruder.mar"):
        build.build_model("fmnist-cnn", _rebuild_options(store_copy, check_floor=False), dataset=fmnist)
    (store_copy / "archives" / "intruder.mar").unlink()
    assert archive.verify_manifest(store_copy) == before  # the built model was not replaced
    assert [p.name for p in store_copy.iterdir() if p.name.startswith(".")] == []


def test_a_rebuild_replaces_the_model_and_records_only_its_files(store_copy: Path, fmnist) -> None:
    """A rebuild over a built store moves the new model and archives in, hashes those anew and
    keeps the rest as verified; nothing of its staging folder is left or listed."""
    from model_store import build

    before = archive.verify_manifest(store_copy)
    (store_copy / "other").mkdir()
    (store_copy / "other" / "card.json").write_text("{}")  # another model's file, approved by its run
    archive.approve_changes(store_copy, ["other"])
    build.build_model("fmnist-cnn", _rebuild_options(store_copy, check_floor=False), dataset=fmnist)
    after = archive.verify_manifest(store_copy)
    assert after["other/card.json"] == archive.sha256_file(store_copy / "other" / "card.json")
    assert after["fmnist-cnn/model.pt"] != before["fmnist-cnn/model.pt"]  # 300 images, 1 epoch: new weights
    assert not any(rel.startswith(".") for rel in after)
    assert [p.name for p in store_copy.iterdir() if p.name.startswith(".")] == []


def test_a_change_is_written_only_when_the_rest_of_the_store_verifies(store_copy: Path) -> None:
    """``approve_changes(write=...)``: verify, then write, then record; a store that does
    not verify is left as it was, the write never run."""
    policy = store_copy / "fmnist-cnn" / "policy.json"
    written: list[str] = []

    def save() -> None:
        written.append("policy")
        policy.write_text('{"new": true}')

    card = store_copy / "fmnist-cnn" / "card.json"
    original = card.read_bytes()
    card.write_bytes(original + b" ")
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: fmnist-cnn/card.json"):
        archive.approve_changes(store_copy, ["fmnist-cnn/policy.json"], write=save)
    assert written == []
    card.write_bytes(original)
    archive.approve_changes(store_copy, ["fmnist-cnn/policy.json"], write=save)
    assert written == ["policy"]
    assert archive.verify_manifest(store_copy)["fmnist-cnn/policy.json"] == archive.sha256_file(policy)


def _rezip(src: Path, dst: Path, extra: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    """A copy of the archive ``src`` at ``dst`` with ``extra`` members appended."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for item in z.infolist():
            out.writestr(item, z.read(item))
        for info, body in extra:
            if isinstance(info, str) and info in {i.filename for i in z.infolist()}:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "Duplicate name": that is the point
                    out.writestr(info, body)
            else:
                out.writestr(info, body)
    return dst


def test_an_archive_that_is_not_plain_files_is_refused(tiny_store: Path, tmp_path: Path) -> None:
    """TorchServe unpacks what it serves: a manifest's hash says an archive is the one written,
    not that it is safe to unpack."""
    good = tiny_store / "archives" / "fmnist-cnn-onnx.mar"
    archive.check_archive(good)  # what the build makes passes
    link = zipfile.ZipInfo("handlers/evil.py")
    link.external_attr = (0o120777 << 16)  # a symlink entry
    cases = {
        "outside": ("../../escaped.py", b"x", "would unpack outside"),
        "absolute": ("/etc/cron.d/x", b"x", "would unpack outside"),
        "symlink": (link, b"/etc/passwd", "is not a plain file"),
        "twice": ("handlers/base.py", b"# another handler", "is in it twice"),
    }
    for name, (member, body, message) in cases.items():
        bad = _rezip(good, tmp_path / f"{name}.mar", [(member, body)])
        with pytest.raises(archive.UnsafeArchive, match=message):
            archive.check_archive(bad)
    bomb = _rezip(good, tmp_path / "bomb.mar", [("padding.bin", b"\0" * (8 << 20))])
    assert bomb.stat().st_size < good.stat().st_size + (1 << 20)  # 8 MiB of zeros pack small
    archive.check_archive(bomb)
    with pytest.raises(archive.UnsafeArchive, match="unpacks to"):
        archive.check_archive(bomb, max_unpacked_bytes=4 << 20)
    with pytest.raises(archive.UnsafeArchive, match="not a readable zip"):
        archive.check_archive(tmp_path / "twice.mar.missing")


def _zip(members: list[tuple[str, bytes]], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name" where a case wants one
        for name, body in members:
            z.writestr(name, body)
    return buf.getvalue()


def test_an_archive_whose_entries_say_what_its_directory_does_not_is_refused(tmp_path: Path) -> None:
    """TorchServe's Java unpacker reads the entries' own headers one after another, Python
    the central directory: an archive must read the same both ways (found by review)."""
    plain = _zip([("MAR-INF/MANIFEST.json", b"{}"), ("handlers/a.py", b"x = 1\n")])
    archive.check_members(zipfile.ZipFile(io.BytesIO(plain)))  # the same, read both ways
    # an entry in front that the directory does not list: Java would unpack it, unseen
    hidden = _zip([("handlers/evil.py", b"import os\n")])
    hidden = hidden[:hidden.index(b"PK\x01\x02")]
    # a deflated entry whose stream runs on far past the size its headers give
    bomb = bytearray(_zip([("a.bin", b"\0" * (4 << 20))]))
    struct.pack_into("<I", bomb, 22, 10)  # the entry's own header
    struct.pack_into("<I", bomb, bomb.index(b"PK\x01\x02") + 24, 10)  # the directory's
    # the entry's own name differs from the directory's (Java unpacks by the entry's)
    renamed = bytearray(plain)
    at = renamed.index(b"handlers/a.py")  # the first: the entry's header, before the directory
    renamed[at:at + 13] = b"handlers/b.py"
    # a stored entry's bytes changed after the CRC was taken
    flipped = bytearray(_zip([("a.txt", b"hello")], zipfile.ZIP_STORED))
    flipped[30 + 5] ^= 0xFF
    # bytes between the last entry and the directory, the directory's offset moved to match
    cd = plain.index(b"PK\x01\x02")
    gap = bytearray(plain[:cd] + b"junk" + plain[cd:])
    end = gap.rindex(b"PK\x05\x06")
    struct.pack_into("<I", gap, end + 16, cd + 4)
    # a NUL in a name (both headers): Python's zipfile cuts the name there, other unpackers may not
    nul = _zip([("handlers/a.py", b"x = 1\n"), ("handlers/aZ/../../../evil.py", b"")]).replace(b"aZ/", b"a\0/")
    # a name flagged UTF-8 that is not: zipfile raised UnicodeDecodeError, a traceback for the user
    utf = bytearray(_zip([("handlers/Z.py", b"x = 1\n")]).replace(b"/Z.py", b"/\xff.py"))
    at = utf.index(b"PK\x01\x02")
    struct.pack_into("<H", utf, at + 8, struct.unpack_from("<H", utf, at + 8)[0] | 0x800)
    cases = {
        "nul": (nul, "has a NUL in its name"),
        "not utf-8": (bytes(utf), "not a readable zip archive"),
        "hidden": (hidden + plain, "bytes no entry accounts for"),
        "bomb": (bytes(bomb), "unpacks to more than its stated 10 bytes"),
        "renamed": (bytes(renamed), "is named 'handlers/b.py' in its own header"),
        "flipped": (bytes(flipped), "does not unpack to its stated size and CRC"),
        "gap": (bytes(gap), r"\+4 bytes no entry accounts for before its directory"),
        "dot-slash twin": (_zip([("handlers/a.py", b"1"), ("./handlers/a.py", b"2")]), "is in it twice"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.mar"
        path.write_bytes(data)
        with pytest.raises(archive.UnsafeArchive, match=message):
            archive.check_archive(path)


def test_serve_and_the_gateway_refuse_an_unsafe_archive_the_manifest_lists(store_copy: Path, tmp_path: Path) -> None:
    from model_store import serve
    from service.errors import PolicyMismatch
    from service.registry import read_archive_limits

    mar = store_copy / "archives" / "fmnist-cnn-onnx.mar"
    _rezip(mar, tmp_path / "bad.mar", [("../../escaped.py", b"x")]).replace(mar)
    archive.write_manifest(store_copy)  # listed: whoever rewrote it approved it
    settings = serve.ServeSettings.on_free_ports(store=store_copy, run_dir=tmp_path / "run")
    with pytest.raises(archive.UnsafeArchive, match="would unpack outside") as err:
        serve.start(settings)  # refused before TorchServe is started
    assert serve.attach(tmp_path / "run") is None
    # the run dir's copy was checked; the message names the store's file, the one to rebuild
    assert str(mar) in str(err.value) and str(tmp_path / "run") not in str(err.value)
    assert not serve.staged_archives(tmp_path / "run").exists()  # no copy left
    with pytest.raises(PolicyMismatch, match="would unpack outside"):
        read_archive_limits(mar)


def _replaced(src: Path, dst: Path, member: str, body: bytes) -> Path:
    """A copy of the archive ``src`` at ``dst`` with ``member``'s content replaced."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as out:
        for item in z.infolist():
            out.writestr(item, body if item.filename == member else z.read(item))
    return dst


def test_an_archive_whose_manifest_runs_other_code_or_weights_is_refused(default_store: Path, tmp_path: Path) -> None:
    """The card's weights inside, but MAR-INF/MANIFEST.json naming another handler (which
    loads other weights, added beside them): the weights check passed, TorchServe would run
    the other handler. The manifest must name the format's own files, and no file the build
    does not put there may ride along."""
    src = default_store / "archives" / "fmnist-cnn-onnx.mar"
    model_dir = default_store / "fmnist-cnn"
    archive.check_archive_model(src, model_dir)  # as built
    with zipfile.ZipFile(src) as z:
        manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
    manifest["model"]["handler"] = "other_handler.py"
    (tmp_path / "a").mkdir()
    renamed = _replaced(src, tmp_path / "a" / "fmnist-cnn-onnx.mar", "MAR-INF/MANIFEST.json",
                        json.dumps(manifest).encode())
    with zipfile.ZipFile(renamed, "a") as z:
        z.writestr("other_handler.py", "import torch\n")
    with pytest.raises(archive.UnsafeArchive, match="names 'model.onnx' run by 'other_handler.py'"):
        archive.check_archive_model(renamed, model_dir)
    (tmp_path / "b").mkdir()
    extra = shutil.copy(src, tmp_path / "b" / "fmnist-cnn-onnx.mar")
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr("other.pt", b"weights")
    with pytest.raises(archive.UnsafeArchive, match="holds files no build puts there: other.pt"):
        archive.check_archive_model(Path(extra), model_dir)
    from benchmarks.serving import batching_store  # its config keeps its own file name: allowed
    batching = batching_store(default_store, "fmnist-cnn", tmp_path / "batching")
    archive.check_archive_model(batching / "archives" / "fmnist-cnn-onnx.mar", batching / "fmnist-cnn")
    for config in ("onnxruntime.py", "sub/model-config.yaml", ["model-config.yaml"]):  # a module the handler imports
        manifest["model"].update(handler="onnx_handler.py", configFile=config)
        (tmp_path / "d").mkdir(exist_ok=True)
        smuggled = _replaced(src, tmp_path / "d" / "fmnist-cnn-onnx.mar", "MAR-INF/MANIFEST.json",
                             json.dumps(manifest).encode())
        with pytest.raises(archive.UnsafeArchive, match="names the config"):
            archive.check_archive_model(smuggled, model_dir)
    (tmp_path / "c").mkdir()  # an onnx archive under the torchscript name
    with pytest.raises(archive.UnsafeArchive, match="not a torchscript archive's"):
        archive.check_archive_model(Path(shutil.copy(src, tmp_path / "c" / "fmnist-cnn-torchscript.mar")), model_dir)


@pytest.mark.parametrize("member", ["model.onnx", "card.json"])
def test_serve_and_the_gateway_refuse_an_archive_serving_another_model_than_its_card(
        calibrated_store: Path, tmp_path: Path, member: str) -> None:
    """The manifest says only that a file is one a build wrote: an archive rebuilt from other
    weights (or carrying another card) with the manifest rewritten was served, under a policy
    calibrated for the card's model. TorchServe's start and the gateway's now hash the served
    file inside the archive against the card, and the card it carries against the store's."""
    from model_store import serve
    from service.errors import PolicyMismatch
    from service.registry import Registry

    store_copy = tmp_path / "store"
    shutil.copytree(calibrated_store, store_copy)
    mar = store_copy / "archives" / "fmnist-cnn-onnx.mar"
    with zipfile.ZipFile(mar) as z:
        body = z.read(member)
    _replaced(mar, tmp_path / "other.mar", member, body + b" ").replace(mar)
    archive.write_manifest(store_copy)  # listed: whoever rewrote it approved it
    why = "serves a model.onnx other than" if member == "model.onnx" else "carries another card.json than"
    settings = serve.ServeSettings.on_free_ports(store=store_copy, run_dir=tmp_path / "run",
                                                 models=("fmnist-cnn-onnx",))
    with pytest.raises(archive.UnsafeArchive, match=why):
        serve.start(settings)  # refused before TorchServe is started
    assert serve.attach(tmp_path / "run") is None
    registry = Registry.load(store_copy, ("fmnist-cnn",), "onnx")
    registry.check_archive_models(store_copy, "torchscript")  # the other archive is the card's
    with pytest.raises(PolicyMismatch, match=why):
        registry.check_archive_models(store_copy, "onnx")


def test_the_gateway_reads_only_a_card_weights_and_archive_the_manifest_lists(calibrated_store: Path,
                                                                             tmp_path: Path) -> None:
    """A card edited after the build (labels swapped: callers would read wrong class names)
    fails the gateway's start; a policy replaced (as a deployment mounts its own) does not."""
    from service.errors import GatewayError
    from service.registry import Registry

    store_copy = tmp_path / "store"
    shutil.copytree(calibrated_store, store_copy)

    assert Registry.load(store_copy, ("fmnist-cnn",), "onnx").get("fmnist-cnn").labels[0] == "T-shirt/top"
    policy = store_copy / "fmnist-cnn" / "policy.json"
    policy.write_text(policy.read_text().replace('"mode": "enforce"', '"mode": "monitor"'))
    assert Registry.load(store_copy, ("fmnist-cnn",), "onnx").get("fmnist-cnn").policy.mode.value == "monitor"
    card = store_copy / "fmnist-cnn" / "card.json"
    card.write_text(card.read_text().replace('"T-shirt/top"', '"Trouser?"'))
    with pytest.raises(GatewayError, match="sha256 mismatch: fmnist-cnn/card.json"):
        Registry.load(store_copy, ("fmnist-cnn",), "onnx")
    (store_copy / archive.MANIFEST).unlink()
    with pytest.raises(GatewayError, match="manifest.json is missing"):
        Registry.load(store_copy, ("fmnist-cnn",), "onnx")


def test_the_gateway_reads_each_served_file_once_and_holds_the_weights_to_the_card(
        calibrated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights verified against the manifest are compared with the card by that digest,
    not read again; weights the manifest approved but the card does not name still fail."""
    from service import registry
    from service.errors import PolicyMismatch

    store_copy = tmp_path / "store"
    shutil.copytree(calibrated_store, store_copy)
    read: list[str] = []
    real = archive.sha256_file

    def counting(path: Path) -> str:
        read.append(Path(path).relative_to(store_copy).as_posix())
        return real(path)

    monkeypatch.setattr(archive, "sha256_file", counting)
    monkeypatch.setattr(registry, "sha256_file", counting)
    registry.Registry.load(store_copy, ("fmnist-cnn",), "onnx")
    assert sorted(read) == ["archives/fmnist-cnn-onnx.mar", "fmnist-cnn/card.json", "fmnist-cnn/model.pt"]

    weights = store_copy / "fmnist-cnn" / "model.pt"
    weights.write_bytes(weights.read_bytes() + b"\0")  # other weights, approved by a manifest rewrite
    archive.write_manifest(store_copy)
    with pytest.raises(PolicyMismatch, match="does not match its card's sha256"):
        registry.Registry.load(store_copy, ("fmnist-cnn",), "onnx")


def test_calibration_refuses_a_store_that_does_not_verify(store_copy: Path) -> None:
    """Checked before TorchServe is called (the address here serves nothing) and before the
    policy is replaced."""
    import asyncio

    from service import calibration

    policy = store_copy / "fmnist-cnn" / "policy.json"
    card = store_copy / "fmnist-cnn" / "card.json"
    card.write_text(card.read_text() + " ")
    before = policy.read_bytes() if policy.exists() else None
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: fmnist-cnn/card.json"):
        asyncio.run(calibration.calibrate(store_copy, "fmnist-cnn", "127.0.0.1:1", store_copy / "no-key.json",
                                          images=10, log=lambda *a: None))
    assert (policy.read_bytes() if policy.exists() else None) == before


def test_torchserve_listens_on_loopback_only() -> None:
    from model_store import serve

    for host in ("127.0.0.1", "127.0.0.2", "localhost"):
        serve.ServeSettings(host=host)
    for host in ("0.0.0.0", "10.0.0.7", "::", "example.com", "127.0.0.1\nplugins_path=/tmp"):
        with pytest.raises(ValueError, match="loopback"):
            serve.ServeSettings(host=host)
    assert serve.main(["start", "--host", "0.0.0.0"]) == 2


def test_a_build_clears_what_an_interrupted_one_left_and_checks_the_store_before_training(
        store_copy: Path, fmnist) -> None:
    """A killed build leaves its staging folder (and perhaps a manifest's temporary file) in
    the store, which then fails verification; the next build of that model removes them. A
    store the build could not approve (a file no run wrote) fails before minutes of training."""
    from model_store import build

    staged = store_copy / ".fmnist-cnn-staging-abc123" / "fmnist-cnn"
    staged.mkdir(parents=True)
    (staged / "model.pt").write_bytes(b"half an export")
    (store_copy / ".manifest.json.x1y2").write_text("{")
    with pytest.raises(archive.ManifestError, match="not in manifest: .fmnist-cnn-staging-abc123"):
        archive.verify_manifest(store_copy)
    with pytest.raises(build.BuildError, match="below the floor"):
        build.build_model("fmnist-cnn", _rebuild_options(store_copy, check_floor=True), dataset=fmnist)
    archive.verify_manifest(store_copy)  # cleared; the built model untouched

    (store_copy / "archives" / "intruder.mar").write_bytes(b"PK")
    start = time.monotonic()
    assert build.main(["--store", str(store_copy), "--force", "--quiet"]) == 1
    assert time.monotonic() - start < 30  # refused before training (which takes minutes)
    (store_copy / "archives" / "intruder.mar").unlink()
    (store_copy / archive.MANIFEST).write_text("{")
    assert build.main(["--store", str(store_copy), "--force", "--quiet"]) == 1  # a message, no traceback


def test_a_build_of_a_model_already_built_clears_an_interrupted_runs_leftovers(store_copy: Path) -> None:
    """A re-archiving or build interrupted (Ctrl-C in run.sh) left its staging folder; the
    next build found the model built and skipped it, and every later start failed
    verification on the folder (found by review)."""
    from model_store import build

    (store_copy / ".fmnist-cnn-staging-k1" / "archives").mkdir(parents=True)
    (store_copy / ".fmnist-cnn-staging-k1" / "archives" / "fmnist-cnn-onnx.mar").write_bytes(b"half")
    with pytest.raises(archive.ManifestError, match="not in manifest: .fmnist-cnn-staging-k1"):
        archive.verify_manifest(store_copy)
    assert build.main(["--store", str(store_copy), "--quiet", "--no-floor"]) == 0  # already built: nothing trained
    archive.verify_manifest(store_copy)
    # another model's: a killed build of it left a folder that failed this store's verification,
    # and only its own next build (an hour, for the ResNet) cleared it
    (store_copy / ".fmnist-resnet18-staging-k2").mkdir()
    (store_copy / ".fmnist-resnet18-staging-k2" / "model.pt").write_bytes(b"half")
    assert build.main(["--store", str(store_copy), "--quiet", "--no-floor"]) == 0
    archive.verify_manifest(store_copy)


def test_a_model_built_below_its_floor_is_built_again(store_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A smoke build into the default store (--no-floor, a few epochs) was taken as built by
    every later plain build, and run.sh served it. A model whose card is below its preset's
    floor is built again, unless the floor is waived this time too. (The store here is such a
    smoke build: the build itself is stood in for.)"""
    from model_store import build

    card = json.loads((store_copy / "fmnist-cnn" / "card.json").read_text())
    assert card["accuracy"]["test"] < build.PRESETS["fmnist-cnn"].floor
    built: list[str] = []
    monkeypatch.setattr(build, "build_model", lambda name, opts, dataset=None: built.append(name))
    assert build.main(["--store", str(store_copy), "--quiet", "--no-floor"]) == 0
    assert built == []
    assert build.main(["--store", str(store_copy), "--quiet"]) == 0
    assert built == ["fmnist-cnn"]
    assert "is below its accuracy floor (test top-1 " in capsys.readouterr().out


def test_accuracy_is_a_count_not_a_float32_mean() -> None:
    """9 of 10 right was 0.8999999761581421 (a float32 mean), below a 0.90 floor."""
    import numpy as np
    import torch

    from model_store import evaluate
    from model_store.data import Split

    class Bright(torch.nn.Module):  # class 0 for an image with a bright pixel
        def forward(self, x):
            return torch.cat([x.flatten(1).sum(1, keepdim=True), torch.full((x.shape[0], 1), 0.5)], 1), None

    images = np.zeros((10, 28, 28), np.uint8)
    images[:9, 0, 0] = 255
    assert evaluate.accuracy(Bright(), Split(images, np.zeros(10, np.int64))) == 0.9


def test_a_build_stopped_by_sigterm_runs_its_cleanup(tmp_path: Path) -> None:
    """SIGTERM (timeout, docker stop, a CI's cancel) killed a build where Ctrl-C ran its
    finally blocks (a staging folder left to fail the store's verification): it is Ctrl-C now.
    Sent while the model is exported into its staging folder."""
    proc = subprocess.Popen([sys.executable, "-m", "model_store.build", "--store", str(tmp_path / "store"),
                             "--epochs", "1", "--limit", "20000", "--no-floor"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "exporting" in line:
                break
        assert list((tmp_path / "store").glob(".*-staging-*"))
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130  # KeyboardInterrupt's exit, not -15
    assert not list((tmp_path / "store").glob(".*-staging-*"))


@pytest.mark.parametrize("flag, value, says", [
    ("--epochs", "0", "'0' is below 1"),  # OneCycleLR's ValueError, as a traceback
    ("--limit", "-5", "'-5' is below 1"),  # trained on all but 5 images, in silence
    ("--seed", "-1", "'-1' is below 0"),  # default_rng's ValueError
    ("--seed", str(2**64), f"'{2**64}' is above {2**63 - 1}"),  # torch.manual_seed's overflow, as a traceback
    ("--epochs", "two", "'two' is not a whole number"),
])
def test_the_build_refuses_counts_out_of_range_in_one_line(
        flag: str, value: str, says: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from model_store import build

    with pytest.raises(SystemExit) as exit_:
        build.main(["--store", str(tmp_path / "store"), flag, value])
    assert exit_.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "store").exists()  # refused before anything was made


def test_one_build_or_calibration_changes_a_store_at_a_time(store_copy: Path) -> None:
    """run.sh and test.sh started together on a fresh clone each cleared the other's staging
    folder (found by review): a second run waits for the first, and says so. The lock file
    is the store's own, not an artifact."""
    import fcntl
    import threading

    holder = os.open(store_copy / archive.STORE_LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a build that runs
    archive.verify_manifest(store_copy)  # .lock is not an unlisted file
    done: list[subprocess.CompletedProcess] = []
    second = threading.Thread(target=lambda: done.append(subprocess.run(
        [sys.executable, "-m", "model_store.build", "--store", str(store_copy), "--quiet", "--no-floor"],
        capture_output=True, text=True, timeout=120)))
    second.start()
    time.sleep(8)  # long enough to start, read the store and meet the lock
    assert not done, "a second build ran while the first held the store"
    os.close(holder)  # the first one ends
    second.join(120)
    assert done and done[0].returncode == 0, done[0].stderr if done else "still waiting"
    assert "waiting for another build or calibration" in done[0].stderr


_INTERRUPTED_CHANGE = r"""
import os, signal, sys
from pathlib import Path
from model_store import archive

# Python's own SIGINT handler, whatever this process inherited: a shell without job control
# starts background commands (a CI job's, `cmd &`) with SIGINT ignored, and Python keeps that.
signal.signal(signal.SIGINT, signal.default_int_handler)
store = Path(sys.argv[1])
model = store / "m"
if sys.argv[3] == "threads":  # as a build (torch's pool) or a calibration (gRPC's) is
    import threading
    threading.Thread(target=threading.Event().wait, daemon=True).start()

def move_in():
    (model / "model.pt").write_bytes(b"new weights")
    os.kill(os.getpid(), signal.SIGINT if sys.argv[2] == "INT" else signal.SIGTERM)
    (model / "card.json").write_text('{"new": true}')

try:
    archive.approve_changes(store, ["m"], write=move_in)
except KeyboardInterrupt:
    print("interrupted after the change", flush=True)
    raise
"""


@pytest.mark.parametrize("threads", ["one thread", "threads"])
@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_an_interrupt_during_a_change_waits_for_its_record(tmp_path: Path, sig: str, threads: str) -> None:
    """Ctrl-C or SIGTERM while a change moves in (a build's move, a policy's write) is held
    until the manifest records it: the store still verifies, then the process stops as asked.
    Delivered at once, it left the new files under the old digests. With another thread
    running (a build's, a calibration's), a signal mask on the main thread held nothing: the
    kernel handed the signal to the other thread."""
    store = tmp_path / "store"
    (store / "m").mkdir(parents=True)
    (store / "m" / "model.pt").write_bytes(b"old weights")
    (store / "m" / "card.json").write_text("{}")
    archive.write_manifest(store)
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_CHANGE, str(store), sig, threads],
                          capture_output=True, text=True, timeout=60, cwd=Path(archive.__file__).parents[1])
    if sig == "INT":
        assert done.returncode != 0 and "interrupted after the change" in done.stdout, done.stderr[-2000:]
    else:
        assert done.returncode == -15, (done.returncode, done.stderr[-2000:])  # SIGTERM's default action
    assert (store / "m" / "card.json").read_text() == '{"new": true}'  # the change ran whole
    entries = archive.verify_manifest(store)
    assert entries["m/model.pt"] == archive.sha256_file(store / "m" / "model.pt")
