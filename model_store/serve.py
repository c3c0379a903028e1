"""Start, wait for and stop TorchServe on a verified model store.

    python -m model_store.serve start  [--store DIR] [--run-dir DIR] [--model NAME ...]
    python -m model_store.serve status [--run-dir DIR]
    python -m model_store.serve stop   [--run-dir DIR]

From code (tests, the main command, the gateway)::

    with serve.start(serve.ServeSettings(store=Path("model_store/artifacts"))) as ts:
        key = ts.keys().inference          # for the gRPC "authorization: Bearer <key>" header
        channel = grpc.insecure_channel(ts.grpc_inference_target)

:func:`start` verifies the store against its manifest, renders ``config/config.properties``
and ``config/log4j2.xml`` into the run directory, launches TorchServe there (its working
directory, so ``key_file.json`` lands there) as a process group this module owns, and
returns once every model's workers are READY in the management API's describe answer
(``/ping`` answers before any worker has loaded). Token authorization stays on.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_store import archive

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(__file__).resolve().parent / "config"
DEFAULT_STORE = Path(__file__).resolve().parent / "artifacts"
DEFAULT_RUN_DIR = REPO / "var" / "torchserve"
STATE_FILE = "serve.json"
KEY_FILE = "key_file.json"
CONSOLES = ("file", "inherit")
CONSOLE_FILE = "torchserve.out"  # in <run_dir>/logs: the launcher's and the JVM's own output
LOG_FILE = "ts_log.log"  # in <run_dir>/logs: TorchServe's log (log4j2.xml rolls it)


class ServeError(RuntimeError):
    """TorchServe could not be started, did not become ready, or is not running."""


@dataclass(frozen=True)
class ServeSettings:
    """How to run TorchServe. Ports are TorchServe's defaults; tests pass free ones."""

    store: Path = DEFAULT_STORE
    run_dir: Path = DEFAULT_RUN_DIR  # config, key file, logs, TorchServe's temp dir
    models: tuple[str, ...] = ()  # archive names (archives/<name>.mar); empty = every archive
    host: str = "127.0.0.1"
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    job_queue_size: int = 1000  # requests queued per model before TorchServe answers 503
    # for archives whose model-config.yaml names no worker count; 0: TorchServe's own rule, one
    # worker per GPU it finds, else one per processor the JVM sees (its out-of-the-box setting)
    default_workers: int = 1
    default_response_timeout: int = 120  # seconds
    max_request_size: int = 8 << 20  # bytes, REST and gRPC
    max_response_size: int = 64 << 20  # bytes
    token_expiration_min: float = 60 * 24 * 365  # TorchServe's default is 60
    disable_system_metrics: bool = False
    startup_timeout_s: float = 180.0
    console: str = "file"
    """Where TorchServe's console goes. ``"file"``: ``logs/torchserve.out`` in the run
    directory, which then receives only what bypasses logging (the launcher's and the JVM's
    own messages); the log itself goes to the rolling ``logs/ts_log.log`` alone.
    ``"inherit"``: this process's stdout, with the log on it too, for a container whose
    runtime collects and rotates stdout. TorchServe keeps that stdout after :func:`start`
    returns, so it must be a file or a long-lived stream, not a pipe that a caller reads to
    its end (``$(...)``, ``capture_output``): that caller would wait until TorchServe stops."""

    def __post_init__(self) -> None:
        if self.console not in CONSOLES:
            raise ValueError(f"console must be one of {', '.join(CONSOLES)}, not {self.console!r}")
        try:  # its five ports, the management API's among them, stay private to the machine (pod)
            loopback = self.host == "localhost" or ipaddress.IPv4Address(self.host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"host must be localhost or an IPv4 loopback address such as 127.0.0.1, not "
                             f"{self.host[:100]!r}: TorchServe's ports stay private, the gateway is what callers reach")

    @classmethod
    def on_free_ports(cls, **kwargs: Any) -> ServeSettings:
        """Settings whose five ports are free loopback ports (tests, calibration, benchmarks:
        a private TorchServe that leaves a running service alone)."""
        names = ("grpc_inference_port", "grpc_management_port", "inference_port", "management_port", "metrics_port")
        return cls(**{**dict(zip(names, free_ports(len(names)))), **kwargs})

    @property
    def archives(self) -> Path:
        return Path(self.store) / "archives"


# Where free_ports looks first: below the kernel's ephemeral range, whose ports it hands to
# outgoing connections as their local ends. A port picked from that range can be taken by a
# client connecting anywhere between the pick and the listener's bind (the suite opens
# thousands); a port below it is taken only by a process that names it.
PORTS_BELOW_EPHEMERAL_FROM = 20000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux's default where it
    cannot be read)."""
    try:
        low, high = map(int, EPHEMERAL_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that nothing listens on right now: picked at random
    below the kernel's ephemeral range where that leaves room, each tried by binding it (one
    taken, or already ours, is passed over), else handed out by the kernel (port 0). Every
    socket stays bound until all are picked: picked one at a time, the kernel may hand out a
    port it just released again, and two services told one port fail to start."""
    low, _ = ephemeral_range()
    rng = random.SystemRandom()
    tries = 200 if low - PORTS_BELOW_EPHEMERAL_FROM >= 1000 else 0
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < n:
            port = rng.randrange(PORTS_BELOW_EPHEMERAL_FROM, low) if tries > 0 else 0
            tries -= 1
            s = stack.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                if port == 0:
                    raise
                continue  # taken, or lingering in TIME_WAIT: another
            ports.append(s.getsockname()[1])
        return ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


@dataclass(frozen=True)
class Keys:
    """TorchServe's tokens: ``inference`` for predictions, ``management`` for the
    management API, ``api`` to renew the other two (``/token?type=...``)."""

    inference: str
    management: str
    api: str


def read_keys(run_dir: Path) -> Keys:
    """Read the tokens TorchServe wrote to ``run_dir/key_file.json``."""
    path = Path(run_dir) / KEY_FILE
    try:
        raw = json.loads(path.read_text())
        keys = Keys(inference=raw["inference"]["key"], management=raw["management"]["key"],
                    api=raw["API"]["key"])
    except (OSError, ValueError) as e:
        raise ServeError(f"cannot read TorchServe's key file {path}: {e}") from None
    except (KeyError, TypeError):
        raise ServeError(f"TorchServe's key file {path} is not in the layout TorchServe writes "
                         "(inference, management and API keys)") from None
    if not all(isinstance(k, str) and k for k in (keys.inference, keys.management, keys.api)):
        raise ServeError(f"TorchServe's key file {path} holds an empty or non-text key")
    return keys


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")  # an archive's name: no path, no ".."


def model_names(settings: ServeSettings) -> list[str]:
    names = list(settings.models) or sorted(p.stem for p in settings.archives.glob("*.mar"))
    if not names:
        raise ServeError(f"no archives in {settings.archives}: build the store with `python -m model_store.build`")
    bad = [n for n in names if not MODEL_NAME.fullmatch(n) or ".." in n]
    if bad:  # "/tmp/x" would be looked for outside the store, "../x" refused by TorchServe only later
        raise ServeError(f"model names are archive names in {settings.archives} (letters, digits, '.', '_', "
                         f"'-'; no path): {', '.join(map(repr, bad))}")
    missing = [n for n in names if not (settings.archives / f"{n}.mar").is_file()]
    if missing:
        raise ServeError(f"archives not found in {settings.archives}: {', '.join(missing)}")
    return names


def render_config(settings: ServeSettings) -> str:
    """config.properties for ``settings`` (the template in ``config/``, fields filled in).

    Per-model batch and worker settings come from each archive's ``model-config.yaml``
    (TorchServe 0.12 lets them win over config.properties' ``models``)."""
    fields_ = {k: v for k, v in asdict(settings).items() if not isinstance(v, (tuple, Path))}
    fields_["disable_system_metrics"] = str(settings.disable_system_metrics).lower()
    template = string.Template((CONFIG_DIR / "config.properties").read_text())
    return template.substitute(fields_)


# TorchServe's own APIs, on this host: never through a proxy. urlopen follows http_proxy even
# for 127.0.0.1 (unless no_proxy names it), so a pod or shell that sets one for its egress sent
# the management token to the proxy, and readiness never came.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_json(url: str, token: str, timeout: float = 5.0) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with _DIRECT.open(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _runs_from(pid: int, run_dir: Path) -> bool:
    """The process ``pid`` works in ``run_dir`` or under it: ``start`` starts the launcher
    there, the JVM inherits it and each worker works in its model's folder under ``tmp/``."""
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    root = os.path.realpath(run_dir)
    return cwd == root or cwd.startswith(root + os.sep)


def _is_ours(pid: int, run_dir: Path) -> bool:
    """The process ``pid`` is the TorchServe launcher ``start`` started from ``run_dir``: a
    reused pid is another program's, or another run directory's TorchServe."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"ts.model_server" in cmdline and _runs_from(pid, run_dir)


def _alive(pid: int, run_dir: Path) -> bool:
    """The TorchServe whose launcher had ``pid`` (also its group's id) still runs from
    ``run_dir``: the launcher, or what it left in its group when it died alone."""
    return _is_ours(pid, run_dir) or _group_is_torchserve(pid, run_dir)


def _group_is_torchserve(pgid: int, run_dir: Path) -> bool:
    """A process of group ``pgid`` is TorchServe's frontend or one of its workers, from
    ``run_dir``: what is left when the launcher died alone (it does not pass signals on),
    still holding the ports."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)"
            if int(fields[2]) != pgid:  # state, ppid, pgrp
                continue
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ((b"org.pytorch.serve.ModelServer" in cmdline or b"model_service_worker" in cmdline)
                and _runs_from(int(stat.parent.name), run_dir)):
            return True
    return False


_STAND_DOWN = b"x"
LAUNCHER_PID_FILE = ".model_server.pid"  # ts.model_server's, in its temp dir


def _lifeline(pgid: int, run_dir: Path) -> int:
    """Start a watchdog that stops process group ``pgid``, TorchServe's from ``run_dir``, when
    this process ends without standing it down; return the write end of its pipe (keep it open).

    The watchdog reads its stdin, a pipe whose only write end this process holds (not
    inherited by children it starts: PEP 446). EOF without :data:`_STAND_DOWN` first means
    this process is gone, however it died; the watchdog, in a session of its own, then
    stops the group as :meth:`TorchServe.stop` would."""
    read, write = os.pipe()
    try:
        subprocess.Popen([sys.executable, "-c", "import sys; from model_store.serve import _watch; "
                          "_watch(int(sys.argv[1]), sys.argv[2])", str(pgid), str(run_dir)],
                         stdin=read, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=REPO, start_new_session=True)
    except BaseException:
        os.close(write)
        raise
    finally:
        os.close(read)
    return write


def _watch(pgid: int, run_dir: str) -> None:
    """The watchdog's body (:func:`_lifeline`). The group is stopped only where it is still
    TorchServe's from ``run_dir`` (:func:`_alive`): Linux hands out no pid that is the id of an
    existing group, but once TorchServe's group has gone (it crashed) its id may lead another
    program's, which a bare "a group with this id lives" would have stopped."""
    if sys.stdin.buffer.read(1) != _STAND_DOWN:
        if _alive(pgid, Path(run_dir)):
            _stop_group(pgid, timeout=30.0)
        # no key file (every token) left behind a killed owner, even where TorchServe died
        # first; only under the lock, since nothing waits on the watchdog
        _tidy(Path(run_dir), pgid, need_lock=True)


def _stop_group(pgid: int, timeout: float, resend_s: float = 1.0) -> None:
    """SIGTERM the process group TorchServe runs in, then SIGKILL what is left.

    The SIGTERM is repeated every ``resend_s``: TorchServe's frontend restarts workers that
    die while it shuts down, and those new workers, started after the first signal, would
    otherwise live until the SIGKILL.
    """
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + wait
        next_signal = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_signal:
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    return
                next_signal = time.monotonic() + resend_s
            try:  # reap the launcher when it is our child
                os.waitpid(pgid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def log_paths(run_dir: Path) -> tuple[Path, Path]:
    """A run dir's console file (a launcher or JVM failure shows there, where one is kept)
    and TorchServe's log."""
    return run_dir / "logs" / CONSOLE_FILE, run_dir / "logs" / LOG_FILE


class TorchServe:
    """A TorchServe started by :func:`start` (or found by :func:`attach`)."""

    def __init__(self, settings: ServeSettings, names: list[str], pid: int,
                 process: subprocess.Popen | None = None,
                 log_offsets: dict[Path, int] | None = None) -> None:
        self.settings = settings
        self.models = names
        self.pid = pid  # the launcher's pid, also the process group's id
        self.process = process
        # Where this run's lines begin in files that earlier runs of the run dir wrote to.
        self.log_offsets = dict(log_offsets or {})
        self.lifeline: int | None = None  # write end of the pipe its watchdog waits on

    @property
    def grpc_inference_target(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_inference_port}"

    @property
    def grpc_management_target(self) -> str:
        return f"{self.settings.host}:{self.settings.grpc_management_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.management_port}"

    @property
    def inference_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.inference_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.metrics_port}/metrics"

    @property
    def log_file(self) -> Path:
        """TorchServe's log: the frontend's warnings and the workers' output, rolled by size."""
        return log_paths(Path(self.settings.run_dir))[1]

    def keys(self) -> Keys:
        return read_keys(self.settings.run_dir)

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _alive(self.pid, Path(self.settings.run_dir))

    def describe(self, model: str) -> list[dict[str, Any]]:
        """The management API's describe answer for ``model`` (one entry per version)."""
        return _http_json(f"{self.management_url}/models/{model}", self.keys().management)

    def model_status(self, model: str) -> dict[str, Any]:
        """``{"ready": bool, "serving": bool, "workers": [status, ...], "min_workers": n, ...}``
        for ``model``: ready, every worker it should have READY; serving, at least one."""
        d = self.describe(model)[0]
        workers = [w.get("status") for w in d.get("workers", [])]
        need = max(1, int(d.get("minWorkers", 1)))
        return {
            "ready": len(workers) >= need and all(s == "READY" for s in workers),
            "serving": "READY" in workers,
            "workers": workers,
            "min_workers": need,
            "batch_size": d.get("batchSize"),
            "max_batch_delay_ms": d.get("maxBatchDelay"),
            "version": d.get("modelVersion"),
        }

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every model's workers are READY; raise :class:`ServeError` when the
        process dies or ``timeout`` (default: the settings') passes."""
        deadline = time.monotonic() + (self.settings.startup_timeout_s if timeout is None else timeout)
        pending = list(self.models)
        last = "no answer yet"
        while pending:
            if not self.running():
                raise ServeError(f"TorchServe exited while starting; see {self.log_file}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServeError(f"TorchServe not ready: {pending[0]}: {last}; see {self.log_file}:\n{self.log_tail()}")
            try:
                st = self.model_status(pending[0])
                last = f"workers {st['workers']}"
                if st["ready"]:
                    pending.pop(0)
                    continue
            except (ServeError, OSError, urllib.error.URLError, ValueError, KeyError, IndexError) as e:
                last = str(e)
            time.sleep(0.2)

    def log_tail(self, lines: int = 30, max_bytes: int = 1 << 16) -> str:
        """The last lines this run wrote to the console file, then to the log (at most
        ``max_bytes`` of each; a file rolled since the start is read from its beginning)."""
        parts = []
        for path in log_paths(Path(self.settings.run_dir)):
            try:
                with path.open("rb") as f:
                    size = f.seek(0, os.SEEK_END)
                    start = self.log_offsets.get(path, 0)
                    f.seek(max(start if start <= size else 0, size - max_bytes))
                    tail = f.read().decode(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            if tail:
                parts.append("\n".join([f"--- {path} ---", *tail]))
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop TorchServe and its workers (SIGTERM to the process group, SIGKILL after
        ``timeout``); remove the key file, the state file and the archive copies, unless the
        state file names another TorchServe by now (a ``start`` on the run dir, once this one
        was gone: its files are that one's)."""
        if self.process is not None or _alive(self.pid, Path(self.settings.run_dir)):
            _stop_group(self.pid, timeout)
        if self.process is not None:
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        _tidy(Path(self.settings.run_dir), self.pid)
        if self.lifeline is not None:  # stopped in order: stand the watchdog down
            with contextlib.suppress(OSError):
                os.write(self.lifeline, _STAND_DOWN)
            os.close(self.lifeline)
            self.lifeline = None

    def __enter__(self) -> TorchServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _settings_to_json(settings: ServeSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["store"], d["run_dir"] = str(settings.store), str(settings.run_dir)
    d["models"] = list(settings.models)
    return d


def start(settings: ServeSettings, wait: bool = True, outlive_caller: bool = False) -> TorchServe:
    """Verify the store, start TorchServe on it and (by default) wait until it is ready.

    TorchServe runs in a session of its own, so a terminal's Ctrl-C does not reach it before
    its owner can stop it in order. Unless ``outlive_caller`` (the ``start`` command, which
    leaves it running for ``stop``), it is stopped when the calling process ends without
    stopping it, even by SIGKILL (:func:`_lifeline`): a killed test run or benchmark leaves
    no TorchServe behind.

    Raises :class:`archive.ManifestError` when the store fails verification or an archive is
    unsafe to unpack (:func:`archive.check_archive`), and
    :class:`ServeError` when TorchServe does not come up (it is stopped again then)."""
    store = Path(settings.store).resolve()
    run_dir = Path(settings.run_dir).resolve()
    settings = ServeSettings(**{**settings.__dict__, "store": store, "run_dir": run_dir})
    staged = staged_archives(run_dir)
    if run_dir == store or store in run_dir.parents or staged == store or store in staged.parents:
        raise ServeError(f"the run dir {run_dir} and the model store {store} overlap: the run dir holds "
                         "TorchServe's files and copies of the archives, which would change the store "
                         "(give --run-dir a folder of its own)")
    verified = archive.verify_manifest(store)
    names = model_names(settings)
    for n in names:
        if archive.split_archive_name(n)[1] not in archive.FORMATS:
            raise archive.UnsafeArchive(f"archive {n}.mar is not named <model>-<format> ({', '.join(archive.FORMATS)})")
    run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one: this user's alone
    ts: TorchServe | None = None
    try:  # an interrupt as the lock is let go stops what was started too
        with _start_lock(run_dir):  # until the state file names what started: one start at a time
            ts = _launch(settings, run_dir, names, outlive_caller, verified)
        if wait:
            ts.wait_ready()
    except BaseException:
        if ts is not None:
            ts.stop()
        raise
    return ts


#: How long a ``start`` waits for another one on the same run dir to write its state.
START_LOCK_WAIT_S = 30.0
START_LOCK_FILE = ".start.lock"


@contextlib.contextmanager
def _start_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's start lock: two ``start``s on one run dir would both find nothing
    running (:func:`attach`) and launch two TorchServes, the second's state file hiding the
    first from ``stop``. The second waits here, then finds the first's state. The lock is an
    ``flock`` on a file of the run dir, released when its holder ends, however it ends, and
    not inherited by TorchServe (close-on-exec). Within the thread that holds it (a start that
    fails stops what it started, which tidies under this lock) it is held already."""
    held = _held.__dict__.setdefault("run_dirs", set())
    if run_dir in held:
        yield
        return
    fd = os.open(run_dir / START_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + START_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ServeError(f"another start on {run_dir} has held it for "
                                     f"{START_LOCK_WAIT_S:g} s; is that one stuck?") from None
                time.sleep(0.05)
        held.add(run_dir)
        try:
            yield
        finally:
            held.discard(run_dir)
    finally:
        os.close(fd)  # releases the lock


_held = threading.local()  # the run dirs whose start lock this thread holds


def _tidy(run_dir: Path, pid: int, need_lock: bool = False) -> None:
    """Remove the key file, the state file and the archive copies of the stopped TorchServe
    ``pid`` from ``run_dir``, unless the state file names another TorchServe by now (a start on
    the run dir, once that one was gone: its files are that one's). Without the start lock
    (:func:`_tidy_lock`) the copies stay, and with ``need_lock`` everything does."""
    with _tidy_lock(run_dir) as locked:  # no start stages copies or writes its state meanwhile
        if (need_lock and not locked) or _state_pid(run_dir) not in (None, pid):
            return
        for name in (KEY_FILE, STATE_FILE):
            with contextlib.suppress(OSError):  # one that cannot go keeps none of the others
                (run_dir / name).unlink(missing_ok=True)
        if locked:
            _remove_staged(run_dir)


@contextlib.contextmanager
def _tidy_lock(run_dir: Path) -> Iterator[bool]:
    """Hold the run dir's start lock while ``stop`` tidies it: a start staging its copies or
    launching is waited for, and once its state file names its own TorchServe, that one's files
    stay. True when held (by this thread's own start too); False where it cannot be had (the
    run dir gone, or a start stuck holding it): then the key and state files are tidied as
    before and the copies left."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_start_lock(run_dir))
        except (OSError, ServeError):
            locked = False
        else:
            locked = True
        yield locked


#: The run dir's folder of the archives TorchServe serves: checked copies of the store's.
STAGED_ARCHIVES = "archives"


def staged_archives(run_dir: Path) -> Path:
    """The folder of ``run_dir`` that holds the archive copies TorchServe serves."""
    return Path(run_dir) / STAGED_ARCHIVES


def _remove_staged(run_dir: Path) -> None:
    """Remove the run dir's archive copies (a folder; a link or file in its place is left)."""
    staged = staged_archives(run_dir)
    if staged.is_dir() and not staged.is_symlink():
        shutil.rmtree(staged, ignore_errors=True)


def _stage_archives(settings: ServeSettings, run_dir: Path, names: list[str], verified: dict[str, str]) -> Path:
    """Copy the archives TorchServe is to serve from the store into the run dir, each hashed
    as it is copied against the manifest entry verified before, and check the copies: each is
    only plain files under relative names (:func:`archive.check_archive`; TorchServe unpacks
    it) and serves the model its card describes (:func:`archive.check_archive_model`).
    TorchServe reads the copies, so what it serves is what was checked: the store's file
    could be replaced between a check of it and TorchServe's read (a build finishing, say).
    Returns the folder of copies; the run dir is this user's alone (where one archive fails,
    :func:`_launch` removes the folder)."""
    store = Path(settings.store)
    staged = staged_archives(run_dir)
    if staged.is_symlink() or staged.is_file():
        staged.unlink()
    changed = "(it changed while TorchServe was being started: a build running?)"
    staged.mkdir(mode=0o700, exist_ok=True)
    served = {f"{n}.mar" for n in names}
    for old in staged.iterdir():  # a former start's: only what is served now stays
        if old.name not in served or not old.is_file() or old.is_symlink():
            _remove(old)
    for n in names:
        rel, src, dst = f"archives/{n}.mar", settings.archives / f"{n}.mar", staged / f"{n}.mar"
        partial = staged / f".{n}.mar.partial"
        try:
            with src.open("rb") as f, open(partial, "wb", opener=_owner_only) as out:
                digest = archive.sha256_stream(f, copy_to=out)
        except FileNotFoundError:
            raise archive.ManifestError(f"model store {store} failed verification: missing: {rel} {changed}") from None
        if digest != verified.get(rel):
            raise archive.ManifestError(f"model store {store} failed verification: sha256 mismatch: {rel} {changed}")
        os.replace(partial, dst)
        try:
            archive.check_archive(dst)
            archive.check_archive_model(dst, store / archive.split_archive_name(n)[0])
        except archive.UnsafeArchive as e:  # the copy was checked; a user rebuilds the store's file
            raise archive.UnsafeArchive(str(e).replace(str(dst), str(src))) from None
    return staged


def _remove(path: Path) -> None:
    """Remove ``path``, a folder with what it holds, a link as a link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _launch(settings: ServeSettings, run_dir: Path, names: list[str], outlive_caller: bool,
            verified: dict[str, str]) -> TorchServe:
    """Check and copy the archives (:func:`_stage_archives`), start TorchServe on the copies
    and write its state file (the caller holds the start lock)."""
    existing = attach(run_dir)
    if existing is not None:
        raise ServeError(f"TorchServe already runs from {run_dir} (pid {existing.pid}); stop it first")
    # Until TorchServe is started, a failure (a later archive refused, a full disk, an
    # interrupt) leaves no copy, whole or partial: nothing runs from this run dir (attach).
    # From its start until its state file names it, an interrupt would leave a TorchServe that
    # nothing stops or finds (its own session: a Ctrl-C to this group never reaches it), so
    # SIGINT and SIGTERM are held till then. Then a SIGINT stops what was started, in order; a
    # SIGTERM left at its default ends this process there, where `stop` finds TorchServe by
    # its state file (and the lifeline watchdog stops one not meant to outlive its caller).
    proc: subprocess.Popen | None = None
    ts: TorchServe | None = None
    try:
        staged = _stage_archives(settings, run_dir, names, verified)
        with archive.signals_deferred():
            proc, offsets = _spawn(settings, run_dir, staged, names)
            ts = TorchServe(settings, names, proc.pid, proc, log_offsets=offsets)
            if not outlive_caller:
                ts.lifeline = _lifeline(proc.pid, run_dir)
            # whole or not at all: `stop` reads it to find what to stop
            partial = run_dir / f".{STATE_FILE}.{proc.pid}"
            partial.write_text(json.dumps(
                {"pid": proc.pid, "models": names, "settings": _settings_to_json(settings)}, indent=2) + "\n")
            os.replace(partial, run_dir / STATE_FILE)
    except BaseException:  # a failure (an archive refused, a full disk), or the interrupt held
        if ts is not None:
            ts.stop()  # and tidies: key, state file, copies
        else:
            if proc is not None:
                _stop_group(proc.pid, timeout=30.0)
            _remove_staged(run_dir)
        raise
    return ts


def _spawn(settings: ServeSettings, run_dir: Path, staged: Path,
           names: list[str]) -> tuple[subprocess.Popen, dict[Path, int]]:
    """Start TorchServe on the archive copies in ``staged``: its run dir's folders and config,
    and the process. Returns it with the sizes its log files had before it started."""
    (run_dir / "logs").mkdir(mode=0o700, exist_ok=True)
    (run_dir / "tmp").mkdir(mode=0o700, exist_ok=True)
    (run_dir / KEY_FILE).unlink(missing_ok=True)
    # A state file naming nothing that runs (attach): a run whose owner died before its
    # TorchServe's state was written would hide this one's from its watchdog's tidy.
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    # The launcher's pid file from a run that ended without `stop` (TMPDIR below): nothing
    # runs from this run dir (attach), but were its pid now another TorchServe's JVM, the
    # launcher would refuse to start ("already running").
    (run_dir / "tmp" / LAUNCHER_PID_FILE).unlink(missing_ok=True)
    config = run_dir / "config.properties"
    config.write_text(render_config(settings))
    cmd = [
        sys.executable, "-m", "ts.model_server", "--start", "--foreground", "--ncs",
        "--model-store", str(staged),
        "--ts-config", str(config),
        "--log-config", str(CONFIG_DIR / "log4j2.xml"),
        "--models", *[f"{n}={n}.mar" for n in names],
    ]
    env = server_env(os.environ)
    # TorchServe's launcher keeps its pid file in the temp dir and unpacks archives into
    # java.io.tmpdir: one per run directory, so servers on other run dirs do not collide.
    # The console carries the log only where stdout is a rotated stream (log4j2.xml).
    inherit = settings.console == "inherit"
    env.update(TMPDIR=str(run_dir / "tmp"), TEMP=str(run_dir / "tmp"),
               LOG_LOCATION=str(run_dir / "logs"), METRICS_LOCATION=str(run_dir / "logs"),
               CONSOLE_LOG_LEVEL="all" if inherit else "off")
    offsets = {p: p.stat().st_size for p in log_paths(run_dir) if p.is_file()}
    console = contextlib.nullcontext() if inherit else (run_dir / "logs" / CONSOLE_FILE).open("ab")
    with console as out:  # None (inherit): TorchServe writes to this process's stdout
        # umask 077: TorchServe writes its key file (every token) with the default mode and
        # makes it owner-only after; created owner-only, no other user can open it between
        proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, umask=0o077)
    return proc, offsets


def server_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment TorchServe and its workers get: this one less ``TS_*`` (TorchServe reads
    its settings from those, over the config file) and less any ``PYTHONPATH`` entry holding
    this checkout's handler or protocol packages. TorchServe puts the inherited ``PYTHONPATH``
    before an archive's own folder on its workers' path, so a gateway's ``PYTHONPATH`` (the
    image's ``/app:/app/proto``) had a worker run the archive's entry file with the
    checkout's ``handlers`` and ``probe_pb2``: code the archive's manifest and staleness check
    do not cover. Other entries (a GPU kit's site folder) are kept."""
    env = {k: v for k, v in environ.items() if not k.startswith("TS_")}
    if "PYTHONPATH" in env:
        kept = [os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep)  # TorchServe runs elsewhere
                if p and not (Path(p) / "handlers" / "__init__.py").is_file()
                and not (Path(p) / "robustgate" / "v1").is_dir()]
        if kept:
            env["PYTHONPATH"] = os.pathsep.join(kept)
        else:
            del env["PYTHONPATH"]
    return env


def _state_pid(run_dir: Path) -> int | None:
    """The pid the run dir's state file names; None where there is none to read."""
    try:
        return int(json.loads((run_dir / STATE_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def attach(run_dir: Path = DEFAULT_RUN_DIR) -> TorchServe | None:
    """The TorchServe started from ``run_dir`` by another process, or None."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        pid = int(state["pid"])
        s = dict(state["settings"])
        s["store"], s["run_dir"], s["models"] = Path(s["store"]), Path(s["run_dir"]), tuple(s["models"])
        models = list(state["models"])
    except (KeyError, TypeError, ValueError):
        raise ServeError(f"{path} is not the state `start` writes (edited by hand?): stop the TorchServe it "
                         "names yourself, if one runs, and remove the file") from None
    if not _alive(pid, Path(run_dir)):
        return None  # its launcher's group is gone (a reused pid is no TorchServe of this run dir's)
    try:
        settings = ServeSettings(**s)
    except (TypeError, ValueError):  # written by another version (other fields, a host now refused)
        settings = ServeSettings(store=s["store"], run_dir=s["run_dir"], models=s["models"])  # enough to stop it
    return TorchServe(settings, models, pid)


def stop(run_dir: Path = DEFAULT_RUN_DIR, timeout: float = 30.0) -> bool:
    """Stop the TorchServe started from ``run_dir``; False when none was running."""
    ts = attach(run_dir)
    if ts is None:
        return False
    ts.stop(timeout)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_store.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["start", "stop", "status"])
    p.add_argument("--store", type=Path, default=DEFAULT_STORE, help="model store (with manifest.json)")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, help="config, key file and logs")
    p.add_argument("--model", action="append", default=[], help="archive name to serve (repeat); default all")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--grpc-port", type=int, default=7070, help="gRPC inference port (management: +1)")
    p.add_argument("--http-port", type=int, default=8080, help="REST inference port (management +1, metrics +2)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for READY")
    p.add_argument("--console", choices=CONSOLES, default="file",
                   help="TorchServe's console: logs/torchserve.out in the run directory (the log itself then "
                        "goes only to the rolling logs/ts_log.log), or this command's stdout with the log on it "
                        "(a container's, which its runtime rotates; not a pipe read to its end: TorchServe keeps it)")
    p.add_argument("--live", action="store_true",
                   help="status: exit 0 while every model has a READY worker (a liveness probe: TorchServe "
                        "restarts a failed worker by itself, the others serving meanwhile); without it, "
                        "0 only while every worker is READY")
    p.add_argument("--no-system-metrics", action="store_true",
                   help="turn TorchServe's system metrics (CPU, memory, GPU, every minute) off: on a GPU "
                        "its collector needs the nvgpu package, which this image does not carry")
    args = p.parse_args(argv)
    try:
        return _command(args)
    except (ServeError, archive.ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a run directory that cannot be made or written
        print(archive.os_error_line(e, args.run_dir), file=sys.stderr)
        return 1


def _command(args: argparse.Namespace) -> int:
    if args.command == "stop":
        print("stopped" if stop(args.run_dir) else f"no TorchServe running from {args.run_dir}")
        return 0
    if args.command == "status":
        ts = attach(args.run_dir)
        if ts is None:
            print(f"no TorchServe running from {args.run_dir}")
            return 1
        report = {"pid": ts.pid, "grpc_inference": ts.grpc_inference_target, "management": ts.management_url,
                  "metrics": ts.metrics_url, "key_file": str(Path(ts.settings.run_dir) / KEY_FILE), "models": {}}
        ok = True
        for name in ts.models:
            try:
                report["models"][name] = ts.model_status(name)
                ok &= report["models"][name]["serving" if args.live else "ready"]
            except (OSError, urllib.error.URLError, ServeError, ValueError, LookupError, TypeError) as e:
                # LookupError, TypeError: a describe answer of another shape (an empty list)
                report["models"][name] = {"ready": False, "error": str(e) or type(e).__name__}
                ok = False
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    try:
        settings = ServeSettings(
            store=args.store, run_dir=args.run_dir, models=tuple(args.model), host=args.host,
            grpc_inference_port=args.grpc_port, grpc_management_port=args.grpc_port + 1,
            inference_port=args.http_port, management_port=args.http_port + 1, metrics_port=args.http_port + 2,
            startup_timeout_s=args.timeout, console=args.console, disable_system_metrics=args.no_system_metrics,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ts = start(settings, outlive_caller=True)
    print(f"TorchServe ready (pid {ts.pid}): gRPC {ts.grpc_inference_target}, models {', '.join(ts.models)}; "
          f"keys in {Path(ts.settings.run_dir) / KEY_FILE}; stop with `python -m model_store.serve stop`")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C, or run.sh passing on a SIGTERM: finally blocks ran
        sys.exit(130)
