"""Gateway settings: one object, built once in ``__main__`` from flags and ``ROBUSTGATE_*``
environment variables (flags win), then passed down. No other module reads ``os.environ``.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import secrets
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from handlers import limits as handler_limits

REPO = Path(__file__).resolve().parent.parent
ENV_PREFIX = "ROBUSTGATE_"
MIN_WORKER_TIMEOUT_S = 1.0  # a watched worker's shortest timeout (Settings.worker_timeout_s)
# Durations below which a gateway misbehaves instead of serving: a health probe sent back to back,
# a backend that never answers in time (never ready), connections closed or pinged as they open.
MIN_DURATION_S = {"backend_timeout_s": 0.01, "request_timeout_s": 0.01, "health_interval_s": 0.1,
                  "max_connection_age_s": 0.1, "keepalive_time_s": 0.1, "keepalive_timeout_s": 0.1}
MAX_WORKERS = 64
# gRPC takes its options as 32-bit ints: message sizes in bytes, durations in milliseconds
# (and its deadlines overflow beyond about 292 years); larger values failed the start with an
# OverflowError traceback, or left the health probe failing for good.
MAX_MESSAGE_BYTES = 2**31 - 1
MAX_DURATION_S = (2**31 - 1) // 1000
# A caller's id is echoed in its answer (twice on a stream: the envelope and the result): an
# unbounded one could push an answer past the message limit and end a stream's later answers.
MAX_REQUEST_ID_CHARS = 256
# A request's fields besides its image (a request id of at most 256 characters, up to 1 KiB in
# UTF-8; the model's name and version; top_k, certify; protobuf's tags and lengths, a stream
# item's wrapper): the image limit is the message limit less this, so an image at the limit
# GetModel states still fits in a message gRPC takes.
REQUEST_ENVELOPE_BYTES = 2048
# ROBUSTGATE_* variables that are not the gateway's settings but read beside it (the image's
# entrypoint, scripts/run.sh); any other unknown name is refused as a likely typo.
OTHER_ENV = frozenset({"ROBUSTGATE_POLICY_DIR", "ROBUSTGATE_KEY_FILE_WAIT_S", "ROBUSTGATE_MODEL"})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    """Every knob of the gateway. Each field's env variable is ``ROBUSTGATE_<FIELD>``."""

    host: str = "127.0.0.1"
    """Address the gateway's gRPC server binds to (0.0.0.0 in a pod)."""
    port: int = 50051
    """Gateway gRPC port; 0 picks a free one (tests)."""
    metrics_port: int = 9464
    """Prometheus /metrics port of the gateway; 0 picks a free one, -1 disables it."""
    store: Path = REPO / "model_store" / "artifacts"
    """Model store: model cards, policies and archives (manifest-verified)."""
    models: tuple[str, ...] = ("fmnist-cnn",)
    """Models to serve (directories of the store)."""
    backend_format: str = "onnx"
    """Which TorchServe archive serves each model: onnx (default: ONNX Runtime is several times
    faster on CPU than TorchScript, whose profiling executor re-specialises per batch size) or
    torchscript. Both exports agree within 1e-4, so one calibrated policy serves either."""
    torchserve_address: str = "127.0.0.1:7070"
    """TorchServe's gRPC inference address (inside the pod)."""
    torchserve_key_file: Path = REPO / "var" / "torchserve" / "key_file.json"
    """TorchServe's key_file.json (token auth), written in TorchServe's run directory."""
    torchserve_metrics_url: str = "http://127.0.0.1:8082/metrics"
    """TorchServe's Prometheus endpoint (inside the pod), relayed on the gateway's metrics port at
    /metrics/torchserve so that TorchServe stays on the loopback; empty: not relayed."""
    backend_timeout_s: float = 5.0
    """Deadline of one TorchServe call, capped by what the client has left."""
    request_timeout_s: float = 10.0
    """Deadline for a request whose client set none; a client's own deadline is cut to ten
    times this (100 s by default), so that no caller's deadline holds a slot for hours."""
    coalesce_max_batch: int = 32
    """Coalesce concurrent requests for one model into one TorchServe call of at most this many
    images, each with its own plan (at most the handler's max_batch_items); 0 or 1: off. On by
    default: against TorchServe's batching alone it lowers the p50 at one client (4.3 against
    7.9 ms on the machine of 2026-12-03) and gives 1.4-1.7x the throughput at 1-64 clients
    with the gate off, 1.0-1.2x with the cascade; a lone request leaves at once (README,
    Results; benchmarks/results/serving.md)."""
    coalesce_max_wait_ms: float = 2.0
    """With coalescing on: longest a request waits for company while the backend is busy (a lone
    request leaves at once, and a waiting batch leaves when the call in flight comes back).
    Near saturation ``coalesce_max_calls`` is what fills batches; a 10 ms wait without it gave
    0.9-1.1x the throughput at 64 clients but 0.8x with the cascade at 4
    (benchmarks/results/coalesce_wait.md)."""
    coalesce_max_rows: int = 4096
    """With coalescing on: variant rows (images x (1 + variants)) in one TorchServe call."""
    coalesce_max_calls: int = 3
    """With coalescing on: TorchServe calls in flight per model; beyond it requests gather until
    one comes back (or they fill a batch). 0: no limit. The default is the shipped archives'
    2 workers + 1 (one call ready behind each busy pair); raise it with the workers. Against no
    limit: 1.05-1.4x the throughput at 64 clients with the gate off, 1.2x with the cascade, the
    same within noise at 1-16 (benchmarks/results/coalesce_wait.md)."""
    max_inflight: int = 256
    """Requests processed at once (per gateway process, see ``workers``); beyond it
    RESOURCE_EXHAUSTED at once."""
    max_inflight_per_connection: int = 128
    """Requests one client connection may have processed at once, unary calls and stream items
    together (per gateway process), so that one client cannot take every slot of
    ``max_inflight`` and leave the others nothing: beyond it a call is refused with
    RESOURCE_EXHAUSTED at once, and a stream reads its next item only when its connection has
    room again (gRPC's flow control then holds the sender back). Each waiting stream is woken
    when room comes and reads one item ahead, so at most one item per open stream waits read
    for its share (``max_streams_per_connection`` of them at the most): an idle stream holds no
    share, so none can keep the others waiting. Behind a proxy that carries
    many clients over a few connections (a service mesh's sidecar), raise it to
    ``max_inflight`` or set 0: no per-connection limit. Not HTTP/2's
    SETTINGS_MAX_CONCURRENT_STREAMS: with that at the limit, gRPC 1.85's clients had some calls
    fail UNAVAILABLE (RST_STREAM REFUSED_STREAM) instead of waiting."""
    allow_certify: bool = True
    """Whether a request may ask for a randomized-smoothing certificate (``certify: true``),
    which draws up to the policy's ``noise.max_samples`` noise copies within its
    ``max_forward_passes`` (the shipped policy: up to 430 forward passes, about 30 times a
    request's 14), all of it counted as one request by ``max_inflight``. false: such a request
    is refused with FAILED_PRECONDITION, unless the policy certifies every request anyway
    (``noise.certify``); GetModel tells callers (``policy.certify_refused``)."""
    max_streams_per_connection: int = 100
    """ClassifyStreams one client connection may have open at once (per gateway process); one
    more is refused with RESOURCE_EXHAUSTED as it opens, and the connection's other calls and
    streams go on. An open stream costs the gateway a task and its buffers even while it waits
    for its caller's next item (and holds no share of ``max_inflight_per_connection`` then):
    unbounded, one connection could open them by the hundred thousand. 100 is what HTTP/2
    recommends a server allow at least (RFC 9113, SETTINGS_MAX_CONCURRENT_STREAMS). Behind a
    proxy that carries many clients' streams over one connection, raise it; 0: no limit."""
    workers: int = 1
    """Gateway processes serving one port (SO_REUSEPORT; ``service/workers.py``). One Python
    process served 1,000 to 2,300 unary calls/s on an H200 node, its event loop holding one core:
    more processes serve more where the model is fast (a GPU) and the node has cores for them
    (there 4 served 2.0x one at 64 clients; 8 served less than 4, each coalescing smaller batches).
    On 2 cores shared with TorchServe, 2 served 0.82x one: keep 1 there. Each process
    coalesces, admits (``max_inflight``) and limits its TorchServe calls (``coalesce_max_calls``)
    on its own. One HTTP/2 connection stays on one process, so load spreads over several
    connections (clients, or channels of one client). 1: one process."""
    worker_timeout_s: float = 30.0
    """With ``workers`` > 1: a worker whose event loop has not run for this long (hung in a call
    that never returns, or stopped) is killed and replaced, as one that died; so is a
    replacement that does not listen within 120 s more. Its loop marks a heartbeat every
    second once it listens; nothing in a request blocks the loop for more than milliseconds.
    One process is watched by the pod's liveness probe instead, which with several workers
    reaches only the one its connection lands on. 0: not watched; otherwise at least 1 s."""
    stream_window: int = 16
    """Items of one ClassifyStream processed at once, coalesced like concurrent calls; answers
    still leave in request order. The next item is read only when one of them is answered (and
    the connection has room, below); the rest stay unread, so gRPC's flow control holds a
    faster sender back. Each item in flight counts toward
    ``max_inflight`` and ``max_inflight_per_connection``. 1: one at a time."""
    max_connection_age_s: float = 300.0
    """A client connection is closed gently (GOAWAY) after about this long (gRPC adds +-10 %
    jitter): calls in flight finish, streams open then are not cut, and the client reconnects
    for its next call. So long-lived connections re-spread: over pods after the autoscaler adds
    some, and over the ``workers``, which the kernel assigns per connection, unevenly when there
    are few (16 connections over 8 workers: the busiest had 1.5-3x the mean). 0: never."""
    keepalive_time_s: float = 60.0
    """The gateway pings a client connection after this long without a frame from it, and
    closes it if the ping is not answered within ``keepalive_timeout_s``: a client that
    vanished without closing its connection (host gone, network cut, a NAT or load balancer
    that dropped the flow) no longer holds its streams open, their items in flight and their
    admission slots, forever. Clients may ping too, as often as every 10 s (or every
    ``keepalive_time_s`` where that is shorter), with or without calls open; more often, gRPC
    answers GOAWAY ``too_many_pings``. 0: no pings, and gRPC's default for clients (at most
    one ping per 5 minutes without data)."""
    keepalive_timeout_s: float = 20.0
    """How long the gateway waits for the answer to its keepalive ping before it closes the
    connection (its calls and streams end CANCELLED)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted from callers, and sent to them. A larger one is refused
    by gRPC's transport with RESOURCE_EXHAUSTED before any gateway code runs (not an overload
    signal). Encoded images may take all of it but ``REQUEST_ENVELOPE_BYTES``
    (``max_image_bytes``, which GetModel states). The gateway's own calls to TorchServe have
    TorchServe's limits (``service.backend.BACKEND_MAX_*``), whatever this is."""
    max_image_pixels: int = 4096 * 4096
    """Pixel-count cap checked from the header before full decode (decompression bombs)."""
    decode_threads: int = 2
    """Images of over a million pixels (by their header) decoded at once per gateway process,
    in threads off its event loop; more wait their turn (smaller ones off the loop have 4
    threads of their own). Each may hold about 260 MB while it decodes at the default
    ``max_image_pixels`` (a 4096x4096 PNG with an alpha channel), so this bounds a process's
    decoding memory (about 520 MB at 2, and up to 4 x 16 MB for the smaller ones). A request
    cancelled meanwhile leaves its decode the thread until it ends."""
    grace_s: float = 10.0
    """On SIGTERM: stop accepting, let in-flight calls finish within this many seconds."""
    health_interval_s: float = 2.0
    """How often the backend is probed for the health service."""
    otlp_endpoint: str = ""
    """OTLP/gRPC collector for traces (http://host:4317 plaintext, https:// TLS); empty: tracing off."""
    trace_sample_ratio: float = 1.0
    """Share of requests traced while tracing is on (a caller's sampled trace is always followed)."""
    seed: int = field(default=-1, repr=False)
    """Secret key of the probe plans' seeds: an image's seed is a keyed hash (HMAC-SHA256) of
    its pixels, so under one key the same image meets the same probes (reproducible verdicts),
    and a caller cannot know the noise and jitter copies its image will meet (randomized
    checks whose draws an attacker can compute are as good as fixed ones). -1: drawn at random
    at start, shared by the workers of one gateway; set one (from a Secret) for every pod
    and restart to probe alike. In [0, 2^63). Prefer ``seed_file``: env and flags show in
    ``ps`` and ``/proc/*/environ``."""
    seed_file: str = ""
    """File holding ``seed`` (a whole number), read once at start (a key added to the Secret
    later reaches a gateway at its next start). A file that is not there (a Secret's optional
    key left unset) draws one at start, as without it, and says so in the log; one that is
    there and holds anything else refuses the start. Not with ``seed``."""
    log_level: str = "INFO"
    tls_cert_file: str = ""
    """PEM server certificate chain; with ``tls_key_file`` the port speaks TLS; empty: plaintext."""
    tls_key_file: str = ""
    """PEM private key of ``tls_cert_file``."""
    tls_client_ca_file: str = ""
    """PEM CA bundle; set: mutual TLS, every client must present a certificate it signed."""
    auth_token_file: str = ""
    """File holding the bearer token callers must send (``authorization: Bearer <token>``); one
    token per line, any of them accepted. Looked at on a call that carries a token, at most
    every 2 s, and re-read when it changed, so a token is rotated without a restart (README,
    Deploy)."""
    auth_token: str = field(default="", repr=False)  # a secret: never in a logged repr
    """The bearer token itself (prefer ``auth_token_file``: env and flags show in ``ps``); empty: no check.
    Health and reflection stay open either way, so probes work."""
    allow_unauthenticated: bool = False
    """Serve callers without a credential on an address other machines reach. Off: a host that
    is not loopback (0.0.0.0, a LAN address, a name) needs ``auth_token_file`` /
    ``auth_token`` or ``tls_client_ca_file``, and the start is refused without one."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # NaN passes every < and <= check below
            if isinstance(f.default, float) and not math.isfinite(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be a finite number")
        if not 0 <= self.port <= 65535:  # gRPC wraps a larger one to another port
            raise ValueError("port must be in [0, 65535] (0: a free one)")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be in [0, 65535] (0: a free one), or -1 (off)")
        if not self.models:
            raise ValueError("models must name at least one model (a gateway of none reports SERVING)")
        if self.max_message_bytes <= REQUEST_ENVELOPE_BYTES:
            raise ValueError(f"max_message_bytes must be > {REQUEST_ENVELOPE_BYTES} (a request's fields "
                             f"besides its image)")
        if self.max_image_pixels < 1:
            raise ValueError("max_image_pixels must be >= 1")
        if self.decode_threads < 1:
            raise ValueError("decode_threads must be >= 1")
        if self.max_message_bytes > MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be <= {MAX_MESSAGE_BYTES} (gRPC's limit is a 32-bit int)")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        object.__setattr__(self, "log_level", self.log_level.upper())
        if self.backend_format not in ("torchscript", "onnx"):
            raise ValueError(f"backend_format must be torchscript or onnx, not {self.backend_format!r}")
        if (not 0 <= self.coalesce_max_batch <= handler_limits.MAX_BATCH_ITEMS or self.coalesce_max_wait_ms < 0
                or self.coalesce_max_rows < 1 or self.coalesce_max_calls < 0):
            raise ValueError(f"coalesce_max_batch must be in [0, {handler_limits.MAX_BATCH_ITEMS}] (the handler's "
                             "max_batch_items), coalesce_max_wait_ms >= 0, coalesce_max_rows >= 1, coalesce_max_calls >= 0")
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {MAX_WORKERS}]")
        if self.stream_window < 1:
            raise ValueError("stream_window must be >= 1")
        if self.max_inflight_per_connection < 0:
            raise ValueError("max_inflight_per_connection must be >= 0 (0: no limit)")
        if self.max_streams_per_connection < 0:
            raise ValueError("max_streams_per_connection must be >= 0 (0: no limit)")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError("trace_sample_ratio must be in [0, 1]")
        if self.auth_token and not (self.auth_token.isascii() and self.auth_token.isprintable()):
            raise ValueError("auth_token must be printable ASCII on one line (a gRPC header value)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if not (self.auth_token or self.auth_token_file or self.tls_client_ca_file or self.allow_unauthenticated
                or is_loopback(self.host)):
            raise ValueError(f"host {self.host} takes calls from other machines and no caller credential is set: "
                             "set auth_token_file (callers send 'authorization: Bearer <token>') or "
                             "tls_client_ca_file (mutual TLS), or allow_unauthenticated=true to serve anyone "
                             "who reaches the port")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        if self.worker_timeout_s < 0:
            raise ValueError("worker_timeout_s must be >= 0 (0: not watched)")
        if 0 < self.worker_timeout_s < MIN_WORKER_TIMEOUT_S:  # the supervisor looks every 0.2 s; below
            # twice that, every look took it for a frozen pod and forgave every hung worker
            raise ValueError(f"worker_timeout_s must be 0 (not watched) or at least {MIN_WORKER_TIMEOUT_S:g} s, "
                             f"got {self.worker_timeout_s:g}")
        if self.max_connection_age_s < 0:
            raise ValueError("max_connection_age_s must be >= 0 (0: never)")
        if self.keepalive_time_s < 0:
            raise ValueError("keepalive_time_s must be >= 0 (0: no keepalive pings)")
        for name in ("backend_timeout_s", "request_timeout_s", "grace_s", "health_interval_s", "keepalive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        for name, floor in MIN_DURATION_S.items():  # 0 still turns off those that may be off
            if 0 < getattr(self, name) < floor:
                raise ValueError(f"{name} must be at least {floor:g} s, got {getattr(self, name):g}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_s") and getattr(self, f.name) > MAX_DURATION_S:
                raise ValueError(f"{f.name} must be <= {MAX_DURATION_S} s (about 24 days: gRPC takes durations as "
                                 f"32-bit milliseconds; 0 turns off those that may be off)")
        if self.torchserve_metrics_url:
            relay_url_parts(self.torchserve_metrics_url)
        if not -1 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2^63), or -1 (a secret one drawn at start)")
        if self.seed == -1 and self.seed_file:  # once: a copy (dataclasses.replace) keeps what was read
            from_file = read_seed_file(self.seed_file)
            if from_file is not None:
                object.__setattr__(self, "seed", from_file)
        if self.seed == -1:  # before the workers are spawned: they inherit this object
            object.__setattr__(self, "seed", secrets.randbits(63))

    @property
    def max_image_bytes(self) -> int:
        """The largest encoded image taken: the message limit less a request's other fields."""
        return self.max_message_bytes - REQUEST_ENVELOPE_BYTES


def _read_ascii(path: Path | str, what: str) -> str:
    """The ASCII text in ``path``, surrounding whitespace dropped; ValueError naming the file
    where it is not ASCII or cannot be read (FileNotFoundError passes: the callers differ)."""
    try:
        return Path(path).read_bytes().decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not ASCII text") from None
    except FileNotFoundError:
        raise
    except OSError as e:  # a folder, no permission
        raise ValueError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def read_tokens_file(path: Path | str, what: str = "token file") -> tuple[str, ...]:
    """The bearer tokens in ``path``, one per line (blank lines skipped, each line's
    surrounding whitespace dropped): several while a token is rotated. ValueError naming the
    file where it holds none, or a line no client could send (a control character)."""
    try:
        text = _read_ascii(path, what)
    except FileNotFoundError:
        raise ValueError(f"{what} {path} is not there") from None
    tokens = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not tokens:
        raise ValueError(f"{what} {path} is empty")
    if not all(t.isprintable() for t in tokens):
        raise ValueError(f"{what} {path} holds a control character")
    return tokens


def read_seed_file(path: Path | str) -> int | None:
    """The probe key in ``path``: a whole number in [0, 2^63), surrounding whitespace dropped.
    None where there is no such file (a Secret's optional key left unset). ValueError naming
    the file for anything else: a key silently drawn in its place would probe this pod
    unlike the others."""
    try:
        text = _read_ascii(path, "seed_file")
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise ValueError(f"seed_file {path} does not hold a whole number")
    seed = int(text)
    if seed >= 2**63:
        raise ValueError(f"seed_file {path} holds a seed outside [0, 2^63)")
    return seed


def is_loopback(host: str) -> bool:
    """``host`` is this machine's loopback only ("localhost", 127.0.0.0/8, ::1): unreachable
    from other machines. A name other than localhost may resolve anywhere: not loopback."""
    bare = host.strip().strip("[]")
    if bare == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def relay_url_parts(url: str) -> tuple[str, int, str]:
    """(host, port, path with query) of the TorchServe metrics URL the gateway relays.

    Only ``http://host[:port][/path]`` (TorchServe beside the gateway, on the pod's loopback);
    anything else is a ValueError at start. The message never repeats the URL, which could
    carry credentials.
    """
    parts = urllib.parse.urlsplit(url)
    try:
        port = 80 if parts.port is None else parts.port
    except ValueError:  # not a number, or above 65535
        port = 0
    if parts.scheme != "http" or not parts.hostname or parts.username is not None or not port:
        raise ValueError("torchserve_metrics_url must be http://host[:port][/path] (no credentials, "
                         "a port in 1-65535)")
    return parts.hostname, port, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(f: dataclasses.Field, raw: str) -> object:
    default = f.default
    if isinstance(default, bool):  # a typo ("ture") read as false would switch a setting off in silence
        word = raw.strip().lower()
        if word not in _TRUE + _FALSE:
            raise ValueError(f"{f.name} must be true or false (or 1/0, yes/no, on/off), got {raw.strip()[:40]!r}")
        return word in _TRUE
    if isinstance(default, (int, float)):
        try:
            return type(default)(raw)
        except ValueError:
            kind = "an integer" if isinstance(default, int) else "a number"
            raise ValueError(f"{f.name} must be {kind}, got {raw.strip()[:40]!r}") from None
    if isinstance(default, tuple):
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if f.name in ("store", "torchserve_key_file"):
        return Path(raw)
    return raw


def from_args(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``ROBUSTGATE_*`` variables, then command-line flags over them."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    known = {ENV_PREFIX + name.upper() for name in fields} | OTHER_ENV
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:  # a misspelt setting would otherwise start with the default, in silence
        raise ValueError(f"unknown setting {', '.join(unknown)}: the gateway's are {ENV_PREFIX}<setting> "
                         f"for the flags of `python -m service --help`")
    for name, f in fields.items():
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _convert(f, raw)
    parser = argparse.ArgumentParser(prog="python -m service", description="RobustGate gRPC gateway")
    for name, f in fields.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                            help=f"env {ENV_PREFIX}{name.upper()} (default: {f.default})")
    args = parser.parse_args(argv)
    for name, f in fields.items():
        raw = getattr(args, name)
        if raw is not None:
            values[name] = _convert(f, raw)
    if values.get("seed_file") and "seed" in values:
        raise ValueError("seed and seed_file: set one (seed_file keeps the key out of env and ps)")
    return Settings(**values)  # type: ignore[arg-type]
