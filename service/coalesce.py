"""Request coalescing: concurrent probe calls for one model leave as ONE TorchServe call.

    prober = Coalescer(backend, CoalesceConfig(max_batch=32, max_wait_ms=2.0))
    out = await prober.probe(model_name, image, plan, timeout_s)   # same call as the backend's

For a small model TorchServe's per-call path, not the model, sets the pace: every call pays
gRPC framing, the Java frontend's queue and the Python worker's per-request bookkeeping,
whether or not TorchServe's own batching later groups it with others. Coalescing in the
gateway sends several images, each with its own plan, as one ``robustgate.v1.ProbeBatch``;
the handler answers a ``ProbeBatchResult`` and every caller gets its own ``ProbeOutput`` (or
its own error: one bad image does not fail its neighbours).

When a batch leaves (Nagle's algorithm with an idle bypass):

- no call for the model is in flight: at once, with whatever arrived in the same event-loop
  turn, so a lone caller waits nothing;
- calls are in flight: when ``max_batch`` images or ``max_rows`` variant rows are waiting,
  when the in-flight calls have all come back, or ``max_wait_ms`` after the first waiting
  request, whichever comes first. The busier the backend, the larger the batches;
- ``max_calls`` calls are in flight: when one of them comes back (or the batch is full).
  TorchServe runs as many calls at once as the model has workers and queues the rest, so a
  call beyond workers + 1 would only wait there, where nothing can join it; held here, the
  requests behind it leave as one call.

Each caller keeps its own deadline: the call is sent with the latest of the batch's
deadlines, a caller whose deadline passes first gets ``DeadlineExceeded`` alone, and a
request whose deadline has already passed when its batch leaves is not sent. A call every
caller of which has gone keeps its place in ``max_calls`` until TorchServe answers (at most
the latest of its deadlines): TorchServe runs a job whose call was cancelled all the same, so
the requests behind it would only queue there behind it, in smaller calls. A call that
TorchServe refuses as a whole (an archive that takes no ``ProbeBatch``, or fewer items) blames
no caller: its requests are sent again one by one, each answered as if it had gone alone. They
queue in the lane and each leaves as a call of its own within the same ``max_calls``, ahead of
any new batch (no refused batch's requests wait behind requests that came later), and one at a
time where full batches, which leave whatever the limit, hold the lane at it. The lane
remembers the refusal for :data:`REFUSAL_MEMORY_S`: a batch at least as large (in images and in
rows) goes one by one at once, without the round trip it would be refused in; smaller batches
are still tried, and once the memory lapses (an archive replaced) every size is.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from handlers import limits as handler_limits
from robustgate.v1 import probe_pb2
from service.backend import ProbeOutput, TorchServeBackend
from service.errors import BackendRefused, BackendUnavailable, DeadlineExceeded, GatewayError
from service.ratelog import Throttle
from service.settings import Settings

log = logging.getLogger(__name__)
_throttled = Throttle(log)  # a refused batch repeats with every batch: one line per 10 s
REFUSAL_MEMORY_S = 60.0  # how long a lane sends batches like a refused one straight one by one


@dataclass(frozen=True)
class CoalesceConfig:
    """Defaults are the gateway's (:class:`service.settings.Settings`, where each is argued)."""

    max_batch: int = Settings.coalesce_max_batch
    """Images in one TorchServe call (at most the handler's ``max_batch_items``)."""
    max_wait_ms: float = Settings.coalesce_max_wait_ms
    """Longest a request waits for company while the backend is busy."""
    max_rows: int = Settings.coalesce_max_rows
    """Variant rows (every image's 1 + plan variants) in one call, so gate requests stay bounded
    (at most the handler's ``max_batch_rows``)."""
    max_bytes: int = 2 << 20
    """Image bytes in one call, well inside the gRPC message limits on both sides."""
    max_calls: int = Settings.coalesce_max_calls
    """TorchServe calls in flight for one model; more requests wait (gathering into the next
    batch) until one comes back, unless they fill a batch. 0: no limit."""

    def __post_init__(self) -> None:
        if not 2 <= self.max_batch <= handler_limits.MAX_BATCH_ITEMS:
            raise ValueError(f"coalescing needs 2 <= max_batch <= {handler_limits.MAX_BATCH_ITEMS} (the handler's max_batch_items)")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.max_rows < 1 or self.max_bytes < 1:
            raise ValueError("max_rows and max_bytes must be >= 1")
        if self.max_calls < 0:
            raise ValueError("max_calls must be >= 0")


def plan_rows(plan: probe_pb2.ProbePlan | None) -> int:
    """Rows a plan asks of the model: the base image plus every variant (probe.proto's order)."""
    if plan is None:
        return 1
    n = 1 + plan.noise.count + len(plan.squeeze.bit_depths) + len(plan.squeeze.median_sizes) + len(plan.views)
    shuffle = plan.shuffle.count if plan.shuffle.grid else 0  # no grid, no shuffles (handlers.probe.count_rows)
    return n + plan.occlusion.grid ** 2 + shuffle + plan.jitter.count


@dataclass
class _Waiting:
    image: np.ndarray
    plan: probe_pb2.ProbePlan | None
    rows: int
    nbytes: int
    deadline: float  # time.monotonic()
    future: asyncio.Future


@dataclass
class _Lane:
    """The waiting requests and the calls in flight for one (model, version)."""

    waiting: list[_Waiting] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0
    inflight: int = 0  # TorchServe calls in flight (a batch is one; each of a refused batch's requests one)
    timer: asyncio.TimerHandle | None = None
    singles: collections.deque[_Waiting] = field(default_factory=collections.deque)  # refused batches' requests, each to go alone
    single_calls: set[asyncio.Task] = field(default_factory=set)  # the calls in flight of those
    refused: dict[tuple[int, int], float] = field(default_factory=dict)  # (images, rows) refused: until when

    def refuses(self, images: int, rows: int, now: float) -> bool:
        """Whether a batch of ``images`` and ``rows`` is at least as large as one TorchServe
        refused within :data:`REFUSAL_MEMORY_S` (whichever of its limits that one passed, this
        one passes too). Lapsed refusals are forgotten."""
        for size, until in list(self.refused.items()):
            if until <= now:
                del self.refused[size]
            elif images >= size[0] and rows >= size[1]:
                return True
        return False

    def remember_refusal(self, images: int, rows: int, now: float) -> None:
        for size in [x for x in self.refused if x[0] >= images and x[1] >= rows]:
            del self.refused[size]  # covered by this smaller one
        self.refused[(images, rows)] = now + REFUSAL_MEMORY_S


class Coalescer:
    def __init__(self, backend: TorchServeBackend, config: CoalesceConfig, metrics=None) -> None:
        self.backend = backend
        self.config = config
        self._metrics = metrics  # service.metrics.Metrics or None
        self._lanes: dict[tuple[str, str], _Lane] = {}
        self._tasks: dict[asyncio.Task, list[_Waiting]] = {}  # each call in flight: its requests

    async def probe(self, model_name: str, image: np.ndarray, plan: probe_pb2.ProbePlan | None,
                    timeout_s: float, version: str = "") -> ProbeOutput:
        """As :meth:`TorchServeBackend.probe`, sent together with concurrent calls for the model."""
        if timeout_s <= 0:
            raise DeadlineExceeded("request deadline ran out before the backend call")
        loop = asyncio.get_running_loop()
        key = (model_name, version)
        lane = self._lanes.setdefault(key, _Lane())
        cfg = self.config
        w = _Waiting(image, plan, plan_rows(plan), image.nbytes, time.monotonic() + timeout_s, loop.create_future())
        if lane.waiting and (lane.rows + w.rows > cfg.max_rows or lane.nbytes + w.nbytes > cfg.max_bytes):
            self._flush(key)  # this one would overflow the call: the waiting ones go first
        lane.waiting.append(w)
        lane.rows += w.rows
        lane.nbytes += w.nbytes
        if self._full(lane) and self._at_limit(lane):
            self._prune(lane)  # a full batch leaves past max_calls: not one full of requests out of time
        if self._full(lane):
            self._flush(key)
        elif lane.timer is None and not self._at_limit(lane):
            delay = 0.0 if lane.inflight == 0 else self.config.max_wait_ms / 1000.0
            lane.timer = loop.call_later(delay, self._timer_fired, key)
        try:
            # Not wait_for: on Python 3.11 a cancel that lands as the answer does is dropped
            # (wait_for returns the result), and the caller's handler runs on for nobody.
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(w.future)
        except TimeoutError:
            if not w.future.done():
                w.future.cancel()  # not sent if still waiting (the finally below then has nothing to do)
                if self._forget(lane, w):  # never sent: TorchServe is not the one that was slow
                    raise DeadlineExceeded("deadline exceeded while waiting for the backend") from None
                raise DeadlineExceeded("backend did not answer within the deadline") from None
        finally:
            if not w.future.done():  # the caller is gone (deadline, cancelled): not sent if still waiting
                w.future.cancel()
                self._forget(lane, w)
            elif not w.future.cancelled():
                w.future.exception()  # failed as the caller left: read, or asyncio logs it as never retrieved
        # settled as its time ran out: its answer, or its own error (one never sent says so)
        return w.future.result()

    @staticmethod
    def _forget(lane: _Lane, w: _Waiting) -> bool:
        """Take a departed caller's request out of its lane, so it neither fills a batch nor
        counts toward its rows (held requests may wait a while at ``max_calls``). True where
        it was there, not yet sent (or a refused batch's, to go again)."""
        for i, x in enumerate(lane.waiting):
            if x is w:
                del lane.waiting[i]
                lane.rows -= w.rows
                lane.nbytes -= w.nbytes
                return True
        for i, x in enumerate(lane.singles):
            if x is w:
                del lane.singles[i]
                return True
        return False

    def _at_limit(self, lane: _Lane) -> bool:
        return 0 < self.config.max_calls <= lane.inflight

    def _full(self, lane: _Lane) -> bool:
        cfg = self.config
        return len(lane.waiting) >= cfg.max_batch or lane.rows >= cfg.max_rows or lane.nbytes >= cfg.max_bytes

    def _prune(self, lane: _Lane) -> None:
        """The lane's waiting requests less those whose callers left or whose time ran out (those
        answered): what is left to fill a batch."""
        lane.waiting = self._live(lane.waiting)
        lane.rows = sum(w.rows for w in lane.waiting)
        lane.nbytes = sum(w.nbytes for w in lane.waiting)

    def _timer_fired(self, key: tuple[str, str]) -> None:
        """The wait for company is over: the requests leave, unless the lane has reached
        ``max_calls`` meanwhile (a refused batch's requests took its calls): then they are held,
        and leave when a call comes back."""
        lane = self._lanes[key]
        lane.timer = None
        if not (lane.singles or self._at_limit(lane)):
            self._flush(key)

    def _flush(self, key: tuple[str, str]) -> None:
        lane = self._lanes[key]
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        batch, lane.waiting, lane.rows, lane.nbytes = lane.waiting, [], 0, 0
        live = self._live(batch)
        if len(live) > 1 and lane.refuses(len(live), sum(w.rows for w in live), time.monotonic()):
            lane.singles.extend(live)  # as large as a batch refused lately: one by one, no round trip
            self._send_singles(key)
        elif live:
            self._start(key, live)

    @staticmethod
    def _live(batch: list[_Waiting]) -> list[_Waiting]:
        """The requests of ``batch`` still to send: a caller that has gone is dropped, one out of
        time is answered ``DeadlineExceeded`` and not sent."""
        now = time.monotonic()
        live = []
        for w in batch:
            if w.future.done():  # its caller has gone (cancelled)
                continue
            if w.deadline <= now:
                w.future.set_exception(DeadlineExceeded("deadline exceeded while waiting for the backend"))
            else:
                live.append(w)
        return live

    def _start(self, key: tuple[str, str], batch: list[_Waiting]) -> asyncio.Task:
        """One TorchServe call for ``batch`` (one request: a plain call), counted in its lane."""
        self._lanes[key].inflight += 1
        task = asyncio.get_running_loop().create_task(self._send(key, batch))
        self._tasks[task] = batch
        task.add_done_callback(functools.partial(self._call_done, key))
        return task

    def _send_singles(self, key: tuple[str, str]) -> None:
        """Refused batches' requests, each as its own call, while the lane has calls to spare
        (``max_calls``; with no limit, at most a handler batch's worth at once: a refused
        batch of 32 is not 32 calls at a time), and one at a time where it has none: full
        batches leave whatever the limit, and a steady stream of them would otherwise keep
        these waiting until their deadlines."""
        lane = self._lanes[key]
        limit = self.config.max_calls or handler_limits.MAX_BATCH_ITEMS
        while lane.singles and (lane.inflight < limit or not lane.single_calls):
            live = self._live([lane.singles.popleft()])
            if live:
                lane.single_calls.add(self._start(key, live))

    def _call_done(self, key: tuple[str, str], task: asyncio.Task) -> None:
        """However the call ended (answered, failed, cancelled before it ran): count it back,
        answer any caller it left waiting, and let the next call leave: refused batches'
        requests first, then the requests held at max_calls."""
        for w in self._tasks.pop(task):
            if not w.future.done():
                w.future.set_exception(BackendUnavailable("backend is unavailable"))
        lane = self._lanes[key]
        lane.inflight -= 1
        lane.single_calls.discard(task)
        self._send_singles(key)
        if lane.waiting and not lane.singles and (
                lane.inflight == 0 or (lane.timer is None and not self._at_limit(lane))):
            self._flush(key)  # the backend is idle, or the requests held at max_calls may leave

    async def _send(self, key: tuple[str, str], batch: list[_Waiting]) -> None:
        model_name, version = key
        timeout_s = max(w.deadline for w in batch) - time.monotonic()
        if timeout_s <= 0:  # every deadline passed between the flush and this task's start: not sent
            self._live(batch)  # each answered DeadlineExceeded
            return
        try:
            if len(batch) == 1:  # nothing to coalesce: the plain call (and its errors) as is
                outs: list[ProbeOutput | GatewayError] = [
                    await self._plain(model_name, batch[0], timeout_s, version)]
            else:
                lane, rows = self._lanes[key], sum(w.rows for w in batch)
                try:
                    self._observe_call(model_name, len(batch))
                    outs = await self.backend.probe_batch(
                        model_name, [(w.image, w.plan) for w in batch], timeout_s, version)
                except BackendRefused:
                    # The batch as a whole was refused (the backend has logged the handler's
                    # words): no caller's input is to blame. An archive that takes no
                    # ProbeBatch, or fewer items than coalesce_max_batch (the registry checks
                    # that against each archive's limits at start): each request on its own,
                    # in the lane's turn (this call's end sends the first), and the lane's next
                    # batches as large as this one too.
                    _throttled.log(logging.ERROR, "batch refused",
                                   "TorchServe refused a coalesced call of %d requests (%d rows); sent one "
                                   "by one, as are batches as large for %.0f s", len(batch), rows,
                                   REFUSAL_MEMORY_S)
                    lane.remember_refusal(len(batch), rows, time.monotonic())
                    lane.singles.extend(w for w in batch if not w.future.done())
                    batch.clear()  # no longer this call's to answer (nor to fail, in _call_done)
                    return
        except GatewayError as e:
            outs = [e] * len(batch)
        except Exception:  # never leave a caller hanging on a bug
            log.exception("coalesced backend call failed")
            outs = [BackendUnavailable("backend is unavailable")] * len(batch)
        for w, out in zip(batch, outs):
            self._answer(w, out)

    @staticmethod
    def _answer(w: _Waiting, out: ProbeOutput | GatewayError) -> None:
        """Hand ``out`` to the caller of ``w``, unless it has its answer or has gone."""
        if w.future.done():
            return
        if isinstance(out, GatewayError):
            w.future.set_exception(type(out)(str(out)))
        else:
            w.future.set_result(out)

    def _observe_call(self, model_name: str, images: int) -> None:
        """One TorchServe call of ``images`` images (a refused one too: TorchServe had it)."""
        if self._metrics is not None:
            self._metrics.series(self._metrics.backend_batch_images,
                                 self._metrics.model_of(model_name)).observe(images)

    async def _plain(self, model_name: str, w: _Waiting, timeout_s: float, version: str) -> ProbeOutput | GatewayError:
        self._observe_call(model_name, 1)
        try:
            return await self.backend.probe(model_name, w.image, w.plan, timeout_s, version)
        except GatewayError as e:
            return e

    async def close(self) -> None:
        """Let the calls in flight finish where a caller still waits for them; a call every
        caller of which has gone (the server's stop cancelled them) is cancelled, so the drain
        does not wait up to a backend timeout for answers nobody reads."""
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
        for key, lane in self._lanes.items():
            if lane.waiting:
                self._flush(key)
        while self._tasks:  # a finishing call may start the next batch
            for task, batch in list(self._tasks.items()):
                if all(w.future.done() for w in batch):
                    task.cancel()
            # shielded: a cancelled close() must not cancel the calls callers are waiting on
            await asyncio.shield(asyncio.gather(*list(self._tasks), return_exceptions=True))
