"""The shared TorchServe handler: decode each request once, expand its probe plan next to
the model, run every variant of every request in the batch through one chunked forward,
and answer each request with its own serialized ``robustgate.v1.ProbeResult``.

A request may also carry several images, each with its own plan, as one
``robustgate.v1.ProbeBatch`` (input key ``batch``; the gateway coalesces concurrent
requests this way); it is answered with a ``ProbeBatchResult``, one result per item, and
its items join the same forward as every other request of the worker batch.

Subclasses say only how to load the serialized model and how to run a forward
(:meth:`ProbeHandler.load` and :meth:`ProbeHandler.forward`).

Errors, and what a gRPC client of TorchServe sees (TorchServe 0.12 maps a worker's
status to a gRPC status for the whole batch, and ignores per-request statuses on gRPC):

- a batch of one request with bad input: ``PredictionException(message, 400)``, which the
  client receives as ``INVALID_ARGUMENT`` with the message;
- a bad request in a larger batch: its answer is a ``ProbeResult`` with only ``error``
  set (its HTTP status is set too, which TorchServe's REST API honours); the other
  requests of the batch are answered normally;
- a bad item of a ``ProbeBatch``: its result has only ``error`` set, the other items are
  answered; a ``batch`` that cannot be parsed, or holds too many items, is a bad request;
- anything unexpected fails the batch (TorchServe answers 503/507).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, fields
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from google.protobuf.message import DecodeError
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

from handlers import limits, probe, wire
from handlers.decode import CHANNELS, InputError, InputSpec, decode_image, decode_tensor, max_tensor_bytes, tensor_array
from robustgate.v1 import probe_pb2

logger = logging.getLogger(__name__)
T = TypeVar("T")

IMAGE_KEYS = ("data", "body")  # "body" is what TorchServe's REST API names a raw body
TENSOR_KEY = "tensor"
PLAN_KEY = "plan"
BATCH_KEY = "batch"
BAD_PLAN = "bad plan"  # every refused plan's message starts so (probe.proto, ProbeError)


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler:`` section of the archive's ``model-config.yaml``."""

    max_forward_batch: int = limits.MAX_FORWARD_BATCH  # rows per forward call; a batch's rows go in chunks of this
    max_variants: int = limits.MAX_VARIANTS  # variants one plan may ask for (rows - 1)
    max_batch_items: int = limits.MAX_BATCH_ITEMS  # images one ProbeBatch may carry
    max_batch_rows: int = limits.MAX_BATCH_ROWS  # rows (images x (1 + variants)) one ProbeBatch may ask for
    max_image_bytes: int = 1 << 20  # encoded image or tensor bytes
    max_image_pixels: int = 1 << 22  # width * height read from the header, before decoding
    intra_op_threads: int = 0  # torch / ONNX Runtime threads per worker; 0 = library default
    log_level: str = "WARNING"  # the worker's Python log level (per-request INFO lines cost throughput)

    @classmethod
    def from_yaml(cls, section: dict[str, Any] | None) -> HandlerSettings:
        section = dict(section or {})
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ValueError(f"model-config.yaml handler: unknown keys {unknown}")
        s = cls(**section)
        # of its own type: a quoted "512" passed an int() check and failed every request later
        # (comparing int with str), a worker that loads and answers nothing
        for f in fields(cls):
            value, want = getattr(s, f.name), int if f.type in (int, "int") else str
            if type(value) is not want:
                raise ValueError(f"model-config.yaml handler.{f.name} must be {'an integer' if want is int else 'a string'}, "
                                 f"not {value!r:.40}")
        for name in ("max_forward_batch", "max_variants", "max_batch_items", "max_batch_rows", "max_image_bytes",
                     "max_image_pixels"):
            if getattr(s, name) < 1:
                raise ValueError(f"model-config.yaml handler.{name} must be >= 1")
        if s.intra_op_threads < 0:
            raise ValueError("model-config.yaml handler.intra_op_threads must be >= 0 (0: the library's default)")
        if not isinstance(logging.getLevelName(s.log_level.upper()), int):
            raise ValueError(f"model-config.yaml handler.log_level: not a logging level: {s.log_level!r:.40}")
        return s


@dataclass(frozen=True)
class Card:
    """What the handler reads from the model card."""

    spec: InputSpec
    classes: int
    feature_dim: int

    @property
    def shape(self) -> probe.Shape:
        return probe.Shape(self.spec.channels, self.spec.h, self.spec.w)


def read_card(path: str, settings: HandlerSettings) -> Card:
    with open(path) as f:
        card = json.load(f)
    inp = card["input"]
    c, h, w = (int(v) for v in inp["shape"])
    mode = inp["mode"]
    if CHANNELS.get(mode) != c:
        raise ValueError(f"{path}: input mode {mode!r} does not match {c} channels")
    if inp.get("dtype", "float32") != "float32" or list(inp.get("range", [0.0, 1.0])) != [0.0, 1.0]:
        raise ValueError(f"{path}: this handler serves float32 inputs in [0, 1]")
    return Card(
        spec=InputSpec(mode=mode, h=h, w=w, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels),
        classes=len(card["labels"]),
        feature_dim=int(card["feature_dim"]),
    )


@dataclass
class Request:
    """One decoded request: ``base`` float32 [C, H, W] on the model's device."""

    base: torch.Tensor
    plan: probe_pb2.ProbePlan | None
    rows: int


class BatchRefused(InputError):
    """A ProbeBatch refused whole (it does not parse, or is over a limit): answered as a
    ProbeBatchResult of this one error, the message its caller reads, not as a ProbeResult."""


def check_plan_bytes(n: int, max_variants: int) -> None:
    """Refuse a plan of ``n`` bytes before it is parsed, since parsing is what costs
    (:func:`probe.max_plan_bytes`)."""
    bound = probe.max_plan_bytes(max_variants)
    if n > bound:
        raise InputError(f"{BAD_PLAN}: {n:,} bytes, more than any plan within this model's "
                         f"{max_variants} variants takes ({bound:,})")


def batch_items(raw: Any, spec: InputSpec, settings: HandlerSettings) -> Iterator[probe_pb2.ProbeItem | InputError]:
    """A serialized ``ProbeBatch`` -> each item parsed, or the error that item is answered
    with; raises :class:`InputError` at once when the batch as a whole is unusable. The batch
    is walked on the wire first (``handlers/wire.py``): its item count, each item's bytes (a
    tensor as a lone request may send it, and a plan) and each item's plan bytes are bounded
    before anything is parsed. Each item is then parsed alone, so a malformed item fails
    alone, and only as the caller takes it: one parsed item is held at a time, not a second
    copy of the whole batch."""
    if not isinstance(raw, (bytes, bytearray)):
        raise InputError("the batch must be sent as bytes of a serialized robustgate.v1.ProbeBatch")
    limit = settings.max_batch_items
    buf = memoryview(raw)  # TorchServe's max_request_size has bounded the bytes already
    plan_bound = probe.max_plan_bytes(settings.max_variants)
    item_bound = max_tensor_bytes(spec) + plan_bound + 16  # a tensor, a plan, their 2 headers
    try:
        spans = wire.batch_items(buf, limit, plan_bound)
    except wire.WireError:
        raise InputError("batch is not a valid robustgate.v1.ProbeBatch") from None
    except wire.TooManyItems:
        raise InputError(f"batch has more than {limit} items; the limit is {limit}") from None
    if not spans:
        raise InputError("batch has no items")
    return (_one_item(lambda span=span: _parse_item(buf, span, spec, settings.max_variants, item_bound), "parsed")
            for span in spans)


def _parse_item(buf: memoryview, span: wire.ItemSpan, spec: InputSpec, max_variants: int,
                item_bound: int) -> probe_pb2.ProbeItem:
    """One walked item of a batch, bounded and parsed; raises :class:`InputError`."""
    if span.end - span.start > item_bound:
        raise InputError(f"batch item is {span.end - span.start:,} bytes; the limit is {item_bound:,} "
                         f"(a tensor of at most {spec.max_bytes:,} bytes of data and a plan)")
    if span.malformed:
        raise InputError("batch item is not a valid robustgate.v1.ProbeItem")
    if span.plan_bytes is not None:  # measured: the item is longer than the bound
        check_plan_bytes(span.plan_bytes, max_variants)
    try:
        return probe_pb2.ProbeItem.FromString(buf[span.start:span.end])
    except DecodeError:
        raise InputError("batch item is not a valid robustgate.v1.ProbeItem") from None


def _one_item(make: Callable[[], T], what: str) -> T | InputError:
    """One batch item's outcome: what ``make`` returns, or the error that item is answered
    with (its :class:`InputError`; anything unexpected fails that item only, as a 500)."""
    try:
        return make()
    except InputError as e:
        return e
    except Exception:
        logger.exception("batch item could not be %s", what)
        return InputError("internal error", 500)


# One TorchServe request as the handler sees it between its hooks: a single image (or its
# error), or the items of a ProbeBatch.
Item = Request | InputError
Row = Request | InputError | list[Item]


@dataclass
class Answer:
    """One request's rows: ``logits`` float32 [rows, K] and, when asked, ``features`` [D]."""

    logits: np.ndarray
    features: np.ndarray | None
    plan_version: int


class ProbeHandler(BaseHandler):
    """Base for the TorchScript and ONNX handlers."""

    runtime = "unknown"

    # ------------------------------------------------------------------ subclass API

    def load(self, path: str) -> Any:
        """Load the serialized model at ``path`` for ``self.device``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float32 [N, C, H, W] on ``self.device`` -> (logits [N, K], features [N, D])."""
        raise NotImplementedError

    # ------------------------------------------------------------------ TorchServe hooks

    def initialize(self, context) -> None:
        props = context.system_properties
        self.manifest = context.manifest
        self.model_yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.settings = HandlerSettings.from_yaml(self.model_yaml_config.get("handler"))
        logging.getLogger().setLevel(self.settings.log_level.upper())
        if self.settings.intra_op_threads > 0:
            torch.set_num_threads(self.settings.intra_op_threads)
        if torch.cuda.is_available() and props.get("gpu_id") is not None:
            self.map_location = "cuda"
            self.device = torch.device(f"cuda:{props['gpu_id']}")
            torch.cuda.set_device(self.device)
        else:
            self.map_location = "cpu"
            self.device = torch.device("cpu")
        model_dir = props["model_dir"]
        self.card = read_card(os.path.join(model_dir, "card.json"), self.settings)
        self.model_pt_path = os.path.join(model_dir, self.manifest["model"]["serializedFile"])
        self.model = self.load(self.model_pt_path)
        self._check_outputs()
        self.initialized = True
        name = self.manifest["model"].get("modelName")
        code = os.path.dirname(os.path.realpath(__file__))
        logger.warning("%s: %s on %s, max_forward_batch %d, max_variants %d, handler code %s",
                       name, self.runtime, self.device, self.settings.max_forward_batch,
                       self.settings.max_variants, code)
        if not code.startswith(os.path.join(os.path.realpath(model_dir), "")):
            # a PYTHONPATH ahead of the archive's folder: the archive's entry file runs with
            # other handler code, which its manifest and staleness check do not cover
            logger.error("%s: the handler package comes from %s, not from the archive (%s)", name, code, model_dir)

    # TorchServe's BaseHandler.handle reads request 0's headers ("explain", "describe", set from a
    # REST call's HTTP headers and by its /explanations endpoint) to route the whole worker
    # batch to paths this handler does not have: one caller's header failed every request
    # batched with it (503). Every request here is a probe.
    def _is_explain(self) -> bool:
        return False

    def _is_describe(self) -> bool:
        return False

    def _check_outputs(self) -> None:
        s = self.card.spec
        with torch.inference_mode():
            logits, feats = self.forward(torch.zeros(2, s.channels, s.h, s.w, device=self.device))
        want = ((2, self.card.classes), (2, self.card.feature_dim))
        if (tuple(logits.shape), tuple(feats.shape)) != want:
            raise RuntimeError(f"model outputs {tuple(logits.shape)}, {tuple(feats.shape)}; the card says {want}")

    def preprocess(self, data: list[dict[str, Any]]) -> list[Row]:
        self._started = time.perf_counter()  # the batch's worker time runs from here to postprocess
        rows: list[Row] = []
        for row in data:
            batch = BATCH_KEY in row
            refused = BatchRefused if batch else InputError  # a refused batch is answered whole
            try:
                rows.append(self.parse_batch(row[BATCH_KEY]) if batch else self.parse(row))
            except InputError as e:
                rows.append(refused(e.message, e.code))
            except Exception:  # never let one request's surprise fail the batch
                logger.exception("request could not be decoded")
                rows.append(refused("internal error", 500))
        if len(rows) == 1 and isinstance(rows[0], InputError):
            raise PredictionException(rows[0].message, rows[0].code)
        return rows

    def inference(self, rows: list[Row], *args, **kwargs) -> list[Answer | InputError | list[Answer | InputError]]:
        flat = [it for row in rows for it in (row if isinstance(row, list) else [row])]
        answers = self._answer([it for it in flat if isinstance(it, Request)])

        def one(it: Item) -> Answer | InputError:
            return answers[id(it)] if isinstance(it, Request) else it

        return [[one(it) for it in row] if isinstance(row, list) else one(row) for row in rows]

    def _answer(self, good: list[Request]) -> dict[int, Answer]:
        """Every request's variants through one chunked forward; answers keyed by ``id(request)``."""
        if not good:
            return {}
        starts = np.cumsum([0] + [it.rows for it in good])[:-1].tolist()
        want = [s for it, s in zip(good, starts) if it.plan is not None and it.plan.return_features]
        with torch.inference_mode():
            logits, feats = self.forward_expanded(good, want)
            feats_cpu = feats.float().cpu().numpy() if want else None
            logits_cpu = logits.float().cpu().numpy()
        answers: dict[int, Answer] = {}
        j = 0
        for it, start in zip(good, starts):
            f = None
            if it.plan is not None and it.plan.return_features:
                f, j = feats_cpu[j], j + 1
            answers[id(it)] = Answer(
                logits=logits_cpu[start : start + it.rows],
                features=f,
                plan_version=it.plan.version if it.plan is not None else 0,
            )
        return answers

    def forward_expanded(self, good: list[Request], want: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each request's variants (:func:`probe.expand`) through :meth:`forward` in chunks of
        ``max_forward_batch`` rows, expanded request by request as the chunks need them: the
        worker batch's rows are never in memory all at once (a batch of ProbeBatches may ask
        for ``batch_size`` x ``max_batch_rows`` of them), only one request's and under a
        chunk's more.
        Returns every row's logits and the features of rows ``want`` (ascending; None when
        empty)."""
        step = self.settings.max_forward_batch
        if sum(it.rows for it in good) <= step:  # the common case: one forward, nothing held over
            x = torch.cat([probe.expand(it.base, it.plan) for it in good])
            lo, fe = self.forward(x)
            return lo, (fe[want] if want else None)
        logits: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []  # expanded rows not forwarded yet
        held = done = w = 0  # rows pending, rows forwarded, next of `want`
        for k, it in enumerate(good):
            pending.append(probe.expand(it.base, it.plan))
            held += pending[-1].shape[0]
            last = k == len(good) - 1
            if held < step and not last:
                continue
            x = pending[0] if len(pending) == 1 else torch.cat(pending)
            pending.clear()  # x holds them now
            end = held if last else held - held % step
            for i in range(0, end, step):
                lo, fe = self.forward(x[i : min(i + step, end)])
                logits.append(lo)
                while w < len(want) and want[w] < done + lo.shape[0]:
                    feats.append(fe[want[w] - done].clone())  # not a view holding the chunk's
                    w += 1
                done += lo.shape[0]
            if end < held:  # under a chunk: a copy, not a view holding all of x
                pending.append(x[end:].clone())
            held -= end
            del x, lo, fe  # before the next request's rows are built beside them
        out = logits[0] if len(logits) == 1 else torch.cat(logits)
        return out, (torch.stack(feats) if feats else None)

    def postprocess(self, outputs: list[Answer | InputError | list[Answer | InputError]]) -> list[bytes]:
        n = len(outputs)
        took = time.perf_counter() - self._started
        out = []
        for idx, o in enumerate(outputs):
            if isinstance(o, list):
                batch = probe_pb2.ProbeBatchResult(results=[self._result(it, n, took) for it in o])
                out.append(batch.SerializeToString())
                continue
            if isinstance(o, InputError):
                self.context.set_response_status(o.code, o.message, idx)
            if isinstance(o, BatchRefused):  # answered in the message its caller reads
                out.append(probe_pb2.ProbeBatchResult(results=[self._result(o, n, took)]).SerializeToString())
                continue
            out.append(self._result(o, n, took).SerializeToString())
        return out

    def _result(self, o: Answer | InputError, batch_requests: int, worker_seconds: float) -> probe_pb2.ProbeResult:
        if isinstance(o, InputError):
            return probe_pb2.ProbeResult(
                error=probe_pb2.ProbeError(code=o.code, message=o.message), batch_requests=batch_requests,
                worker_seconds=worker_seconds,
            )
        res = probe_pb2.ProbeResult(
            plan_version=o.plan_version,
            rows=o.logits.shape[0],
            classes=o.logits.shape[1],
            logits=np.ascontiguousarray(o.logits, dtype="<f4").tobytes(),
            device=str(self.device),
            runtime=self.runtime,
            batch_requests=batch_requests,
            worker_seconds=worker_seconds,
        )
        if o.features is not None:
            res.features = np.ascontiguousarray(o.features, dtype="<f4").tobytes()
            res.feature_dim = o.features.shape[0]
        return res

    # ------------------------------------------------------------------ helpers

    def parse(self, row: dict[str, Any]) -> Request:
        """One request's input map -> :class:`Request`; raises :class:`InputError`."""
        spec = self.card.spec
        image = next((row[k] for k in IMAGE_KEYS if k in row), None)
        tensor = row.get(TENSOR_KEY)
        if (image is None) == (tensor is None):
            raise InputError("send exactly one of 'data' (PNG or JPEG bytes) and 'tensor' (robustgate.v1.Tensor)")
        raw = image if image is not None else tensor
        if not isinstance(raw, (bytes, bytearray)):
            raise InputError("the image must be sent as bytes (no JSON or text content type)")
        arr = decode_image(bytes(raw), spec) if image is not None else decode_tensor(bytes(raw), spec)
        plan = None
        if PLAN_KEY in row:
            raw_plan = row[PLAN_KEY]
            if not isinstance(raw_plan, (bytes, bytearray)):
                raise InputError(f"{BAD_PLAN}: must be sent as bytes of a serialized robustgate.v1.ProbePlan")
            check_plan_bytes(len(raw_plan), self.settings.max_variants)
            try:
                plan = probe_pb2.ProbePlan.FromString(bytes(raw_plan))
            except DecodeError:
                raise InputError(f"{BAD_PLAN}: not a valid robustgate.v1.ProbePlan") from None
        return self._request(arr, plan)

    def parse_batch(self, raw: Any) -> list[Item]:
        """A ``batch`` input (serialized ``ProbeBatch``) -> one :class:`Request` or error per item;
        raises :class:`InputError` when the batch as a whole is unusable (:func:`batch_items`)."""
        items: list[Item] = []
        rows = 0
        for item in batch_items(raw, self.card.spec, self.settings):
            out = item if isinstance(item, InputError) else _one_item(lambda item=item: self._item_request(item), "decoded")
            if isinstance(out, Request):
                if rows + out.rows > self.settings.max_batch_rows:
                    out = InputError(f"batch asks for more than {self.settings.max_batch_rows} rows; send fewer items", 413)
                else:
                    rows += out.rows
            items.append(out)
        return items

    def _item_request(self, item: probe_pb2.ProbeItem) -> Request:
        """A parsed batch item -> :class:`Request`; raises :class:`InputError`."""
        if not item.HasField("tensor"):
            raise InputError("batch item has no tensor")
        arr = tensor_array(item.tensor, self.card.spec)
        return self._request(arr, item.plan if item.HasField("plan") else None)

    def _request(self, arr: np.ndarray, plan: probe_pb2.ProbePlan | None) -> Request:
        try:
            rows = probe.validate(plan, self.card.shape, self.settings.max_variants) if plan is not None else 1
        except probe.PlanError as e:
            raise InputError(f"{BAD_PLAN}: {e}") from None
        base = torch.from_numpy(np.array(arr)).to(self.device)
        base = base.float().div_(255.0) if base.dtype == torch.uint8 else base
        return Request(base=base, plan=plan, rows=rows)
