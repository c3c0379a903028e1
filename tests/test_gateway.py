"""End to end through the real gateway process and a real TorchServe, on loopback."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from model_store import data, serve
from robustgate.v1 import classifier_pb2 as pb
from service.client import Client
from service.server import LIVENESS_SERVICE
from tests.conftest import free_port


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def gateway_command(store: Path, ts, **overrides: str) -> list[str]:
    """``python -m service`` over ``store`` and the TorchServe ``ts``, quiet, metrics off, probe
    seed 0 (tests and benchmarks compare gateways and runs: as shipped, each draws a secret
    one); ``overrides``: flags by name without their dashes (``port`` first of all)."""
    args = {
        "port": "0", "metrics-port": "-1", "store": str(store),
        "log-level": "WARNING", "seed": "0",
        "torchserve-address": ts.grpc_inference_target,
        "torchserve-key-file": str(ts.settings.run_dir / serve.KEY_FILE),
        "health-interval-s": "0.5", **overrides,
    }
    return [sys.executable, "-m", "service"] + [x for k, v in args.items() for x in (f"--{k}", v)]


def source_env(source: Path | None) -> dict[str, str]:
    """The environment of a process that runs the repository's code from ``source`` (and
    from that folder): its folder and its protos before this checkout's installed ones."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(source), str(source / "proto"), env.get("PYTHONPATH")) if x)
    return env


PORT_TRIES = 3  # a gateway whose picked port was taken before it bound it: started again on another


def start_gateway(store: Path, ts, tmp: Path, *, source: Path | None = None,
                  **overrides: str) -> tuple[subprocess.Popen, str]:
    """:func:`gateway_command` started, once it answers SERVING. ``source``: another tree of
    the repository to run the gateway's code from (its folder and its protos first on the
    path); by default this checkout's. The port is picked free and released for the gateway
    to bind, so another process can take it in between (seen once in a few hundred starts):
    a gateway that exits saying its port is taken is started again on a fresh one, up to
    :data:`PORT_TRIES` times; a port the caller names is never changed."""
    for attempt in range(1, PORT_TRIES + 1):
        port = overrides.get("port") or str(free_port())
        try:
            return _start_gateway_on(port, store, ts, tmp, source, overrides)
        except PortTaken:
            if "port" in overrides or attempt == PORT_TRIES:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """The gateway exited because another process held its gRPC port."""


def _start_gateway_on(port: str, store: Path, ts, tmp: Path, source: Path | None,
                      overrides: dict[str, str]) -> tuple[subprocess.Popen, str]:
    cmd = gateway_command(store, ts, **{**overrides, "port": port})
    log_path = tmp / f"gateway-{port}.log"
    proc = subprocess.Popen(cmd, cwd=source, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            env=source_env(source))
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                if proc.poll() is not None:
                    text = log_path.read_text()
                    kind = PortTaken if f"cannot listen on {address}: the port is taken" in text else RuntimeError
                    raise kind(f"gateway exited: {text[-3000:]}")
                try:
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("gateway did not become SERVING")
                time.sleep(0.2)
    except BaseException:  # including an interrupt while waiting: never leave it running
        proc.kill()
        proc.wait()
        raise
    return proc, address


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def metrics_port() -> int:
    """The module gateway's metrics port, picked when the gateway starts (a port picked at
    import would stay unbound through every module before this one, free for anything to take)."""
    return free_port()


@pytest.fixture(scope="module")
def gateway(calibrated_store: Path, torchserve, tmp_path_factory, metrics_port: int):
    proc, address = start_gateway(calibrated_store, torchserve, tmp_path_factory.mktemp("gw"),
                                  **{"metrics-port": str(metrics_port)})
    yield address
    stop(proc)


Samples = dict[tuple[str, frozenset], float]


def scrape(port: int) -> Samples:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric_sum(samples: Samples, name: str, **where: str) -> float:
    """The samples of ``name`` whose labels include ``where``, summed."""
    return sum(v for (n, labels), v in samples.items() if n == name and set(where.items()) <= labels)


def metric_by(samples: Samples, name: str, label: str, **where: str) -> dict[str, float]:
    """The samples of ``name`` whose labels include ``where``, summed by the value of ``label``."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name and set(where.items()) <= labels:
            key = dict(labels)[label]
            out[key] = out.get(key, 0.0) + v
    return out


def requests_by_code(metrics_port: int, code: str = "OK") -> float:
    """``robustgate_requests_total`` of ``code``, summed over models and decisions."""
    return metric_sum(scrape(metrics_port), "robustgate_requests_total", code=code)


def inflight(metrics_port: int) -> float:
    return scrape(metrics_port)[("robustgate_inflight_requests", frozenset())]


def until_inflight(metrics_port: int, n: int, timeout_s: float = 10.0) -> None:
    """Poll the gateway's in-flight gauge until it reads ``n``."""
    deadline = time.monotonic() + timeout_s
    while (now := inflight(metrics_port)) != n:
        assert time.monotonic() < deadline, f"{now:.0f} calls in flight, not {n}"
        time.sleep(0.02)


def test_metrics_count_what_was_sent(client: Client, fmnist: data.FashionMNIST, metrics_port: int) -> None:
    ok0, bad0 = requests_by_code(metrics_port), requests_by_code(metrics_port, "INVALID_ARGUMENT")
    before = scrape(metrics_port)
    for i in range(7):
        client.classify(png(fmnist.test.images[100 + i]), model="fmnist-cnn")
    for _ in range(3):
        with pytest.raises(grpc.RpcError):
            client.classify(b"junk", model="fmnist-cnn")
    assert requests_by_code(metrics_port) - ok0 == 7 and requests_by_code(metrics_port, "INVALID_ARGUMENT") - bad0 == 3
    samples = scrape(metrics_port)
    names = {n for n, _ in samples}
    assert {"robustgate_request_duration_seconds_bucket", "robustgate_check_score_bucket",
            "robustgate_forward_passes_bucket", "robustgate_inflight_requests", "robustgate_backend_requests_total",
            "grpc_server_handled_total", "robustgate_model_info"} <= names
    checks = {dict(l)["check"] for n, l in samples if n == "robustgate_check_score_count"}
    assert {"squeeze", "viewpoint", "density"} <= checks
    assert samples[("robustgate_backend_up", frozenset())] == 1.0
    # Each answered TorchServe call reports its worker's time, a part of the backend stage's
    # (the health probe's calls, every 2 s, add a fraction of a millisecond of worker time).
    def grew(name: str, **where: str) -> float:
        return metric_sum(samples, name, **where) - metric_sum(before, name, **where)

    assert set(metric_by(samples, "robustgate_backend_worker_seconds_count", "model")) == {"fmnist-cnn"}
    assert grew("robustgate_backend_worker_seconds_count", model="fmnist-cnn") >= 7
    worker_s = grew("robustgate_backend_worker_seconds_sum", model="fmnist-cnn")
    assert 0 < worker_s < grew("robustgate_stage_duration_seconds_sum", stage="backend")
    # No request id or free-form text ever becomes a label value.
    assert not any("r-1" in dict(l).values() for _, l in samples)


@pytest.fixture(scope="module")
def client(gateway: str):
    with Client(gateway) as c:
        yield c


def test_classify_png_answers_label_and_gate_report(client: Client, fmnist: data.FashionMNIST,
                                                    calibrated_store: Path) -> None:
    from service.gate.policy_io import load_policy

    policy = load_policy(calibrated_store / "fmnist-cnn" / "policy.json")
    resp = client.classify(png(fmnist.test.images[0]), model="fmnist-cnn", top_k=3, request_id="r-1")
    assert resp.request_id == "r-1" and resp.model == "fmnist-cnn"
    g = resp.gate
    assert g.mode == "enforce" and g.policy_version
    assert {c.name for c in g.checks} >= {"squeeze", "viewpoint", "density", "noise"}
    ran = {c.name for c in g.checks if c.ran}
    assert ran >= {"squeeze", "viewpoint", "density"}
    # One probe call for the cheap checks: base + the squeezers + the card's label-preserving views
    # + the jitter copies its squeeze detector reads (the noise stage only runs when the cheap
    # checks are inconclusive).
    det = policy.references.squeeze_detector
    assert det is not None and det.jitter[0] == policy.probe.jitter.count > 0
    cheap_rows = 1 + len(policy.probe.squeeze.names()) + len(policy.probe.views) + policy.probe.jitter.count
    assert g.forward_passes == cheap_rows or (g.forward_passes > cheap_rows and any(c.name == "noise" and c.ran for c in g.checks))
    if g.decision != pb.DECISION_REJECT:
        assert len(resp.classes) == 3
        probs = [c.probability for c in resp.classes]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    assert resp.timings.total_seconds >= resp.timings.backend_seconds > 0


def test_raw_float_tensor_and_png_agree(client: Client, fmnist: data.FashionMNIST) -> None:
    img = fmnist.test.images[1]
    a = client.classify(png(img), model="fmnist-cnn", top_k=10)
    b = client.classify((img.astype(np.float32) / 255.0)[None], model="fmnist-cnn", top_k=10)
    pa = {c.index: c.probability for c in a.classes}
    pb_ = {c.index: c.probability for c in b.classes}
    assert pa.keys() == pb_.keys()
    assert max(abs(pa[k] - pb_[k]) for k in pa) < 1e-5


def test_same_image_same_verdict(client: Client, fmnist: data.FashionMNIST) -> None:
    raw = png(fmnist.test.images[2])
    a, b = (client.classify(raw, model="fmnist-cnn") for _ in range(2))
    assert [c.score for c in a.gate.checks] == [c.score for c in b.gate.checks]


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"", "empty"),
        (b"GIF89a" + b"\x00" * 40, "neither PNG nor JPEG"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, "not a decodable PNG"),
    ],
)
def test_bad_images_are_invalid_argument(client: Client, payload: bytes, message: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.classify(payload, model="fmnist-cnn")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_bad_tensor_is_invalid_argument(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.classify(np.full((1, 28, 28), np.nan, dtype=np.float32), model="fmnist-cnn")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        client.classify(np.zeros((3, 32, 32), dtype=np.uint8), model="fmnist-cnn")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "shape" in err.value.details()


def test_unknown_model_is_not_found(client: Client, fmnist: data.FashionMNIST) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.classify(png(fmnist.test.images[0]), model="no-such-model")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no-such-model" in err.value.details()


def test_deadline_exceeded(client: Client, fmnist: data.FashionMNIST) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.classify(png(fmnist.test.images[0]), model="fmnist-cnn", timeout_s=0.001)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_calls_cut_short_are_counted_by_their_code(gateway: str, torchserve, fmnist: data.FashionMNIST,
                                                   metrics_port: int) -> None:
    """With TorchServe stalled, calls whose deadline passes, a call the client cancels and a
    stream cancelled with items in flight all show in ``robustgate_requests_total`` and
    ``grpc_server_handled`` by their code (never UNKNOWN, never missing), whichever of the
    gateway's own deadline and gRPC's cancellation fires first."""
    from robustgate.v1 import classifier_pb2_grpc as pb_grpc

    def counts() -> dict[str, dict[str, float]]:
        samples = scrape(metrics_port)
        return {"requests": metric_by(samples, "robustgate_requests_total", "code"),
                "handled": metric_by(samples, "grpc_server_handled_total", "grpc_code",
                                     grpc_service="robustgate.v1.ClassifierService")}

    # Settled first: a call of an earlier test on this gateway (test_deadline_exceeded's, whose
    # 1 ms deadline its client saw pass at once) may still be counted by the server, which
    # under a loaded machine's scheduling came inside this test's window.
    before, settle = counts(), time.monotonic() + 10
    while time.monotonic() < settle:
        time.sleep(0.5)
        now = counts()
        if now == before:
            break
        before = now
    req = Client.request(png(fmnist.test.images[0]), "fmnist-cnn")
    os.killpg(torchserve.pid, signal.SIGSTOP)  # TorchServe answers nothing until SIGCONT
    try:
        with grpc.insecure_channel(gateway) as ch:
            stub = pb_grpc.ClassifierServiceStub(ch)
            for timeout in (0.3, 0.5, 0.7):
                with pytest.raises(grpc.RpcError) as err:
                    stub.Classify(req, timeout=timeout)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            call = stub.Classify.future(req)
            until_inflight(metrics_port, 1)  # in the gateway, waiting for TorchServe
            assert call.cancel()
            until_inflight(metrics_port, 0)
            stream = stub.ClassifyStream(iter([pb.ClassifyStreamRequest(request=req)] * 2))
            until_inflight(metrics_port, 2)  # both items
            stream.cancel()
            until_inflight(metrics_port, 0)  # the gateway has heard of both cancellations
    finally:
        os.killpg(torchserve.pid, signal.SIGCONT)

    def added(kind: str, code: str) -> float:
        return after[kind].get(code, 0) - before[kind].get(code, 0)

    after = counts()
    deadline = time.monotonic() + 10  # a call's code is counted as its handler returns
    while added("handled", "CANCELLED") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        after = counts()

    assert added("requests", "DEADLINE_EXCEEDED") == 3
    assert added("requests", "CANCELLED") == 3  # the unary call and the stream's two items
    assert added("handled", "DEADLINE_EXCEEDED") == 3
    assert added("handled", "CANCELLED") == 2  # the unary call and the stream
    assert added("handled", "UNKNOWN") == 0


def test_a_stream_reads_no_item_beyond_its_window(calibrated_store: Path, torchserve, tmp_path: Path,
                                                  fmnist: data.FashionMNIST) -> None:
    """With a window of one, the second item stays unread (with gRPC's flow control) while the
    first waits for TorchServe: a client that stops reading answers pins nothing more in the
    gateway (it read one item more, and held it, up to 4 MiB a stream). Cancelled then, the one
    item read is counted CANCELLED, once; answered, the next ones are read in turn."""
    from robustgate.v1 import classifier_pb2_grpc as pb_grpc

    port = free_port()
    proc, address = start_gateway(calibrated_store, torchserve, tmp_path,
                                  **{"stream-window": "1", "metrics-port": str(port)})
    req = Client.request(png(fmnist.test.images[0]), "fmnist-cnn")

    def received() -> float:
        return metric_sum(scrape(port), "grpc_server_msg_received_total", grpc_method="ClassifyStream")

    try:
        before = requests_by_code(port, "CANCELLED")
        os.killpg(torchserve.pid, signal.SIGSTOP)  # the first item waits for TorchServe
        try:
            with grpc.insecure_channel(address) as ch:
                stream = pb_grpc.ClassifierServiceStub(ch).ClassifyStream(
                    iter([pb.ClassifyStreamRequest(request=req)] * 3))
                until_inflight(port, 1)
                time.sleep(1.0)  # time to read the second item, were it read ahead
                assert received() == 1
                stream.cancel()
                until_inflight(port, 0)
        finally:
            os.killpg(torchserve.pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while requests_by_code(port, "CANCELLED") - before < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        assert requests_by_code(port, "CANCELLED") - before == received() == 1
        with Client(address) as c:  # not stopped: each answer lets the next item in
            answers = list(c.classify_stream([req] * 3, timeout_s=60))
        assert [a.WhichOneof("outcome") for a in answers] == ["result"] * 3
        assert received() == 4
    finally:
        stop(proc)


def test_stream_answers_each_request_in_order(client: Client, fmnist: data.FashionMNIST) -> None:
    reqs = [Client.request(png(fmnist.test.images[i]), "fmnist-cnn", request_id=f"s{i}") for i in range(5)]
    reqs.insert(2, Client.request(b"not an image", "fmnist-cnn", request_id="bad"))
    answers = list(client.classify_stream(reqs, timeout_s=60))
    assert [a.request_id for a in answers] == ["s0", "s1", "bad", "s2", "s3", "s4"]
    assert answers[2].WhichOneof("outcome") == "error" and answers[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert all(a.WhichOneof("outcome") == "result" for i, a in enumerate(answers) if i != 2)


def test_what_a_caller_sent_is_quoted_in_an_error_only_up_to_a_limit(client: Client, fmnist: data.FashionMNIST) -> None:
    """A status message travels in a header of at most 8 KiB: quoting a 9,000-character model
    name whole ended the call RESOURCE_EXHAUSTED, which a client retries, instead of NOT_FOUND."""
    with pytest.raises(grpc.RpcError) as err:
        client.classify(png(fmnist.test.images[0]), model="x" * 9000)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "xxxx" in err.value.details() and len(err.value.details()) <= 500


def test_an_overlong_request_id_is_refused_and_the_stream_goes_on(client: Client, fmnist: data.FashionMNIST) -> None:
    """A request_id is echoed (twice on a stream): 2 MB of one pushed its answer past the
    message limit and ended the stream, losing the answers after it. Over 256 characters it
    is refused, that answer echoes none, and the stream goes on."""
    image = png(fmnist.test.images[0])
    assert client.classify(image, "fmnist-cnn", request_id="r" * 256).request_id == "r" * 256
    with pytest.raises(grpc.RpcError) as err:
        client.classify(image, "fmnist-cnn", request_id="r" * 257)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "request_id is 257 characters" in err.value.details()
    reqs = [Client.request(image, "fmnist-cnn", request_id=rid) for rid in ("one", "r" * 2_100_000, "three")]
    answers = list(client.classify_stream(reqs, timeout_s=60))
    assert [a.request_id for a in answers] == ["one", "", "three"]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [a.WhichOneof("outcome") for a in answers] == ["result", "error", "result"]


def test_an_undecodable_message_is_the_callers_error(gateway: str, fmnist: data.FashionMNIST) -> None:
    """A message protobuf cannot parse (a string field that is not UTF-8) is the caller's
    doing: INVALID_ARGUMENT, on a stream (was INTERNAL, a server fault logged with a
    traceback) and in a unary call (was gRPC's UNKNOWN)."""
    good = pb.ClassifyStreamRequest(request=Client.request(png(fmnist.test.images[0]), "fmnist-cnn", request_id="ok"))
    bad_request = b"\x0a\x0afmnist-cnn" + b"\x32\x02\xff\xfe"  # model, then request_id (field 6): not UTF-8
    bad = b"\x0a" + bytes([len(bad_request)]) + bad_request  # ClassifyStreamRequest.request
    with grpc.insecure_channel(gateway) as channel:
        call = channel.stream_stream("/robustgate.v1.ClassifierService/ClassifyStream")(
            iter([good.SerializeToString(), bad]), timeout=60)
        answers, code = [], None
        try:
            answers.extend(pb.ClassifyStreamResponse.FromString(raw) for raw in call)
        except grpc.RpcError as e:
            code, details = e.code(), e.details()
    assert [a.request_id for a in answers] == ["ok"]
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid ClassifyStreamRequest" in details
    with grpc.insecure_channel(gateway) as channel:  # the same bytes in a unary call
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/robustgate.v1.ClassifierService/Classify")(bad_request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # gRPC's own answer: UNKNOWN, naming DecodeError
    assert err.value.details() == "the Classify request does not parse"


def test_a_stream_cancelled_midway_stops_what_it_had_in_flight(client: Client, fmnist: data.FashionMNIST,
                                                             metrics_port: int, torchserve) -> None:
    """The client walks away with a window of items in flight: the gateway cancels them (none
    is answered; each is counted as CANCELLED once), frees their admission slots and keeps
    serving. TorchServe is stopped while they are in flight, so none can finish first: with
    slow items instead, one that finished in the instant before the cancel arrived (CI, 1 run
    in 12) could not be told from one that was never cancelled."""
    window = 16  # the gateway's stream_window

    first_answered = threading.Event()

    def requests() -> Iterator[pb.ClassifyRequest]:
        yield Client.request(fmnist.test.images[0][None], "fmnist-cnn", request_id="c0")
        first_answered.wait(60)
        for i in range(1, 40):
            yield Client.request(fmnist.test.images[i][None], "fmnist-cnn", request_id=f"c{i}")

    def received() -> float:  # stream messages the gateway has read
        return metric_sum(scrape(metrics_port), "grpc_server_msg_received_total", grpc_method="ClassifyStream")

    call = client.classify_stream(requests(), timeout_s=60)
    assert next(call).request_id == "c0"
    before, cancelled_before = requests_by_code(metrics_port), requests_by_code(metrics_port, "CANCELLED")
    received_before = received()
    os.killpg(torchserve.pid, signal.SIGSTOP)  # TorchServe answers nothing until SIGCONT
    try:
        first_answered.set()
        until_inflight(metrics_port, window, timeout_s=30)
        time.sleep(0.2)  # no more than the window is taken
        assert inflight(metrics_port) == window
        call.cancel()
        until_inflight(metrics_port, 0)  # the cancelled stream's items are no longer in flight
    finally:
        os.killpg(torchserve.pid, signal.SIGCONT)
    time.sleep(1)  # anything left running would finish and be counted by now
    assert requests_by_code(metrics_port) == before, "items of the cancelled stream were answered"
    # The window's items and no more (the next is read only when one of them is answered):
    # every item it read is counted, once.
    read = received() - received_before
    assert read == window
    assert requests_by_code(metrics_port, "CANCELLED") - cancelled_before == read
    assert client.classify(png(fmnist.test.images[0]), model="fmnist-cnn").classes


def test_a_plan_the_handler_refuses_is_a_server_fault_not_the_callers(calibrated_store: Path, torchserve,
                                                                      fmnist: data.FashionMNIST,
                                                                      tmp_path: Path) -> None:
    """A policy whose certification batch is over the archive's max_variants (a limit of the
    archive's model-config.yaml, which the gateway checks at start-up only where its store
    holds the archive; this store does not, as when TorchServe serves archives from
    elsewhere): the handler refuses that plan. The caller sent a good image: INTERNAL with a fixed message, counted as a server
    fault, the handler's words in the gateway's log; uncertified calls still answer."""
    from benchmarks.report import store_with_policy

    def certify_in_one_batch(pol: dict) -> None:
        pol["noise"].update(certify=True, max_samples=2100, first_batch=2100)
        pol["max_forward_passes"] = 2200

    store = store_with_policy(calibrated_store, tmp_path / "store", "fmnist-cnn", certify_in_one_batch)
    port = free_port()
    proc, address = start_gateway(store, torchserve, tmp_path, **{"metrics-port": str(port)})
    try:
        with Client(address) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.classify(png(fmnist.test.images[0]), model="fmnist-cnn")
            assert c.classify(png(fmnist.test.images[0]), model="fmnist-cnn", certify=False).classes
        codes = metric_by(scrape(port), "robustgate_requests_total", "code")
    finally:
        stop(proc)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert err.value.details() == "the model server refused the gate's probe plan: the gateway and its model " \
                                  "archives disagree"
    assert codes.get("INTERNAL") == 1 and codes.get("OK") == 1 and not codes.get("INVALID_ARGUMENT"), codes
    log = (tmp_path / f"gateway-{address.rsplit(':', 1)[1]}.log").read_text()
    assert "refused a probe plan" in log and "allows at most 2048" in log


def test_a_gateway_whose_port_was_taken_after_the_pick_is_started_on_another(calibrated_store: Path, torchserve,
                                                                              tmp_path: Path, monkeypatch) -> None:
    """The harness's own start: the first port it picks is held (as when another process binds
    it between the pick and the gateway's bind); the gateway that exits saying so is started
    again on a fresh port, and a port the caller names is not changed behind its back."""
    import socket

    import tests.test_gateway as here

    with socket.create_server(("127.0.0.1", 0)) as held:
        taken = held.getsockname()[1]
        picks = iter([taken])
        pick = here.free_port
        monkeypatch.setattr(here, "free_port", lambda: next(picks, None) or pick())
        proc, address = start_gateway(calibrated_store, torchserve, tmp_path)
        try:
            assert address != f"127.0.0.1:{taken}"
            with Client(address) as c:
                assert c.list_models().models
        finally:
            stop(proc)
        assert "the port is taken" in (tmp_path / f"gateway-{taken}.log").read_text()
        with pytest.raises(PortTaken):
            start_gateway(calibrated_store, torchserve, tmp_path, port=str(taken))


def test_cli_refuses_bad_arguments_in_one_line(tmp_path: Path) -> None:
    """Refused before any call, exit 2 and one line, never a traceback, and never gRPC's core
    aborting the process (a client certificate without its key did: SIGABRT). In a subprocess,
    so that such an abort cannot take the test run with it."""
    image = tmp_path / "x.png"
    image.write_bytes(b"not read")
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (tmp_path / "token").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "empty-token").write_bytes(b"\n")  # would send no token: a bare UNAUTHENTICATED
    (tmp_path / "control-token").write_bytes(b"abc\x01def\n")  # gRPC core: lines of C on stderr
    cases = {
        "certificate without key": (["--tls-cert", str(tmp_path / "cert.pem")], "go together"),
        "key without certificate": (["--tls-key", str(tmp_path / "cert.pem")], "go together"),
        # gRPC's core took them, printed lines of C and failed UNAVAILABLE naming no file
        "CA file no PEM": (["--tls-ca", str(tmp_path / "cert.pem")], f"CA file {tmp_path / 'cert.pem'} holds no PEM"),
        "certificate and key no PEM": (["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "cert.pem")],
                                       "are not a PEM certificate and its unencrypted private key"),
        # a file that cannot be read: "[Errno 2] No such file or directory", naming none
        "CA file missing": (["--tls-ca", str(tmp_path / "nope.pem")],
                            f"CA file {tmp_path / 'nope.pem'} cannot be read: No such file or directory"),
        "CA file a folder": (["--tls-ca", str(tmp_path)], f"CA file {tmp_path} cannot be read: Is a directory"),
        "key missing": (["--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "nope.key")],
                        f"{tmp_path / 'nope.key'} cannot be read: No such file or directory"),
        "binary token file": (["--token-file", str(tmp_path / "token")], "is not ASCII text"),
        "empty token file": (["--token-file", str(tmp_path / "empty-token")], "is empty"),
        "token file with a control character": (["--token-file", str(tmp_path / "control-token")],
                                                "holds a control character"),
        "infinite timeout": (["--timeout", "inf"], "is not a number of seconds in (0, "),
        # past gRPC's 32-bit milliseconds the deadline overflowed: DEADLINE_EXCEEDED at once
        "timeout past gRPC's range": (["--timeout", "1e10"], "is not a number of seconds in (0, 2147483]"),
        "timeout not a number": (["--timeout", "soon"], "'soon' is not a number of seconds"),
        "negative top-k": (["classify", str(image), "--top-k", "-1"], "is not in [0, 4294967295]"),
        "top-k past uint32": (["classify", str(image), "--top-k", "99999999999"], "is not in [0, 4294967295]"),
        "top-k not a number": (["classify", str(image), "--top-k", "abc"], "'abc' is not a whole number"),
    }
    for case, (flags, says) in cases.items():
        argv = flags if flags[0] == "classify" else [*flags, "classify", str(image)]
        r = subprocess.run([sys.executable, "-m", "service.cli", "--address", "127.0.0.1:9", *argv],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, (case, r.returncode, r.stderr[-1500:])
        assert says in r.stderr and "Traceback" not in r.stderr, (case, r.stderr[-1500:])
        # nothing from gRPC's core (its log lines: "E1206 19:03:12.34 ... ssl_transport_security.cc")
        assert not re.search(r"^[EWI]\d{4} |\.cc:\d+", r.stderr, re.M), (case, r.stderr[-1500:])
    r = subprocess.run([sys.executable, "-m", "service.sample_image", str(tmp_path / "out"), "--index", "10000"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--index must be in 0..9999" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "service.sample_image", str(tmp_path / "no-such-folder" / "x.png")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "cannot write" in r.stderr and "Traceback" not in r.stderr


def test_cli_classifies_one_image_or_several_over_one_stream(gateway: str, fmnist: data.FashionMNIST,
                                                              tmp_path: Path) -> None:
    files = []
    for i in range(3):
        files.append(tmp_path / f"img{i}.png")
        files[-1].write_bytes(png(fmnist.test.images[i]))
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")

    def cli(*args: Path | str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "--address", gateway, "classify", *map(str, args)],
                              capture_output=True, text=True, timeout=120)

    one = cli(files[0])
    assert one.returncode == 0 and "rank  class" in one.stdout and "gate: " in one.stdout, one.stderr
    many = cli(files[0], junk, files[1], files[2])
    assert many.returncode == 2  # one image failed
    assert [line for line in many.stdout.splitlines() if line.startswith("== ")] == ["== img0.png", "== img1.png",
                                                                                      "== img2.png"]
    assert many.stdout.count("gate: ") == 3
    assert many.stderr.startswith("junk.png: error: INVALID_ARGUMENT: ") and "Traceback" not in many.stderr
    missing = cli(tmp_path / "nope.png")
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and not missing.stdout
    # several: a file that cannot be read (gone, a folder a glob matched) is named on stderr and
    # the others are answered (all were read before sending: one stopped the run)
    some = cli(files[0], tmp_path / "nope.png", tmp_path, files[1])
    assert some.returncode == 2
    assert [line for line in some.stdout.splitlines() if line.startswith("== ")] == ["== img0.png", "== img1.png"]
    assert some.stderr.splitlines() == ["nope.png: error: cannot read: No such file or directory",
                                        f"{tmp_path.name}: error: cannot read: Is a directory"]
    # several: a file larger than the gateway takes is named and skipped; sent, gRPC ended the
    # whole stream on it (RESOURCE_EXHAUSTED) and the files after it were never answered
    big = tmp_path / "big.png"
    big.write_bytes(files[0].read_bytes() + bytes(4 << 20))
    limit = Client(gateway).get_model("fmnist-cnn").input.max_image_bytes
    over = cli(files[0], big, files[1])
    assert over.returncode == 2
    assert [line for line in over.stdout.splitlines() if line.startswith("== ")] == ["== img0.png", "== img1.png"]
    assert over.stderr.splitlines() == [f"big.png: error: more than {limit} bytes, the most the gateway takes "
                                        "for an image"]
    # a file of exactly the limit is sent: it reaches the gateway's decoder (these bytes are no image)
    edge = tmp_path / "edge.png"
    edge.write_bytes(b"\x01" * limit)
    at = cli(edge, files[1])
    assert at.returncode == 2 and at.stdout.count("gate: ") == 1
    assert at.stderr.startswith("edge.png: error: INVALID_ARGUMENT: ") and "neither PNG nor JPEG" in at.stderr, at.stderr
    # a device or a pipe has no size to check first: read no further than the limit allows
    endless = cli(files[0], "/dev/zero", files[1])
    assert endless.returncode == 2 and endless.stdout.count("gate: ") == 2
    assert endless.stderr.splitlines() == [f"zero: error: more than {limit} bytes, the most the gateway takes for "
                                           "an image"]
    # several for a model the gateway does not serve: one line, before any file is read
    unknown = cli(files[0], files[1], "--model", "nope")
    assert unknown.returncode == 2 and not unknown.stdout
    assert unknown.stderr.startswith("error: NOT_FOUND: ") and len(unknown.stderr.splitlines()) == 1
    # a certificate asked for, and a model version named
    certified = cli(files[0], "--certify", "--model-version", "1")
    assert certified.returncode == 0 and "certified radius: 0." in certified.stdout, certified.stdout
    other = cli(files[0], "--model-version", "9")
    assert other.returncode == 2 and other.stderr.startswith("error: NOT_FOUND: "), other.stderr
    # a file name that is no UTF-8 (the file system keeps bytes): its request id escapes them
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/shoe\xff.png"))
    odd.write_bytes(files[0].read_bytes())
    named = subprocess.run([sys.executable, "-m", "service.cli", "--address", gateway, "classify", odd, files[1]],
                           capture_output=True, timeout=120)
    assert named.returncode == 0, named.stderr
    assert b"== shoe\\xff.png\n" in named.stdout
    # escaped, a name of 84 bytes is 324 characters, past the gateway's 256 for an id: cut and
    # told apart by a hash, not refused for its name
    long_odd = Path(os.fsdecode(bytes(tmp_path) + b"/" + b"\xff" * 80 + b".png"))
    long_odd.write_bytes(files[0].read_bytes())
    cut = subprocess.run([sys.executable, "-m", "service.cli", "--address", gateway, "classify", long_odd, files[1]],
                         capture_output=True, timeout=120)
    assert cut.returncode == 0, cut.stderr
    labels = [line[3:] for line in cut.stdout.splitlines() if line.startswith(b"== ")]
    assert len(labels) == 2 and labels[1] == b"img1.png" and len(labels[0].decode()) == 256
    assert labels[0].startswith(b"\\xff" * 60) and re.fullmatch(rb".*~[0-9a-f]{12}", labels[0])
    # `robustgate classify *.png | head`: the reader leaves before the answers are printed
    read, write = os.pipe()
    os.close(read)
    try:
        gone = subprocess.run([sys.executable, "-m", "service.cli", "--address", gateway, "classify", *map(str, files)],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (gone.returncode, gone.stderr) == (141, "")


def test_cli_health_is_an_exit_status(gateway: str) -> None:
    """`robustgate health` (an exec probe where the kubelet's gRPC probe cannot speak TLS):
    the gateway's status by name, exit 0 when SERVING; a service it does not report is an
    error (2) naming it."""
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", "--address", gateway, "health", *args],
                              capture_output=True, text=True, timeout=120)

    for service in ((), ("--service", "robustgate.liveness"), ("--service", "robustgate.v1.ClassifierService")):
        r = cli(*service)
        assert (r.returncode, r.stdout) == (0, "SERVING\n"), (service, r.stderr)
    r = cli("--service", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: NOT_FOUND"), r.stderr
    down = subprocess.run([sys.executable, "-m", "service.cli", "--address", f"127.0.0.1:{free_port()}",
                           "--timeout", "2", "health"], capture_output=True, text=True, timeout=120)
    assert down.returncode == 2 and down.stderr.startswith("error: UNAVAILABLE"), down.stderr


def test_the_readme_examples_run_as_written(gateway: str, tmp_path: Path) -> None:
    """The README's "Calling it" commands, run as written (this gateway's address in place of
    the default one) from a folder that holds the checkout's .venv, as a newcomer would."""
    import json
    import re

    section = (serve.REPO / "README.md").read_text().split("\n## Calling it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 2 and all("127.0.0.1:50051" in b for b in blocks)
    script = "\n".join(blocks).replace("127.0.0.1:50051", gateway).replace(
        "robustgate classify", f"robustgate --address {gateway} classify")
    (tmp_path / ".venv").symlink_to(serve.REPO / ".venv")
    out = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "rank  class" in out.stdout and "gate: " in out.stdout  # robustgate classify's table
    # grpcurl prints one JSON object per answer: Classify, Health/Check, then two stream answers
    text = out.stdout[out.stdout.index("\n{") + 1:]
    answers, end = [], 0
    while (start := text.find("{", end)) >= 0:
        obj, end = json.JSONDecoder().raw_decode(text, start)
        answers.append(obj)
    classify, health, *stream = answers
    assert len(classify["classes"]) == 3 and classify["gate"]["decision"].startswith("DECISION_")
    assert health == {"status": "SERVING"}
    assert [a["request_id"] for a in stream] == ["shoe.png", "shoe.png"]
    assert all(a["result"]["classes"][0]["label"] == classify["classes"][0]["label"] for a in stream)


def test_list_and_get_model(client: Client) -> None:
    models = client.list_models().models
    assert [m.name for m in models] == ["fmnist-cnn"] and set(models[0].formats) == {"torchscript", "onnx"}
    assert models[0].ready  # TorchServe answers (a dead one: test_backend_down_is_unavailable_and_not_serving)
    info = client.get_model("fmnist-cnn")
    assert len(info.labels) == 10 and list(info.input.shape) == [1, 28, 28]
    assert info.input.dtype == "float32" and list(info.input.tensor_dtypes) == ["uint8", "float32"]
    assert info.policy.mode == "enforce" and "squeeze" in info.policy.enabled_checks
    assert (info.policy.certify_default, info.policy.certify_refused) == (False, False)
    with pytest.raises(grpc.RpcError) as err:
        client.get_model("nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert client.get_model("fmnist-cnn", models[0].version).labels == info.labels  # the served version
    with pytest.raises(grpc.RpcError) as err:
        client.get_model("fmnist-cnn", models[0].version + "-other")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "is not served" in err.value.details()


def test_a_gateway_that_offers_no_certificates_refuses_requests_for_one(calibrated_store: Path, torchserve,
                                                                      fmnist: data.FashionMNIST,
                                                                      tmp_path: Path) -> None:
    """``allow_certify false``: a request asking for a certificate (up to 430 forward passes
    where one costs 14) is refused FAILED_PRECONDITION with words saying what to do, before
    anything reaches TorchServe; unset or false, it is answered; GetModel says so. A policy
    that certifies every request anyway takes an explicit ask, which asks for nothing more."""
    from benchmarks.report import store_with_policy

    image = png(fmnist.test.images[0])
    port = free_port()
    proc, address = start_gateway(calibrated_store, torchserve, tmp_path,
                                  **{"metrics-port": str(port), "allow-certify": "false"})
    try:
        with Client(address) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.classify(image, model="fmnist-cnn", certify=True)
            plain = c.classify(image, model="fmnist-cnn")
            assert c.classify(image, model="fmnist-cnn", certify=False).classes
            assert c.get_model("fmnist-cnn").policy.certify_refused is True
        codes = metric_by(scrape(port), "robustgate_requests_total", "code")
    finally:
        stop(proc)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == "certification is turned off on this gateway (allow_certify): ask without certify"
    assert plain.gate.forward_passes < 20  # the cheap checks only: nothing certified
    assert codes == {"FAILED_PRECONDITION": 1, "OK": 2}, codes

    def certify_all(pol: dict) -> None:
        pol["noise"]["certify"] = True

    store = store_with_policy(calibrated_store, tmp_path / "store", "fmnist-cnn", certify_all)
    proc, address = start_gateway(store, torchserve, tmp_path, **{"allow-certify": "false"})
    try:
        with Client(address) as c:
            policy = c.get_model("fmnist-cnn").policy
            assert (policy.certify_default, policy.certify_refused) == (True, False)
            certified = c.classify(image, model="fmnist-cnn", certify=True).gate
            assert certified.forward_passes > plain.gate.forward_passes
    finally:
        stop(proc)


def test_an_image_at_the_stated_limit_is_read_one_byte_more_is_refused(client: Client) -> None:
    """GetModel's max_image_bytes is a promise: an image of that size, in a request with a
    request id of the longest kind (256 characters of 4 bytes each in UTF-8), reaches the
    decoder (these bytes are no image); one byte more is refused by the decoder, saying the
    limit. It stated the message limit, which an image that size cannot fit beside the
    request's other fields (gRPC refused it)."""
    limit = client.get_model("fmnist-cnn").input.max_image_bytes
    assert limit > 0
    for size, wanted in ((limit, "neither PNG nor JPEG"), (limit + 1, f"the limit is {limit}")):
        request = pb.ClassifyRequest(model="fmnist-cnn", image=b"\x01" * size, request_id="\U0001f600" * 256)
        with pytest.raises(grpc.RpcError) as err:
            client._stub.Classify(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (size, err.value.code(), err.value.details())
        assert wanted in err.value.details(), (size, err.value.details())


def test_reflection_lists_the_services(gateway: str) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"robustgate.v1.ClassifierService", "grpc.health.v1.Health"} <= names


def test_overload_is_resource_exhausted_at_once(calibrated_store: Path, torchserve, tmp_path: Path,
                                                 fmnist: data.FashionMNIST) -> None:
    proc, address = start_gateway(calibrated_store, torchserve, tmp_path, **{"max-inflight": "1"})
    try:
        raw = png(fmnist.test.images[0])
        with Client(address) as c, ThreadPoolExecutor(16) as pool:
            def call(_: int) -> grpc.StatusCode:
                try:
                    c.classify(raw, model="fmnist-cnn", timeout_s=30)
                    return grpc.StatusCode.OK
                except grpc.RpcError as e:
                    return e.code()

            codes = list(pool.map(call, range(48)))
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.OK) >= 1 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 1
    finally:
        stop(proc)


def test_the_first_health_answer_is_already_the_backends(calibrated_store: Path, torchserve, tmp_path: Path) -> None:
    """The gateway probes TorchServe once before it accepts calls, so its first health answer
    is the backend's: a worker started beside others (or replacing one) never answers
    NOT_SERVING for a backend that answers. Here TorchServe is frozen while the gateway
    starts and a health check waits at its bound port; thawed, the check is answered SERVING
    (answered at once, as before, it read NOT_SERVING: the first probe had not come back)."""
    import psutil

    port = free_port()
    cmd = gateway_command(calibrated_store, torchserve, port=str(port), **{"backend-timeout-s": "20"})
    os.killpg(torchserve.pid, signal.SIGSTOP)
    thawed = False
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def bound() -> bool:
            return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                       for c in psutil.Process(proc.pid).net_connections(kind="tcp"))
        deadline = time.monotonic() + 60
        while not bound():
            assert proc.poll() is None and time.monotonic() < deadline, "the gateway never bound its port"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            check = health_pb2_grpc.HealthStub(ch).Check.future(health_pb2.HealthCheckRequest(), timeout=30,
                                                                   wait_for_ready=True)
            time.sleep(1.0)  # the check is on its way while TorchServe cannot answer the probe
            os.killpg(torchserve.pid, signal.SIGCONT)
            thawed = True
            assert check.result().status == health_pb2.HealthCheckResponse.SERVING
    finally:
        if not thawed:
            os.killpg(torchserve.pid, signal.SIGCONT)
        stop(proc)


def test_backend_down_is_unavailable_and_not_serving(calibrated_store: Path, torchserve, tmp_path: Path,
                                                       fmnist: data.FashionMNIST) -> None:
    class Dead:  # a TorchServe address where nothing listens
        grpc_inference_target = f"127.0.0.1:{free_port()}"
        settings = torchserve.settings

    port = free_port()
    cmd = [sys.executable, "-m", "service", "--port", str(port), "--metrics-port", "-1", "--store", str(calibrated_store),
           "--torchserve-address", Dead.grpc_inference_target,
           "--torchserve-key-file", str(torchserve.settings.run_dir / serve.KEY_FILE), "--backend-timeout-s", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as ch:
            grpc.channel_ready_future(ch).result(timeout=60)
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            # the liveness probe's service: the process serves, whatever its backend does (a
            # restart would only cut the calls and streams it has open)
            live = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=5).status
            assert live == health_pb2.HealthCheckResponse.SERVING
            # the gateway's bounded health service (service/healthcheck.py): a watch of a name
            # it does not serve answers once and ends, holding nothing open
            made_up = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service="x" * 512), timeout=5)
            assert [r.status for r in made_up] == [health_pb2.HealthCheckResponse.SERVICE_UNKNOWN]
        probe = subprocess.run([sys.executable, "-m", "service.cli", "--address", address, "health"],
                               capture_output=True, text=True, timeout=120)  # `robustgate health`, an exec probe
        assert (probe.returncode, probe.stdout) == (1, "NOT_SERVING\n"), probe.stderr
        with Client(address) as c:
            t = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                c.classify(png(fmnist.test.images[0]), model="fmnist-cnn", timeout_s=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert err.value.details() == "backend is unavailable"
            assert time.monotonic() - t < 5  # fails fast, no hang
            assert [m.ready for m in c.list_models().models] == [False]  # was always True
    finally:
        stop(proc)
