"""TorchServe backend: one shared gRPC channel, the inference token on every call, a deadline
on every call, TorchServe's status codes mapped to domain errors.

What crosses to TorchServe is the probe contract (``proto/robustgate/v1/probe.proto``): one
decoded image as a ``Tensor`` and an optional ``ProbePlan``; what comes back is a
``ProbeResult`` with the logits of every variant in plan order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from robustgate.torchserve import inference_pb2, inference_pb2_grpc
from robustgate.v1 import probe_pb2
from service.errors import (
    BackendRefused,
    BackendUnavailable,
    DeadlineExceeded,
    GatewayError,
    ModelNotLoaded,
    Overloaded,
)
from service.ratelog import Throttle

log = logging.getLogger(__name__)
_throttled = Throttle(log)  # per-request failures: the first at once, then one per 10 s per kind


@dataclass(frozen=True)
class ProbeOutput:
    """``logits`` float32 [rows, classes] (row 0 the base image); ``features`` float32 [D] or None."""

    logits: np.ndarray
    features: np.ndarray | None
    device: str
    runtime: str
    worker_s: float = 0.0  # the worker's time on the batch that served it (0: an older archive)


class Prober(Protocol):
    """What the request path calls: :class:`TorchServeBackend` or a coalescer in front of it."""

    async def probe(self, model_name: str, image: np.ndarray, plan: probe_pb2.ProbePlan | None,
                    timeout_s: float, version: str = "") -> ProbeOutput: ...


def read_inference_key(key_file: Path) -> str:
    """The inference token from TorchServe's ``key_file.json``."""
    try:
        keys = json.loads(Path(key_file).read_text())
        return str(keys["inference"]["key"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackendUnavailable(f"cannot read TorchServe's key file {key_file}") from e


def tensor_message(image: np.ndarray) -> probe_pb2.Tensor:
    """``uint8`` or ``float32`` [C, H, W] -> ``robustgate.v1.Tensor``."""
    dtype = "uint8" if image.dtype == np.uint8 else "float32"
    data = np.ascontiguousarray(image, dtype="<u1" if dtype == "uint8" else "<f4").tobytes()
    return probe_pb2.Tensor(shape=list(image.shape), dtype=dtype, data=data)


def encode_tensor(image: np.ndarray) -> bytes:
    """``uint8`` or ``float32`` [C, H, W] -> serialized ``robustgate.v1.Tensor``."""
    return tensor_message(image).SerializeToString()


def decode_result(raw: bytes | probe_pb2.ProbeResult) -> ProbeOutput:
    """A ProbeResult as arrays; a per-request error inside a batch raises its domain error, and
    an answer no caller could use (no rows or classes, logits or features not finite, sizes
    that disagree) a ValueError (:func:`_checked`: the backend's fault)."""
    if isinstance(raw, probe_pb2.ProbeResult):
        res = raw
    else:
        res = probe_pb2.ProbeResult()
        res.ParseFromString(raw)
    if res.HasField("error"):
        if 400 <= res.error.code < 500:
            raise refusal(res.error.message)
        raise BackendUnavailable(_PUBLIC_MESSAGE[BackendUnavailable])
    if res.rows < 1 or res.classes < 1:
        raise ValueError(f"a result of {res.rows} rows of {res.classes} classes")
    logits = np.frombuffer(res.logits, dtype="<f4").reshape(res.rows, res.classes)
    feats = np.frombuffer(res.features, dtype="<f4") if res.feature_dim else None
    if feats is not None and feats.size != res.feature_dim:
        raise ValueError(f"{feats.size} features where the result says {res.feature_dim}")
    # a model that emits NaN or inf must not answer a caller probabilities of nan, nor reach the gate
    if not np.isfinite(logits).all() or (feats is not None and not np.isfinite(feats).all()):
        raise ValueError("logits or features that are not finite")
    return ProbeOutput(logits=logits, features=feats, device=res.device, runtime=res.runtime,
                       worker_s=res.worker_seconds)


# TorchServe's gRPC status -> domain error. Handler 4xx (its validation) arrive as
# INVALID_ARGUMENT (see refusal()); a dead worker or frontend as UNAVAILABLE or INTERNAL. Its
# gRPC API (0.12, InferenceImpl.prediction) answers a full job queue and a model it has not
# loaded with INTERNAL too, told apart by their words (_INTERNAL_BY_TEXT); NOT_FOUND and
# RESOURCE_EXHAUSTED are kept for other versions. A model not loaded is UNAVAILABLE to the
# caller: the gateway serves that model, so it is a server fault.
_BY_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BackendRefused,
    grpc.StatusCode.NOT_FOUND: ModelNotLoaded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: BackendUnavailable,
    grpc.StatusCode.CANCELLED: BackendUnavailable,
    grpc.StatusCode.INTERNAL: BackendUnavailable,
    grpc.StatusCode.UNKNOWN: BackendUnavailable,
    grpc.StatusCode.UNAUTHENTICATED: BackendUnavailable,
    grpc.StatusCode.PERMISSION_DENIED: BackendUnavailable,
}

# TorchServe's words for an INTERNAL that is not a failure: the job queue full (addJob refused:
# "Model "m" has no worker to serve inference request", its HTTP API's 503, which a model
# with no worker at all answers too) is overload, worth a retry after backoff, and a health
# probe's "busy"; a model or version it does not have is a model not loaded.
_INTERNAL_BY_TEXT: tuple[tuple[str, type[GatewayError]], ...] = (
    ("has no worker to serve inference request", Overloaded),
    ("Model not found:", ModelNotLoaded),
    ("does not exist for model:", ModelNotLoaded),  # "Model version: V does not exist for model: M"
)

_PUBLIC_MESSAGE: dict[type[GatewayError], str] = {
    ModelNotLoaded: "model is not loaded in the backend; retry later",
    Overloaded: "backend is overloaded; retry later",
    DeadlineExceeded: "backend did not answer within the deadline",
    BackendUnavailable: "backend is unavailable",
}


# How the handler's refusal of a plan begins (probe.proto, ProbeError); the last two are
# what archives built before every such message began "bad plan" say.
_PLAN_REFUSALS = ("bad plan", "plan is not a valid", "the plan must be sent")
PLAN_REFUSED_MESSAGE = "the model server refused the gate's probe plan: the gateway and its model archives disagree"
INPUT_REFUSED_MESSAGE = ("the model server refused an input the gateway had checked: the gateway and its model "
                         "archives disagree")


def refusal(message: str) -> BackendRefused:
    """The handler's 4xx as a domain error. The gateway sends only what it built and checked:
    tensors it decoded and validated against the model's card as the handler does, its own
    plans and its own coalesced batches. So a refusal is never the caller's doing, whatever
    the handler's words (they are written for direct callers): BackendRefused, answered
    INTERNAL with a fixed message and counted as a server fault; the words go to the log."""
    detail = (message or "invalid input").splitlines()[0][:300]
    plan = detail.startswith(_PLAN_REFUSALS)
    what = ("a probe plan (gateway policy and archives disagree)" if plan
            else "a checked input (gateway and archives disagree)")
    _throttled.log(logging.ERROR, ("plan" if plan else "input", detail),
                   "the model server refused %s: %s", what, detail)
    return BackendRefused(PLAN_REFUSED_MESSAGE if plan else INPUT_REFUSED_MESSAGE)


def map_rpc_error(err: grpc.aio.AioRpcError) -> GatewayError:
    """A TorchServe error as a domain error whose message is safe to show a caller."""
    kind, details = _BY_CODE.get(err.code(), BackendUnavailable), err.details() or ""
    if kind is BackendRefused:  # the handler's 4xx
        return refusal(details)
    if err.code() == grpc.StatusCode.INTERNAL:
        kind = next((k for words, k in _INTERNAL_BY_TEXT if words in details), kind)
    _throttled.log(logging.WARNING, ("call", err.code()), "backend call failed: %s %s", err.code().name,
                   details[:500])
    return kind(_PUBLIC_MESSAGE[kind])


# The channel to TorchServe carries what the gateway built (decoded tensors, coalesced into calls
# of at most CoalesceConfig.max_bytes) and TorchServe's answers (every variant's logits): its
# limits are TorchServe's own (max_request_size, max_response_size in model_store.serve's
# ServeSettings), not the callers' max_message_bytes. Tied to that, a gateway whose callers were
# held to 64 KiB answered coalesced calls RESOURCE_EXHAUSTED ("overloaded") under load.
BACKEND_MAX_SEND_BYTES = 8 << 20
BACKEND_MAX_RECEIVE_BYTES = 64 << 20


# A channel option: never through http_proxy / grpc_proxy, which gRPC honours even for
# 127.0.0.1: a pod that sets one for its egress would send TorchServe's token to the proxy.
NO_PROXY = ("grpc.enable_http_proxy", 0)


class TorchServeBackend:
    """Async client of TorchServe's gRPC inference API (one channel for every call)."""

    def __init__(self, address: str, token: str | None, metrics=None, key_file: Path | None = None) -> None:
        self._address = address
        self._metrics = metrics  # service.metrics.Metrics or None
        self._key_file = key_file  # re-read when TorchServe refuses the token (it was renewed)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        opts = [
            ("grpc.max_send_message_length", BACKEND_MAX_SEND_BYTES),
            ("grpc.max_receive_message_length", BACKEND_MAX_RECEIVE_BYTES),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.enable_retries", 0),
            # Reconnect within seconds once TorchServe is back (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
            NO_PROXY,
        ]
        self._channel = grpc.aio.insecure_channel(address, options=opts)  # loopback inside the pod
        self._stub = inference_pb2_grpc.InferenceAPIsServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    def _count(self, code: grpc.StatusCode) -> None:
        if self._metrics is not None:
            self._metrics.backend_requests.labels(code=code.name).inc()

    def _worker_time(self, model_name: str, seconds: float) -> None:
        """An answered call's worker time (its results' ``worker_seconds``); archives built
        before that field answer 0 and are not counted, nor is a call refused as a whole."""
        if self._metrics is not None and seconds > 0:
            m = self._metrics
            m.series(m.backend_worker_duration, m.model_of(model_name)).observe(seconds)

    async def _call(self, req: inference_pb2.PredictionsRequest, timeout_s: float):
        """One Predictions call; retried once, only when TorchServe refused the token before
        doing anything (it renews keys): safe, the request was never run. Both tries share
        ``timeout_s``: the retry gets what the refusal left, none when it took it all."""
        deadline = time.monotonic() + timeout_s
        for attempt in (0, 1):
            try:
                resp = await self._stub.Predictions(req, timeout=deadline - time.monotonic(), metadata=self._metadata)
                self._count(grpc.StatusCode.OK)
                return resp
            except asyncio.CancelledError:  # its caller left (coalescing off), or the gateway stops: counted
                self._count(grpc.StatusCode.CANCELLED)
                raise
            except grpc.aio.AioRpcError as e:
                self._count(e.code())
                if attempt or e.code() != grpc.StatusCode.PERMISSION_DENIED or self._key_file is None:
                    raise
                try:
                    token = read_inference_key(self._key_file)
                except GatewayError:
                    raise e from None
                self._metadata = (("authorization", f"Bearer {token}"),)
                if deadline - time.monotonic() <= 0:
                    raise DeadlineExceeded("the deadline ran out while TorchServe refused a renewed token") from None
        raise AssertionError("unreachable")

    async def _predict(self, model_name: str, version: str, inputs: dict[str, bytes], timeout_s: float) -> bytes:
        """One Predictions call within ``timeout_s``; its answer's bytes, or a domain error."""
        if timeout_s <= 0:
            raise DeadlineExceeded("request deadline ran out before the backend call")
        req = inference_pb2.PredictionsRequest(model_name=model_name, model_version=version, input=inputs)
        try:
            resp = await self._call(req, timeout_s)
        except grpc.aio.AioRpcError as e:
            raise map_rpc_error(e) from None
        return resp.prediction

    async def probe(
        self,
        model_name: str,
        image: np.ndarray,
        plan: probe_pb2.ProbePlan | None,
        timeout_s: float,
        version: str = "",
    ) -> ProbeOutput:
        """One call: the image plus an optional plan -> logits of every variant."""
        inputs = {"tensor": encode_tensor(image)}
        if plan is not None:
            inputs["plan"] = plan.SerializeToString()
        out = _checked(await self._predict(model_name, version, inputs, timeout_s))
        self._worker_time(model_name, out.worker_s)
        return out

    async def probe_batch(
        self,
        model_name: str,
        items: list[tuple[np.ndarray, probe_pb2.ProbePlan | None]],
        timeout_s: float,
        version: str = "",
    ) -> list[ProbeOutput | GatewayError]:
        """One call carrying several images, each with its own plan (a ``ProbeBatch``): one
        output per item, in order, or that item's own error. A failure of the call itself
        raises, as :meth:`probe` does."""
        batch = probe_pb2.ProbeBatch(items=[
            probe_pb2.ProbeItem(tensor=tensor_message(image), plan=plan) if plan is not None
            else probe_pb2.ProbeItem(tensor=tensor_message(image))
            for image, plan in items
        ])
        raw = await self._predict(model_name, version, {"batch": batch.SerializeToString()}, timeout_s)
        try:
            results = probe_pb2.ProbeBatchResult.FromString(raw).results
        except Exception as e:
            raise unusable("an undecodable ProbeBatchResult", e) from None
        if len(results) == 1 != len(items) and results[0].HasField("error"):
            _checked(results[0])  # the handler refused the batch whole: raises its error for the call
        if len(results) != len(items):
            raise unusable("a wrong number of results", f"{len(results)} for {len(items)} items")
        self._worker_time(model_name, max(r.worker_seconds for r in results))
        outs: list[ProbeOutput | GatewayError] = []
        for res in results:
            try:
                outs.append(_checked(res))
            except GatewayError as e:
                outs.append(e)
        return outs


def unusable(kind: str, detail: object = "") -> BackendUnavailable:
    """An answer the gateway cannot use (malformed, or not what its call asked for): the
    backend's fault, logged (throttled per ``kind``, a fixed phrase) and answered as the
    backend being unavailable, with a fixed message."""
    _throttled.log(logging.ERROR, ("unusable", kind), "backend answered %s: %s", kind, str(detail)[:500])
    return BackendUnavailable("backend answered an undecodable result")


def _checked(raw: bytes | probe_pb2.ProbeResult) -> ProbeOutput:
    """:func:`decode_result`, where a malformed answer is the backend's fault, not the caller's."""
    try:
        return decode_result(raw)
    except GatewayError:
        raise
    except Exception as e:
        raise unusable("an undecodable ProbeResult", e) from None
