"""The gateway's metrics port: its own metrics, and TorchServe's relayed beside them.

    server, thread = start(host, port, registry, torchserve_metrics_url)

| path | answers |
|---|---|
| ``/metrics`` (any path but the one below) | the gateway's registry, as ``prometheus_client`` serves it |
| ``/metrics/torchserve`` (or with a final ``/``) | TorchServe's ``/metrics``, fetched when scraped (one fetch at a time, reused for 1 s); 503 when it does not answer in time |

TorchServe binds the pod's loopback, its metrics endpoint included, so nothing outside the pod
can reach it. Prometheus scrapes it through this port as a second target with a job of its own.
The relay fetches one ``http://`` URL fixed at start (no caller chooses what is fetched; any
other scheme, or a host that does not resolve, fails at start; the name is looked up then, once),
never through a proxy. The fetch has one deadline for the whole of
it, connect, headers and body (a TorchServe trickling bytes cannot stretch it), shorter than a
scrape's timeout. When TorchServe does not answer 200 by then, the scrape fails with 503 and
Prometheus records that target down (``up == 0``) while the gateway's own target stays up.

The relay is single-flight: scrapes that arrive while a fetch is under way wait for it and share
its outcome, and an outcome (answer or failure) younger than ``RELAY_MAX_AGE_S`` is reused, so a
scrape storm or several Prometheus replicas cost TorchServe one fetch a second at most. No scrape
waits longer than the relay's timeout in all: one that would answers 503.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from service.settings import relay_url_parts

log = logging.getLogger(__name__)

TORCHSERVE_PATH = "/metrics/torchserve"
RELAY_TIMEOUT_S = 5.0  # below the ServiceMonitor's 10 s scrape timeout
RELAY_MAX_AGE_S = 1.0  # a fetch's outcome is reused this long (scrapes come every 15 s)
MAX_RELAY_BYTES = 16 << 20  # TorchServe's exposition is tens of kB
_LOG_EVERY_S = 60.0  # a down TorchServe is logged once a minute, not once a scrape
_DEFAULT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def _text() -> list[tuple[str, str]]:
    """Headers of a plain-text answer: a new list each time (wsgiref appends to the one given)."""
    return [("Content-Type", "text/plain; charset=utf-8")]


def _time_left(deadline: float) -> float:
    """Seconds until ``deadline`` (``time.monotonic``); TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the relay's deadline passed")
    return left


class _DeadlineSocket(socket.socket):
    """A socket whose every blocking call ends by ``deadline``: its timeout is set to the time
    left before each one, so a peer trickling bytes cannot stretch a fetch past the deadline as
    it could a per-call timeout. ``http.client`` reads headers and body through ``recv_into``."""

    deadline = float("-inf")
    per_call_s = float("inf")  # and each call within this

    def _arm(self) -> None:
        self.settimeout(min(self.per_call_s, _time_left(self.deadline)))

    def connect(self, address: object) -> None:
        self._arm()
        super().connect(address)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        self._arm()
        super().sendall(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._arm()
        return super().recv(bufsize, flags)

    def recv_into(self, buffer: memoryview | bytearray, nbytes: int = 0, flags: int = 0) -> int:
        self._arm()
        return super().recv_into(buffer, nbytes, flags)


class _ConnectionSocket(_DeadlineSocket):
    """The metrics port's end of a connection. Its deadline passing, or a write the client does
    not take within the per-call timeout, is the client's doing: ``ConnectionAbortedError``,
    which wsgiref closes quietly like a client gone (a ``TimeoutError`` while it answered was a
    traceback on stderr, at a client's will)."""

    def _arm(self) -> None:
        try:
            super()._arm()
        except TimeoutError:
            raise ConnectionAbortedError("the connection's deadline passed") from None

    def sendall(self, data: bytes, flags: int = 0) -> None:
        try:
            super().sendall(data, flags)
        except TimeoutError:
            raise ConnectionAbortedError("the client does not read its answer") from None


class _DeadlineConnection(http.client.HTTPConnection):
    """An HTTP connection over a :class:`_DeadlineSocket`: connect, request and response all
    within one deadline. ``http.client`` never consults proxy settings."""

    def __init__(self, host: str, port: int, addresses: list[tuple], deadline: float) -> None:
        super().__init__(host, port)
        self.addresses = addresses
        self.deadline = deadline

    def connect(self) -> None:
        """Each of the host's addresses (resolved once, at start: a name lookup has no
        deadline) in turn, all within the deadline."""
        error: OSError = OSError(f"{self.host} has no address")
        for family, kind, proto, _, address in self.addresses:
            sock = _DeadlineSocket(family, kind, proto)
            sock.deadline = self.deadline
            try:
                sock.connect(address)
            except OSError as e:
                sock.close()
                error = e
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
            return
        raise error


_Outcome = tuple[bytes, str] | None  # (exposition, its Content-Type), or None: no answer in time


class TorchServeRelay:
    """A WSGI app answering TorchServe's current exposition from ``url`` (``http://`` only;
    anything else is a ValueError here, at start). One fetch at a time, within ``timeout_s``
    from connect to the body's last byte; its outcome is shared with the scrapes that waited
    for it and reused for ``max_age_s``."""

    def __init__(self, url: str, timeout_s: float = RELAY_TIMEOUT_S, max_age_s: float = RELAY_MAX_AGE_S) -> None:
        host, port, target = relay_url_parts(url)
        if timeout_s <= 0 or max_age_s < 0:
            raise ValueError("the relay's timeout_s must be > 0 and its max_age_s >= 0")
        self.url = url
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._host, self._port, self._target = host, port, target
        try:  # once: a lookup cannot be bounded by a fetch's deadline (the URL names the loopback)
            self._addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise ValueError("torchserve_metrics_url: its host does not resolve") from None
        self._lock = threading.Lock()  # held by the one fetch under way
        self._last: tuple[float, _Outcome] | None = None  # (when it ended, outcome) of the last fetch
        self._last_log = float("-inf")

    def _fetch(self, deadline: float) -> tuple[bytes, str]:
        conn = _DeadlineConnection(self._host, self._port, self._addresses, deadline)
        try:
            conn.request("GET", self._target)
            resp = conn.getresponse()
            if resp.status != 200:
                raise http.client.HTTPException(f"answered {resp.status} {resp.reason}")
            body = resp.read(MAX_RELAY_BYTES + 1)  # every socket read within the deadline
            if len(body) > MAX_RELAY_BYTES:
                raise ValueError(f"exposition larger than {MAX_RELAY_BYTES} bytes")
            if resp.length:  # the connection closed before Content-Length bytes came
                raise http.client.IncompleteRead(body, resp.length)
            return body, resp.headers.get("Content-Type") or _DEFAULT_TYPE
        finally:
            conn.close()

    def _outcome(self) -> _Outcome:
        """The last fetch's outcome if it ended after this scrape arrived or less than
        ``max_age_s`` ago, else a new fetch's; None (503) by ``timeout_s`` after arrival at the latest."""
        arrived = time.monotonic()
        deadline = arrived + self.timeout_s
        if not self._lock.acquire(timeout=self.timeout_s):
            return None  # the fetch under way outlasted this scrape's time (it logs its own failure)
        try:
            if self._last is not None:
                ended, outcome = self._last
                if ended >= arrived or time.monotonic() - ended < self.max_age_s:
                    return outcome
            try:
                outcome = self._fetch(deadline)
            except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts are OSErrors
                outcome = None
                now = time.monotonic()
                if now - self._last_log >= _LOG_EVERY_S:
                    self._last_log = now
                    log.warning("TorchServe's metrics endpoint %s did not answer: %s", self.url, e)
            self._last = (time.monotonic(), outcome)
            return outcome
        finally:
            self._lock.release()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        outcome = self._outcome()
        if outcome is None:
            start_response("503 Service Unavailable", _text())
            return [b"TorchServe's metrics endpoint did not answer\n"]
        body, ctype = outcome
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]


def metrics_app(registry: CollectorRegistry, torchserve_metrics_url: str = "") -> WSGIApp:
    """The gateway's registry on every path but :data:`TORCHSERVE_PATH`, which relays TorchServe
    (404 when ``torchserve_metrics_url`` is empty)."""
    own = make_wsgi_app(registry)
    relay = TorchServeRelay(torchserve_metrics_url) if torchserve_metrics_url else None

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").rstrip("/") == TORCHSERVE_PATH:
            if relay is None:
                start_response("404 Not Found", _text())
                return [b"TorchServe's metrics are not relayed by this gateway\n"]
            return relay(environ, start_response)
        return own(environ, start_response)

    return app


MAX_CONNECTIONS = 32  # served at once; each holds a thread (Prometheus scrapes one at a time)


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most :data:`MAX_CONNECTIONS` of them: a connection
    beyond is closed at once, unanswered, so idle connections cannot grow the gateway's
    threads without bound (each held up to the handler's timeout)."""

    daemon_threads = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(*args, **kwargs)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that went quiet (the handler's timeout) or away: closed without a word;
        anything else as socketserver reports it."""
        if isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
            return
        super().handle_error(request, client_address)


class _QuietHandler(WSGIRequestHandler):
    # A connection that sends nothing (or half a request) holds its thread until it ends:
    # without a timeout, forever. Prometheus sends its request at once and reads the answer
    # within its scrape timeout (10 s by default).
    timeout = 10.0
    # The timeout is per read: a client sending a byte every 9 s kept its connection, and 32
    # of them every slot, for as long as they liked. Each connection ends this long after it
    # was accepted, whatever it is doing (one request each: wsgiref answers HTTP/1.0), read
    # and written through a :class:`_DeadlineSocket` on the same file descriptor.
    deadline_s = 30.0

    def setup(self) -> None:
        sock = _ConnectionSocket(fileno=os.dup(self.request.fileno()))  # the server closes its own
        sock.deadline, sock.per_call_s = time.monotonic() + self.deadline_s, self.timeout
        self.request = sock
        super().setup()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.request.close()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (no line per scrape)
        pass


class _DualStack(_Server):
    """Every address of both families, as gRPC binds a wildcard host (``0.0.0.0`` too)."""

    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


#: Hosts that mean every address. gRPC binds them to IPv6 and IPv4 alike; bound to IPv4 only,
#: the metrics port of a pod on an IPv6-only cluster refused every scrape the gRPC port took.
WILDCARD_HOSTS = ("0.0.0.0", "::")


def start(host: str, port: int, registry: CollectorRegistry,
          torchserve_metrics_url: str = "") -> tuple[WSGIServer, threading.Thread]:
    """Serve :func:`metrics_app` on ``host:port`` (0: a free port) from a daemon thread; stop
    with ``server.shutdown()`` (from another thread), then ``server.server_close()``. A
    wildcard host serves both families (IPv4 alone where the machine has no IPv6)."""
    bare = host.strip("[]")  # an IPv6 host as gRPC takes it ([::]): the brackets are not the address
    app = metrics_app(registry, torchserve_metrics_url)
    server: WSGIServer | None = None
    if bare in WILDCARD_HOSTS:
        try:
            server = make_server("::", port, app, _DualStack, _QuietHandler)
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT):
                raise  # the port taken, say: as for any host
            bare = "0.0.0.0"  # a kernel without IPv6
    if server is None:
        family = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0][0]
        server_class = type("_MetricsServer", (_Server,), {"address_family": family})
        server = make_server(bare, port, app, server_class, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
