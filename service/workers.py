"""Several gateway processes on one port: ``python -m service --workers N``.

One Python process served 1,000 to 2,300 unary calls/s on an H200 node: its event loop holds
one core (README, Results). Where the model is fast, that process is the limit, so with
``workers`` > 1 the process started becomes a supervisor of N gateway processes:

- **One port.** The supervisor reserves the port with a socket bound with ``SO_REUSEPORT`` that
  never listens (port 0 picks a free one, as with one process). Each worker binds the same port
  with ``SO_REUSEPORT`` and the kernel spreads new connections between the listening ones. One
  HTTP/2 connection stays on one worker: load spreads over connections, not calls. Before the
  reservation, the port is bound once without the option, so a port another program holds fails
  the start with the one-process message; both binds set ``SO_REUSEADDR`` as gRPC does, so the
  TIME_WAIT connections of a previous run (a restart in the same pod) do not.
- **Spawned, not forked**: gRPC's core does not survive a fork. A worker is a whole gateway
  (:func:`service.server.serve`) and coalesces, admits and drains on its own.
- **Metrics add up.** Workers write prometheus_client's multiprocess files into a fresh
  directory (``PROMETHEUS_MULTIPROC_DIR``, read when a worker imports prometheus_client); the
  supervisor serves their combination on the metrics port (counters and histograms summed, each
  gauge by its ``multiprocess_mode``, ``service/metrics.py``), with TorchServe's relay beside
  it. A replaced worker's counts stay in the sums, so counters never go back: its counter and
  histogram files are added into one ``<type>_dead.db`` each and removed. The directory is
  removed on the way out; one left by a supervisor that was killed (its lock no longer held)
  is removed by the next one to start, so a crash loop cannot fill the pod's /tmp.
- **A worker that dies is replaced**, with the exit logged; more than ``MAX_RESTARTS`` in
  ``RESTART_WINDOW_S`` and the supervisor stops everything and exits 1, so that the pod restarts.
  **So is one that hangs**: each worker's event loop writes a heartbeat (a shared double, the
  monotonic clock) about once a second; one not written for ``worker_timeout_s`` gets SIGUSR1,
  on which :mod:`faulthandler` writes every thread's stack to the log (it needs neither the
  loop nor the GIL), then SIGKILL, and counts as an exit (gunicorn's worker timeout, with shared
  memory for its temp file); a replacement gets its start allowance more to start listening
  (``START_TIMEOUT_S`` plus ``backend_timeout_s``, the longest its first probe of the backend waits),
  and after the supervisor itself stood still (a frozen container) every worker gets a fresh
  timeout rather than all being killed.
  The pod's liveness probe cannot see this: its connection reaches one worker of N.
  Workers get SIGTERM if the supervisor dies (``PR_SET_PDEATHSIG``).
- **Start and stop as one.** It returns 2 with the reason when a worker cannot start (the
  first one's message is logged by the worker), and logs "listening" only when every worker
  listens. SIGTERM or SIGINT: every worker drains (``grace_s``), then the supervisor exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import fcntl
import glob
import faulthandler
import logging
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, disable_created_metrics, multiprocess
from prometheus_client.mmap_dict import MmapedDict

from service import early_signal
from service import metrics_server as metrics_http
from service.metrics import SupervisorMetrics
from service.server import StartFailed, cannot_listen, serve
from service.settings import Settings

log = logging.getLogger("service.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
METRICS_DIR_PREFIX = "robustgate-metrics-"
LOCK_FILE = ".lock"  # held (flock) by the supervisor whose directory it is
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 120.0  # each worker loads the registry and connects: seconds, not minutes
# (its first probe of the backend, up to backend_timeout_s, comes on top: Supervisor.start_allowance_s)
KILL_AFTER_GRACE_S = 5.0  # a worker still running this long after its drain deadline is killed
HEARTBEAT_S = 1.0  # a worker's event loop marks its heartbeat this often (at most)
DUMP_SIGNAL = signal.SIGUSR1  # a worker writes its threads' stacks to stderr on it
DUMP_WAIT_S = 0.5  # time given to that before the kill
WORKER_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
_PR_SET_PDEATHSIG = 1


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT that never listens: it holds the port
    (0: a free one) for the workers. OSError, in the gateway's words, when another socket holds it."""
    bare = host.strip("[]")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror:
        raise OSError(f"cannot listen on {host}:{port}: not an address of this host") from None
    taken = cannot_listen(f"{host}:{port}")
    # SO_REUSEADDR, as gRPC's own bind: the TIME_WAIT connections a restarted gateway's last
    # run left on the port do not hold it (on Linux any listener, or a socket bound without
    # the option, still does). No SO_REUSEPORT on the probe: any holder makes it fail.
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError:
            raise taken from None
        port = probe.getsockname()[1]
    hold = socket.socket(family, kind, proto)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind((address[0], port, *address[2:]))
    except OSError:  # taken in between
        hold.close()
        raise taken from None
    return hold


def metrics_dir(parent: Path | None = None) -> tuple[Path, int]:
    """A fresh multiprocess directory under ``parent`` (the temp dir) and the fd of its held
    lock; first removes the directories of supervisors that are gone (their lock is free)."""
    base = Path(parent or tempfile.gettempdir())
    for old in base.glob(METRICS_DIR_PREFIX + "*"):
        try:
            fd = os.open(old / LOCK_FILE, os.O_RDWR)
        except OSError:
            continue  # not one of ours
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live supervisor's
        finally:
            os.close(fd)  # releases the lock if taken
        shutil.rmtree(old, ignore_errors=True)
        log.info("removed %s, left by a gateway that did not stop cleanly", old)
    making = Path(tempfile.mkdtemp(prefix="." + METRICS_DIR_PREFIX, dir=base))  # no other start looks here
    fd = os.open(making / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    new = base / making.name[1:]
    making.rename(new)  # under its name only once locked
    return new, fd


#: ``<type>_dead.db`` in the metrics directory: the counters and histograms of the workers that
#: are gone, summed (:func:`fold_dead`).
DEAD_FILES = "dead"


def fold_dead(pid: int, path: str) -> None:
    """Add a dead worker's counters and histograms into the directory's ``<type>_dead.db`` and
    remove its own files: the sums stay what they were (counters never go back), and a worker
    that dies every minute for days does not leave two files per death (64 KiB or more each)
    for every scrape to read and the pod's /tmp to hold. Its live gauges are
    :func:`prometheus_client.multiprocess.mark_process_dead`'s. The caller keeps scrapes out
    meanwhile (:class:`FoldingCollector`). All or nothing for each file: the sums are written
    to a copy that replaces ``<type>_dead.db`` only once whole, and the worker's file is out of
    the scrape's sight (renamed) meanwhile and put back if anything fails, so a failure (a file
    that does not read, a full disk) leaves the counts read once, as before."""
    for typ in ("counter", "histogram"):
        own = os.path.join(path, f"{typ}_{pid}.db")
        if not os.path.exists(own):
            continue
        dead = os.path.join(path, f"{typ}_{DEAD_FILES}.db")
        hidden, partial = own + ".folding", dead + ".partial"  # not *.db: no scrape reads them
        os.rename(own, hidden)
        try:
            values = [(key, value) for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(hidden)]
            if os.path.exists(dead):
                shutil.copyfile(dead, partial)
            sums = MmapedDict(partial)
            try:  # values as the files keep them: histogram buckets one by one, summed as merge sums them
                for key, value in values:
                    total, timestamp = sums.read_value(key)
                    sums.write_value(key, total + value, timestamp)
            finally:
                sums.close()
            os.replace(partial, dead)
        except BaseException:
            os.rename(hidden, own)  # as it was
            with contextlib.suppress(OSError):
                os.remove(partial)
            raise
        with contextlib.suppress(OSError):  # out of sight already: a leftover is never counted
            os.remove(hidden)


_LIVE_GAUGE_FILE = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


class FoldingCollector(multiprocess.MultiProcessCollector):
    """The workers' files combined, never while a dead worker's are folded (:func:`fold_dead`
    runs under the same lock): between its adding and its removing, a scrape would count that
    worker twice. ``listening``: the pids of the workers that listen; a worker's live gauges
    count from then on (a replacement's ``robustgate_backend_up`` reads 0 until its first probe
    answers, and the pod's is the lowest worker's: each restart read as TorchServe down)."""

    def __init__(self, registry: CollectorRegistry, path: str, lock: threading.Lock,
                 listening: Callable[[], set[int]] | None = None) -> None:
        self._lock = lock
        self._listening = listening
        super().__init__(registry, path=path)

    def collect(self):
        with self._lock:
            files = glob.glob(os.path.join(self._path, "*.db"))
            if self._listening is not None:
                listening = self._listening()
                files = [f for f in files if (m := _LIVE_GAUGE_FILE.fullmatch(os.path.basename(f))) is None
                         or int(m.group(1)) in listening]
            return list(self.merge(files, accumulate=True))


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) for this process when the supervisor dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def dump_stacks_on_signal() -> None:
    """On ``DUMP_SIGNAL`` write every thread's Python stack to stderr, even while the main thread
    holds the GIL in a call that never returns: what the log shows of a worker killed as hung."""
    faulthandler.register(DUMP_SIGNAL, all_threads=True)


def beat_interval(timeout_s: float) -> float:
    """Seconds between a worker's heartbeats: 1, or a quarter of a shorter timeout."""
    return min(HEARTBEAT_S, timeout_s / 4) if timeout_s > 0 else HEARTBEAT_S


async def _serve_beating(settings: Settings, ready: Callable[[], object], beat) -> None:
    """The gateway, with ``beat.value`` set to the monotonic clock while its event loop runs,
    from the moment it listens (starting may block the loop: the supervisor allows for it)."""
    every = beat_interval(settings.worker_timeout_s)
    tasks: list[asyncio.Task] = []

    async def heartbeat() -> None:
        while True:
            beat.value = time.monotonic()
            await asyncio.sleep(every)

    def started() -> None:
        beat.value = time.monotonic()  # before ``ready``: never stale once it counts
        tasks.append(asyncio.get_running_loop().create_task(heartbeat()))
        ready()

    try:
        await serve(settings, worker=True, started=started)
    finally:
        for t in tasks:
            t.cancel()


def _worker(settings: Settings, parent: int, ready: threading.Event, why: mp.SimpleQueue, beat) -> None:
    """A worker process: one whole gateway on the reserved port, beating into ``beat``. Exit 2:
    it could not start (the reason goes to ``why`` too)."""
    logging.basicConfig(level=settings.log_level, format=WORKER_LOG_FORMAT)
    dump_stacks_on_signal()
    _die_with_parent(parent)
    try:
        asyncio.run(_serve_beating(settings, ready.set, beat))
    except StartFailed as e:
        log.error("cannot start: %s", e)
        why.put(str(e))
        sys.exit(2)


class StopFlag:
    """Set by the supervisor's signal handler, polled by its loops. Not a threading.Event:
    Python runs a handler between any two bytecodes of the main thread, also while
    ``Event.wait`` holds the event's own lock, and ``Event.set`` there waits for that lock
    for ever (the supervisor hung on its SIGTERM; the pod was killed at its grace period).
    Setting an attribute takes no lock; a wait sleeps in short slices and looks again."""

    __slots__ = ("_set",)
    SLICE_S = 0.02

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """True as soon as set (within a slice); False after ``timeout`` seconds otherwise."""
        deadline = time.monotonic() + timeout
        while not self._set:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, self.SLICE_S))
        return True


@dataclasses.dataclass
class _Slot:
    proc: BaseProcess
    ready: threading.Event
    beat: Any  # a shared double: the monotonic clock when the worker's loop last ran


class Supervisor:
    """The workers of one port. :meth:`run` is the whole life: start, watch, drain."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ctx = mp.get_context("spawn")
        self.slots: list[_Slot] = []
        self.restarts: deque[float] = deque()
        self.stopping = StopFlag()  # set by SIGTERM / SIGINT
        self.why = self.ctx.SimpleQueue()  # a worker's reason for not starting
        self.metrics: SupervisorMetrics | None = None
        self.scrape_lock = threading.Lock()  # a scrape of the workers' files, or a dead one's folding
        self._watched_at: float | None = None  # the monotonic clock at the last watch
        # a worker listens only after one probe of every model (concurrent, each up to the
        # backend timeout): a hung TorchServe must not fail every worker's start or restart
        self.start_allowance_s = START_TIMEOUT_S + settings.backend_timeout_s

    def _listening(self) -> set[int]:
        """The pids of the workers that listen (read by a scrape's thread)."""
        return {s.proc.pid for s in list(self.slots) if s.ready.is_set() and s.proc.pid is not None}

    def _spawn(self, worker_settings: Settings) -> _Slot:
        ready = self.ctx.Event()
        # one writer, one reader of an aligned double: no lock. Until it listens, the worker
        # has its start allowance to do so on top of the timeout.
        beat = self.ctx.RawValue("d", time.monotonic() + self.start_allowance_s)
        proc = self.ctx.Process(target=_worker, args=(worker_settings, os.getpid(), ready, self.why, beat),
                                name="robustgate-worker", daemon=False)
        proc.start()
        return _Slot(proc, ready, beat)  # type: ignore[arg-type]

    def _wait_started(self) -> str | None:
        """None once every worker listens; else why not (a worker exited, time ran out, a signal)."""
        deadline = time.monotonic() + self.start_allowance_s
        while not all(s.ready.is_set() for s in self.slots):
            for s in self.slots:
                if not s.proc.is_alive() and not s.ready.is_set():
                    return self.why.get() if not self.why.empty() else f"a worker exited while starting (exit code {s.proc.exitcode})"
            if time.monotonic() > deadline:
                return f"the workers did not listen within {self.start_allowance_s:g} s"
            if self.stopping.wait(0.05):
                return "stopped while starting"
        return None

    def _watch(self, now: float) -> None:
        """One look for hung workers. When this process itself did not run for half a timeout
        (the container was frozen or starved), its workers could not beat either: each gets
        a fresh timeout from now instead of being killed all at once."""
        timeout = self.settings.worker_timeout_s
        if timeout <= 0:
            return
        if self._watched_at is not None and now - self._watched_at > timeout / 2:
            log.warning("the supervisor did not run for %.1f s: its workers' heartbeats count from now",
                        now - self._watched_at)
            for s in self.slots:
                s.beat.value = max(s.beat.value, now)  # a starting worker keeps its allowance
        began = time.monotonic()
        self._kill_hung(now, timeout)
        # from the look's end: the time spent killing (0.5 s for each one's stacks) was this
        # process running, not frozen; counted as a gap, it forgave every other stale worker
        self._watched_at = now + (time.monotonic() - began)

    def _kill_hung(self, now: float, timeout: float) -> None:
        """SIGKILL each worker whose heartbeat is older than ``timeout`` at ``now`` (one that
        does not listen yet has :attr:`start_allowance_s` more, from its spawn); the next
        :meth:`_replace_dead` replaces it."""
        for s in self.slots:
            silent = now - s.beat.value
            if silent <= timeout or not s.proc.is_alive():
                continue
            if s.ready.is_set():
                log.error("worker pid %d: its event loop has not run for %.1f s (worker_timeout_s %g): "
                          "killed; where its threads were follows", s.proc.pid, silent, timeout)
            else:
                log.error("worker pid %d did not listen within %.1f s of its start: killed; where its "
                          "threads were follows", s.proc.pid, silent + self.start_allowance_s)
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.proc.pid, DUMP_SIGNAL)  # type: ignore[arg-type]
            time.sleep(DUMP_WAIT_S)
            s.proc.kill()
            s.proc.join(KILL_AFTER_GRACE_S)

    def _forget_files(self, pid: int, metrics_path: str) -> None:
        """A dead worker's metrics files: its live gauges leave the sums, its counters and
        histograms are folded (:func:`fold_dead`). A fault there is logged and leaves the files
        as they are (its counts still read from them): it must not take every worker down."""
        try:
            multiprocess.mark_process_dead(pid, metrics_path)
            with self.scrape_lock:  # no scrape sees its counts twice, or not at all
                fold_dead(pid, metrics_path)
        except Exception:
            log.exception("the metrics files of worker pid %d could not be folded; left as they are", pid)

    def _replace_dead(self, worker_settings: Settings, metrics_path: str) -> bool:
        """Start a worker in place of each that exited; False when they die too often."""
        while not self.why.empty():  # a replacement's reason for not starting (it logged it):
            self.why.get()           # unread, 64 KiB of them would block the next in its put
        dead = [i for i, s in enumerate(self.slots) if not s.proc.is_alive()]
        for i in dead:  # every dead one's files first: a replacement could be given a pid just freed
            self._forget_files(self.slots[i].proc.pid, metrics_path)  # type: ignore[arg-type]
        for i in dead:
            s = self.slots[i]
            now = time.monotonic()
            self.restarts.append(now)
            while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
                self.restarts.popleft()
            if len(self.restarts) > MAX_RESTARTS:
                log.error("worker pid %d exited (exit code %s): more than %d exits in %g s, stopping",
                          s.proc.pid, s.proc.exitcode, MAX_RESTARTS, RESTART_WINDOW_S)
                return False
            log.error("worker pid %d exited (exit code %s); starting another", s.proc.pid, s.proc.exitcode)
            try:
                self.slots[i] = self._spawn(worker_settings)
            except OSError as e:  # its files are folded already: stop, as when they die too often
                log.error("no worker could be started in place of pid %d: %s; stopping", s.proc.pid, e)
                return False
            if self.metrics is not None:
                self.metrics.restarts.inc()
        return True

    def _stop_workers(self) -> None:
        """SIGTERM to each worker (each drains within grace_s), then kill what outlives that."""
        for s in self.slots:
            if s.proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(s.proc.pid, signal.SIGTERM)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.settings.grace_s + KILL_AFTER_GRACE_S
        for s in self.slots:
            s.proc.join(max(0.0, deadline - time.monotonic()))
            if s.proc.is_alive():
                log.error("worker pid %d did not stop in time: killed", s.proc.pid)
                s.proc.kill()
                s.proc.join()

    def _on_signals(self) -> None:
        """SIGTERM and SIGINT stop it; a SIGTERM that came while it started (the imports,
        :mod:`service.early_signal`) stops it as soon as it can."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        if early_signal.received():
            self.stopping.set()

    def run(self) -> int:
        """0 after a drain; 2 when the gateway cannot start; 1 when workers keep dying."""
        s = self.settings
        self._on_signals()
        if self.stopping.is_set():  # a SIGTERM while it started: no worker to start only to stop
            log.info("SIGTERM arrived while starting: stopping")
            return 0
        try:
            hold = reserve_port(s.host, s.port)
        except OSError as e:
            log.error("cannot start: %s", e)
            return 2
        mdir, lock = metrics_dir()
        metrics_server = None
        rc = 0
        try:
            if s.metrics_port >= 0:
                registry = CollectorRegistry()
                FoldingCollector(registry, str(mdir), self.scrape_lock, self._listening)
                disable_created_metrics()  # as the workers do
                self.metrics = SupervisorMetrics(registry)  # in this process: not in the workers' files
                try:
                    metrics_server, _ = metrics_http.start(s.host, s.metrics_port, registry, s.torchserve_metrics_url)
                except OSError:
                    log.error("cannot start: %s", cannot_listen(f"{s.host}:{s.metrics_port} (metrics)"))
                    return 2
                except ValueError as e:  # the relay's URL (its host does not resolve)
                    log.error("cannot start: %s", e)
                    return 2
            port = hold.getsockname()[1]
            worker_settings = dataclasses.replace(s, port=port, metrics_port=-1, workers=1)
            os.environ[MULTIPROC_ENV] = str(mdir)  # the workers inherit it
            self.slots = []
            try:
                for _ in range(s.workers):  # one by one: a failure stops those started (finally), which
                    self.slots.append(self._spawn(worker_settings))  # would hold the exit for good
            except OSError as e:  # no process or no shared memory for one (a pids limit, /dev/shm full)
                log.error("cannot start: a worker process could not be started: %s", e)
                return 2
            why = self._wait_started()
            if why is not None:
                if not self.stopping.is_set():
                    log.error("cannot start: %s", why)
                    rc = 2
                return rc
            log.info("gateway listening on %s:%d with %d worker processes (pids %s), metrics %s",
                     s.host, port, len(self.slots), ", ".join(str(x.proc.pid) for x in self.slots),
                     metrics_server.server_port if metrics_server is not None else "off")
            while not self.stopping.wait(0.2):
                self._watch(time.monotonic())
                if not self._replace_dead(worker_settings, str(mdir)):
                    rc = 1
                    break
                if self.metrics is not None:
                    self.metrics.workers.set(sum(x.proc.is_alive() for x in self.slots))
            log.info("draining: up to %.1f s for in-flight calls in each worker", s.grace_s)
            return rc
        finally:
            self._stop_workers()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()
            hold.close()
            os.environ.pop(MULTIPROC_ENV, None)
            shutil.rmtree(mdir, ignore_errors=True)
            os.close(lock)


def supervise(settings: Settings) -> int:
    """Run ``settings.workers`` gateway processes on one port; the exit code (see :meth:`Supervisor.run`)."""
    return Supervisor(settings).run()
