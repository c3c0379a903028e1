"""The request path, free of transport: decode once -> gate cascade (probe calls) -> answer.

    result = await pipeline.classify(request, deadline)

The gate decides which probes to send (:class:`service.gate.cascade.GateRun`); the backend
sends each as one TorchServe call holding the image once plus its plan; top-k classes come
from the base image's logits (row 0 of the first answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from robustgate.v1 import probe_pb2
from service.backend import Prober, unusable
from service.decode import Limits, NotHere, decode_image, decode_tensor
from service.errors import DeadlineExceeded, InvalidInput, NotOffered
from service.gate.cascade import GateRun
from service.gate.errors import ScoreInputError
from service.gate.plan import ProbeSpec
from service.gate.report import GateReport
from service.registry import Registry, ServedModel
from service.tracing import OFF, Tracing, set_error

DEFAULT_TOP_K = 5
# Decode big images in a worker thread so that one cannot stall the event loop: big in bytes,
# or in the size its header declares (a small file can declare millions of pixels), as its
# decoder reads that header: a header parser of our own read a PNG's first IHDR where Pillow
# takes its last, and could be led past a JPEG's frame header by a marker without a length.
# Bounded by the side, not only the pixels: a PNG may carry a chunk per row, each parsed in
# Python (an 8x8192 one of 5,300 chunks in 64 KiB held the loop 12 ms). Within 256 a side,
# an image has at most 256 x 256 pixels.
_INLINE_DECODE_BYTES = 64 * 1024
_INLINE_DECODE_SIDE = 256
# Off the loop, two pools of threads of our own: an image of up to _MEDIUM_DECODE_PIXELS by its
# header, whatever its shape (about 16 MB at the most while it decodes) in one of _MEDIUM_DECODE_THREADS, a bigger
# one (about 260 MB at the 4096x4096 limit) in one of Settings.decode_threads, so that a few
# huge images neither hold more memory than that nor keep ordinary ones waiting. A request
# cancelled while its image decodes leaves the decode its thread until it ends (a slot freed
# at once let a client with 10 ms deadlines start any number of them).
_MEDIUM_DECODE_PIXELS = 1024 * 1024
_MEDIUM_DECODE_THREADS = 4


class _DecodePool:
    """Threads that decode, and one place per thread: a request takes a place before its decode
    is handed to a thread and the place comes back when the decode ends, not when the request
    does. A request cancelled while it waits for a place holds nothing (not even its bytes, as
    a work item queued in an executor would); one cancelled while its image decodes leaves the
    decode its place until it ends. One whose deadline passed while it waited gives its place
    back undecoded (under a queue that outlasts deadlines every decode would be of a request
    already lost)."""

    def __init__(self, threads: int, name: str) -> None:
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._places = asyncio.Semaphore(threads)

    async def run(self, decode: Callable[[], np.ndarray], deadline: float) -> np.ndarray:
        """``deadline``: ``time.monotonic()`` value by which the request's answer is due."""
        await self._places.acquire()
        if time.monotonic() >= deadline:
            self._places.release()
            raise DeadlineExceeded("deadline exceeded")
        loop = asyncio.get_running_loop()

        def give_back(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while the decode ran
                loop.call_soon_threadsafe(self._places.release)

        try:
            job = self._threads.submit(decode)
        except BaseException:
            self._places.release()
            raise
        job.add_done_callback(give_back)
        return await asyncio.wrap_future(job)


@dataclass(frozen=True)
class RawTensor:
    shape: Sequence[int]  # the request's own field: a caller's may hold millions of entries
    dtype: str
    data: bytes


@dataclass(frozen=True)
class ClassifyInput:
    model: str
    image: bytes | None = None
    tensor: RawTensor | None = None
    version: str = ""
    top_k: int = 0
    request_id: str = ""
    certify: bool | None = None  # None: the policy's default


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    probability: float


@dataclass
class Timings:
    """Seconds per stage."""

    decode: float = 0.0
    backend: float = 0.0
    gate: float = 0.0
    total: float = 0.0


@dataclass(frozen=True)
class ClassifyResult:
    request_id: str
    model: str
    version: str
    classes: tuple[ClassScore, ...]
    report: GateReport | None
    timings: Timings = field(default_factory=Timings)
    backend_calls: int = 0


@functools.lru_cache(maxsize=64)
def _plan_template(spec: ProbeSpec) -> probe_pb2.ProbePlan:
    from google.protobuf import json_format

    return json_format.ParseDict(spec.to_dict(), probe_pb2.ProbePlan())


def spec_to_proto(spec: ProbeSpec) -> probe_pb2.ProbePlan:
    """The gate's plan dataclass as the wire message (same JSON field names both sides).

    A policy's plans differ only in their seed (and a noise batch's count and offset), so the
    JSON conversion (about 100 us) runs once per distinct plan and later calls copy it (a few
    us); the seed and the offset are set on the copy."""
    template = spec.with_seed(0)
    if spec.noise.offset:
        template = dataclasses.replace(template, noise=dataclasses.replace(spec.noise, offset=0))
    msg = probe_pb2.ProbePlan()
    msg.CopyFrom(_plan_template(template))
    msg.seed = spec.seed
    if spec.noise.offset:  # set only when it is (assigning 0 would add an empty noise section)
        msg.noise.offset = spec.noise.offset
    return msg


def request_seed(key: int, image: np.ndarray) -> int:
    """A per-image seed, keyed: the same image gets the same probes under one ``key``
    (reproducible verdicts), and without the key nobody can tell which (``Settings.seed``)."""
    digest = hmac.digest(key.to_bytes(8, "little"), image.tobytes(), "sha256")
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def top_k(logits_row: np.ndarray, labels: tuple[str, ...], k: int) -> tuple[ClassScore, ...]:
    z = logits_row.astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")[:k]  # by logit: probabilities that underflow to 0 still rank
    return tuple(ClassScore(int(i), labels[i] if i < len(labels) else str(i), float(p[i])) for i in order)


def certify_allowed(model: ServedModel, allow_certify: bool) -> bool:
    """Whether a request for ``model`` may set ``certify: true``: the gateway allows it, or the
    policy certifies every request anyway (asking then asks for nothing more)."""
    return allow_certify or model.policy.noise.certify


class Pipeline:
    def __init__(self, registry: Registry, backend: Prober, limits: Limits,
                 backend_timeout_s: float, base_seed: int = 0, tracing: Tracing = OFF,
                 allow_certify: bool = True, decode_threads: int = 2) -> None:
        self.registry = registry
        self._medium_decodes = _DecodePool(_MEDIUM_DECODE_THREADS, "decode")
        self._big_decodes = _DecodePool(decode_threads, "decode-big")  # Settings.decode_threads
        self.allow_certify = allow_certify  # Settings.allow_certify
        self.backend = backend
        self.limits = limits
        self.backend_timeout_s = backend_timeout_s
        self.base_seed = base_seed
        self.tracing = tracing

    async def _decode(self, req: ClassifyInput, model: ServedModel, deadline: float) -> np.ndarray:
        if req.image is not None and req.tensor is not None:
            raise InvalidInput("send either image or tensor, not both")
        if req.image is not None:
            if len(req.image) <= _INLINE_DECODE_BYTES:
                try:
                    return decode_image(req.image, model.input, self.limits, here_side=_INLINE_DECODE_SIDE)
                except NotHere:
                    pass
            try:
                return await self._medium_decodes.run(functools.partial(
                    decode_image, req.image, model.input, self.limits, here_pixels=_MEDIUM_DECODE_PIXELS), deadline)
            except NotHere:
                pass  # out of the except block: a wait below that is cancelled chains no NotHere (and its frames)
            return await self._big_decodes.run(functools.partial(decode_image, req.image, model.input, self.limits),
                                               deadline)
        if req.tensor is not None:
            t = req.tensor
            return decode_tensor(t.shape, t.dtype, t.data, model.input)
        raise InvalidInput("request has no image: set image (PNG/JPEG bytes) or tensor")

    async def classify(self, req: ClassifyInput, deadline: float) -> ClassifyResult:
        """``deadline``: ``time.monotonic()`` value by which the answer is due."""
        t0 = time.perf_counter()
        timings = Timings()
        model = self.registry.get(req.model, req.version)
        if req.certify and not certify_allowed(model, self.allow_certify):
            raise NotOffered("certification is turned off on this gateway (allow_certify): ask without certify")
        k = req.top_k or min(DEFAULT_TOP_K, len(model.labels))  # unset: 5, or every label of a model of fewer
        if k > len(model.labels):
            raise InvalidInput(f"top_k {k} exceeds the model's {len(model.labels)} classes")
        with self.tracing.span("decode"):
            image = await self._decode(req, model, deadline)
        timings.decode = time.perf_counter() - t0

        async def call(plan: probe_pb2.ProbePlan | None, rows: int):
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded("deadline exceeded")
            t = time.perf_counter()
            with self.tracing.span("backend", {"robustgate.backend.model": model.backend_name,
                                               "robustgate.backend.call": calls}) as span:
                try:
                    out = await self.backend.probe(model.backend_name, image, plan, min(self.backend_timeout_s, left))
                    if out.logits.shape != (rows, len(model.labels)):  # another archive than the one checked at start?
                        raise unusable("logits of another shape than asked",
                                       f"{out.logits.shape} for {rows} rows of {len(model.labels)} classes")
                except Exception as e:  # the input was checked before: a failure here is the server's
                    set_error(span, type(e).__name__)
                    raise
            timings.backend += time.perf_counter() - t
            return out

        run = GateRun.start(model.policy, request_seed(self.base_seed, image), certify=req.certify)
        base_logits: np.ndarray | None = None
        calls = 0
        while (spec := run.next_plan()) is not None:
            out = await call(spec_to_proto(spec), spec.rows)
            calls += 1
            if base_logits is None:
                base_logits = out.logits[0]
            t = time.perf_counter()
            with self.tracing.span("gate") as span:
                try:
                    run = run.feed(out.logits, out.features)
                except ScoreInputError as e:  # e.g. features missing or of another size than the density model's
                    set_error(span, "BackendUnavailable")
                    raise unusable("scores the gate cannot use", e) from None
            timings.gate += time.perf_counter() - t
        if base_logits is None:  # gate off: a plain classification
            out = await call(None, 1)
            calls += 1
            base_logits = out.logits[0]
        t = time.perf_counter()
        with self.tracing.span("gate"):
            report = run.report()
        timings.gate += time.perf_counter() - t
        classes = () if report.withhold_label else top_k(base_logits, model.labels, k)
        timings.total = time.perf_counter() - t0
        return ClassifyResult(req.request_id, model.name, model.version, classes, report, timings, calls)
