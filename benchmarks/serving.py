"""Serving benchmark: the same model and images, measured side by side in one run.

    python -m benchmarks.serving            # ~3 minutes
    python -m benchmarks.serving --smoke    # seconds (the test suite runs this)

Closed-loop asyncio clients over loopback at each concurrency, for a fixed time each:

- in process: TorchScript and ONNX Runtime, one image per call (the limit); and the first
  probe of each gated row (base image and its variants, expanded and run as the handler does),
  the limit for what the gate may add ("the gate adds only compute");
- TorchServe called directly over its gRPC API (plain classification, no plan): the ONNX and
  the TorchScript archive as shipped (handlers/model-config.yaml: 2 workers x 1 thread,
  batch size 1, because the gateway batches); the ONNX archive with TorchServe's batching on
  (batch 32, 2 ms: the best setting for callers that send TorchServe one image per call);
  and the format's archive out of the box (no model-config.yaml: TorchServe's batch size 1, its
  default worker count (one per GPU it finds, else one per core), default threads);
- the gateway as shipped (request coalescing, ``--coalesce-max-batch``) with the gate off
  (on the ONNX and on the TorchScript backend; and fed by ClassifyStream, as many items in
  flight as the one-call clients, ``--stream-window`` a stream), with the calibrated gate (cascade), with
  every check on; and with coalescing off, in front of the batching archive: TorchServe's
  batching alone, gate off and cascade;
- the gateway certifying every request (randomized smoothing): sequential sampling against a
  fixed budget of the same maximum;
- naive: the gate's variants sent to the batching archive as separate one-image calls from
  the client;
- the gate's cost at one client ("in turns" rows): TorchServe directly, the gateway with the
  gate off, with the cascade and with every check on, a bare call to the gate-off gateway
  (its health check: the floor under the latency it adds), and each gated row's first probe
  in process (back to back, and again after 10 ms idle per call, as a TorchServe worker runs
  it), all up at once and measured in turns of a fraction of a second, so the drift of a
  shared machine over the run falls on each alike; the gate-cost and added-latency ratios
  read these rows, each with how far resampling the turns moves it;
- the bytes one gated image sends to TorchServe and gets back, on-device against naive
  (``benchmarks.wire_bytes``, no load): their ratio bounds the on-device expansion's speed.

Writes benchmarks/results/serving[-smoke].{md,json,png}. On a 2-core machine the load generator
shares the cores with the servers: compare the ratios, which carry across machines, more
than the absolute figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.report import parser, report_stem, run_facts, store_with_policy, write_report
from benchmarks.wire_bytes import wire_bytes
from model_store.archive import FORMATS
from service.backend import NO_PROXY
from service.metrics import STAGES
from service.settings import Settings


@dataclasses.dataclass
class Result:
    name: str
    concurrency: int
    calls: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    mean_ms: float = float("nan")

    @property
    def per_s(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    @classmethod
    def of(cls, name: str, concurrency: int, latencies_s: list[float], seconds: float, errors: int = 0) -> Result:
        """A row from the answered calls' latencies (seconds) over ``seconds`` of load."""
        ms = np.array(latencies_s) * 1e3 if latencies_s else np.array([np.nan])
        return cls(name, concurrency, len(latencies_s), seconds,
                   *(float(np.percentile(ms, q)) for q in (50, 95, 99)), errors, float(ms.mean()))


def stage_means(before: dict, after: dict) -> dict[str, float]:
    """Mean ms per request between two scrapes of one gateway's metrics
    (``tests.test_gateway.scrape``): each pipeline stage (``robustgate_stage_duration_seconds``),
    the whole pipeline (``robustgate_request_duration_seconds``), the TorchServe worker's part of
    the backend stage by its own clock (``robustgate_backend_worker_seconds``; the gateway's
    health probe, one small call every 2 s, adds to it too), and the requests counted."""
    def delta(name: str, **labels: str) -> float:
        want = set(labels.items())
        return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and want <= k[1])

    n = delta("robustgate_stage_duration_seconds_count", stage="decode")
    out = {"requests": n}
    for stage in STAGES:
        out[stage] = delta("robustgate_stage_duration_seconds_sum", stage=stage) * 1e3 / n if n else float("nan")
    out["pipeline"] = delta("robustgate_request_duration_seconds_sum") * 1e3 / n if n else float("nan")
    out["worker"] = delta("robustgate_backend_worker_seconds_sum") * 1e3 / n if n else float("nan")
    return out


@contextlib.asynccontextmanager
async def connections(target: str, n: int, stub: Callable[[object], Any]) -> AsyncIterator[list]:
    """``stub`` over each of ``n`` channels to ``target``, each its own TCP connection (a local
    subchannel pool: otherwise channels to one target share one), never through a proxy the
    environment names (a row through one would measure the proxy too)."""
    import grpc

    options = [NO_PROXY, *([("grpc.use_local_subchannel_pool", 1)] if n > 1 else [])]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(n)]
    try:
        yield [stub(ch) for ch in channels]
    finally:
        for ch in channels:
            await ch.close()


CALLER: contextvars.ContextVar[int] = contextvars.ContextVar("caller", default=0)
"""Which of a :func:`closed_loop`'s callers makes the call (0 .. concurrency - 1): a caller
keeps one connection, as a client process does."""


async def closed_loop(name: str, call, concurrency: int, duration_s: float) -> Result:
    lat: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration_s

    async def worker(k: int) -> None:
        nonlocal errors
        CALLER.set(k)  # each caller is a task of its own, with its own context
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            try:
                await call(i)
                lat.append(time.perf_counter() - t)
            except Exception:
                errors += 1
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return Result.of(name, concurrency, lat, time.perf_counter() - t0, errors)


async def streamed(name: str, open_stream: Callable[[float], object], request: Callable[[int], object],
                   in_flight: int, window: int, duration_s: float) -> Result:
    """``in_flight // window`` bidirectional streams, each keeping ``window`` items written
    and unanswered for ``duration_s``; an item's latency runs from its write to its answer
    (a stream answers in order). The row's concurrency is the items in flight, as for
    :func:`closed_loop` rows with as many one-call clients."""
    import collections

    lat: list[float] = []
    errors = 0
    streams = max(1, in_flight // window)
    stop_at = time.perf_counter() + duration_s

    async def one(k: int) -> None:
        nonlocal errors
        call = open_stream(duration_s + 30)
        sent: collections.deque[float] = collections.deque()
        room = asyncio.Semaphore(window)

        async def write() -> None:
            i = k
            while True:
                await room.acquire()
                if time.perf_counter() >= stop_at:
                    break
                sent.append(time.perf_counter())
                await call.write(request(i))
                i += streams
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            async for answer in call:
                t = sent.popleft()
                if answer.WhichOneof("outcome") == "result":
                    lat.append(time.perf_counter() - t)
                else:
                    errors += 1
                room.release()
            await writer
        except Exception:  # the stream failed as a whole: what it had in flight is lost
            errors += len(sent) or 1
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(streams)))
    return Result.of(name, streams * window, lat, time.perf_counter() - t0, errors)


def torchserve_call(ts, stubs: list, model_name: str, tensors: list[bytes], plan: bytes | None = None,
                    clock: list[float] | None = None) -> Callable[[int], Awaitable[None]]:
    """``call(i)``: ``tensors[i]`` (cycled; encoded as the gateway sends them) straight to
    TorchServe ``ts``'s ``model_name`` over its gRPC inference API, as a client with the
    inference token does; each caller of a :func:`closed_loop` keeps to one of ``stubs``.
    Plain, or with ``plan`` (serialized); with ``clock``, each answer's worker seconds are
    appended to it."""
    from robustgate.torchserve import inference_pb2
    from robustgate.v1 import probe_pb2

    md = (("authorization", f"Bearer {ts.keys().inference}"),)

    async def direct(i: int) -> None:
        inputs = {"tensor": tensors[i % len(tensors)], **({"plan": plan} if plan else {})}
        answer = await stubs[CALLER.get() % len(stubs)].Predictions(inference_pb2.PredictionsRequest(
            model_name=model_name, input=inputs), metadata=md, timeout=30)
        if clock is not None:
            clock.append(probe_pb2.ProbeResult.FromString(answer.prediction).worker_seconds)
    return direct


class Turn(NamedTuple):
    """One row's turn in :func:`closed_loops_in_turns`."""

    per_s: float
    p50_ms: float
    cpu_ms_per_call: float  # NaN where the row has no CPU clock, or answered nothing
    errors: int


async def closed_loops_in_turns(calls: dict[str, Callable[[int], Awaitable[object]]], concurrency: int,
                                turns: int, turn_s: float,
                                cpu_s: dict[str, Callable[[], float]] | None = None) -> dict[str, list[Turn]]:
    """A :func:`closed_loop` of ``concurrency`` callers on each of ``calls`` for ``turn_s``
    in turns, ``turns`` times over, the order rotating from turn to turn (with two rows:
    alternating), so that a shared machine's drift falls on every row alike. ``cpu_s``: for
    some rows, a clock of the CPU seconds their processes have used so far. -> each row's turns."""
    seen: dict[str, list[Turn]] = {name: [] for name in calls}
    order = list(calls)
    for turn in range(turns):
        for name in order[turn % len(order):] + order[:turn % len(order)]:
            clock = (cpu_s or {}).get(name)
            before = clock() if clock else 0.0
            r = await closed_loop(name, calls[name], concurrency, turn_s)
            cpu = 1e3 * (clock() - before) / r.calls if clock and r.calls else float("nan")
            seen[name].append(Turn(r.per_s, r.p50_ms, cpu, r.errors))
    return seen


def cpu_s(proc) -> float:
    """CPU seconds (user + system) so far of a ``psutil.Process``; 0 once it has gone."""
    import psutil

    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def gateway_cpu_s(pid: int) -> float:
    """CPU seconds so far of the gateway ``pid``: with --workers, the supervisor and its workers."""
    import psutil

    gateway = psutil.Process(pid)
    return cpu_s(gateway) + sum(cpu_s(c) for c in gateway.children(recursive=True))


def cpu_parts(gateway_pid: int | None, torchserve_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of the load generator (this process), the gateway,
    and TorchServe's Java frontend and Python workers (the process tree under its launcher)."""
    import psutil

    parts = {"client": cpu_s(psutil.Process())}
    if gateway_pid is not None:
        parts["gateway"] = gateway_cpu_s(gateway_pid)
    java = workers = 0.0
    for proc in psutil.Process(torchserve_pid).children(recursive=True):
        try:
            is_java = proc.name() == "java"
        except psutil.NoSuchProcess:
            continue
        if is_java:
            java += cpu_s(proc)
        else:
            workers += cpu_s(proc)
    parts.update({"TorchServe Java": java, "TorchServe workers": workers})
    return parts


def timed_loop(name: str, fn, count: int, seconds: float) -> Result:
    """One caller in process: ``fn(i)`` for i = 0, 1, ... for ``seconds``, each call timed,
    after a quarter of that (at most 0.5 s) of unmeasured calls, as every served row has its
    warm-up: TorchScript's profiling executor specialises over the first calls and ONNX
    Runtime allocates its arenas, and a limit read with them in it is a slower limit."""
    import torch

    with torch.inference_mode():
        i, warm_until = 0, time.perf_counter() + min(0.5, seconds / 4)
        while time.perf_counter() < warm_until:
            fn(i % count)
            i += 1
        lat, i, stop_at = [], 0, time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            fn(i % count)
            lat.append(time.perf_counter() - t)
            i += 1
        elapsed = time.perf_counter() - t0
    return Result.of(name, 1, lat, elapsed)


class Runner:
    """The model in process, as a TorchServe worker of ``fmt``'s archive runs it on this
    machine: TorchScript on the GPU where there is one, ONNX Runtime with its CUDA provider
    where that loads, else on the CPU. ``run(x)`` takes float32 ``[N, C, H, W]`` on
    :attr:`device` and returns the logits on the CPU (with ``all_outputs``, the features
    too, as the handler fetches them), so a GPU's work is waited for. ONNX Runtime is fed
    from host memory even with its CUDA provider (the handler binds the GPU's tensors):
    there the limit includes a copy the handler does not make."""

    def __init__(self, store: Path, model: str, fmt: str, intra_op_threads: int = 0,
                 all_outputs: bool = False) -> None:
        import torch

        gpu = torch.cuda.is_available()
        if fmt == "torchscript":
            from handlers import torchscript_handler
            from handlers.base import HandlerSettings, read_card

            self.device = torch.device("cuda" if gpu else "cpu")
            card = read_card(str(store / model / "card.json"), HandlerSettings())
            net = torchscript_handler.load(str(store / model / "model.pt"), self.device, card.shape)
            self.run = ((lambda x: [t.cpu() for t in net(x)]) if all_outputs else (lambda x: net(x)[0].cpu()))
            self.where = torch.cuda.get_device_name(self.device) if gpu else "CPU"
            return
        import onnxruntime as ort

        cuda = gpu and "CUDAExecutionProvider" in ort.get_available_providers()
        opts = ort.SessionOptions()
        if intra_op_threads > 0:
            opts.intra_op_num_threads, opts.inter_op_num_threads = intra_op_threads, 1
        sess = ort.InferenceSession(str(store / model / "model.onnx"), sess_options=opts,
                                    providers=(["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"])
        outputs = None if all_outputs else ["logits"]
        self.device = torch.device("cpu")
        self.run = lambda x: sess.run(outputs, {"images": x.numpy()})
        # the provider that loaded: a CUDA provider whose libraries are missing falls back
        loaded = sess.get_providers()[0]
        self.where = f"{torch.cuda.get_device_name()} ({loaded})" if loaded == "CUDAExecutionProvider" else "CPU"


def in_process(store: Path, model: str, images: np.ndarray, seconds: float) -> tuple[list[Result], dict[str, str]]:
    """One image per call in process, each format on the device its archive's worker uses;
    and where each ran (format -> :attr:`Runner.where`)."""
    import torch

    x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0)
    out, where = [], {}
    for fmt in FORMATS:
        r = Runner(store, model, fmt)
        xd = x.to(r.device)
        out.append(timed_loop(IN_PROCESS_ROW[fmt], lambda i, r=r, xd=xd: r.run(xd[i:i + 1]), len(x), seconds))
        where[fmt] = r.where
    return out, where


def every_check_on(pol: dict) -> None:
    """Edit a policy.json's dict to run every check: occlusion and structure too (the
    "every check on" rows)."""
    for name in ("occlusion", "structure"):
        pol["checks"][name]["enabled"] = True


def first_plans(model: str, policies: dict[str, Path]) -> dict[str, object]:
    """For each gateway row named in ``policies`` (a store holding its policy), the first
    probe plan that policy sends (base image and cheap variants), as the wire message."""
    from service.gate.policy_io import load_policy
    from service.pipeline import spec_to_proto

    return {row: spec_to_proto(load_policy(store / model / "policy.json").cheap_plan(0))
            for row, store in policies.items()}


def variant_probes(store: Path, model: str, policies: dict[str, Path],
                   images: np.ndarray, fmt: str = "onnx") -> dict[str, Callable[[int], object]]:
    """The limit for the gate's cost: for each gateway row named in ``policies`` (a store
    holding its policy), the first probe that policy sends (base image and cheap variants),
    expanded and run in process as the handler of ``fmt`` does (``handlers.probe.expand`` on
    the model's device, with the archive's intra-op threads): row name -> ``fn(i)`` for
    image ``i``; and the image alone (:func:`image_alone_row`), the row of the probe the plain
    call pays too, which the gate's cost is measured without. Run them under
    :func:`like_a_worker`."""
    import torch

    from handlers import probe

    r = Runner(store, model, fmt, archive_intra_op_threads(), all_outputs=True)
    x = torch.from_numpy(images.astype(np.float32)[:, None] / 255.0).to(r.device)
    out = {}
    for row, plan in first_plans(model, policies).items():
        out[f"{variants_row(fmt)} {row} ({probe.count_rows(plan)} rows)"] = (
            lambda i, plan=plan: r.run(probe.expand(x[i % len(x)], plan)))
    out[image_alone_row(fmt)] = lambda i: r.run(probe.expand(x[i % len(x)], None))
    return out


def archive_intra_op_threads() -> int:
    """The shipped archive's ``intra_op_threads`` (handlers/model-config.yaml)."""
    import yaml

    from handlers import probe

    config = yaml.safe_load((Path(probe.__file__).parent / "model-config.yaml").read_text())
    return int(config["handler"]["intra_op_threads"])


@contextlib.contextmanager
def like_a_worker() -> Iterator[None]:
    """Torch's threads as a TorchServe worker of the shipped archive sets them, and inference
    mode, for as long as the block runs."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(archive_intra_op_threads(), 1))
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.set_num_threads(saved)


def in_process_variants(probes: dict[str, Callable[[int], object]], count: int, seconds: float) -> list[Result]:
    """:func:`variant_probes` over ``count`` images, each timed for ``seconds`` at one caller."""
    with like_a_worker():
        return [timed_loop(name, fn, count, seconds) for name, fn in probes.items()]


@dataclasses.dataclass(frozen=True)
class AfterIdle:
    """A row of :func:`interleaved` whose every call comes after ``idle_s`` of sleep (not
    timed, in its latencies or its calls/s), as a TorchServe worker's does: at one client
    with two workers taking turns, each sits idle for about one whole call between its own.
    On this VM a probe run after 7 ms of sleep took 0.7 to 2 ms longer than back to back
    (caches and the core gone cold), so the back-to-back limit flatters the probe."""

    idle_s: float
    call: Callable[[int], object]


async def interleaved(calls: dict[str, Callable[[int], object] | AfterIdle], rounds: int,
                      round_s: float, by_turn: dict[str, list[list[float]]] | None = None) -> list[Result]:
    """One caller; each call in turn for ``round_s``, ``rounds`` times over (a call may be a
    coroutine function or a plain one, run in process). On a shared machine the speed drifts
    over minutes, by more than the gate's cost; in turns every row sees the same drift, so
    their differences hold where rows measured minutes apart do not. The order rotates from
    round to round, so no row always runs after the same neighbour (whose caches it inherits).
    ``by_turn``: filled with each row's latencies (s) turn by turn, for :func:`turn_intervals`."""
    import inspect

    lat: dict[str, list[float]] = {name: [] for name in calls}
    spent = dict.fromkeys(calls, 0.0)
    errors = dict.fromkeys(calls, 0)
    order = list(calls.items())
    for k in range(rounds):  # each round starts one row later: no row always follows the same one
        for name, row in order[k % len(order):] + order[: k % len(order)]:
            idle_s, call = (row.idle_s, row.call) if isinstance(row, AfterIdle) else (0.0, row)
            if by_turn is not None:
                by_turn.setdefault(name, []).append([])
            t0 = time.perf_counter()
            stop_at = t0 + round_s
            slept = 0.0  # out of the row's time too: its calls/s is the rate while it works
            while True:  # at least one call a turn, however late the turn started
                i = len(lat[name]) + errors[name]
                if idle_s:
                    t = time.perf_counter()
                    time.sleep(idle_s)  # the whole process idles, as a worker waiting for its next call
                    slept += time.perf_counter() - t
                t = time.perf_counter()
                try:
                    out = call(i)
                    if inspect.isawaitable(out):
                        await out
                    lat[name].append(time.perf_counter() - t)
                    if by_turn is not None:
                        by_turn[name][-1].append(lat[name][-1])
                except Exception:
                    errors[name] += 1
                if time.perf_counter() >= stop_at:
                    break
            spent[name] += time.perf_counter() - t0 - slept
    return [Result.of(f"{INTERLEAVED}{name}", 1, v, spent[name], errors[name]) for name, v in lat.items()]


def turn_intervals(by_turn: dict[str, list[list[float]]], fmt: str = "onnx", resamples: int = 1000,
                   level: float = 0.9, seed: int = 0,
                   compute: Callable[[list[Result]], dict[str, float]] | None = None) -> dict[str, tuple[float, float]]:
    """How far the ratios read from the rows in turns (:func:`interleaved`'s ``by_turn``) can
    be trusted, within one run: each resample draws the turns with replacement, the same
    turns for every row (rows in one turn share the machine's drift), pools each row's
    latencies over them and recomputes the ratios with ``compute`` (default: this report's
    :func:`ratios`) from rows named as :func:`interleaved` names them. -> ratio label ->
    (low, high), the central ``level`` of the resampled values. It does not see the drift
    from one run or day to the next, which on a shared VM is larger."""
    compute = compute or (lambda rows: ratios(rows, [1], fmt))
    rng = np.random.default_rng(seed)
    n = min(len(turns) for turns in by_turn.values())
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        pick = rng.integers(0, n, n)
        rows = [Result.of(INTERLEAVED + name, 1, list(itertools.chain.from_iterable(turns[k] for k in pick)), 1.0)
                for name, turns in by_turn.items()]
        for label, value in compute(rows).items():
            draws.setdefault(label, []).append(value)
    tail = (1 - level) / 2
    return {label: (round(float(np.quantile(v, tail)), 3), round(float(np.quantile(v, 1 - tail)), 3))
            for label, v in draws.items()}


INTERVAL_NOTE = ("In brackets: the central 90 % of the same ratio over 1,000 resamples of the turns, how far "
                 "this run's noise moves it.")


def ab_in_turns(calls: dict[str, Callable[[int], object]], turns: int, turn_s: float, pairs: dict[str, str],
                who: str) -> tuple[dict[str, Result], dict[str, float], dict[str, tuple[float, float]]]:
    """An A/B in process: the rows in turns (:func:`interleaved`, one caller), never reported
    over a call that raised (SystemExit naming ``who``). -> the rows by name; for each of
    ``pairs`` (row -> the row it is divided by) the p50 ratio, keyed by the first; and how far
    this run's noise moves each (:func:`turn_intervals`, the same turns for every row)."""
    by_turn: dict[str, list[list[float]]] = {}
    measured = {m.name.removeprefix(INTERLEAVED): m for m in asyncio.run(interleaved(calls, turns, turn_s, by_turn))}
    failed = {k: m.errors for k, m in measured.items() if m.errors}
    if failed:
        raise SystemExit(f"{who}: calls failed: {failed}")

    def p50_ratios(results) -> dict[str, float]:
        p50 = {m.name.removeprefix(INTERLEAVED): m.p50_ms for m in results}
        return {a: p50[a] / p50[b] for a, b in pairs.items()}
    return measured, p50_ratios(measured.values()), turn_intervals(by_turn, compute=p50_ratios)


def archive_store(src: Path, model: str, dst: Path, config: Path | None, fmt: str = "onnx") -> Path:
    """A store holding only ``<model>-<fmt>.mar``, packed with ``config`` as its
    model-config.yaml (None: none, TorchServe's defaults), and the card it serves (TorchServe
    is started only on an archive that serves its card's model)."""
    from model_store import archive

    archive.build_archive(src / model, fmt, dst / "archives", config=config)
    (dst / model).mkdir(exist_ok=True)
    shutil.copy2(src / model / "card.json", dst / model / "card.json")
    archive.write_manifest(dst)
    return dst


def ootb_store(src: Path, model: str, dst: Path, fmt: str = "onnx") -> Path:
    """``<model>-<fmt>.mar`` WITHOUT the project's model-config.yaml: TorchServe's defaults
    (batch size 1, the server's ``default_workers`` workers, no handler tuning)."""
    return archive_store(src, model, dst, None, fmt)


def batching_store(src: Path, model: str, dst: Path, batch_size: int = 32, max_delay_ms: int = 2,
                   fmt: str = "onnx") -> Path:
    """``<model>-<fmt>.mar`` built from the project's model-config.yaml with TorchServe's own
    batching on: the best setting for callers that send one image per call,
    the baseline the gateway is compared with."""
    import yaml

    from model_store import archive

    cfg = yaml.safe_load(archive.DEFAULT_CONFIG.read_text())
    cfg.update(batchSize=batch_size, maxBatchDelay=max_delay_ms)
    config = dst.parent / f"{dst.name}-model-config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return archive_store(src, model, dst, config, fmt)


def admission_overrun(concurrency: int, connections: int, workers: int, shipped: Settings) -> str:
    """Why the gateways as shipped would refuse some of a row's calls (their admission
    limits), or "" when they would not: the benchmark would then measure refusals, not
    serving. Callers spread round-robin over the connections, so the busiest connection
    carries ceil(concurrency / connections) calls; with one gateway process all of them
    meet ``max_inflight`` (with several, the kernel spreads connections unevenly)."""
    per_connection = -(-concurrency // max(1, connections))
    share = shipped.max_inflight_per_connection
    if share and per_connection > share:
        return (f"concurrency {concurrency} over {connections} connection(s) puts {per_connection} calls "
                f"in flight on one connection, above the gateway's max_inflight_per_connection ({share}); "
                f"pass --connections {-(-concurrency // share)} or more")
    if workers <= 1 and concurrency > shipped.max_inflight:
        return (f"concurrency {concurrency} is above the gateway's max_inflight ({shipped.max_inflight}) "
                "for one gateway process; lower it or pass --gateway-workers")
    return ""


def main(argv: list[str] | None = None) -> int:
    p = parser("benchmarks.serving", __doc__)
    p.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    p.add_argument("--concurrency", default="1,4,16,64")
    shipped = Settings()  # the gateway's defaults, so the rows "as shipped" follow them
    p.add_argument("--coalesce-max-batch", type=int, default=shipped.coalesce_max_batch)
    p.add_argument("--coalesce-max-wait-ms", type=float, default=shipped.coalesce_max_wait_ms)
    p.add_argument("--coalesce-max-calls", type=int, default=shipped.coalesce_max_calls,
                   help="TorchServe calls in flight per model; 0: no limit")
    p.add_argument("--stream-window", type=int, default=shipped.stream_window,
                   help="items in flight per ClassifyStream (the gateway's --stream-window)")
    p.add_argument("--gateway-workers", type=int, default=shipped.workers,
                   help="gateway processes on one port (the gateway's --workers)")
    p.add_argument("--connections", type=int, default=1,
                   help="client connections each row's calls spread over, TorchServe's and the gateway's alike "
                        "(one HTTP/2 connection stays on one gateway worker)")
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="the archive every TorchServe row serves and the gateways' --backend-format. On a "
                        "machine with a GPU the TorchScript archive runs there; the ONNX archive does only "
                        "where ONNX Runtime's CUDA provider is installed")
    args = p.parse_args(argv)
    fmt = args.format
    warm_s, turns = 5.0, 10
    if args.smoke:
        args.seconds, args.concurrency, warm_s, turns, args.stream_window = 0.5, "1,4", 0.2, 2, 4
    levels = [int(c) for c in args.concurrency.split(",")]
    over = admission_overrun(max(levels), args.connections, args.gateway_workers, shipped)
    if over:
        p.error(over)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from model_store import data, serve
    from robustgate.torchserve import inference_pb2, inference_pb2_grpc
    from robustgate.v1 import classifier_pb2 as pb
    from robustgate.v1 import classifier_pb2_grpc as pb_grpc
    from robustgate.v1 import probe_pb2
    from service.backend import encode_tensor
    from service.client import Client
    from tests.test_gateway import scrape, start_gateway, stop

    images = data.load_test().images[:512]
    tmp = Path(tempfile.mkdtemp(prefix="rg-bench-"))
    results, runs_on = in_process(args.store, args.model, images, args.seconds)
    # the shipped archives the rows measure: the format's, and TorchScript's beside ONNX's
    settings = serve.ServeSettings.on_free_ports(
        store=args.store, run_dir=tmp / "ts", models=tuple(dict.fromkeys((f"{args.model}-torchscript",
                                                                          f"{args.model}-{fmt}"))))

    def certify(fixed: bool):
        def edit(pol: dict) -> None:
            pol["noise"]["certify"] = True
            if fixed:  # one batch of the whole budget: no early stop
                pol["noise"]["first_batch"] = pol["noise"]["max_samples"]
        return edit
    gate_off = store_with_policy(args.store, tmp / "off", args.model, lambda pol: pol.update(mode="off"))
    gate_all = store_with_policy(args.store, tmp / "all", args.model, every_check_on)
    cert_seq = store_with_policy(args.store, tmp / "cert-seq", args.model, certify(False))
    cert_fixed = store_with_policy(args.store, tmp / "cert-fixed", args.model, certify(True))
    probes = variant_probes(args.store, args.model, {CASCADE: args.store, EVERY_CHECK: gate_all}, images, fmt)
    results += in_process_variants(probes, len(images), args.seconds)
    coalesce = {"models": args.model, "coalesce-max-batch": str(args.coalesce_max_batch),
                "coalesce-max-wait-ms": str(args.coalesce_max_wait_ms),
                "coalesce-max-calls": str(args.coalesce_max_calls), "stream-window": str(args.stream_window),
                "backend-format": fmt, "workers": str(args.gateway_workers)}
    cheap_rows = None

    tensors = [encode_tensor(im[None]) for im in images]

    cpu_per_call: dict[str, dict[str, float]] = {}

    async def measure(name: str, call, warm: bool = True, cpu=None) -> None:
        """One row per concurrency level. ``warm``: unmeasured load first (every level), so no
        row pays for JIT and cold caches: without it the first row after a start reads up to 2x slow.
        ``cpu``: a function returning :func:`cpu_parts`; each part's CPU per call is recorded
        for the highest concurrency."""
        for c in levels if warm else ():
            await closed_loop("warm-up", call, c, min(0.5, args.seconds))
        for c in levels:
            await record(name, c, cpu, lambda c=c: closed_loop(name, call, c, args.seconds))

    async def record(name: str, c: int, cpu, take) -> None:
        """Add the row ``await take()`` measures at concurrency ``c``; at the highest
        concurrency also each process's CPU per call (``cpu``: a function returning
        :func:`cpu_parts`, or None)."""
        before = cpu() if cpu is not None and c == max(levels) else None
        r = await take()
        results.append(r)
        if before is not None and r.calls:
            after = cpu()
            cpu_per_call[f"{name} (c={c})"] = {k: round(1e3 * (after[k] - before[k]) / r.calls, 3) for k in after}

    def direct_call(ts, stubs, fmt: str, plan: bytes | None = None, clock: list[float] | None = None):
        """:func:`torchserve_call` to the model's ``fmt`` archive with the test images."""
        return torchserve_call(ts, stubs, f"{args.model}-{fmt}", tensors, plan, clock)

    async def worker_devices(ts) -> dict[str, str]:
        """Where each archive's TorchServe worker runs the model, as its answer says (the
        ProbeResult's runtime and device): format -> e.g. "torchscript on cuda:0"."""
        out = {}
        async with grpc.aio.insecure_channel(ts.grpc_inference_target, options=[NO_PROXY]) as ch:
            stub = inference_pb2_grpc.InferenceAPIsServiceStub(ch)
            for name in ts.models:
                answer = await stub.Predictions(inference_pb2.PredictionsRequest(
                    model_name=name, input={"tensor": tensors[0]}),
                    metadata=(("authorization", f"Bearer {ts.keys().inference}"),), timeout=30)
                res = probe_pb2.ProbeResult.FromString(answer.prediction)
                out[name.rsplit("-", 1)[1]] = f"{res.runtime} on {res.device}"
        return out

    async def warm_torchserve(ts) -> None:
        """Load on a fresh TorchServe before its first measured row: its Java frontend runs
        interpreted until the JIT has compiled the call path, and whichever row came first
        after a start would pay for that (measured: up to 2x the latency at one client)."""
        async with connections(ts.grpc_inference_target, args.connections,
                               inference_pb2_grpc.InferenceAPIsServiceStub) as stubs:
            for name in ts.models:
                await closed_loop("warm-up", direct_call(ts, stubs, name.rsplit("-", 1)[1]), 16, warm_s)

    async def run_direct(ts, rows, naive: bool = False) -> None:
        async with connections(ts.grpc_inference_target, args.connections,
                               inference_pb2_grpc.InferenceAPIsServiceStub) as stubs:
            for name, fmt in rows:
                await measure(name, direct_call(ts, stubs, fmt), cpu=lambda: cpu_parts(None, ts.pid))
            if not naive:
                return
            direct = direct_call(ts, stubs, fmt)
            # Naive: each of the gate's variants as its own one-image call.
            n = cheap_rows or 11

            async def naive_call(i: int) -> None:
                await asyncio.gather(*(direct(i) for _ in range(n)))

            await measure(f"naive: {n} variants as separate calls", naive_call, warm=False)  # direct warmed it

    reqs = [Client.request(im[None], args.model, top_k=1) for im in images]  # raw uint8 tensors

    async def run_gateway(name: str, address: str, cpu=None) -> None:
        nonlocal cheap_rows
        async with connections(address, args.connections, pb_grpc.ClassifierServiceStub) as stubs:
            first = await stubs[0].Classify(reqs[0], timeout=30)
            if name.startswith(CASCADE):
                cheap_rows = first.gate.forward_passes

            async def call(i: int) -> None:
                await stubs[CALLER.get() % len(stubs)].Classify(reqs[i % len(reqs)], timeout=30)

            await measure(name, call, cpu=cpu)
            if name != GATE_OFF:
                return
            # The same gateway fed by ClassifyStream: as many items in flight as the unary rows
            # at each concurrency that fills whole windows.
            opened = itertools.count()

            def open_stream(timeout_s: float):  # streams take turns over the connections
                return stubs[next(opened) % len(stubs)].ClassifyStream(timeout=timeout_s)

            def item(i: int):
                return pb.ClassifyStreamRequest(request=reqs[i % len(reqs)])

            for c in (c for c in levels if c >= args.stream_window):
                await record(STREAMED, c, cpu,
                             lambda c=c: streamed(STREAMED, open_stream, item, c, args.stream_window, args.seconds))

    ootb = ootb_store(args.store, args.model, tmp / "ootb", fmt)

    async def run_ootb(ts) -> None:
        async with connections(ts.grpc_inference_target, args.connections,
                               inference_pb2_grpc.InferenceAPIsServiceStub) as stubs:
            await measure(DIRECT_OOTB, direct_call(ts, stubs, fmt))

    # default_workers 0: TorchServe picks, as out of the box (one worker per GPU, else per core)
    with serve.start(serve.ServeSettings.on_free_ports(store=ootb, run_dir=tmp / "ts-ootb", default_workers=0)) as ts:
        ootb_workers = len(ts.model_status(f"{args.model}-{fmt}")["workers"])
        asyncio.run(warm_torchserve(ts))
        asyncio.run(run_ootb(ts))
    # TorchServe's batching on (batch 32, 2 ms): best for one-image callers; the gateway without
    # coalescing in front of it; the naive path.
    batching = batching_store(args.store, args.model, tmp / "batching", fmt=fmt)
    with serve.start(serve.ServeSettings.on_free_ports(store=batching, run_dir=tmp / "ts-batching",
                                                       models=(f"{args.model}-{fmt}",))) as ts:
        asyncio.run(warm_torchserve(ts))
        off = {"models": args.model, "coalesce-max-batch": "0", "backend-format": fmt,
               "workers": str(args.gateway_workers)}
        for name, store in ((GATE_OFF + UNCOALESCED, gate_off), (CASCADE + UNCOALESCED, args.store)):
            proc, address = start_gateway(store, ts, tmp, **off)
            try:
                asyncio.run(run_gateway(name, address))
            finally:
                stop(proc)
        asyncio.run(run_direct(ts, ((DIRECT_BATCHING, fmt),), naive=True))

    async def gate_cost_in_turns(ts) -> list[Result]:
        """The gate's and the gateway's cost at one client: TorchServe called directly, gate
        off, each gated row and each one's first probe in process, measured in turns
        (:func:`interleaved`), every gateway up at once."""
        rows = {GATE_OFF: gate_off, CASCADE: args.store, EVERY_CHECK: gate_all}
        started: list[tuple] = []
        ports = dict(zip(rows, serve.free_ports(len(rows))))
        try:
            for name, store in rows.items():
                started.append(start_gateway(store, ts, tmp, **coalesce, **{"metrics-port": str(ports[name])}))
            async with contextlib.AsyncExitStack() as stack:
                ts_ch = await stack.enter_async_context(grpc.aio.insecure_channel(ts.grpc_inference_target, options=[NO_PROXY]))
                ts_stub = inference_pb2_grpc.InferenceAPIsServiceStub(ts_ch)
                # the plain call the gateway's added latency is measured against, in the same turns;
                # and each gated row's first plan sent straight to TorchServe: the plan's cost around
                # the worker without the gateway (each answer's worker clock kept)
                direct = {DIRECT: None, **{direct_plan_row(row): plan for row, plan in plans.items()}}
                calls: dict[str, Callable[[int], object]] = {
                    name: direct_call(ts, [ts_stub], fmt, plan, worker_s.setdefault(name, []))
                    for name, plan in direct.items()}
                for name, (_, address) in zip(rows, started):
                    ch = await stack.enter_async_context(grpc.aio.insecure_channel(address, options=[NO_PROXY]))
                    stub = pb_grpc.ClassifierServiceStub(ch)
                    calls[name] = lambda i, stub=stub: stub.Classify(reqs[i % len(reqs)], timeout=30)
                    if name == GATE_OFF:  # the same server answering from memory: the hop alone
                        health = health_pb2_grpc.HealthStub(ch)
                        calls[BARE_CALL] = lambda i: health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                    await closed_loop("warm-up", calls[name], 1, warm_s / 5)
                calls.update(probes)
                calls.update({f"{AFTER_IDLE}{name}": AfterIdle(IDLE_S, fn) for name, fn in probes.items()})
                before = {name: scrape(port) for name, port in ports.items()}
                with like_a_worker():
                    measured = await interleaved(calls, turns, args.seconds / 8, by_turn)
                means = {r.name.removeprefix(INTERLEAVED): r.mean_ms for r in measured}
                for name, seconds in worker_s.items():  # TorchServe called straight: the client's and the worker's clocks
                    direct_ms[name] = {"client": means[name], "worker": 1e3 * float(np.mean(seconds))}
                for name, port in ports.items():  # where each row's time went, by the gateway's own clock
                    stages_ms[name] = {"client": means[name], **stage_means(before[name], scrape(port))}
                    probe = _find(measured, f"{INTERLEAVED}{variants_row(fmt)} {name}", 1)
                    alone = _find(measured, f"{INTERLEAVED}{image_alone_row(fmt)}", 1)
                    if probe is not None and alone is not None:  # what the worker's share of the gate
                        # is measured against (:func:`surplus_parts`: the first probe less the image alone)
                        stages_ms[name]["probe_in_process"] = probe.mean_ms
                        stages_ms[name]["image_alone_in_process"] = alone.mean_ms
                return measured
        finally:
            for proc, _ in started:
                stop(proc)

    plans = {row: p.SerializeToString() for row, p in first_plans(args.model, {CASCADE: args.store,
                                                                              EVERY_CHECK: gate_all}).items()}
    worker_s: dict[str, list[float]] = {}  # each direct row's answers' worker clocks, in turns

    stages_ms: dict[str, dict[str, float]] = {}  # filled by gate_cost_in_turns
    direct_ms: dict[str, dict[str, float]] = {}  # filled by gate_cost_in_turns
    by_turn: dict[str, list[list[float]]] = {}  # the rows in turns, turn by turn: gate_cost_in_turns
    # As shipped: archives at batch size 1, the gateway coalescing.
    with serve.start(settings) as ts:
        served_on = asyncio.run(worker_devices(ts))
        asyncio.run(warm_torchserve(ts))
        results += asyncio.run(gate_cost_in_turns(ts))
        # the other format's rows (TorchScript beside ONNX) only where the main rows are ONNX's
        other = ((GATE_OFF_TS, gate_off, {**coalesce, "backend-format": "torchscript"}),) if fmt == "onnx" else ()
        if args.gateway_workers > 1:  # what the workers bring, side by side with one process
            other += ((GATE_OFF_ONE_WORKER, gate_off, {**coalesce, "workers": "1"}),)
        for name, store, extra in ((GATE_OFF, gate_off, coalesce), *other,
                                   (CASCADE, args.store, coalesce), (EVERY_CHECK, gate_all, coalesce),
                                   (CERT_SEQ, cert_seq, coalesce), (CERT_FIXED, cert_fixed, coalesce)):
            proc, address = start_gateway(store, ts, tmp, **extra)
            cpu = (lambda proc=proc: cpu_parts(proc.pid, ts.pid)) if name == GATE_OFF else None
            try:
                asyncio.run(run_gateway(name, address, cpu))
            finally:
                stop(proc)
        asyncio.run(run_direct(ts, ((DIRECT, fmt), *(((DIRECT_TS, "torchscript"),) if fmt == "onnx" else ()))))

    command = "python -m benchmarks.serving" + ("" if args.model == "fmnist-cnn" else
                                                  f" --model {args.model} --store STORE --out DIR")
    if fmt != "onnx":
        command += f" --format {fmt}" + ("" if " --out " in command else " --out DIR")
    if args.gateway_workers != shipped.workers:
        command += f" --gateway-workers {args.gateway_workers}"
    if args.connections != 1:
        command += f" --connections {args.connections}"
    if args.concurrency != "1,4,16,64" and not args.smoke:
        command += f" --concurrency {args.concurrency}"
    report = {**run_facts(command), "model": args.model, "format": fmt,
              "served_on": served_on, "runs_on": runs_on, "ootb_workers": ootb_workers,
              "seconds_per_measurement": args.seconds, "turns": turns, "turn_seconds": args.seconds / 8,
              "stream_window": args.stream_window, "gateway_workers": args.gateway_workers,
              "connections": args.connections,
              "results": [dataclasses.asdict(r) | {"per_s": r.per_s} for r in results]}
    report["ratios"] = ratios(results, levels, fmt)
    # the on-device expansion's bound: the bytes one gated image sends and gets back either way
    report["wire_bytes"] = wire_bytes(args.store, args.model, fmt)
    report["ratio_intervals"] = turn_intervals(by_turn, fmt)
    report["cpu_ms_per_call"] = cpu_per_call
    report["stages_ms_in_turns"] = stages_ms
    report["direct_ms_in_turns"] = direct_ms
    report["coalescing"] = {"max_batch": args.coalesce_max_batch, "max_wait_ms": args.coalesce_max_wait_ms,
                            "max_calls": args.coalesce_max_calls}
    # serving[-smoke] for the ONNX rows (the name earlier reports have), serving-<format>[-smoke] else
    stem = report_stem("benchmarks.serving" + ("" if fmt == "onnx" else f"-{fmt}"), args.smoke)
    write_report(args.out, stem, report, render(report, f"{stem}.png"))
    plot(results, args.out / f"{stem}.png")
    shutil.rmtree(tmp, ignore_errors=True)  # kept, with TorchServe's and the gateway's logs, when the run failed
    return 0


GATE_OFF = "gateway, gate off"
STREAMED = "gateway, gate off, fed by ClassifyStream"
CASCADE = "gateway, calibrated gate (cascade)"
UNCOALESCED = ", no coalescing, TorchServe batching (32, 2 ms)"
EVERY_CHECK = "gateway, every check on"
CERT_SEQ = "gateway, certify every request, sequential sampling"
CERT_FIXED = "gateway, certify every request, fixed budget"
DIRECT = "TorchServe direct (plain), shipped archive (batch 1)"
DIRECT_BATCHING = "TorchServe direct (plain), TorchServe batching (32, 2 ms)"
DIRECT_OOTB = "TorchServe direct (plain), out-of-the-box settings"
DIRECT_TS = "TorchServe direct (plain), TorchScript archive"
GATE_OFF_TS = "gateway, gate off, TorchScript backend"
GATE_OFF_ONE_WORKER = "gateway, gate off, one process (--workers 1)"
IN_PROCESS_ROW = {"torchscript": "in-process TorchScript", "onnx": "in-process ONNX Runtime"}
IN_PROCESS = IN_PROCESS_ROW["onnx"]


def direct_plan_row(row: str) -> str:
    """The row that sends gated ``row``'s first plan straight to TorchServe."""
    return f"TorchServe direct, the first probe of {row}"


def variants_row(fmt: str) -> str:
    """The prefix of the in-process rows that run a gated row's first probe, in ``fmt``."""
    return f"{IN_PROCESS_ROW[fmt]}, the first probe of"


def image_alone_row(fmt: str) -> str:
    """The in-process row that runs the image alone (one row) as a probe does, in ``fmt``."""
    return f"{IN_PROCESS_ROW[fmt]}, the image alone (1 rows)"


IN_PROCESS_VARIANTS = variants_row("onnx")
BARE_CALL = "gateway, gate off: a bare call (grpc.health.v1 Health/Check, answered from memory)"


def _find(results: list[Result], name: str, c: int) -> Result | None:
    """The row ``name`` at concurrency ``c``; "naive" and the in-process variant rows match
    by prefix (their names carry a count)."""
    by_prefix = ("naive", *(f"{INTERLEAVED}{idle}{variants_row(f)} {g}"
                            for f in FORMATS for g in GATED for idle in ("", AFTER_IDLE)))

    def named(r: Result) -> bool:
        return r.name == name or (name in by_prefix and r.name.startswith(name))
    return next((r for r in results if named(r) and r.concurrency == c), None)


MAX_ERROR_SHARE = 0.01  # of a row's calls; a row with more failed calls gives no ratio


def ratios(results: list[Result], levels: list[int], fmt: str = "onnx") -> dict[str, float]:
    """The report's ratios, from rows whose TorchServe and gateway rows served ``fmt``; none
    from a row that failed more than ``MAX_ERROR_SHARE`` of its calls."""
    out: dict[str, float] = {}
    limit_row = IN_PROCESS_ROW[fmt]
    top, one = max(levels), min(levels)
    pairs = {
        f"throughput gateway gate-off / TorchServe direct, best-tuned (batching 32, 2 ms) (c={top})":
            (GATE_OFF, DIRECT_BATCHING, "per_s", top),
        f"throughput gateway gate-off / TorchServe direct, same archive (c={top})": (GATE_OFF, DIRECT, "per_s", top),
        f"throughput TorchServe direct, shipped archive / out of the box (c={top})": (DIRECT, DIRECT_OOTB, "per_s", top),
        f"throughput TorchServe direct, batching / out of the box (c={top})": (DIRECT_BATCHING, DIRECT_OOTB, "per_s", top),
        f"throughput TorchServe direct, TorchScript / ONNX archive (c={top})": (DIRECT_TS, DIRECT, "per_s", top),
        f"throughput gateway gate-off, TorchScript / ONNX backend (c={top})": (GATE_OFF_TS, GATE_OFF, "per_s", top),
        f"throughput gateway gate-off, streamed / unary calls (c={top})": (STREAMED, GATE_OFF, "per_s", top),
        f"throughput gateway gate-off, its workers / one process (c={top})":
            (GATE_OFF, GATE_OFF_ONE_WORKER, "per_s", top),
        f"throughput gateway gate-off, streamed / TorchServe direct, best-tuned (c={top})":
            (STREAMED, DIRECT_BATCHING, "per_s", top),
        **{f"throughput coalescing / TorchServe batching alone, gate off (c={c})":
           (GATE_OFF, GATE_OFF + UNCOALESCED, "per_s", c) for c in levels},
        **{f"throughput coalescing / TorchServe batching alone, cascade (c={c})":
           (CASCADE, CASCADE + UNCOALESCED, "per_s", c) for c in levels},
        "p50 gate-on (cascade) / gate-off, in turns (c=1)": (INTERLEAVED + CASCADE, INTERLEAVED + GATE_OFF, "p50_ms", 1),
        f"{FULL_GATE} (c=1)": (INTERLEAVED + EVERY_CHECK, INTERLEAVED + GATE_OFF, "p50_ms", 1),
        f"p50 certify sequential / fixed (c={one})": (CERT_SEQ, CERT_FIXED, "p50_ms", one),
        f"throughput certify sequential / fixed (c={top})": (CERT_SEQ, CERT_FIXED, "per_s", top),
        f"throughput on-device expansion / naive, both on the batching archive (c={top})":
            (CASCADE + UNCOALESCED, "naive", "per_s", top),
        f"throughput on-device expansion, coalescing / naive (c={top})": (CASCADE, "naive", "per_s", top),
        f"p50 gateway gate-off / {limit_row} (c={one})": (GATE_OFF, limit_row, "p50_ms", one),
    }

    def measured(*rows: Result | None) -> bool:
        """Rows a ratio may read: some calls answered (else NaN percentiles) and at most 1 % of
        them failed (else the answered ones are the survivors of an overload, a throughput
        and percentiles of another load than the row's)."""
        return all(r is not None and r.calls > 0 and r.errors <= MAX_ERROR_SHARE * (r.calls + r.errors)
                   for r in rows)

    for label, (a, b, field, c) in pairs.items():
        ra, rb = _find(results, a, c), _find(results, b, 1 if b == limit_row else c)
        if measured(ra, rb) and getattr(rb, field):
            out[label] = round(getattr(ra, field) / getattr(rb, field), 3)
    for name, base, c in ((GATE_OFF, DIRECT, one), (GATE_OFF + UNCOALESCED, DIRECT_BATCHING, one),
                          (INTERLEAVED + GATE_OFF, INTERLEAVED + DIRECT, 1)):  # rows in turns: one client
        ra, rb = _find(results, name, c), _find(results, base, c)
        if measured(ra, rb):
            out[f"added p50 ms, {name} vs {base} (c={c})"] = round(ra.p50_ms - rb.p50_ms, 3)
    bare = _find(results, INTERLEAVED + BARE_CALL, 1)
    if measured(bare):  # the floor under the added latency: one gRPC round trip to the gateway's server
        out[f"p50 ms, {INTERLEAVED}{BARE_CALL} (c=1)"] = round(bare.p50_ms, 3)
    # The gate's cost against the in-process time of its variants: the first probe less the
    # image alone, whose row the plain call pays as well (with it, the ratio read 3-12 % low).
    plain = _find(results, INTERLEAVED + GATE_OFF, 1)
    for name in GATED:
        gated = _find(results, INTERLEAVED + name, 1)
        for label, idle in ((GATE_COST, ""), (GATE_COST_IDLE, AFTER_IDLE)):  # after idle: not a target
            limit = _find(results, f"{INTERLEAVED}{idle}{variants_row(fmt)} {name}", 1)
            alone = _find(results, f"{INTERLEAVED}{idle}{image_alone_row(fmt)}", 1)
            if measured(plain, gated, limit, alone) and limit.p50_ms > alone.p50_ms:
                out[f"{label} {name} (c=1)"] = round(
                    (gated.p50_ms - plain.p50_ms) / (limit.p50_ms - alone.p50_ms), 3)
    return out


GATED = (CASCADE, EVERY_CHECK)
INTERLEAVED = "in turns, one client: "
GATE_COST = "p50 the gate adds (gate on - gate off) / its variants in process (first probe - image alone), in turns,"
IDLE_S = 0.01
AFTER_IDLE = f"after {IDLE_S * 1e3:.0f} ms idle each call: "
GATE_COST_IDLE = "p50 the gate adds / its variants in process after idle (not a target), in turns,"
FULL_GATE = "p50 gate-on (every check) / gate-off, in turns"

# The targets on the ratios above: (label prefix, comparison, bound).
GATE_OFF_THROUGHPUT = (">=", 0.9)  # the gate-off gateway's calls/s over TorchServe direct, best-tuned, at 64 clients
ADDED_P50_MS = ("<=", 2.0)  # the gate-off gateway's p50 less TorchServe direct's, at one client
TARGETS = (
    ("throughput gateway gate-off / TorchServe direct, best-tuned", *GATE_OFF_THROUGHPUT),
    # from the rows measured in turns: sequential rows minutes apart drift by about as much
    (f"added p50 ms, {INTERLEAVED}{GATE_OFF} vs", *ADDED_P50_MS),
    ("throughput TorchServe direct, shipped archive / out of the box", ">=", 1.5),
    (GATE_COST, "<=", 1.2),
)
# ... and where the model runs on a GPU: the full gate costs at most half a plain call more
GPU_TARGETS = ((FULL_GATE, "<=", 1.5),)
# On-device expansion ahead of the naive path by at least the ratio of bytes it saves: the
# speed ratios under ON_DEVICE against the report's measured bytes ratio (its "wire_bytes",
# benchmarks.wire_bytes), the requests' (what the expansion saves: the variants not sent; the
# answers carry the same rows either way, the on-device one the features as well). Reports
# from before it was measured have no such target row.
ON_DEVICE = "throughput on-device expansion"
BYTES_BOUND = "request_ratio"


def meets(value: float, op: str, bound: float) -> bool:
    """Whether ``value`` is within a target's ``bound`` (``op``: ">=" or "<=")."""
    return value >= bound if op == ">=" else value <= bound


def targets(ratio: dict[str, float], gpu: bool = False,
            wire: dict[str, float] | None = None) -> list[tuple[str, str, float, bool]]:
    """(ratio label, comparison, bound, met) for every ratio an issue target bounds; ``gpu``:
    the rows served a model on a GPU, and the GPU's targets apply too; ``wire``: the report's
    bytes per gated image (:func:`benchmarks.wire_bytes.wire_bytes`), whose ratio bounds the
    on-device expansion's speed ratios."""
    out = []
    bytes_target = ((ON_DEVICE, ">=", wire[BYTES_BOUND]),) if wire and BYTES_BOUND in wire else ()
    for prefix, op, bound in TARGETS + (GPU_TARGETS if gpu else ()) + bytes_target:
        for label, value in ratio.items():
            if label.startswith(prefix):
                out.append((label, op, bound, meets(value, op, bound)))
    return out


def on_gpu(r: dict) -> bool:
    """Whether report ``r``'s TorchServe and gateway rows served a model on a GPU, as its
    TorchServe worker said (TorchServe gives workers a GPU only where it finds one)."""
    return "cuda" in r.get("served_on", {}).get(r.get("format", "onnx"), "")


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r.name for r in results if not r.name.startswith(("in-process", INTERLEAVED))):
        rs = sorted((r for r in results if r.name == name), key=lambda r: r.concurrency)
        style = "--" if UNCOALESCED in name or "direct" in name else "-"
        ax1.plot([r.concurrency for r in rs], [r.per_s for r in rs], style, marker="o", label=name)
        ax2.plot([r.concurrency for r in rs], [r.p50_ms for r in rs], style, marker="o", label=name)
    for ax, ylabel in ((ax1, "calls/s"), (ax2, "p50 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def surplus_parts(stages: dict[str, dict[str, float]],
                  direct: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float]]:
    """For each gated row: what it adds to a gate-off call (means at one client, in turns),
    its variants' time in process (its first probe less the image alone, whose row the plain
    call runs too, as the gate-cost ratio counts them), and the surplus over that split where
    it goes. The parts add up to the surplus: the worker's time beyond the variants, the
    TorchServe call around the worker (its frontend, the hop, the larger plan and answer),
    the gate's logic in the gateway, the answer's way back to the client (outside the
    pipeline), the rest of the pipeline (decode and bookkeeping). Beside them, where
    ``direct`` holds the calls straight to TorchServe (:data:`DIRECT` and
    :func:`direct_plan_row`'s, client and worker ms), ``around the worker, direct``: what the
    plan adds around the worker with no gateway in the way, to hold the gateway's part against."""
    off = stages.get(GATE_OFF, {})
    out = {}
    for row in GATED:
        v = stages.get(row, {})
        if "worker" not in off or "worker" not in v or "image_alone_in_process" not in v:
            continue  # reports before the worker's clock, or before the image alone was kept beside the probe

        def d(key: str) -> float:
            return v[key] - off[key]
        adds, probe = d("client"), v["probe_in_process"] - v["image_alone_in_process"]
        rest = (v["pipeline"] - v["backend"] - v["gate"]) - (off["pipeline"] - off["backend"] - off["gate"])
        out[row] = {"adds": adds, "probe": probe, "surplus": adds - probe, "worker": d("worker") - probe,
                    "around the worker": d("backend") - d("worker"), "gate logic": d("gate"),
                    "answer": (v["client"] - v["pipeline"]) - (off["client"] - off["pipeline"]), "rest": rest}
        plain, planned = (direct or {}).get(DIRECT), (direct or {}).get(direct_plan_row(row))
        if plain and planned:
            out[row][DIRECT_AROUND] = (planned["client"] - plain["client"]) - (planned["worker"] - plain["worker"])
    return out


SURPLUS_PARTS = ("worker", "around the worker", "gate logic", "answer", "rest")
DIRECT_AROUND = "around the worker, direct"


def surplus_table(stages: dict[str, dict[str, float]], direct: dict[str, dict[str, float]] | None = None) -> list[str]:
    """:func:`surplus_parts` as the report's table (none for reports without the worker's clock)."""
    parts = surplus_parts(stages, direct)
    if not parts:
        return []
    lines = ["", "Where what the gate adds goes beyond its variants' compute (means, ms, gate on − gate off; "
                 "its variants in process: its first probe less the image alone, which the plain call runs too; "
                 "in the worker: its time beyond the same variants in process; around the worker: the rest of the "
                 "TorchServe call, its frontend, the hop, the larger plan and answer; gate logic: the gateway's; "
                 "answer: outside the pipeline, on its way to the client; rest: decode and bookkeeping; "
                 "beside them, around the worker, direct: the same plan sent straight to TorchServe by a client "
                 "in the same turns, its time around the worker beyond a plain direct call's, the gateway's "
                 "column held against it):", "",
             "| row | the gate adds | its variants in process | surplus | " + " | ".join(SURPLUS_PARTS)
             + f" | {DIRECT_AROUND} |", "|---" * (5 + len(SURPLUS_PARTS)) + "|"]
    for row, p in parts.items():
        lines.append(f"| {row} | {p['adds']:.2f} | {p['probe']:.2f} | {p['surplus']:.2f} | "
                     + " | ".join(f"{p[k]:.2f}" for k in SURPLUS_PARTS)
                     + (f" | {p[DIRECT_AROUND]:.2f} |" if DIRECT_AROUND in p else " | – |"))
    return lines


def bytes_table(w: dict) -> list[str]:
    """The report's bytes per gated image (:func:`benchmarks.wire_bytes.wire_bytes`) as Markdown."""
    n = w["rows"]
    return ["", f"Bytes to TorchServe and back for one gated image ({w['format']} archive; serialized protobuf, "
                "gRPC framing and HTTP/2 headers not counted; answers by the archive's handler in process): "
                f"on-device, one call with the image and the cascade's first plan ({n} rows); naive, {n} plain "
                "calls of the image, as the naive row sends them (in brackets: each variant sent as itself, "
                "uint8 where exact, else float32).", "",
            "| path | requests B | answers B | total B |", "|---|---|---|---|",
            f"| on-device expansion | {w['on_device_request']:,} | {w['on_device_answer']:,} | "
            f"{w['on_device_request'] + w['on_device_answer']:,} |",
            f"| naive, {n} calls | {w['naive_request']:,} ({w['naive_variants_request']:,}) | {w['naive_answer']:,} | "
            f"{w['naive_request'] + w['naive_answer']:,} |",
            f"| naive / on-device | {w['request_ratio']} ({w['variants_request_ratio']}) | "
            f"{round(w['naive_answer'] / w['on_device_answer'], 3)} | {w['total_ratio']} |"]


def render(r: dict, png: str | None = None) -> str:
    lines = [f"# Serving benchmark: {r.get('model', 'fmnist-cnn')} ({r['date']}, {r['machine']})", "",
             f"Reproduce: `{r.get('command', 'python -m benchmarks.serving')}` "
             f"({r['seconds_per_measurement']} s per row"
             + (f"; rows in turns: {r['turns']} turns of {r['turn_seconds']} s each" if "turns" in r else "")
             + (f"; ClassifyStream rows: streams of {r['stream_window']} items in flight each, as many items in "
                "flight in all as the row's concurrency" if "stream_window" in r else "")
             + ").", ""]
    if "served_on" in r:
        lines += [f"TorchServe and the gateways serve the {r['format']} archive. Where the model ran: in "
                  "TorchServe's workers (as their answers say), "
                  + "; ".join(f"the {f} archive: {w}" for f, w in r["served_on"].items()) + "; in process, "
                  + ", ".join(f"{IN_PROCESS_ROW[f].removeprefix('in-process ')}: {w}"
                              for f, w in r["runs_on"].items()) + ".", ""]
    if r.get("gateway_workers", 1) > 1 or r.get("connections", 1) > 1:
        lines += [f"Every gateway ran {r.get('gateway_workers', 1)} worker process(es) on its port (`--workers`); "
                  f"each row's callers spread over {r.get('connections', 1)} client connection(s), to TorchServe "
                  "and to the gateways alike.", ""]
    if "ootb_workers" in r:
        lines += [f"Out of the box, TorchServe started {r['ootb_workers']} worker(s) for the archive: its default "
                  "is one per GPU it finds, else one per processor.", ""]
    lines += ["| path | concurrency | calls/s | p50 ms | p95 ms | p99 ms | errors |", "|---|---|---|---|---|---|---|"]
    for x in r["results"]:
        lines.append(f"| {x['name']} | {x['concurrency']} | {x['per_s']:.0f} | {x['p50_ms']:.2f} | {x['p95_ms']:.2f} | "
                     f"{x['p99_ms']:.2f} | {x['errors']} |")
    spread = {k: tuple(v) for k, v in r.get("ratio_intervals", {}).items()}

    def value(k: str) -> str:
        return f"{r['ratios'][k]}" + (f" ({spread[k][0]}–{spread[k][1]})" if k in spread else "")
    lines += [""]
    if spread:
        lines += ["In brackets, for the ratios read from the rows in turns: the central 90 % of the same ratio "
                  "over 1,000 resamples of the turns (the same turns for every row), how far this run's noise "
                  "moves it. Runs on other days move more.", ""]
    lines += ["| ratio | value |", "|---|---|"] + [f"| {k} | {value(k)} |" for k in r["ratios"]]
    wire = r.get("wire_bytes")  # absent from reports older than the bytes' measure
    if wire:
        lines += bytes_table(wire)
    met = targets(r["ratios"], on_gpu(r), wire)
    if met:
        def verdict(k: str, b: float, ok: bool) -> str:
            within = k in spread and spread[k][0] <= b <= spread[k][1]
            return ("met" if ok else "**missed**") + (", within this run's noise" if within else "")

        def bound(k: str, op: str, b: float) -> str:
            return f"{op} {b}" + (" (the bytes ratio, requests)" if k.startswith(ON_DEVICE) else "")
        lines += ["", "Targets (issue 8), on the ratios above:", "", "| ratio | target | value | |", "|---|---|---|---|"]
        lines += [f"| {k} | {bound(k, op, b)} | {value(k)} | {verdict(k, b, ok)} |" for k, op, b, ok in met]
    if r.get("cpu_ms_per_call"):
        order = ("client", "gateway", "TorchServe Java", "TorchServe workers")
        parts = [k for k in order if any(k in v for v in r["cpu_ms_per_call"].values())]
        lines += ["", "CPU per call (ms; user + system time of each process over the row, divided by the calls "
                      "answered; the machine's cores are shared by all of them):", "",
                  "| row | " + " | ".join(parts) + " | total |", "|---" * (len(parts) + 2) + "|"]
        for row, v in r["cpu_ms_per_call"].items():
            lines.append(f"| {row} | " + " | ".join(f"{v[k]:.3f}" if k in v else "–" for k in parts)
                         + f" | {sum(v.values()):.3f} |")
    if r.get("stages_ms_in_turns"):
        lines += ["", "Where a call's time goes, in turns at one client (mean ms per request; the pipeline and its "
                      "stages by the gateway's own clock, `robustgate_request_duration_seconds` and "
                      "`robustgate_stage_duration_seconds`; backend: the TorchServe call, variants and forward "
                      "included; outside: the gRPC hop, server and client; in the worker: the part of the "
                      "backend stage the TorchServe worker spent on the batch, by its own clock, "
                      "`robustgate_backend_worker_seconds`):", "",
                  "| row | client sees | outside the pipeline | pipeline | decode | backend | in the worker | gate |",
                  "|---|---|---|---|---|---|---|---|"]
        stages = r["stages_ms_in_turns"]

        def ms(v: dict, key: str) -> str:
            return f"{v[key]:.2f}" if key in v else "–"  # reports before the worker's clock have none
        for row, v in stages.items():
            lines.append(f"| {row} | {v['client']:.2f} | {v['client'] - v['pipeline']:.2f} | {v['pipeline']:.2f} | "
                         f"{ms(v, 'decode')} | {ms(v, 'backend')} | {ms(v, 'worker')} | {ms(v, 'gate')} |")
        lines += surplus_table(stages, r.get("direct_ms_in_turns"))
    if "coalescing" in r:
        c = r["coalescing"]
        calls = c.get("max_calls")  # absent from reports older than the limit
        limit = ("" if calls is None else f", at most {calls} calls in flight per model" if calls
                 else ", no limit on calls in flight")
        lines += ["", f"Coalescing: up to {c['max_batch']} images per TorchServe call, "
                      f"waiting at most {c['max_wait_ms']} ms while the backend is busy{limit}."]
    if png:
        lines += ["", f"![throughput and p50 latency against concurrency]({png})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
