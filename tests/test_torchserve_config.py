"""model_store.serve without a running TorchServe: the rendered configuration, the key
file, and the refusal to start on a store that fails its manifest."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from model_store import archive, serve


def test_rendered_config_is_loopback_with_token_auth_and_prometheus() -> None:
    s = serve.ServeSettings(grpc_inference_port=17070, management_port=18081, job_queue_size=77)
    cfg = dict(
        line.split("=", 1) for line in serve.render_config(s).splitlines() if line and not line.startswith("#")
    )
    assert cfg["grpc_inference_address"] == "127.0.0.1" and cfg["grpc_inference_port"] == "17070"
    assert cfg["management_address"] == "http://127.0.0.1:18081"
    assert all("127.0.0.1" in v for k, v in cfg.items() if k.endswith("_address"))
    assert cfg["disable_token_authorization"] == "false"
    assert cfg["enable_model_api"] == "false"
    assert cfg["metrics_mode"] == "prometheus"
    assert cfg["job_queue_size"] == "77"
    assert float(cfg["token_expiration_min"]) >= 60 * 24


def test_free_ports_are_distinct_even_where_the_kernel_reuses_a_released_port(monkeypatch) -> None:
    """A kernel may give bind(port 0) the port it released a moment ago. The five TorchServe
    ports must still differ: two listeners told one port and TorchServe fails to start. (An
    ephemeral range with no room below it leaves the pick to the kernel.)"""
    bound: set[int] = set()

    class Reusing:  # bind(0) takes the lowest port not bound right now
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def bind(self, addr):
            assert addr == ("127.0.0.1", 0)
            self.port = min(set(range(40000, 40010)) - bound)
            bound.add(self.port)

        def getsockname(self):
            return ("127.0.0.1", self.port)

        def close(self):
            bound.discard(getattr(self, "port", None))

    monkeypatch.setattr(serve, "ephemeral_range", lambda: (serve.PORTS_BELOW_EPHEMERAL_FROM + 10, 60999))
    monkeypatch.setattr(serve.socket, "socket", Reusing)
    s = serve.ServeSettings.on_free_ports(metrics_port=1234)
    ports = [s.grpc_inference_port, s.grpc_management_port, s.inference_port, s.management_port]
    assert len(set(ports)) == 4 and s.metrics_port == 1234 and not bound  # all released again
    assert len(set(serve.free_ports(6))) == 6


def test_free_ports_stay_out_of_the_range_outgoing_connections_take_and_pass_over_taken_ones(monkeypatch) -> None:
    """The kernel gives outgoing connections local ports from its ephemeral range, so a port
    picked there can be taken by any client between the pick and the listener's bind; ports
    below it cannot. A port someone listens on, or one already picked, is passed over."""
    low = 32768  # Linux's default; whatever this machine's is
    monkeypatch.setattr(serve, "ephemeral_range", lambda: (low, 60999))
    ports = serve.free_ports(50)
    assert len(set(ports)) == 50
    assert all(serve.PORTS_BELOW_EPHEMERAL_FROM <= p < low for p in ports)
    for p in ports:  # free: each binds
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[0]))
        taken.listen()
        picks = iter([ports[0], ports[1], ports[1], ports[2]])
        monkeypatch.setattr(serve.random.SystemRandom, "randrange", lambda self, a, b: next(picks))
        assert serve.free_ports(2) == [ports[1], ports[2]]


def test_the_ephemeral_range_is_the_kernels_or_linuxs_default(monkeypatch, tmp_path) -> None:
    (tmp_path / "range").write_text("1024\t4999\n")
    monkeypatch.setattr(serve, "EPHEMERAL_RANGE_FILE", tmp_path / "range")
    assert serve.ephemeral_range() == (1024, 4999)
    monkeypatch.setattr(serve, "EPHEMERAL_RANGE_FILE", tmp_path / "absent")
    assert serve.ephemeral_range() == (32768, 60999)


def test_torchserves_apis_are_called_directly_whatever_proxy_the_environment_names(proxy_env) -> None:
    """urlopen followed http_proxy even for 127.0.0.1: a shell or pod that set one for its
    egress sent TorchServe's management token to the proxy, and readiness never came."""
    import http.server
    import threading

    heard: list[str | None] = []

    class Api(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            heard.append(self.headers.get("Authorization"))
            body = json.dumps([{"modelName": "m"}]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        answer = serve._http_json(f"http://127.0.0.1:{server.server_address[1]}/models/m", "secret")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert answer == [{"modelName": "m"}] and heard == ["Bearer secret"]
    assert proxy_env == []


def test_log_config_is_warn_level_and_bounded() -> None:
    import xml.etree.ElementTree as ET

    xml = (serve.CONFIG_DIR / "log4j2.xml").read_text()
    assert '<Root level="warn">' in xml and '<Logger name="ACCESS_LOG" level="off"/>' in xml
    appenders = ET.fromstring(xml).find("Appenders")
    assert appenders is not None
    # Every file TorchServe logs to rolls by size and keeps a bounded number of old files;
    # the console passes only what serve.py's CONSOLE_LOG_LEVEL lets through.
    for rolling in appenders.findall("RollingFile"):
        assert rolling.find("Policies/SizeBasedTriggeringPolicy") is not None, rolling.get("name")
        assert int(rolling.find("DefaultRolloverStrategy").get("max")) <= 5, rolling.get("name")
    assert not appenders.findall("File") and not appenders.findall("RandomAccessFile")
    (console,) = appenders.findall("Console")
    assert console.find("ThresholdFilter").get("level") == "${env:CONSOLE_LOG_LEVEL:-all}"


def test_console_setting_is_checked() -> None:
    assert serve.ServeSettings().console == "file"
    with pytest.raises(ValueError, match="console must be one of file, inherit"):
        serve.ServeSettings(console="stdout")


def test_log_tail_shows_only_this_runs_lines(tmp_path: Path) -> None:
    console, log = serve.log_paths(tmp_path)
    log.parent.mkdir()
    console.write_text("old console line\n")
    log.write_text("old failure from an earlier run\n")
    offsets = {p: p.stat().st_size for p in (console, log)}
    ts = serve.TorchServe(serve.ServeSettings(run_dir=tmp_path), [], 0, log_offsets=offsets)
    with log.open("a") as f:
        f.write("this run's failure\n")
    tail = ts.log_tail()
    assert "this run's failure" in tail and "earlier run" not in tail and "old console" not in tail
    log.write_text("rolled: a new file\n")  # shorter than the offset: read from its start
    assert "rolled: a new file" in ts.log_tail()
    attached = serve.TorchServe(serve.ServeSettings(run_dir=tmp_path), [], 0)  # offsets unknown
    assert "old console line" in attached.log_tail()


def test_read_keys(tmp_path: Path) -> None:
    (tmp_path / serve.KEY_FILE).write_text(json.dumps({
        "management": {"key": "m", "expiration time": "x"},
        "inference": {"key": "i", "expiration time": "x"},
        "API": {"key": "a"},
    }))
    assert serve.read_keys(tmp_path) == serve.Keys(inference="i", management="m", api="a")
    with pytest.raises(serve.ServeError, match="key file"):
        serve.read_keys(tmp_path / "nowhere")
    for odd in ({"inference": {"key": "i"}}, [1, 2], {"inference": {"key": 3}, "management": {"key": "m"},
                                                     "API": {"key": "a"}}):
        (tmp_path / serve.KEY_FILE).write_text(json.dumps(odd))  # no traceback: a message
        with pytest.raises(serve.ServeError, match="key file .* (is not in the layout|holds an empty)"):
            serve.read_keys(tmp_path)


def test_start_refuses_a_store_that_fails_its_manifest(tiny_store: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    mar = store / "archives" / "fmnist-cnn-onnx.mar"
    mar.write_bytes(mar.read_bytes() + b"tampered")
    run_dir = tmp_path / "run"
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: archives/fmnist-cnn-onnx.mar"):
        serve.start(serve.ServeSettings(store=store, run_dir=run_dir))
    assert not (run_dir / serve.STATE_FILE).exists()  # nothing was started


def test_an_archive_replaced_after_verification_is_refused(tiny_store: Path, tmp_path: Path,
                                                            monkeypatch) -> None:
    """The store's archive replaced between the manifest check and the copy TorchServe is to
    read (a build finishing as a start runs): the copy's hash is not the verified one. The
    start fails whole: the copy of the archive staged before it is removed too."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    mar = store / "archives" / "fmnist-cnn-onnx.mar"
    verify = archive.verify_manifest

    def verify_then_replace(*args, **kwargs):
        out = verify(*args, **kwargs)
        mar.write_bytes(mar.read_bytes() + b"rebuilt")
        return out

    monkeypatch.setattr(archive, "verify_manifest", verify_then_replace)
    run_dir = tmp_path / "run"
    with pytest.raises(archive.ManifestError, match="sha256 mismatch: archives/fmnist-cnn-onnx.mar "
                                                    r"\(it changed while TorchServe was being started"):
        serve.start(serve.ServeSettings.on_free_ports(store=store, run_dir=run_dir,
                                                      models=("fmnist-cnn-torchscript", "fmnist-cnn-onnx")))
    assert serve.attach(run_dir) is None
    assert not serve.staged_archives(run_dir).exists()  # no copy, whole or partial, of either archive


def test_torchserve_serves_the_copy_that_was_checked(tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    """The archives were checked in the store and TorchServe read them from the store after:
    one replaced in between was served unchecked. TorchServe now reads the run dir's copies,
    which are what was checked; here the store's file is garbage by the time TorchServe
    starts, and the model it serves is the checked one."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    mar = store / "archives" / "fmnist-cnn-onnx.mar"
    check = archive.check_archive_model

    def check_then_replace(path: Path, model_dir: Path) -> None:
        check(path, model_dir)
        mar.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: no model in it

    monkeypatch.setattr(archive, "check_archive_model", check_then_replace)
    run_dir = tmp_path / "run"
    (run_dir / serve.STAGED_ARCHIVES).mkdir(parents=True, mode=0o700)
    (run_dir / serve.STAGED_ARCHIVES / "fmnist-cnn-torchscript.mar").write_bytes(b"a former start's")
    (run_dir / serve.STAGED_ARCHIVES / "fmnist-cnn-onnx.mar").mkdir()  # in the copy's way
    (run_dir / serve.STAGED_ARCHIVES / "fmnist-cnn-onnx.mar" / "x").write_bytes(b"x")
    with serve.start(serve.ServeSettings.on_free_ports(store=store, run_dir=run_dir,
                                                       models=("fmnist-cnn-onnx",))) as ts:
        assert ts.model_status("fmnist-cnn-onnx")["ready"]
        staged = sorted((run_dir / serve.STAGED_ARCHIVES).iterdir())
        assert [p.name for p in staged] == ["fmnist-cnn-onnx.mar"]  # only what is served now
        assert staged[0].stat().st_mode & 0o777 == 0o600
        assert archive.sha256_file(staged[0]) == archive.sha256_file(tiny_store / "archives" / "fmnist-cnn-onnx.mar")
    assert not (run_dir / serve.STAGED_ARCHIVES).exists()  # stopped: no copy left behind
    assert not (run_dir / serve.KEY_FILE).exists() and not (run_dir / serve.STATE_FILE).exists()


def test_a_stop_leaves_the_run_dir_to_a_start_that_took_it_over(tmp_path: Path) -> None:
    """A stop tidies the run dir (key, state, archive copies) under the start lock: a start
    holding it (staging its copies, launching) is waited for, and once that start's state file
    names its own TorchServe, its files stay (before, a stop that checked the state file just
    before a new start wrote it deleted the new one's state and copies). A start that fails
    stops what it started under its own lock, which it does not wait for."""
    staged = tmp_path / serve.STAGED_ARCHIVES
    staged.mkdir()
    (staged / "fmnist-cnn-onnx.mar").write_bytes(b"a copy")
    ended = subprocess.Popen(["true"])
    ended.wait()  # a pid that runs nothing from the run dir: stop has nothing to signal
    gone = serve.TorchServe(serve.ServeSettings(store=tmp_path / "store", run_dir=tmp_path), ["fmnist-cnn-onnx"],
                            ended.pid)
    holding = threading.Event()

    def next_start() -> None:
        with serve._start_lock(tmp_path):
            holding.set()
            time.sleep(0.5)  # staging, launching
            (tmp_path / serve.STATE_FILE).write_text(json.dumps({"pid": ended.pid + 1}))

    t = threading.Thread(target=next_start)
    t.start()
    assert holding.wait(10)
    gone.stop()
    t.join()
    assert (staged / "fmnist-cnn-onnx.mar").exists() and (tmp_path / serve.STATE_FILE).exists()
    (tmp_path / serve.STATE_FILE).unlink()
    with serve._start_lock(tmp_path):  # this thread's own start failing
        t0 = time.monotonic()
        gone.stop()
        assert time.monotonic() - t0 < serve.START_LOCK_WAIT_S / 2
    assert not staged.exists()


def test_a_tidy_without_the_lock_keeps_the_copies_and_the_watchdogs_keeps_all(tmp_path: Path, monkeypatch) -> None:
    """A start stuck holding the run dir's lock: stop's tidy (someone waits on it) gives up
    after START_LOCK_WAIT_S and removes the key and state files, not the copies; the
    watchdog's (nobody waits on it) removes nothing without the lock."""
    monkeypatch.setattr(serve, "START_LOCK_WAIT_S", 0.2)
    files = [tmp_path / serve.KEY_FILE, tmp_path / serve.STATE_FILE, tmp_path / serve.STAGED_ARCHIVES / "m.mar"]
    files[2].parent.mkdir()
    for f in files:
        f.write_text(json.dumps({"pid": 4321}))
    fd = os.open(tmp_path / serve.START_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # the stuck start
        serve._tidy(tmp_path, 4321, need_lock=True)
        assert all(f.exists() for f in files)
        serve._tidy(tmp_path, 4321)
        assert [f.exists() for f in files] == [False, False, True]
    finally:
        os.close(fd)
    serve._tidy(tmp_path, 4321, need_lock=True)
    assert not files[2].parent.exists()


def test_a_stale_state_file_does_not_keep_a_failed_starts_files(tiny_store: Path, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """A state file naming nothing that runs (its owner killed before it stopped, or before
    its own state was written) is removed as a start begins: it hid the new TorchServe's key
    file and copies from the tidy of a start that failed (here: its state could not be
    written) and from the watchdog's."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    ended = subprocess.Popen(["true"])
    ended.wait()
    (run_dir / serve.STATE_FILE).write_text(json.dumps({"pid": ended.pid, "models": [], "settings": {
        "store": str(tiny_store), "run_dir": str(run_dir), "models": []}}))
    replace = os.replace

    def no_room_for_state(src, dst):
        if Path(dst).name == serve.STATE_FILE:
            raise OSError(28, "No space left on device")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", no_room_for_state)
    with pytest.raises(OSError, match="No space left"):
        serve.start(serve.ServeSettings.on_free_ports(store=tiny_store, run_dir=run_dir, models=("fmnist-cnn-onnx",)))
    monkeypatch.undo()
    left = [n for n in (serve.KEY_FILE, serve.STATE_FILE, serve.STAGED_ARCHIVES) if (run_dir / n).exists()]
    assert not left


def test_a_run_dir_overlapping_the_store_is_refused(tiny_store: Path, tmp_path: Path) -> None:
    """The run dir gets TorchServe's files and a copy of each served archive in ``archives/``,
    clearing what else is there: a run dir that is the store (or in it, or holds it as its
    ``archives/``) would have deleted the store's other archives."""
    store = tmp_path / "store"
    shutil.copytree(tiny_store, store)
    before = sorted(p.name for p in (store / "archives").iterdir())
    for run_dir in (store, store / "run", store / "archives", tmp_path):
        s = store if run_dir != tmp_path else tmp_path / serve.STAGED_ARCHIVES
        if run_dir == tmp_path:
            shutil.copytree(store, s)
        with pytest.raises(serve.ServeError, match="overlap"):
            serve.start(serve.ServeSettings.on_free_ports(store=s, run_dir=run_dir, models=("fmnist-cnn-onnx",)))
        assert sorted(p.name for p in (s / "archives").iterdir()) == before
    archive.verify_manifest(store)


def test_unknown_model_and_idle_stop(tiny_store: Path, tmp_path: Path) -> None:
    with pytest.raises(serve.ServeError, match="archives not found"):
        serve.start(serve.ServeSettings(store=tiny_store, run_dir=tmp_path, models=("nope",)))
    # a path is no archive name: "/x" was looked for outside the store, "../x" refused by
    # TorchServe only after the whole start-up wait
    outside = tmp_path / "elsewhere.mar"
    shutil.copy(tiny_store / "archives" / "fmnist-cnn-onnx.mar", outside)
    for name in (str(outside.with_suffix("")), "../elsewhere", "a/b"):
        with pytest.raises(serve.ServeError, match="no path"):
            serve.start(serve.ServeSettings(store=tiny_store, run_dir=tmp_path, models=(name,)))
    assert serve.stop(tmp_path) is False
    assert serve.attach(tmp_path) is None


def test_a_pid_file_left_by_a_run_that_ended_unstopped_does_not_block_the_next(tiny_store: Path,
                                                                              tmp_path: Path) -> None:
    """The launcher keeps its JVM's pid in the run dir's temp folder and refuses to start while
    that pid is a TorchServe's: left behind by a run that ended without ``stop``, and the pid
    since reused by another run dir's TorchServe, it blocked this one ("already running")."""
    run_dir = tmp_path / "run"
    (run_dir / "tmp").mkdir(parents=True, mode=0o700)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "org.pytorch.serve.ModelServer"])
    try:
        (run_dir / "tmp" / serve.LAUNCHER_PID_FILE).write_text(f"{other.pid}\n")
        with serve.start(serve.ServeSettings.on_free_ports(store=tiny_store, run_dir=run_dir,
                                                           models=("fmnist-cnn-onnx",))) as ts:
            assert ts.model_status("fmnist-cnn-onnx")["workers"]
            # the start lock went with its start: TorchServe did not inherit it
            with open(run_dir / serve.START_LOCK_FILE) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        other.kill()


def test_a_second_start_on_a_run_dir_waits_for_the_first_to_name_what_it_started(
        tiny_store: Path, tmp_path: Path, monkeypatch) -> None:
    """Two starts on one run dir both found nothing running and launched two TorchServes (the
    second's state file hid the first from `stop`). A start waits for the run dir's start
    lock, held until the state file is written, then finds what the first started."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    settings = serve.ServeSettings.on_free_ports(store=tiny_store, run_dir=run_dir, models=("fmnist-cnn-onnx",))
    monkeypatch.setattr(serve, "START_LOCK_WAIT_S", 0.5)
    with open(run_dir / serve.START_LOCK_FILE, "w") as held:  # a start in progress elsewhere
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(serve.ServeError, match="another start on .* has held it for 0.5 s"):
            serve.start(settings, wait=False)
    assert serve.attach(run_dir) is None and not (run_dir / "config.properties").exists()
    # the lock freed while one waits: the waiting start goes on
    monkeypatch.setattr(serve, "START_LOCK_WAIT_S", 30.0)
    held = open(run_dir / serve.START_LOCK_FILE, "w")
    fcntl.flock(held, fcntl.LOCK_EX)
    t0 = time.monotonic()
    threading.Timer(0.5, held.close).start()
    with serve.start(settings, wait=False) as ts:
        assert time.monotonic() - t0 >= 0.4 and serve.attach(run_dir).pid == ts.pid


@pytest.mark.slow
@pytest.mark.parametrize("first", ["caller", "torchserve"])
def test_a_caller_killed_by_sigkill_leaves_no_torchserve(tiny_store: Path, tmp_path: Path, first: str) -> None:
    """A test run or benchmark killed outright (CI's timeout, an OOM kill) runs no clean-up:
    the watchdog started with TorchServe stops it then, and tidies the run dir as a stop
    does (the key file holds every token), also where TorchServe had died before."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from model_store import serve\n"
        "ts = serve.start(serve.ServeSettings.on_free_ports(store=Path(sys.argv[1]), run_dir=Path(sys.argv[2]),\n"
        "                                                   models=('fmnist-cnn-onnx',)))\n"
        "print(ts.pid, flush=True)\n"
        "ts.process.wait()\n"  # reaps a launcher killed first
        "time.sleep(600)\n"
    )
    caller = subprocess.Popen([sys.executable, "-c", script, str(tiny_store), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    try:
        pgid = int(caller.stdout.readline())
        assert serve._group_alive(pgid)
        if first == "torchserve":  # gone before its caller: the watchdog has nothing to stop
            os.killpg(pgid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while serve._group_alive(pgid):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        caller.kill()
        caller.wait(10)
        deadline = time.monotonic() + 45
        while serve._group_alive(pgid):
            assert time.monotonic() < deadline, "TorchServe outlived its killed caller"
            time.sleep(0.2)
        tidy = [tmp_path / "run" / n for n in (serve.KEY_FILE, serve.STATE_FILE, serve.STAGED_ARCHIVES)]
        while any(p.exists() for p in tidy):
            assert time.monotonic() < deadline, [p.name for p in tidy if p.exists()]
            time.sleep(0.2)
    finally:
        caller.kill()
        ts = serve.attach(tmp_path / "run")
        if ts is not None:
            ts.stop()


def test_a_torchserve_stopped_in_order_stands_its_watchdog_down(tmp_path: Path) -> None:
    """stop() writes the stand-down byte before closing the pipe: the watchdog then leaves
    the (already stopped) group id alone. Without it (its owner died), the watchdog stops the
    group only where it is still TorchServe's from the run dir: a group whose id a crashed
    TorchServe's pid came to lead is another program's (found by review)."""
    def sleeper(*marks: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *marks],
                                cwd=tmp_path, start_new_session=True)

    def cmdline(p: psutil.Process) -> list[str]:
        try:
            return p.cmdline()
        except psutil.Error:  # a child gone, or a zombie another test left
            return []

    def watchdog_of(pid: int) -> psutil.Process:  # the session's TorchServe has a watchdog of its own
        return next(p for p in psutil.Process().children()
                    if "_watch" in " ".join(cmdline(p)) and str(pid) in cmdline(p))

    launcher, other = sleeper("ts.model_server"), sleeper()  # TorchServe's launcher, as _alive knows it
    try:
        ts = serve.TorchServe(serve.ServeSettings(run_dir=tmp_path), [], other.pid)
        ts.lifeline = serve._lifeline(other.pid, tmp_path)
        watchdog = watchdog_of(other.pid)
        ts.stop()  # not TorchServe: stop() only stands the watchdog down (as where it is gone)
        assert ts.lifeline is None
        watchdog.wait(timeout=30)
        assert other.poll() is None  # a stood-down watchdog stops nothing
        loose = serve._lifeline(other.pid, tmp_path)
        watchdog = watchdog_of(other.pid)
        os.close(loose)  # EOF without the byte: as if its owner had died
        watchdog.wait(timeout=30)
        assert other.poll() is None  # not TorchServe: left alone
        loose = serve._lifeline(launcher.pid, tmp_path)
        os.close(loose)
        launcher.wait(timeout=40)
    finally:
        launcher.kill()
        other.kill()


def _free_port_base() -> int:
    """A port p with p, p+1, p+2 free on the loopback (the CLI uses consecutive ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base > 65000:
            continue
        try:
            socks = [socket.create_server(("127.0.0.1", base + i)) for i in range(3)]
        except OSError:
            continue
        for s in socks:
            s.close()
        return base
    raise RuntimeError("no three consecutive free ports")


@pytest.mark.slow
def test_cli_start_status_stop(tiny_store: Path, tmp_path: Path) -> None:
    """The command line starts TorchServe in the background (ready when it returns),
    reports it, and stops every process it started."""
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "model_store.serve"]
    common = ["--store", str(tiny_store), "--run-dir", str(run_dir)]
    console = tmp_path / "console.log"  # the container's stdout, with --console inherit
    with console.open("wb") as out:
        start = subprocess.run(
            [*cli, "start", *common, "--model", "fmnist-cnn-onnx", "--console", "inherit", "--no-system-metrics",
             "--grpc-port", str(_free_port_base()), "--http-port", str(_free_port_base())],
            stdout=out, stderr=subprocess.STDOUT, timeout=240,
        )
    ts = serve.attach(run_dir)
    try:
        assert start.returncode == 0, console.read_text(errors="replace")
        assert ts is not None and ts.running() and ts.settings.console == "inherit"
        assert "disable_system_metrics=true" in (run_dir / "config.properties").read_text()  # the GPU overlay's
        # TorchServe's log reaches stdout (the workers' start-up lines) and the rolling file;
        # no console file is kept in the run directory.
        logged = console.read_text(errors="replace")
        assert "TorchServe ready" in logged and "MODEL_LOG - Torch worker started" in logged
        assert "Torch worker started" in ts.log_file.read_text(errors="replace")
        assert not (run_dir / "logs" / serve.CONSOLE_FILE).exists()
        keys = serve.read_keys(run_dir)
        assert keys.inference and keys.management
        assert (run_dir / serve.KEY_FILE).stat().st_mode & 0o077 == 0 and run_dir.stat().st_mode & 0o077 == 0
        status = subprocess.run([*cli, "status", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and json.loads(status.stdout)["models"]["fmnist-cnn-onnx"]["ready"]
        live = subprocess.run([*cli, "status", "--live", "--run-dir", str(run_dir)], capture_output=True, text=True,
                              timeout=60)
        assert live.returncode == 0 and json.loads(live.stdout)["models"]["fmnist-cnn-onnx"]["serving"]
        again = subprocess.run([*cli, "start", *common], capture_output=True, text=True, timeout=60)
        assert again.returncode == 1 and "already runs" in again.stderr
    finally:
        stop = subprocess.run([*cli, "stop", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=90)
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert not serve._group_alive(ts.pid), "TorchServe processes survived stop"
    assert not (run_dir / serve.KEY_FILE).exists() and serve.attach(run_dir) is None


@pytest.mark.slow
def test_stop_reaches_a_torchserve_whose_launcher_died_alone(tiny_store: Path, tmp_path: Path) -> None:
    """The launcher (``ts.model_server --foreground``) does not pass signals on: killed by
    itself, it leaves the JVM and the workers in its group, holding the ports. ``status`` and
    ``stop`` still find them by the group, and ``stop`` ends them."""
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "model_store.serve"]
    start = subprocess.run([*cli, "start", "--store", str(tiny_store), "--run-dir", str(run_dir),
                            "--model", "fmnist-cnn-onnx", "--grpc-port", str(_free_port_base()),
                            "--http-port", str(_free_port_base())], capture_output=True, text=True, timeout=240)
    ts = serve.attach(run_dir)
    assert start.returncode == 0 and ts is not None, start.stderr[-2000:]
    try:
        os.kill(ts.pid, signal.SIGKILL)  # the launcher only
        psutil.wait_procs([psutil.Process(ts.pid)], timeout=10)
        assert not serve._is_ours(ts.pid, run_dir) and serve._group_alive(ts.pid)  # the orphans
        found = serve.attach(run_dir)
        assert found is not None and found.running()
    finally:
        stop = subprocess.run([*cli, "stop", "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=90)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    assert not serve._group_alive(ts.pid), "TorchServe processes survived stop"


_RESPAWNS_ON_TERM = """
import signal, subprocess, sys, time
def on_term(*_):
    subprocess.Popen(["sleep", "60"])  # a worker restarted during shutdown, same group
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(60)
"""


def test_stop_reaches_processes_started_after_the_first_sigterm() -> None:
    # TorchServe's frontend restarts workers that die while it shuts down; in the image that
    # kept `serve stop` waiting its whole 30 s grace period for the SIGKILL.
    import time

    leader = subprocess.Popen([sys.executable, "-c", _RESPAWNS_ON_TERM], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        assert leader.stdout is not None and leader.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        serve._stop_group(leader.pid, timeout=20.0)
        elapsed = time.monotonic() - t0
        assert not serve._group_alive(leader.pid), "a process of the group survived"
        assert elapsed < 10.0, f"stop waited {elapsed:.1f} s: the late process never got a SIGTERM"
    finally:
        leader.kill()
        leader.wait()


def test_the_serve_command_answers_a_broken_state_or_run_dir_in_one_line(tiny_store: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """A hand-edited serve.json was a KeyError traceback for stop, status and start; a run
    directory that cannot be made was an OSError one (found by review)."""
    (tmp_path / serve.STATE_FILE).write_text(json.dumps({"pid": 1}))  # no settings, no models
    for command in ("stop", "status"):
        assert serve.main([command, "--run-dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "is not the state `start` writes" in err and "Traceback" not in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert serve.main(["start", "--store", str(tiny_store), "--run-dir", str(blocker / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a-file" in err and "Traceback" not in err


def test_a_state_file_naming_another_run_dirs_torchserve_is_not_attached(tmp_path: Path) -> None:
    """``stop`` signals the group a state file names: a pid reused by another run directory's
    TorchServe launcher (another user's of this account, another test's) was taken for this
    one's, and ``stop`` would have ended it. A launcher is this run dir's only when it works
    there, as ``start`` starts it."""
    elsewhere, here = tmp_path / "elsewhere", tmp_path / "here"
    elsewhere.mkdir()
    here.mkdir()
    # A stand-in with a launcher's command line (argv carries "ts.model_server"), in a group of its own.
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)", "ts.model_server"]
    for cwd, wanted in ((elsewhere, False), (here, True)):
        proc = subprocess.Popen(sleeper, cwd=cwd, start_new_session=True)
        try:
            # Until the child has exec'd, /proc shows the parent's command line: wait for its own
            # (under a loaded machine the check below read pytest's and failed).
            deadline = time.monotonic() + 30
            while b"ts.model_server" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the stand-in did not start"
                time.sleep(0.01)
            state = {"pid": proc.pid, "models": ["m"],
                     "settings": serve._settings_to_json(serve.ServeSettings(run_dir=here))}
            (here / serve.STATE_FILE).write_text(json.dumps(state))
            assert (serve.attach(here) is not None) is wanted, cwd
            assert serve._alive(proc.pid, here) is wanted
        finally:
            proc.kill()
            proc.wait()


def test_a_model_with_a_worker_down_is_not_ready_but_still_serving(tmp_path: Path, monkeypatch) -> None:
    """Readiness wants every worker READY; the liveness probe (``status --live``) one: a worker
    TorchServe is restarting does not restart the container (every model reloaded), no READY
    worker at all does."""
    ts = serve.TorchServe(serve.ServeSettings(run_dir=tmp_path), ["m"], 1)
    for workers, ready, serving in ((["READY", "READY"], True, True), (["READY", "UNLOADING"], False, True),
                                    (["STOPPED", "UNLOADING"], False, False), ([], False, False)):
        monkeypatch.setattr(ts, "describe", lambda model, w=workers: [
            {"minWorkers": 2, "workers": [{"status": s} for s in w]}])
        status = ts.model_status("m")
        assert (status["ready"], status["serving"]) == (ready, serving), workers


def test_a_stop_leaves_the_files_of_a_torchserve_started_after_it(tmp_path: Path) -> None:
    """A ``stop`` whose TorchServe is gone by the time it removes the key and state files, and
    a ``start`` on the run dir in between (the lock lets it in: nothing runs): those files are
    the new TorchServe's, and removing them hid it from ``stop`` and its gateway from its
    token. They are removed only where the state file names the stopped one, or nothing."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    settings = serve.ServeSettings(run_dir=tmp_path)
    state = {"pid": os.getpid(), "models": ["m"], "settings": serve._settings_to_json(settings)}
    (tmp_path / serve.STATE_FILE).write_text(json.dumps(state))  # the newer start's
    (tmp_path / serve.KEY_FILE).write_text("{}")
    serve.TorchServe(settings, ["m"], gone.pid).stop()
    assert (tmp_path / serve.STATE_FILE).exists() and (tmp_path / serve.KEY_FILE).exists()
    state["pid"] = gone.pid  # its own: removed, as before
    (tmp_path / serve.STATE_FILE).write_text(json.dumps(state))
    serve.TorchServe(settings, ["m"], gone.pid).stop()
    assert not (tmp_path / serve.STATE_FILE).exists() and not (tmp_path / serve.KEY_FILE).exists()
    (tmp_path / serve.KEY_FILE).write_text("{}")  # no state file at all: the key goes too
    serve.TorchServe(settings, ["m"], gone.pid).stop()
    assert not (tmp_path / serve.KEY_FILE).exists()


def test_a_start_whose_torchserve_cannot_be_started_leaves_no_copy(tiny_store: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """The archives staged, then TorchServe's process cannot be started (no Java, a full
    disk): the start fails with that error and the run dir keeps no archive copy."""
    def no_java(*args, **kwargs):
        raise FileNotFoundError("java")

    monkeypatch.setattr(serve.subprocess, "Popen", no_java)
    run_dir = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="java"):
        serve.start(serve.ServeSettings.on_free_ports(store=tiny_store, run_dir=run_dir, models=("fmnist-cnn-onnx",)))
    assert serve.attach(run_dir) is None
    assert not serve.staged_archives(run_dir).exists()


def test_an_interrupt_as_torchserve_starts_comes_once_its_state_file_names_it(tmp_path: Path,
                                                                             monkeypatch) -> None:
    """A Ctrl-C between TorchServe's process starting and its state file naming it left a
    TorchServe in a session of its own that nothing could find or stop, holding its ports and
    writing the key file the next start removes. It is held until the start has it on record,
    then raised as it came, and the start stops what it started, in order. (SIGTERM is held
    alike; at its default it then ends the process, leaving the state file for `stop`.)"""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started: list[subprocess.Popen] = []

    def stage(settings, run_dir, names, verified):
        return serve.staged_archives(run_dir)

    def spawn(settings, run_dir, staged, names):
        started.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
        os.kill(os.getpid(), signal.SIGINT)  # as the process has just started
        time.sleep(0.1)  # Python runs a handler between bytecodes: it has had its chance
        return started[-1], {}

    monkeypatch.setattr(serve, "_stage_archives", stage)
    monkeypatch.setattr(serve, "_spawn", spawn)
    before = {sig: signal.getsignal(sig) for sig in archive.DEFERRED_SIGNALS}
    try:
        with pytest.raises(KeyboardInterrupt):
            serve._launch(serve.ServeSettings(store=tmp_path / "store", run_dir=run_dir), run_dir,
                          ["fmnist-cnn-onnx"], True, {})
        assert started[0].poll() is not None  # stopped, not left running in its own session
        assert not (run_dir / serve.STATE_FILE).exists()  # and its run dir tidied
        assert {sig: signal.getsignal(sig) for sig in archive.DEFERRED_SIGNALS} == before  # handlers put back
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
    # outside the main thread nothing is held (signal handlers are the main thread's)
    # a failure after the process started, before the start had it: stopped, copies removed
    def stage_a_copy(settings, run_dir, names, verified):
        staged = serve.staged_archives(run_dir)
        staged.mkdir(exist_ok=True)
        (staged / "fmnist-cnn-onnx.mar").write_bytes(b"a copy")
        return staged

    def spawn_quietly(settings, run_dir, staged, names):
        started.append(subprocess.Popen(["sleep", "60"], start_new_session=True))
        return started[-1], {}

    def broken(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(serve, "_stage_archives", stage_a_copy)
    monkeypatch.setattr(serve, "_spawn", spawn_quietly)
    monkeypatch.setattr(serve, "TorchServe", broken)
    try:
        with pytest.raises(MemoryError):
            serve._launch(serve.ServeSettings(store=tmp_path / "store", run_dir=run_dir), run_dir,
                          ["fmnist-cnn-onnx"], True, {})
        assert started[-1].poll() is not None and not serve.staged_archives(run_dir).exists()
    finally:
        for proc in started:
            proc.kill()
            proc.wait()
    seen = []

    def in_a_thread() -> None:
        with archive.signals_deferred():
            seen.append(signal.getsignal(signal.SIGINT))

    worker = threading.Thread(target=in_a_thread)
    worker.start()
    worker.join()
    assert seen == [before[signal.SIGINT]]


def test_torchserve_gets_no_ts_settings_and_no_checkout_on_its_path(tmp_path: Path) -> None:
    """TS_* would override the config file; a PYTHONPATH entry holding this checkout's handler
    or protocol packages would shadow an archive's own (tests/test_torchserve_serving.py shows
    it end to end). Other entries (a GPU kit's site folder) and everything else stay."""
    from model_store import serve

    repo = Path(serve.__file__).resolve().parent.parent
    env = serve.server_env({"PYTHONPATH": os.pathsep.join((str(tmp_path), str(repo), "", str(repo / "proto"))),
                            "TS_CONFIG_FILE": "/elsewhere", "KEEP_ME": "1"})
    assert env == {"PYTHONPATH": str(tmp_path), "KEEP_ME": "1"}
    assert serve.server_env({"PYTHONPATH": f"{repo}{os.pathsep}{repo / 'proto'}"}) == {}
