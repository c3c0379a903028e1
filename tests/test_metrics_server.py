"""The gateway's metrics port (service/metrics_server.py) on real loopback sockets: its own
registry, TorchServe's exposition relayed, a relay that fails cleanly when TorchServe does
not answer (or answers too slowly), and one fetch shared by concurrent scrapes."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from service import metrics_server
from service.settings import Settings
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


class FakeTorchServe:
    """A loopback HTTP server answering ``GET`` with ``status`` and a small exposition after
    ``delay_s``, counting the requests it gets."""

    body = b"# TYPE ts_fake_total counter\nts_fake_total 1.0\n"

    def __init__(self, delay_s: float = 0.0, status: int = 200) -> None:
        self.delay_s, self.status = delay_s, status
        self.requests = 0
        self._count_lock = threading.Lock()
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802  (http.server's name)
                with fake._count_lock:
                    fake.requests += 1
                time.sleep(fake.delay_s)
                self.send_response(fake.status)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(fake.body)))
                self.end_headers()
                self.wfile.write(fake.body)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


@pytest.fixture
def fake_torchserve() -> Iterator[Callable[..., FakeTorchServe]]:
    """Start :class:`FakeTorchServe` servers (``fake_torchserve(delay_s=..., status=...)``),
    closed after the test."""
    started: list[FakeTorchServe] = []

    def make(delay_s: float = 0.0, status: int = 200) -> FakeTorchServe:
        started.append(FakeTorchServe(delay_s, status))
        return started[-1]

    yield make
    for fake in started:
        fake.close()


@pytest.fixture(params=["body", "headers"])
def trickling_upstream(request: pytest.FixtureRequest) -> Iterator[str]:
    """A loopback server that answers every request a few bytes every 0.2 s until the test ends:
    its headers then an endless body (``body``), or endless header lines (``headers``). Each read
    comes well within a per-read timeout, so only a deadline for the whole fetch ends it."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.settimeout(0.2)
    stop = threading.Event()
    if request.param == "body":
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000\r\n\r\n"
        drip = b"# x\n"
    else:
        head, drip = b"HTTP/1.1 200 OK\r\n", b"X-Drip: 1\r\n"

    def answer(conn: socket.socket) -> None:
        with conn:
            try:
                conn.recv(65536)  # the request
                conn.sendall(head)
                while not stop.wait(0.2):
                    conn.sendall(drip)
            except OSError:
                pass  # the relay gave up and closed

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = sock.accept()[0]
            except OSError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/metrics"
    stop.set()
    t.join(5)
    sock.close()


def call(relay: metrics_server.TorchServeRelay) -> tuple[str, bytes]:
    """One scrape of ``relay`` called as a WSGI app: (status line, body)."""
    statuses: list[str] = []
    body = b"".join(relay({"PATH_INFO": "/metrics/torchserve"}, lambda status, headers: statuses.append(status)))
    return statuses[0], body


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


def test_relay_ignores_proxy_settings_and_a_final_slash(registry: CollectorRegistry, proxy_env: list[bytes]) -> None:
    # A pod may set http_proxy for its egress; TorchServe is on the loopback beside the gateway.
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
    assert proxy_env == []  # the recording proxy got nothing


def test_relay_looks_its_host_up_once_at_start(fake_torchserve: Callable[..., FakeTorchServe],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # A name lookup has no deadline: a scrape must never wait on one.
    upstream = fake_torchserve()
    relay = metrics_server.TorchServeRelay(upstream.url.replace("127.0.0.1", "localhost"), max_age_s=0)

    def no_lookups(*args: object, **kwargs: object) -> None:
        raise AssertionError("getaddrinfo during a scrape")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookups)
    statuses: list[str] = []
    body = b"".join(relay({"PATH_INFO": "/metrics/torchserve"}, lambda status, headers: statuses.append(status)))
    assert statuses == ["200 OK"] and body == FakeTorchServe.body
    monkeypatch.undo()
    with pytest.raises(ValueError, match="does not resolve"):
        metrics_server.TorchServeRelay("http://no-such-host.invalid:8082/metrics")


def test_concurrent_scrapes_share_one_fetch(registry: CollectorRegistry,
                                            fake_torchserve: Callable[..., FakeTorchServe]) -> None:
    upstream = fake_torchserve(delay_s=0.3)
    scrapers = 8
    results: list[tuple[int, str]] = []
    for base in serve(registry, upstream.url):
        start = threading.Barrier(scrapers)

        def scrape() -> None:
            start.wait(5)
            results.append(get(f"{base}/metrics/torchserve"))

        threads = [threading.Thread(target=scrape) for _ in range(scrapers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
    assert results == [(200, FakeTorchServe.body.decode())] * scrapers
    assert upstream.requests == 1


def test_relay_reuses_an_outcome_for_its_max_age_then_fetches_again(
        fake_torchserve: Callable[..., FakeTorchServe]) -> None:
    upstream = fake_torchserve()
    relay = metrics_server.TorchServeRelay(upstream.url, timeout_s=2.0, max_age_s=1.5)
    assert call(relay) == ("200 OK", FakeTorchServe.body)
    assert call(relay) == ("200 OK", FakeTorchServe.body)
    assert upstream.requests == 1  # the second scrape came within max_age_s (a stall of a loaded box included)
    time.sleep(1.7)
    assert call(relay) == ("200 OK", FakeTorchServe.body)
    assert upstream.requests == 2


def test_relay_of_a_torchserve_answering_an_error_is_503_and_the_failure_is_reused(
        fake_torchserve: Callable[..., FakeTorchServe]) -> None:
    upstream = fake_torchserve(status=500)
    relay = metrics_server.TorchServeRelay(upstream.url, timeout_s=2.0, max_age_s=5.0)
    for _ in range(3):
        assert call(relay) == ("503 Service Unavailable", b"TorchServe's metrics endpoint did not answer\n")
    assert upstream.requests == 1


def test_relay_gives_up_on_a_trickling_torchserve_by_its_deadline(trickling_upstream: str) -> None:
    timeout_s = 1.0
    relay = metrics_server.TorchServeRelay(trickling_upstream, timeout_s=timeout_s)
    answered: list[tuple[str, bytes]] = []
    t0 = time.monotonic()
    scrape = threading.Thread(target=lambda: answered.append(call(relay)), daemon=True)
    scrape.start()
    scrape.join(timeout_s + 1.5)  # a per-read timeout never fires here: the scrape would hang
    assert not scrape.is_alive(), "the relay kept reading past its deadline"
    assert time.monotonic() - t0 < timeout_s + 1.0
    assert answered == [("503 Service Unavailable", b"TorchServe's metrics endpoint did not answer\n")]


def test_waiting_scrapes_answer_503_within_the_timeout(silent_upstream: str) -> None:
    # One scrape fetches from a wedged TorchServe; the others wait for it, none past the timeout.
    timeout_s = 0.5
    relay = metrics_server.TorchServeRelay(silent_upstream, timeout_s=timeout_s)
    answered: list[tuple[str, float]] = []

    def scrape() -> None:
        t0 = time.monotonic()
        status, _ = call(relay)
        answered.append((status, time.monotonic() - t0))

    threads = [threading.Thread(target=scrape) for _ in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(5)
    assert [status for status, _ in answered] == ["503 Service Unavailable"] * 4
    assert max(elapsed for _, elapsed in answered) < timeout_s + 0.5


@pytest.mark.parametrize("url", ["https://127.0.0.1:8082/metrics", "file:///etc/passwd", "127.0.0.1:8082/metrics",
                                 "http://127.0.0.1:notaport/metrics", "http://user:pw@127.0.0.1:8082/metrics"])
def test_relay_refuses_anything_but_an_http_url_at_start(registry: CollectorRegistry, url: str) -> None:
    with pytest.raises(ValueError, match="torchserve_metrics_url") as raised:
        metrics_server.start("127.0.0.1", 0, registry, url)
    assert "pw" not in str(raised.value)
    with pytest.raises(ValueError, match="torchserve_metrics_url"):  # the gateway's settings, before it binds anything
        Settings(torchserve_metrics_url=url)


@pytest.mark.slow
def test_relay_serves_torchserves_exposition(registry: CollectorRegistry, torchserve) -> None:
    for base in serve(registry, torchserve.metrics_url):
        status, body = get(f"{base}/metrics/torchserve")
        assert status == 200
        assert "# TYPE ts_inference_requests_total counter" in body
        assert "robustgate_probe_things" not in body  # the two expositions stay apart
        status, body = get(f"{base}/metrics")
        assert "ts_inference_requests_total" not in body


def test_a_connection_that_sends_nothing_is_closed_by_the_read_timeout(registry: CollectorRegistry,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capfd: pytest.CaptureFixture) -> None:
    """Each connection holds a thread: one that sends nothing, or half a request, is closed
    after the handler's timeout (10 s as shipped), quietly, and scrapes go on meanwhile."""
    assert metrics_server._QuietHandler.timeout == 10.0
    monkeypatch.setattr(metrics_server._QuietHandler, "timeout", 0.5)
    for base in serve(registry, ""):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as silent, \
                socket.create_connection(("127.0.0.1", port)) as half:
            half.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # no blank line: never ends
            assert get(base + "/metrics")[0] == 200
            for s in (silent, half):
                s.settimeout(10)
                t0 = time.monotonic()
                assert s.recv(1024) == b""  # closed by the server, not by this timeout
                assert time.monotonic() - t0 < 5
    assert "Traceback" not in capfd.readouterr().err  # a client gone quiet is no server error


def test_a_connection_trickling_its_request_is_cut_at_its_deadline(registry: CollectorRegistry,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capfd: pytest.CaptureFixture) -> None:
    """A byte now and then, each within the per-read timeout, no longer holds a connection
    (and, 32 of them, every slot) for as long as the client likes: it is cut at its deadline
    (30 s as shipped), quietly, and a scrape is answered meanwhile."""
    assert metrics_server._QuietHandler.deadline_s == 30.0
    monkeypatch.setattr(metrics_server._QuietHandler, "timeout", 1.0)
    monkeypatch.setattr(metrics_server._QuietHandler, "deadline_s", 3.0)
    for base in serve(registry, ""):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.settimeout(0.05)  # a byte every 0.05 s: far inside the 1 s per read
            t0, request = time.monotonic(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X: " + b"y" * 400
            closed = False
            for byte in request:
                try:
                    slow.sendall(bytes([byte]))
                    closed = slow.recv(1024) == b""
                except TimeoutError:
                    pass
                except OSError:  # reset: cut by the server
                    closed = True
                if closed:
                    break
                if time.monotonic() - t0 < 0.5:
                    assert get(base + "/metrics")[0] == 200
            assert closed, "the trickling connection was never cut"
            assert 2.5 < time.monotonic() - t0 < 8
    assert "Traceback" not in capfd.readouterr().err


def test_a_deadline_passing_while_answering_is_no_server_error(registry: CollectorRegistry, silent_upstream: str,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture) -> None:
    """The relay waits on a wedged TorchServe past the connection's deadline: the answer is not
    written, the connection closes, and no traceback reaches stderr (wsgiref prints one for any
    error but a client's leaving)."""
    monkeypatch.setattr(metrics_server._QuietHandler, "deadline_s", 0.5)
    monkeypatch.setattr(metrics_server, "TorchServeRelay", functools.partial(metrics_server.TorchServeRelay, timeout_s=1.0))
    for base in serve(registry, silent_upstream):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET /metrics/torchserve HTTP/1.0\r\n\r\n")
            c.settimeout(10)
            assert c.recv(1024) == b""  # closed unanswered once the relay gave up
        assert get(base + "/metrics")[0] == 200  # and the port serves on
    assert "Traceback" not in capfd.readouterr().err


def test_idle_connections_hold_at_most_max_connections_threads(registry: CollectorRegistry,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_CONNECTIONS a connection is closed at once, unanswered (before: one thread per
    connection, without bound, each held up to the read timeout); once they go, scrapes are
    served again."""
    monkeypatch.setattr(metrics_server, "MAX_CONNECTIONS", 4)
    for base in serve(registry, ""):
        port = int(base.rsplit(":", 1)[1])
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        try:
            deadline = time.monotonic() + 5
            while threading.active_count() < before + 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            extra = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
            for s in extra:
                s.settimeout(5)
                assert s.recv(1024) == b""  # closed by the server at once
                s.close()
            assert threading.active_count() <= before + 4
        finally:
            for s in idle:
                s.close()
        deadline = time.monotonic() + 5
        while threading.active_count() > before and time.monotonic() < deadline:  # their threads end
            time.sleep(0.01)
        assert get(base + "/metrics")[0] == 200


def test_an_ipv6_host_in_brackets_as_grpc_takes_it_is_served_where_the_bare_one_is(
        registry: CollectorRegistry) -> None:
    """``ROBUSTGATE_HOST=[::]`` is how gRPC takes an IPv6 address; the metrics server passed
    the brackets to getaddrinfo and failed to start. Either form now binds the same address
    (on a machine without IPv6 both fail alike)."""
    outcomes = []
    for host in ("::1", "[::1]"):
        try:
            server, thread = metrics_server.start(host, 0, registry, "")
        except OSError as e:
            outcomes.append(type(e).__name__)
            continue
        try:
            outcomes.append(get(f"http://[::1]:{server.server_port}/metrics")[0])
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)
    assert outcomes[0] == outcomes[1], outcomes


def test_a_wildcard_host_serves_metrics_on_both_families_as_grpc_does(registry: CollectorRegistry,
                                                                      monkeypatch) -> None:
    """The pod sets ROBUSTGATE_HOST=0.0.0.0, which gRPC binds on IPv6 and IPv4 alike; the
    metrics server bound IPv4 only, so on an IPv6-only cluster every scrape of the pod's
    address was refused (the scrape-down alert firing, the autoscaler's metric gone). Where
    the machine has no IPv6 it serves IPv4 as before."""
    import errno
    import socket

    def serves(host: str) -> dict[str, object]:
        server, thread = metrics_server.start(host, 0, registry, "")
        try:
            return {peer: get(f"http://{peer}:{server.server_port}/metrics")[0] for peer in ("127.0.0.1", "[::1]")
                    if peer == "127.0.0.1" or has_ipv6}
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)

    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            has_ipv6 = True
    except OSError:
        has_ipv6 = False
    want = {"127.0.0.1": 200, "[::1]": 200} if has_ipv6 else {"127.0.0.1": 200}
    assert serves("0.0.0.0") == serves("[::]") == want
    with socket.create_server(("0.0.0.0", 0)) as taken:  # a port taken is refused as before
        with pytest.raises(OSError):
            metrics_server.start("0.0.0.0", taken.getsockname()[1], registry, "")

    def no_ipv6(self) -> None:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    monkeypatch.setattr(metrics_server._DualStack, "server_bind", no_ipv6)
    has_ipv6 = False
    assert serves("0.0.0.0") == {"127.0.0.1": 200}
