"""Several gateway processes on one port (``--workers``): a real supervisor, real workers and a
real TorchServe, on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from robustgate.v1 import classifier_pb2_grpc as pb_grpc
from service.client import Client
from service.settings import Settings
from service.workers import (DUMP_SIGNAL, LOCK_FILE, MULTIPROC_ENV, START_TIMEOUT_S, Supervisor, _Slot, beat_interval,
                             metrics_dir, reserve_port)
from tests.conftest import free_port
from tests.test_gateway import png, requests_by_code, scrape, start_gateway, stop


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    out = []
    for child in psutil.Process(proc.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            continue
    return out


def wait_for(what: str, ok, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = ok()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def connections(address: str, n: int) -> list[grpc.Channel]:
    """``n`` channels, each its own TCP connection (a local subchannel pool: otherwise channels
    to one target share a connection)."""
    return [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(n)]


@pytest.fixture(scope="module")
def pool(calibrated_store: Path, torchserve, tmp_path_factory):
    metrics_port = free_port()
    tmp = tmp_path_factory.mktemp("pool")
    proc, address = start_gateway(calibrated_store, torchserve, tmp, workers="2", **{"metrics-port": str(metrics_port)})
    # SERVING comes from the first worker to listen; the kernel spreads connections only over
    # those listening: wait for both.
    port = int(address.rsplit(":", 1)[1])

    def listening() -> bool:
        workers = workers_of(proc)
        return len(workers) == 2 and all(
            any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in w.net_connections(kind="tcp"))
            for w in workers)

    wait_for("both workers listening", listening, timeout_s=60)
    yield proc, address, metrics_port
    stop(proc)


def test_connections_spread_over_the_workers_and_metrics_add_up(pool, fmnist) -> None:
    proc, address, metrics_port = pool
    workers = workers_of(proc)
    assert len(workers) == 2
    before = requests_by_code(metrics_port)
    channels = connections(address, 16)
    try:
        for k, ch in enumerate(channels):
            stub = pb_grpc.ClassifierServiceStub(ch)
            for i in range(2):
                answer = stub.Classify(Client.request(png(fmnist.test.images[2 * k + i]), "fmnist-cnn"), timeout=30)
                assert answer.model == "fmnist-cnn" and answer.gate.decision
        port = int(address.rsplit(":", 1)[1])
        serving = {w.pid for w in workers
                   for c in w.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}
        # 16 connections spread by the kernel: all on one worker has odds of 2 in 65,536
        assert serving == {w.pid for w in workers}
    finally:
        for ch in channels:
            ch.close()
    after = scrape(metrics_port)
    assert requests_by_code(metrics_port) - before == 32  # both workers' counts, summed once
    info = [labels for (name, labels), _ in after.items() if name == "robustgate_model_info"]
    assert len(info) == 1 and ("model", "fmnist-cnn") in info[0]  # one series, not one per worker
    assert after[("robustgate_backend_up", frozenset())] == 1.0
    assert after[("robustgate_inflight_requests", frozenset())] == 0.0


def test_the_summed_exposition_passes_promtool(pool) -> None:
    """The supervisor's exposition (the workers' files combined, its own metrics beside) is as
    clean as one process's: no lint finding, no ``_created`` series."""
    import shutil
    import urllib.request

    _, _, metrics_port = pool
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: install Debian's prometheus package (scripts/setup.sh does)"
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and not (out.stdout + out.stderr).strip(), out.stdout + out.stderr
    assert "_created" not in text
    assert "# TYPE robustgate_workers gauge" in text and "robustgate_worker_restarts_total" in text


def test_a_dead_worker_is_replaced_and_counts_never_go_back(pool, fmnist) -> None:
    proc, address, metrics_port = pool
    old = {w.pid for w in workers_of(proc)}
    before = requests_by_code(metrics_port)
    restarts = scrape(metrics_port)[("robustgate_worker_restarts_total", frozenset())]
    victim = min(old)
    mdir = Path(psutil.Process(victim).environ()[MULTIPROC_ENV])
    assert list(mdir.glob(f"counter_{victim}.db"))  # its counts, in files of its own
    os.kill(victim, signal.SIGKILL)

    def replaced() -> set[int] | None:
        pids = {w.pid for w in workers_of(proc)}
        return pids if len(pids) == 2 and victim not in pids else None

    new = wait_for("a replacement worker", replaced)
    assert old - {victim} <= new
    assert proc.poll() is None  # the supervisor carries on
    assert requests_by_code(metrics_port) == before  # the dead worker's counts stay in the sum
    assert not list(mdir.glob(f"*_{victim}.db")) and (mdir / "counter_dead.db").is_file()  # folded, not kept
    after = scrape(metrics_port)
    assert after[("robustgate_worker_restarts_total", frozenset())] == restarts + 1
    wait_for("the gauge of running workers", lambda: scrape(metrics_port)[("robustgate_workers", frozenset())] == 2)
    channels = connections(address, 8)
    try:
        for k, ch in enumerate(channels):
            pb_grpc.ClassifierServiceStub(ch).Classify(Client.request(png(fmnist.test.images[k]), "fmnist-cnn"),
                                                       timeout=30)
    finally:
        for ch in channels:
            ch.close()
    assert requests_by_code(metrics_port) == before + 8
    assert scrape(metrics_port)[("robustgate_inflight_requests", frozenset())] == 0.0


def test_a_hung_worker_is_killed_and_replaced(calibrated_store: Path, torchserve, tmp_path: Path, fmnist) -> None:
    """A worker whose event loop stops (SIGSTOP here; a call that never returns in life) is
    found by its heartbeat, killed and replaced; busy or idle workers that beat are left alone."""
    metrics_port = free_port()
    proc, address = start_gateway(calibrated_store, torchserve, tmp_path, workers="2",
                                  **{"worker-timeout-s": "3", "metrics-port": str(metrics_port)})
    log_file = tmp_path / f"gateway-{address.rsplit(':', 1)[1]}.log"
    try:
        old = {w.pid for w in workers_of(proc)}
        channels = connections(address, 4)
        stubs = [pb_grpc.ClassifierServiceStub(ch) for ch in channels]
        try:
            end, k = time.monotonic() + 6.0, 0  # twice the timeout, calls and idle gaps
            while time.monotonic() < end:
                stubs[k % 4].Classify(Client.request(png(fmnist.test.images[k]), "fmnist-cnn"), timeout=30)
                k += 1
                time.sleep(0.02)
            assert {w.pid for w in workers_of(proc)} == old  # nobody killed for working
            assert scrape(metrics_port)[("robustgate_worker_restarts_total", frozenset())] == 0
            victim = min(old)
            os.kill(victim, signal.SIGSTOP)

            def replaced() -> set[int] | None:
                pids = {w.pid for w in workers_of(proc)}
                return pids if len(pids) == 2 and victim not in pids else None

            assert old - {victim} <= wait_for("the hung worker's replacement", replaced, timeout_s=60)
            assert not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
            assert scrape(metrics_port)[("robustgate_worker_restarts_total", frozenset())] == 1
            assert f"worker pid {victim}: its event loop has not run for" in log_file.read_text()  # stopped: no stacks
            for k, stub in enumerate(stubs):  # each connection to the hung worker was cut; clients reconnect
                stub.Classify(Client.request(png(fmnist.test.images[k]), "fmnist-cnn"), timeout=30,
                              wait_for_ready=True)
        finally:
            for ch in channels:
                ch.close()
    finally:
        stop(proc)
    assert proc.returncode == 0


def test_sigterm_stops_every_worker_and_cleans_up(calibrated_store: Path, torchserve, tmp_path: Path) -> None:
    proc, _ = start_gateway(calibrated_store, torchserve, tmp_path, workers="3", **{"metrics-port": str(free_port())})
    workers = workers_of(proc)
    assert len(workers) == 3
    metrics_dir = Path(workers[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
    assert metrics_dir.is_dir() and any(metrics_dir.glob("*.db"))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    gone, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive
    assert not metrics_dir.exists()


def test_workers_stop_when_the_supervisor_is_killed(calibrated_store: Path, torchserve, tmp_path: Path) -> None:
    proc, _ = start_gateway(calibrated_store, torchserve, tmp_path, workers="2", **{"metrics-port": "-1"})
    workers = workers_of(proc)
    proc.kill()  # no chance to stop them itself
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=20)  # each drains (SIGTERM from the kernel) and exits
    assert not alive


def test_connections_age_out_gently_so_they_re_spread(calibrated_store: Path, torchserve, tmp_path: Path,
                                                      fmnist) -> None:
    """``max_connection_age_s``: the gateway closes a connection (GOAWAY) once it is that old;
    the client reconnects for its next call (a new connection, which the kernel may give to
    another worker), no call fails, and a stream open across the age runs to its end."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    proc, address = start_gateway(calibrated_store, torchserve, tmp_path, workers="2",
                                  **{"max-connection-age-s": "0.5"})
    port = int(address.rsplit(":", 1)[1])
    me = psutil.Process()

    def local_ports() -> set[int]:
        return {c.laddr.port for c in me.net_connections(kind="tcp")
                if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == port}

    try:
        with Client(address) as client:
            seen: set[int] = set()
            health = health_pb2_grpc.HealthStub(client._channel)
            end = time.monotonic() + 3
            while time.monotonic() < end:  # one channel, one call at a time
                assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING
                seen |= local_ports()
                time.sleep(0.05)
            assert len(seen) >= 3, seen  # about one connection per 0.5 s, each new

            def slow_items():  # a stream open for 2.5 s, five connection ages
                for i in range(10):
                    time.sleep(0.25)
                    yield Client.request(png(fmnist.test.images[i]), "fmnist-cnn", request_id=str(i))

            answers = list(client.classify_stream(slow_items(), timeout_s=30))
            assert [a.request_id for a in answers] == [str(i) for i in range(10)]
            assert all(a.WhichOneof("outcome") == "result" for a in answers)
    finally:
        stop(proc)


def run_service(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service", "--workers", "2", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, timeout=120)


def test_a_port_taken_fails_the_start_with_the_reason() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = run_service("--port", str(port), "--metrics-port", "-1")
    assert r.returncode == 2
    assert f"cannot start: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_a_worker_that_cannot_start_fails_the_start_with_its_reason(tmp_path: Path) -> None:
    r = run_service("--port", "0", "--metrics-port", "-1", "--torchserve-key-file", str(tmp_path / "missing.json"))
    assert r.returncode == 2
    supervisor = [line for line in r.stderr.splitlines() if "service.workers:" in line]
    assert supervisor and supervisor[-1].endswith(f"cannot start: cannot read TorchServe's key file {tmp_path / 'missing.json'}")
    assert "Traceback" not in r.stderr


def test_a_worker_that_cannot_be_started_stops_those_already_started(monkeypatch, caplog) -> None:
    """The workers were started in one list comprehension: when the second could not be
    (a fork refused at a pids limit, /dev/shm full) the first was never stopped, and the
    supervisor's exit waited on it (multiprocessing joins non-daemon children) for good. And
    a replacement that cannot be started stops the supervisor (exit 1) instead of raising."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    started: list = []

    def spawn(self, worker_settings):
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        proc = ctx.Process(target=time.sleep, args=(120,), daemon=False)  # a worker that would serve on
        proc.start()
        started.append(proc)
        return _Slot(proc, ctx.Event(), ctx.RawValue("d", 0.0))  # type: ignore[arg-type]

    monkeypatch.setattr(Supervisor, "_spawn", spawn)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        t0 = time.monotonic()
        with caplog.at_level("ERROR", logger="service.workers"):
            assert Supervisor(Settings(workers=3, port=0, metrics_port=-1)).run() == 2
        assert time.monotonic() - t0 < 30
        assert len(started) == 1 and not started[0].is_alive()  # stopped, not left to hold the exit
        assert "cannot start: a worker process could not be started: [Errno 11]" in caplog.text
        # a replacement: the dead worker's slot, a spawn refused
        sup = Supervisor(Settings(workers=1))
        dead = ctx.Process(target=time.sleep, args=(0,))
        dead.start()
        dead.join()
        sup.slots = [_Slot(dead, ctx.Event(), ctx.RawValue("d", 0.0))]  # type: ignore[arg-type]
        monkeypatch.setattr(Supervisor, "_forget_files", lambda self, pid, path: None)
        caplog.clear()
        with caplog.at_level("ERROR", logger="service.workers"):
            assert sup._replace_dead(Settings(), "unused") is False
        assert f"no worker could be started in place of pid {dead.pid}: [Errno 11]" in caplog.text
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for proc in started:
            proc.kill()


def test_reserve_port_holds_a_port_for_reuseport_binds_only() -> None:
    hold = reserve_port("127.0.0.1", 0)
    try:
        port = hold.getsockname()[1]
        assert port > 0
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # another program: refused
        with socket.socket() as worker:
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))  # a worker: beside it
            worker.listen()
    finally:
        hold.close()
    with pytest.raises(OSError, match="cannot listen on nowhere.invalid:1"):
        reserve_port("nowhere.invalid", 1)


def test_reserve_port_takes_a_port_its_last_run_left_in_time_wait() -> None:
    """A supervisor restarted in the same pod finds its port with the last run's connections in
    TIME_WAIT for a minute; they must not fail the start as a port taken."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server's side closes first: it is the one left in TIME_WAIT
    client.recv(1)
    client.close()
    listener.close()
    assert any(c.status == psutil.CONN_TIME_WAIT and c.laddr.port == port
               for c in psutil.net_connections(kind="tcp4")), "no TIME_WAIT on the port: the test set nothing up"
    hold = reserve_port("127.0.0.1", port)
    hold.close()


def test_a_killed_supervisors_metrics_dir_is_removed_by_the_next(tmp_path: Path) -> None:
    import fcntl

    stale = tmp_path / "robustgate-metrics-stale"  # its supervisor was killed: the lock is free
    stale.mkdir()
    (stale / LOCK_FILE).touch()
    (stale / "counter_123.db").write_bytes(b"x" * 100)
    live = tmp_path / "robustgate-metrics-live"  # a running supervisor's: locked
    live.mkdir()
    held = os.open(live / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)
    other = tmp_path / "robustgate-metrics-nolock"  # not one of ours
    other.mkdir()
    try:
        new, fd = metrics_dir(tmp_path)
        try:
            assert not stale.exists() and live.is_dir() and other.is_dir()
            assert new.is_dir() and new.name.startswith("robustgate-metrics-")
            probe = os.open(new / LOCK_FILE, os.O_RDWR)
            try:  # the new one is held: a later start leaves it alone
                with pytest.raises(BlockingIOError):
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(probe)
        finally:
            os.close(fd)
    finally:
        os.close(held)


@pytest.mark.parametrize("n", [0, 65])
def test_workers_out_of_range_are_refused(n: int) -> None:
    with pytest.raises(ValueError, match="workers must be in"):
        Settings(workers=n)


def test_a_hung_worker_writes_its_stacks_before_the_kill() -> None:
    """What the supervisor's SIGUSR1 gets from a worker whose main thread holds the GIL in a
    call that never returns (a regular expression backtracking here): its Python stacks."""
    hung = subprocess.Popen(
        [sys.executable, "-c", "import re, sys\n"
         "from service.workers import dump_stacks_on_signal\n"
         "dump_stacks_on_signal()\n"
         "def handle(request):\n"
         "    print('ready', flush=True)\n"
         "    return re.match(r'(a+)+$', 'a' * 64 + 'b')\n"
         "handle(None)\n"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hung.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # inside the match
        os.kill(hung.pid, DUMP_SIGNAL)
        time.sleep(0.5)
        assert hung.poll() is None  # the dump does not end it: the supervisor's SIGKILL does
    finally:
        hung.kill()
        _, err = hung.communicate(timeout=30)
    assert "most recent call first" in err and 'in handle' in err, err


def test_the_supervisor_kills_silent_workers_and_those_that_never_listen(caplog) -> None:
    """The supervisor's watch over real processes: a listening worker with a stale heartbeat and a
    replacement that has not listened within its start allowance are killed; a beating one
    and one still within its allowance are left alone."""
    sup = Supervisor(Settings(workers=2, worker_timeout_s=1.0, backend_timeout_s=30.0))

    def slot(ready: bool) -> _Slot:
        proc = sup.ctx.Process(target=time.sleep, args=(60,))
        proc.start()
        event = sup.ctx.Event()
        if ready:
            event.set()
        return _Slot(proc, event, sup.ctx.RawValue("d", 0.0))

    silent, beating, never_listened, starting = slot(True), slot(True), slot(False), slot(False)
    sup.slots = [silent, beating, never_listened, starting]
    now = time.monotonic()  # one clock for the beats and the look, however long the starts took
    for x, age in ((silent, 5.0), (beating, 0.2), (never_listened, 5.0), (starting, -60.0)):  # future: the allowance
        x.beat.value = now - age
    try:
        with caplog.at_level("ERROR", logger="service.workers"):
            sup._watch(now)
        assert [x.proc.is_alive() for x in sup.slots] == [False, True, False, True]
        assert f"worker pid {silent.proc.pid}: its event loop has not run for 5." in caplog.text
        assert f"worker pid {never_listened.proc.pid} did not listen within {5 + START_TIMEOUT_S + 30:.0f}" in caplog.text
        sup.settings = Settings(workers=2, worker_timeout_s=0)  # off: nothing is killed
        beating.beat.value = time.monotonic() - 100
        sup._watch(time.monotonic())
        assert beating.proc.is_alive()
    finally:
        for x in sup.slots:
            x.proc.kill()
            x.proc.join()


def test_a_workers_start_allowance_covers_its_first_probe_of_the_backend(monkeypatch) -> None:
    """A worker listens only after probing every model, which waits up to backend_timeout_s
    for a hung TorchServe; the supervisor gave a fixed 120 s, so a backend timeout near it
    failed every start and every restart. A worker now has START_TIMEOUT_S plus the backend
    timeout, from its spawn."""
    sup = Supervisor(Settings(workers=2, backend_timeout_s=90.0))
    assert sup.start_allowance_s == START_TIMEOUT_S + 90.0

    class NotStarted:  # the slot's process, never run: only its allowance is looked at
        def __init__(self, **kwargs) -> None:
            pass

        def start(self) -> None:
            pass

    monkeypatch.setattr(sup.ctx, "Process", NotStarted)
    before = time.monotonic()
    slot = sup._spawn(sup.settings)
    assert before + START_TIMEOUT_S + 90.0 <= slot.beat.value <= time.monotonic() + START_TIMEOUT_S + 90.0


def test_the_time_a_kill_takes_is_not_taken_for_a_frozen_supervisor() -> None:
    """A kill waits half a second for the worker's stacks: the next look, right after, saw a gap
    over half a 1 s timeout, took the supervisor for frozen and forgave every other stale
    worker. The gap now counts from the end of the look that killed."""
    sup = Supervisor(Settings(workers=2, worker_timeout_s=1.0))

    def slot() -> _Slot:
        proc = sup.ctx.Process(target=time.sleep, args=(60,))
        proc.start()
        event = sup.ctx.Event()
        event.set()
        return _Slot(proc, event, sup.ctx.RawValue("d", 0.0))

    first, second = slot(), slot()
    sup.slots = [first, second]
    try:
        now = time.monotonic()
        first.beat.value, second.beat.value = now - 5.0, now - 0.9  # the second: stale by the next look
        sup._watch(now)
        assert not first.proc.is_alive() and second.proc.is_alive()
        sup._watch(time.monotonic())
        assert not second.proc.is_alive()
    finally:
        for x in sup.slots:
            x.proc.kill()
            x.proc.join()


def test_a_frozen_pod_does_not_cost_every_worker() -> None:
    """After the supervisor itself stood still (a frozen or starved container), the workers,
    which stood still with it, get a fresh timeout rather than all being killed at once."""
    sup = Supervisor(Settings(workers=2, worker_timeout_s=1.0))
    proc = sup.ctx.Process(target=time.sleep, args=(60,))
    proc.start()
    ready = sup.ctx.Event()
    ready.set()
    t0 = time.monotonic()  # explicit clocks: a slow machine's pauses do not move the looks
    slot = _Slot(proc, ready, sup.ctx.RawValue("d", t0 - 5.0))
    sup.slots = [slot]
    try:
        sup._watched_at = t0 - 5.0  # the supervisor's last look was 5 s ago
        sup._watch(t0)
        assert proc.is_alive()
        sup._watch(t0 + 0.1)  # the next look, 0.1 s later: still within the fresh timeout
        assert proc.is_alive()
        slot.beat.value = t0 - 4.8  # and then it really stays silent
        sup._watch(t0 + 0.2)
        assert not proc.is_alive()
    finally:
        proc.kill()
        proc.join()


def test_heartbeats_come_often_enough_for_the_timeout() -> None:
    assert beat_interval(30.0) == 1.0
    assert beat_interval(2.0) == 0.5  # four beats a timeout
    assert beat_interval(0.0) == 1.0  # not watched: beats cost nothing to keep
    with pytest.raises(ValueError, match="worker_timeout_s must be >= 0"):
        Settings(worker_timeout_s=-1)
    # shorter than two of the supervisor's looks, every look forgave every hung worker
    with pytest.raises(ValueError, match="worker_timeout_s must be 0 .* or at least 1 s, got 0.3"):
        Settings(worker_timeout_s=0.3)


STOP_STRESS = """
import signal, time
from service.settings import Settings
from service.workers import Supervisor
sup = Supervisor(Settings())
signal.signal(signal.SIGALRM, lambda *_: sup.stopping.set())  # as run() installs it for SIGTERM
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
end = time.monotonic() + 2
while time.monotonic() < end:
    sup.stopping.wait(0.0005)
signal.setitimer(signal.ITIMER_REAL, 0)
assert sup.stopping.is_set() and sup.stopping.wait(0)
print("done")
"""


def test_the_stop_signal_never_hangs_the_supervisor_in_its_own_wait() -> None:
    """The handler set a threading.Event: run between two bytecodes of ``Event.wait`` while
    that held the event's lock, ``set`` blocked on the same lock (a supervisor hung on SIGTERM
    until the pod's grace period killed it). Thousands of signals land amid the supervisor's
    waits here; the old event hung or died in them within the two seconds."""
    r = subprocess.run([sys.executable, "-c", STOP_STRESS], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "done", (r.returncode, r.stderr[-2000:])


def test_the_stop_flag_waits_for_its_timeout_or_until_set() -> None:
    from service.workers import StopFlag

    flag = StopFlag()
    t0 = time.monotonic()
    assert flag.wait(0.1) is False and time.monotonic() - t0 >= 0.1
    threading.Timer(0.05, flag.set).start()
    t0 = time.monotonic()
    assert flag.wait(5) is True and time.monotonic() - t0 < 1 and flag.is_set()


def test_replacements_reasons_are_read_so_none_blocks_on_a_full_pipe() -> None:
    """A worker that cannot start puts its reason in a pipe the supervisor read only during the
    first start: replacements' reasons piled up until, some 64 KiB later, one blocked in its
    put and stood hung until the watch killed it. Each round of replacing drains them."""
    sup = Supervisor(Settings(workers=2))
    for _ in range(3):
        sup.why.put("cannot listen on 127.0.0.1:1: the port is taken")
    assert sup._replace_dead(Settings(), "/nonexistent") is True  # no slot has died
    assert sup.why.empty()


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler of its own for ``sig`` (/proc's SigCgt mask)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    return False


def test_a_sigterm_while_the_gateway_starts_stops_it_once_started(default_store: Path, tmp_path: Path) -> None:
    """A pod deleted while its gateway starts: as PID 1 (the image execs it) a SIGTERM whose
    action is the default is dropped by the kernel, and the gateway served on until SIGKILL,
    with no drain. It is recorded from `python -m service`'s first line and the gateway stops
    once it has started (here a backend that never answers holds the start for its 2 s
    probe); outside PID 1 the default action killed it (exit -15)."""
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "k"}, "management": {"key": "m"}, "API": {"key": "a"}}))
    with socket.socket() as silent:  # accepts connections, answers nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", "0", "--metrics-port", "-1",
             "--log-level", "INFO", "--store", str(default_store), "--torchserve-key-file", str(keys),
             "--torchserve-address", f"127.0.0.1:{silent.getsockname()[1]}", "--backend-timeout-s", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while not _catches(proc.pid, signal.SIGTERM):  # python -m service's first line has run
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    # started (its probe timed out), then drained at once
    assert "listening on" in out and "SIGTERM arrived while starting: stopping" in out and "draining" in out, out


def test_a_supervisor_stops_on_a_sigterm_that_came_while_it_started(monkeypatch) -> None:
    """The supervisor's imports come before its handlers: a SIGTERM recorded then stops it,
    exit 0, before it starts any worker (none started only to be stopped). Importing
    `service.__main__` (tests do) leaves SIGTERM as it was: only `python -m service` records it."""
    import importlib

    from service import early_signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        import service.__main__

        importlib.reload(service.__main__)  # its module code run again, as an import runs it
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        quiet = Supervisor(Settings(workers=2))
        quiet._on_signals()
        assert not quiet.stopping.is_set()
        monkeypatch.setattr(early_signal, "_received", True)
        told = Supervisor(Settings(workers=2, port=0, metrics_port=-1))
        assert told.run() == 0
        assert told.stopping.is_set() and told.slots == []
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_a_metrics_port_taken_fails_a_single_process_start_naming_it(default_store: Path, tmp_path: Path) -> None:
    """One process, as the supervisor does: the port named, not `[Errno 98] Address already in use`."""
    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"inference": {"key": "k"}, "management": {"key": "m"}, "API": {"key": "a"}}))
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "service", "--port", "0", "--metrics-port", str(port),
                            "--store", str(default_store), "--torchserve-key-file", str(keys)],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"cannot start: cannot listen on 127.0.0.1:{port} (metrics): the port is taken" in r.stderr, r.stderr[-2000:]


def test_a_dead_workers_counts_are_folded_into_one_file_and_the_sums_stay(tmp_path: Path) -> None:
    """A crash-looping worker left two files per death (64 KiB or more each) for every scrape
    to read and the pod's /tmp (128 MiB) to hold. They are added into `<type>_dead.db` and
    removed; the combined metrics read the same before and after, across several deaths."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from service.workers import FoldingCollector, fold_dead

    def worker_files(pid: int, n: float) -> None:  # as prometheus_client's multiprocess values write them
        counter = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        for code, v in (("OK", n), ("INTERNAL", 1.0)):
            counter.write_value(mmap_key("rg_calls", "rg_calls_total", ["code"], [code], "Calls."), v, 0.0)
        counter.close()
        hist = MmapedDict(str(tmp_path / f"histogram_{pid}.db"))
        for le, v in (("0.1", n), ("1.0", 2.0), ("+Inf", 0.0)):
            hist.write_value(mmap_key("rg_lat", "rg_lat_bucket", ["le"], [le], "Latency."), v, 0.0)
        hist.write_value(mmap_key("rg_lat", "rg_lat_sum", [], [], "Latency."), 0.5 * n, 0.0)
        hist.close()

    lock = threading.Lock()
    registry = CollectorRegistry()
    FoldingCollector(registry, str(tmp_path), lock)
    worker_files(101, 3.0)
    worker_files(102, 5.0)
    def exposed() -> list[bytes]:  # the scrape's lines; the order of its metrics follows the files'
        return sorted(generate_latest(registry).splitlines())

    both = exposed()
    assert b'rg_calls_total{code="OK"} 8.0' in both and b"rg_lat_count 12.0" in both
    fold_dead(101, str(tmp_path))
    assert exposed() == both
    fold_dead(102, str(tmp_path))
    fold_dead(102, str(tmp_path))  # folded already: nothing left to add twice
    assert exposed() == both
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_dead.db", "histogram_dead.db"]
    worker_files(103, 7.0)
    with_103 = exposed()
    replace = os.replace

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    os.replace = disk_full  # the sums written, not yet in place
    try:
        with pytest.raises(OSError, match="No space left"):
            fold_dead(103, str(tmp_path))
    finally:
        os.replace = replace
    assert exposed() == with_103  # counted once, as before the fold: nothing half added
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_103.db", "counter_dead.db", "histogram_103.db", "histogram_dead.db"]
    fold_dead(103, str(tmp_path))  # into the files the others were folded into
    text = b"\n".join(exposed())
    assert b'rg_calls_total{code="OK"} 15.0' in text and b'rg_calls_total{code="INTERNAL"} 3.0' in text
    assert b'rg_lat_bucket{le="0.1"} 15.0' in text and b"rg_lat_count 21.0" in text and b"rg_lat_sum 7.5" in text
    # a scrape waits for a folding in progress (between its adding and removing: counted twice)
    with lock:
        scrape = threading.Thread(target=generate_latest, args=(registry,))
        scrape.start()
        scrape.join(0.2)
        assert scrape.is_alive()
    scrape.join(5)
    assert not scrape.is_alive()


def test_a_starting_workers_gauges_count_once_it_listens(tmp_path: Path) -> None:
    """The pod's robustgate_backend_up is its lowest live worker's: a replacement wrote 0 at
    start and kept it until its first probe answered (up to backend_timeout_s), so every
    worker restart read as TorchServe down for the whole pod. A worker's live gauges now count
    from when it listens; its counters always (nothing is lost)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    from service.workers import FoldingCollector

    def worker_files(pid: int, up: float, calls: float) -> None:  # as prometheus_client's values write them
        gauge = MmapedDict(str(tmp_path / f"gauge_livemin_{pid}.db"))
        gauge.write_value(mmap_key("rg_up", "rg_up", [], [], "Up."), up, 0.0)
        gauge.close()
        counter = MmapedDict(str(tmp_path / f"counter_{pid}.db"))
        counter.write_value(mmap_key("rg_calls", "rg_calls_total", [], [], "Calls."), calls, 0.0)
        counter.close()

    listening = {101, 102}
    registry = CollectorRegistry()
    FoldingCollector(registry, str(tmp_path), threading.Lock(), lambda: listening)
    worker_files(101, 1.0, 3.0)
    worker_files(102, 1.0, 4.0)
    worker_files(103, 0.0, 0.5)  # the replacement, its first probe not yet answered
    text = generate_latest(registry)
    assert b"rg_up 1.0" in text and b"rg_calls_total 7.5" in text
    listening.add(103)  # it listens: its probe answered (or found TorchServe down, which then counts)
    text = generate_latest(registry)
    assert b"rg_up 0.0" in text and b"rg_calls_total 7.5" in text


def test_a_dead_workers_files_that_do_not_fold_are_left_and_the_supervisor_goes_on(tmp_path: Path, caplog) -> None:
    """A fault while folding (here a file that does not read; a full disk in the test above)
    was raised out of the supervisor's loop and stopped every worker; it is logged, and the
    files are left as they were, the dead worker's counts still read from its own."""
    import struct

    own = tmp_path / "counter_555.db"
    own.write_bytes(struct.pack("i", 40) + bytes(4) + struct.pack("i", 5) + b"\xff\xfe\xfd\xfc\xfb" + bytes(27))
    sup = Supervisor(Settings(workers=2))
    with caplog.at_level("ERROR", logger="service.workers"):
        sup._forget_files(555, str(tmp_path))
    assert "the metrics files of worker pid 555 could not be folded; left as they are" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_555.db"]  # no half-filled counter_dead.db
