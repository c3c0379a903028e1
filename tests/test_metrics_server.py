"""The gateway's metrics port (service/metrics_server.py) on real loopback sockets: its own
registry, TorchServe's exposition relayed, and a relay that fails cleanly when TorchServe does
not answer."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from service import metrics_server
from tests.conftest import free_port


def get(url: str) -> tuple[int, str]:
    """GET on the loopback, never through a proxy (one test sets a dead one)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=15) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("robustgate_probe_things", "Things.", registry=r).inc(3)
    return r


def serve(registry: CollectorRegistry, url: str) -> Iterator[str]:
    server, thread = metrics_server.start("127.0.0.1", 0, registry, url)
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def silent_upstream() -> Iterator[str]:
    """A loopback server that accepts connections and never answers (a wedged TorchServe)."""
    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
    stop.set()
    t.join(5)
    for c in held:
        c.close()
    sock.close()


def test_own_metrics_on_metrics_path_and_relay_off_is_404(registry: CollectorRegistry) -> None:
    for base in serve(registry, ""):
        status, body = get(f"{base}/metrics")
        assert status == 200 and "robustgate_probe_things_total 3.0" in body
        status, body = get(f"{base}/metrics/torchserve")
        assert status == 404 and "not relayed" in body


def test_relay_of_an_unreachable_torchserve_is_503_and_the_port_stays_up(registry: CollectorRegistry) -> None:
    closed = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    for base in serve(registry, closed):
        for _ in range(3):
            status, body = get(f"{base}/metrics/torchserve")
            assert status == 503
            assert body == "TorchServe's metrics endpoint did not answer\n"  # no address, no exception text
        status, body = get(f"{base}/metrics")
        assert status == 200 and "robustgate_probe_things_total" in body


def test_relay_gives_up_on_a_silent_torchserve_within_its_timeout(silent_upstream: str) -> None:
    relay = metrics_server.TorchServeRelay(silent_upstream, timeout_s=0.5)
    statuses: list[str] = []
    t0 = time.monotonic()
    body = b"".join(relay({"PATH_INFO": "/metrics/torchserve"}, lambda status, headers: statuses.append(status)))
    assert time.monotonic() - t0 < 3.0
    assert statuses == ["503 Service Unavailable"] and b"did not answer" in body


def test_relay_ignores_proxy_settings_and_a_final_slash(registry: CollectorRegistry,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # A pod may set http_proxy for its egress; TorchServe is on the loopback beside the gateway.
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{free_port()}")  # a proxy that is not there
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    port = free_port()
    # The relay's upstream: this same server's own /metrics (a real HTTP exposition).
    server, thread = metrics_server.start("127.0.0.1", port, registry, f"http://127.0.0.1:{port}/metrics")
    try:
        for path in ("/metrics/torchserve", "/metrics/torchserve/"):
            status, body = get(f"http://127.0.0.1:{port}{path}")
            assert status == 200 and "robustgate_probe_things_total 3.0" in body, (path, status, body)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.slow
def test_relay_serves_torchserves_exposition(registry: CollectorRegistry, torchserve) -> None:
    for base in serve(registry, torchserve.metrics_url):
        status, body = get(f"{base}/metrics/torchserve")
        assert status == 200
        assert "# TYPE ts_inference_requests_total counter" in body
        assert "robustgate_probe_things" not in body  # the two expositions stay apart
        status, body = get(f"{base}/metrics")
        assert "ts_inference_requests_total" not in body
