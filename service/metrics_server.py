"""The gateway's metrics port: its own metrics, and TorchServe's relayed beside them.

    server, thread = start(host, port, registry, torchserve_metrics_url)

| path | answers |
|---|---|
| ``/metrics`` (any path but the one below) | the gateway's registry, as ``prometheus_client`` serves it |
| ``/metrics/torchserve`` (or with a final ``/``) | TorchServe's ``/metrics``, fetched when scraped; 503 when it does not answer |

TorchServe binds the pod's loopback, its metrics endpoint included, so nothing outside the pod
can reach it. Prometheus scrapes it through this port as a second target with a job of its own.
The relay fetches one URL fixed at start (no caller chooses what is fetched), within a timeout
shorter than a scrape's. When TorchServe does not answer, the scrape fails with 503 and
Prometheus records that target down (``up == 0``) while the gateway's own target stays up.
"""

from __future__ import annotations

import http.client
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

log = logging.getLogger(__name__)

TORCHSERVE_PATH = "/metrics/torchserve"
RELAY_TIMEOUT_S = 5.0  # below the ServiceMonitor's 10 s scrape timeout
MAX_RELAY_BYTES = 16 << 20  # TorchServe's exposition is tens of kB
_LOG_EVERY_S = 60.0  # a down TorchServe is logged once a minute, not once a scrape
_DEFAULT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

WSGIApp = Callable[[dict, Callable], Iterable[bytes]]


def _text() -> list[tuple[str, str]]:
    """Headers of a plain-text answer: a new list each time (wsgiref appends to the one given)."""
    return [("Content-Type", "text/plain; charset=utf-8")]


class TorchServeRelay:
    """A WSGI app answering TorchServe's current exposition from ``url``."""

    def __init__(self, url: str, timeout_s: float = RELAY_TIMEOUT_S) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self._last_log = float("-inf")
        # TorchServe is beside the gateway: never through an http_proxy set for the pod.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _fetch(self) -> tuple[bytes, str]:
        with self._opener.open(self.url, timeout=self.timeout_s) as resp:
            body = resp.read(MAX_RELAY_BYTES + 1)
            ctype = resp.headers.get("Content-Type") or _DEFAULT_TYPE
        if len(body) > MAX_RELAY_BYTES:
            raise ValueError(f"exposition larger than {MAX_RELAY_BYTES} bytes")
        return body, ctype

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        try:
            body, ctype = self._fetch()
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError and timeouts are OSErrors
            now = time.monotonic()
            if now - self._last_log >= _LOG_EVERY_S:
                self._last_log = now
                log.warning("TorchServe's metrics endpoint %s did not answer: %s", self.url, e)
            start_response("503 Service Unavailable", _text())
            return [b"TorchServe's metrics endpoint did not answer\n"]
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


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (no line per scrape)
        pass


def start(host: str, port: int, registry: CollectorRegistry,
          torchserve_metrics_url: str = "") -> tuple[WSGIServer, threading.Thread]:
    """Serve :func:`metrics_app` on ``host:port`` (0: a free port) from a daemon thread; stop
    with ``server.shutdown()`` (from another thread), then ``server.server_close()``."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_MetricsServer", (_Server,), {"address_family": family})
    server = make_server(host, port, metrics_app(registry, torchserve_metrics_url), server_class, _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread
