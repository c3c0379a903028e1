"""TorchServe archives (.mar) and the sha256 manifest of every artifact in the store.

A ``.mar`` is a zip; it carries the serialized model (TorchScript ``model.pt`` or
``model.onnx``), the model card, the handler package (``handlers/``) and the generated
probe-contract stubs (``robustgate/``), so the handler imports exactly what it imports
in this repository.

The manifest (``manifest.json`` at the store's root) maps every artifact's path,
relative to the store, to its sha256. :func:`verify_manifest` fails on any file that is
missing, added or modified; TorchServe is only started on a store that verifies.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import posixpath
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

REPO = Path(__file__).resolve().parent.parent
HANDLERS_DIR = REPO / "handlers"
PROTO_PKG_DIR = REPO / "proto" / "robustgate"
MANIFEST = "manifest.json"
STORE_LOCK = ".lock"  # at the store's root, no artifact: held by whatever changes the store

FORMATS = {
    # format: (serialized file in the model dir, handler entry file in handlers/)
    "torchscript": ("model.pt", "torchscript_handler.py"),
    "onnx": ("model.onnx", "onnx_handler.py"),
}


class ManifestError(RuntimeError):
    """An artifact does not match the manifest."""


class UnsafeArchive(ManifestError):
    """An archive that is not a plain set of files to unpack (see :func:`check_archive`)."""


# An archive's unpacked size, at most: the bundled models' archives unpack to a few MB
# (ResNet-18's to about 90 MB); a zip bomb unpacks to far more than it weighs.
MAX_UNPACKED_BYTES = 1 << 30


def archive_name(model: str, fmt: str) -> str:
    return f"{model}-{fmt}"


def split_archive_name(name: str) -> tuple[str, str]:
    """``<model>-<format>`` -> (model, format), the inverse of :func:`archive_name`; the
    format is what follows the last '-' (checked by the caller against :data:`FORMATS`)."""
    model, _, fmt = name.rpartition("-")
    return model, fmt


def _copy_py_tree(src: Path, dst: Path) -> None:
    shutil.copytree(
        src, dst, ignore=lambda d, names: [n for n in names if n == "__pycache__" or n.endswith(".pyc")]
    )


DEFAULT_CONFIG = HANDLERS_DIR / "model-config.yaml"


def build_archive(model_dir: Path, fmt: str, export_dir: Path, version: str = "1.0",
                  config: Path | None = DEFAULT_CONFIG) -> Path:
    """Package ``model_dir`` (holding the export and ``card.json``) for ``fmt`` into
    ``export_dir/<model>-<fmt>.mar``; return its path. ``config``: the model-config.yaml
    packed with it (None: none, TorchServe's defaults; the serving benchmark's baseline)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {sorted(FORMATS)}")
    serialized, entry = FORMATS[fmt]
    model_dir = Path(model_dir)
    name = archive_name(model_dir.name, fmt)
    export_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rg-mar-") as tmp:
        extra = Path(tmp) / "extra"
        extra.mkdir()
        _copy_py_tree(HANDLERS_DIR, extra / "handlers")
        _copy_py_tree(PROTO_PKG_DIR, extra / "robustgate")
        shutil.copy2(model_dir / "card.json", extra / "card.json")
        cmd = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name",
            name,
            "--version",
            version,
            "--serialized-file",
            str(model_dir / serialized),
            "--handler",
            str(HANDLERS_DIR / entry),
            "--extra-files",
            str(extra),
            "--export-path",
            str(export_dir),
            "--force",
        ]
        if config is not None:
            cmd += ["--config-file", str(config)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:  # CalledProcessError's message leaves out why
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise ManifestError(f"torch-model-archiver could not write {name}.mar to {export_dir} "
                                f"(exit {done.returncode}): {lines[-1][:500] if lines else 'no message'}")
    return export_dir / f"{name}.mar"


def _packaged_sources() -> dict[str, Path]:
    """Member name in a .mar -> the source file it is copied from (handler code, stubs, config)."""
    out = {}
    for prefix, root in (("handlers", HANDLERS_DIR), ("robustgate", PROTO_PKG_DIR)):
        for p in root.rglob("*"):
            if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".yaml"):
                out[f"{prefix}/{p.relative_to(root).as_posix()}"] = p
    return out


def archive_is_current(path: Path) -> bool:
    """True when the archive carries exactly this checkout's handler code and probe stubs
    (an archive built before a handler change would speak an older probe contract)."""
    with zipfile.ZipFile(path) as z:
        packaged = {n for n in z.namelist() if n.startswith(("handlers/", "robustgate/"))
                    and n.endswith((".py", ".yaml"))}
        sources = _packaged_sources()
        if packaged != set(sources):
            return False
        return all(z.read(name) == src.read_bytes() for name, src in sources.items())


def os_error_line(e: OSError, where: Path) -> str:
    """An OSError as the commands' mains print it: one line, the system's words and the path
    (``where`` when the error names none)."""
    return f"error: {e.strerror or e}: {e.filename or where}"


def check_archive(path: Path, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Raise :class:`UnsafeArchive` unless the zip at ``path`` is only plain files under
    relative names (:func:`check_members`)."""
    try:
        with zipfile.ZipFile(path) as z:
            check_members(z, max_unpacked_bytes)
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as e:  # a name flagged UTF-8 that is not
        raise UnsafeArchive(f"{path} is not a readable zip archive: {e}") from None


_CONFIG_NAME = re.compile(r"([A-Za-z0-9_.]+-)?model-config\.yaml")


def check_archive_model(path: Path, model_dir: Path) -> None:
    """Raise :class:`UnsafeArchive` unless the archive at ``path`` serves the model that the card
    in ``model_dir`` describes: the serialized file its ``MAR-INF/MANIFEST.json`` names hashes
    as the card says, and the ``card.json`` it carries (the handler's labels and input) is that
    card. The store's manifest says only that each file is one a build wrote: an archive from
    another build, or one rebuilt from other weights with the manifest rewritten, would serve
    a model other than the one its policy was calibrated on. The manifest must name the
    format's own weights file and handler, and the archive hold no other file beside its
    packaged code (``handlers/``, ``robustgate/``) and the config it names, a
    ``[<prefix>-]model-config.yaml`` (no module Python could import in its place): one naming
    ``other_handler.py`` that loads ``other.pt`` passed while the weights it named were the card's."""
    card_path = model_dir / "card.json"
    try:
        card_bytes = card_path.read_bytes()
        hashes = json.loads(card_bytes)["hashes"]
        with zipfile.ZipFile(path) as z:
            named = json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]
            serialized, handler, config = named["serializedFile"], named["handler"], named.get("configFile")
            carried = z.read("card.json")
            with z.open(serialized) as f:
                digest = sha256_stream(f)
            loose = {n for n in z.namelist() if not n.startswith(("handlers/", "robustgate/")) and not n.endswith("/")}
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:
        raise UnsafeArchive(f"archive {path} cannot be checked against {card_path}: "
                            f"{type(e).__name__}: {str(e)[:200]}") from None
    fmt = split_archive_name(path.stem)[1]
    if fmt not in FORMATS or (serialized, handler) != FORMATS[fmt]:
        raise UnsafeArchive(f"archive {path}: its MAR-INF/MANIFEST.json names {str(serialized)[:80]!r} run by "
                            f"{str(handler)[:80]!r}, not a {fmt} archive's {FORMATS.get(fmt)}: rebuild it "
                            "(python -m model_store.build)")
    # the config keeps its file's name (the serving benchmark's batching-model-config.yaml);
    # any other name could put an importable module beside the handler (onnxruntime.py)
    if config is not None and not (isinstance(config, str) and _CONFIG_NAME.fullmatch(config)):
        raise UnsafeArchive(f"archive {path}: its MAR-INF/MANIFEST.json names the config {str(config)[:80]!r}, "
                            "not a model-config.yaml: rebuild it (python -m model_store.build)")
    extra = sorted(loose - {"MAR-INF/MANIFEST.json", "card.json", config, serialized, handler})
    if extra:
        raise UnsafeArchive(f"archive {path} holds files no build puts there: {', '.join(extra)[:200]}: rebuild it "
                            "(python -m model_store.build)")
    want = hashes.get(serialized) if isinstance(hashes, dict) else None
    if digest != want:
        raise UnsafeArchive(f"archive {path} serves a {serialized} other than {card_path} describes "
                            f"(sha256 {digest[:12]}, the card's {str(want)[:12]}): rebuild it "
                            "(python -m model_store.build)")
    if carried != card_bytes:
        raise UnsafeArchive(f"archive {path} carries another card.json than {card_path}: rebuild it "
                            "(python -m model_store.build)")


def check_members(z: zipfile.ZipFile, max_unpacked_bytes: int = MAX_UNPACKED_BYTES) -> None:
    """Raise :class:`UnsafeArchive` unless the open zip ``z`` is only plain files under
    relative names: no absolute or ``..`` name, no NUL in a name, no symlink or device entry, no name twice
    (after ``./`` and ``//`` are folded: which copy an unpacker keeps is its own choice), and
    no more than ``max_unpacked_bytes`` unpacked. TorchServe unpacks every archive it serves;
    a hash in the manifest only says the file is the one the build wrote, not that it is safe
    to unpack. The directory is not the whole story, so the entries themselves are read too
    (:func:`_layout_problems`)."""
    problems: list[str] = []
    seen: set[str] = set()
    total = 0
    for info in z.infolist():
        name = info.filename
        if "\x00" in info.orig_filename:  # zipfile cuts the name at it; Java and unzip may not
            problems.append(f"{info.orig_filename!r} has a NUL in its name")
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            problems.append(f"{name!r} would unpack outside the archive's folder")
        kind = stat.S_IFMT(info.external_attr >> 16)  # 0: no Unix type recorded, a plain entry
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            problems.append(f"{name!r} is not a plain file (a {'symlink' if kind == stat.S_IFLNK else oct(kind)})")
        folded = posixpath.normpath(name.replace("\\", "/")) + ("/" if name.endswith("/") else "")
        if folded in seen:
            problems.append(f"{name!r} is in it twice")
        seen.add(folded)
        total += info.file_size
    if total > max_unpacked_bytes:
        problems.append(f"it unpacks to {total:,} bytes, more than {max_unpacked_bytes:,}")
    if not problems:
        problems = _layout_problems(z)
    if problems:
        raise UnsafeArchive(f"archive {z.filename} refused: " + "; ".join(problems[:5])
                            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""))


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # signature .. extra length: 30 bytes
_LOCAL_SIGNATURE = b"PK\x03\x04"
_CHUNK = 1 << 20


def _layout_problems(z: zipfile.ZipFile) -> list[str]:
    """What the zip's entries say that its directory does not: Python reads an archive by its
    central directory, TorchServe's Java unpacker (``ZipInputStream``) by the entries' own
    headers, one after another. So the entries must lie back to back from the first byte to
    the directory (an entry the directory leaves out would be unpacked unseen), each under
    the name and sizes the directory gives, with no data descriptor (sizes after the data,
    which the archiver never writes), stored or deflated, and each deflated stream must end
    exactly at its stated size with its CRC right (a stream that runs on would be unpacked
    whole, whatever the header said). Empty when none of that is wrong."""
    fp = z.fp
    if fp is None:
        return ["it is closed"]
    pos = 0
    for info in sorted(z.infolist(), key=lambda i: i.header_offset):
        name = info.filename
        if info.header_offset != pos:
            return [f"it holds {info.header_offset - pos:+,} bytes no entry accounts for before {name!r}"]
        fp.seek(pos)
        head = fp.read(_LOCAL_HEADER.size)
        if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIGNATURE:
            return [f"{name!r} has no entry header where the directory puts it"]
        _, _, flags, method, _, _, crc, packed, size, n, m = _LOCAL_HEADER.unpack(head)
        raw_name = fp.read(n)
        local = raw_name.decode("utf-8" if flags & 0x800 else "cp437", "replace")
        if local != info.orig_filename:
            return [f"{name!r} is named {local!r} in its own header"]
        if flags & 0x08 or flags & 0x01:
            return [f"{name!r} is encrypted or has its sizes after its data"]
        if (method, crc, packed, size) != (info.compress_type, info.CRC, info.compress_size, info.file_size):
            return [f"{name!r} has other sizes or method in its own header than in the directory"]
        data = pos + _LOCAL_HEADER.size + n + m
        fp.seek(data)
        if (why := _content_problem(fp, method, packed, size, crc)) is not None:
            return [f"{name!r} {why}"]
        pos = data + packed
    if pos != z.start_dir:
        return [f"it holds {z.start_dir - pos:+,} bytes no entry accounts for before its directory"]
    return []


def _content_problem(fp, method: int, packed: int, size: int, crc: int) -> str | None:
    """Why the ``packed`` bytes at ``fp`` do not unpack to exactly ``size`` bytes of CRC
    ``crc`` (stored or deflated), else None. Never inflates more than ``size + 1`` bytes."""
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return f"is compressed by method {method}, neither stored nor deflated"
    if method == zipfile.ZIP_STORED and packed != size:
        return "is stored under two sizes"
    inflate = zlib.decompressobj(-15) if method == zipfile.ZIP_DEFLATED else None
    left, out, got = packed, 0, 0
    while left:
        chunk = fp.read(min(left, _CHUNK))
        if not chunk:
            return "is cut short"
        left -= len(chunk)
        if inflate is not None:
            try:
                chunk = inflate.decompress(chunk, size + 1 - out)
            except zlib.error:
                return "is not a valid deflate stream"
            if inflate.unconsumed_tail:
                return f"unpacks to more than its stated {size:,} bytes"
        out += len(chunk)
        got = zlib.crc32(chunk, got)
        if out > size:
            return f"unpacks to more than its stated {size:,} bytes"
    if inflate is not None and (not inflate.eof or inflate.unused_data):
        return "has a deflate stream that does not end where the entry does"
    if out != size or got != crc:
        return "does not unpack to its stated size and CRC"
    return None


def archive_members(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(z.namelist())


def sha256_stream(f: BinaryIO, copy_to: BinaryIO | None = None) -> str:
    """The sha256 (hex) of what is left to read of ``f``, read in chunks; each chunk also
    written to ``copy_to`` where given (a copy hashed as it is made)."""
    h = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        h.update(chunk)
        if copy_to is not None:
            copy_to.write(chunk)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    with Path(path).open("rb") as f:
        return sha256_stream(f)


def _artifacts(store: Path) -> list[Path]:
    """Every file under ``store`` but the manifest, through symlinked folders too (each real
    folder once): ``rglob`` skips those, and a store whose ``archives/`` is a link would let
    an added archive through unlisted, which ``serve start`` would then load."""
    found: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(store, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back to a folder already walked
            subfolders[:] = []
            continue
        seen.add(real)
        found += [Path(folder) / f for f in files if (Path(folder) / f).is_file()]
    own = {Path(store) / MANIFEST, Path(store) / STORE_LOCK}  # the store's own: anywhere else, artifacts
    return sorted(p for p in found if p not in own)


def _under(rel: str, paths: Sequence[str]) -> bool:
    """Whether ``rel`` is one of ``paths`` or inside one of them (folders)."""
    return any(rel == c or rel.startswith(c.rstrip("/") + "/") for c in paths)


def _record(store: Path, entries: dict[str, str]) -> Path:
    """Write the manifest atomically (a temporary file renamed over it): a crash mid-write
    leaves the old manifest, never half a new one."""
    path = store / MANIFEST
    fd, tmp = tempfile.mkstemp(dir=store, prefix=f".{MANIFEST}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"version": 1, "sha256": entries}, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_manifest(store: Path) -> Path:
    """Record the sha256 of every file under ``store`` (except the manifest itself)."""
    return _record(store, {p.relative_to(store).as_posix(): sha256_file(p) for p in _artifacts(store)})


@contextlib.contextmanager
def store_lock(store: Path, who: str) -> Iterator[None]:
    """Hold ``store`` for a run that changes it (a build, a calibration): one at a time. Two
    at once (``scripts/run.sh`` and ``scripts/test.sh`` started together on a fresh clone)
    each cleared the other's staging folder or approved a manifest under the other's
    change. A second run says it waits, then waits."""
    Path(store).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(store) / STORE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{who}: waiting for another build or calibration of {store} to finish", file=sys.stderr,
                  flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # the lock goes with it


def approve_changes(store: Path, changing: Sequence[str], write: Callable[[], object] | None = None) -> Path:
    """Make a change to ``changing`` (paths or folders relative to the store, such as a
    model's folder and archives, or its policy) and write the manifest after it. Everything
    else must first verify against the old manifest; only then does ``write`` (when given)
    make the change, so a store that does not verify is never changed. The new manifest
    keeps the digests it verified (not a second reading of those files, which a change made
    meanwhile would slip into); only the files under ``changing`` are hashed anew. A store
    without a manifest yet (its first build) is recorded as it is after ``write``."""
    kept = verify_manifest(store, changing=changing) if (store / MANIFEST).is_file() else None
    # The change and its record are one step for Ctrl-C and SIGTERM: an interrupt between
    # the two would leave new files under the old digests, a store that no longer verifies.
    with signals_deferred():
        if write is not None:
            write()
        if kept is None:
            return write_manifest(store)
        on_disk = {p.relative_to(store).as_posix(): p for p in _artifacts(store)}
        fresh = {rel: sha256_file(p) for rel, p in on_disk.items() if _under(rel, changing)}
        return _record(store, {**kept, **fresh})


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP until the block ends; one that came meanwhile is
    raised again then, to the handler it would have met (KeyboardInterrupt after the block,
    a default SIGTERM ending the process after it, not in the middle of it).

    By replacing the handlers, not by a signal mask: a mask holds a signal for the calling
    thread only, and the kernel hands a process's signal to any thread not masking it (torch
    and gRPC keep threads: a build or a calibration is never single-threaded). Python runs
    every handler in the main thread; called from another thread, the block is not guarded.
    SIGKILL and a power cut are not held either: the next build of the model repairs its files."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous: dict[int, Any] = {}
    try:
        for sig in DEFERRED_SIGNALS:
            handler = signal.getsignal(sig)
            signal.signal(sig, lambda signum, _frame: caught.append(signum))
            previous[sig] = signal.SIG_DFL if handler is None else handler  # None: set outside Python
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def _read_entries(path: Path) -> dict[str, str]:
    """The manifest's {relative path: sha256}; ManifestError when it is not one."""
    try:
        entries = json.loads(path.read_text())["sha256"]
        if not isinstance(entries, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in entries.items()):
            raise ValueError("its sha256 entries are not {path: hex digest}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise ManifestError(f"{path} is not a readable manifest ({type(e).__name__}: {str(e)[:200]}); "
                            f"nothing in the store can be trusted: delete it and rebuild every model "
                            f"(`python -m model_store.build --model all --force`), then recalibrate") from None
    return entries


def verify_manifest(store: Path, only: list[str] | None = None, changing: Sequence[str] = ()) -> dict[str, str]:
    """Check files under ``store`` against its manifest; raise :class:`ManifestError` naming
    every missing, unlisted or modified file. ``only`` restricts the check to those
    relative paths (each must be listed); ``changing`` leaves out those paths and folders.
    Returns the verified entries."""
    path = store / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} is missing: build the store with `python -m model_store.build`")
    entries = _read_entries(path)
    if changing:
        def kept(rel: str) -> bool:
            return not _under(rel, changing)

        entries = {rel: digest for rel, digest in entries.items() if kept(rel)}
    problems: list[str] = []
    if only is None:
        on_disk = {p.relative_to(store).as_posix() for p in _artifacts(store)}
        if changing:
            on_disk = {rel for rel in on_disk if kept(rel)}
        problems += [f"not in manifest: {p}" for p in sorted(on_disk - entries.keys())]
        wanted = entries
    else:
        problems += [f"not in manifest: {p}" for p in only if p not in entries]
        wanted = {p: entries[p] for p in only if p in entries}
    for rel, digest in sorted(wanted.items()):
        f = store / rel
        if not f.is_file():
            problems.append(f"missing: {rel}")
        elif sha256_file(f) != digest:
            problems.append(f"sha256 mismatch: {rel}")
    if problems:
        raise ManifestError(f"model store {store} failed verification: " + "; ".join(problems))
    return wanted
