"""The main command's own shell: one instance per checkout, and its exit status after a drain."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
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


def test_run_exits_with_the_gateways_status_after_a_drain(tmp_path: Path) -> None:
    """SIGTERM to run.sh reaches the gateway, which drains and exits 0: the script exits 0,
    not 143 (the status of the wait the signal interrupted). The loop is run.sh's own text."""
    text = RUN.read_text()
    loop = text[text.index('$py -m service --models "$model" &'):]
    gateway = tmp_path / "gateway"  # drains for a second after SIGTERM, then exits with $1
    gateway.write_text("#!/usr/bin/env bash\ntrap 'sleep 1; exit \"$STATUS\"' TERM\n"
                       "while :; do sleep 0.1; done\n")
    gateway.chmod(0o755)
    script = tmp_path / "loop.sh"
    script.write_text(f"set -euo pipefail\npy={gateway}\nmodel=m\n{loop}")
    for status in ("0", "3"):
        proc = subprocess.Popen(["bash", str(script)], env={**os.environ, "STATUS": status})
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == int(status)
