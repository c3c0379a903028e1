"""The Python client's request building (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest

from service.client import Client


def test_arrays_are_sent_as_uint8_or_float32_tensors() -> None:
    grey = np.arange(784, dtype=np.uint8).reshape(28, 28)
    t = Client.request(grey, "m").tensor
    assert (t.dtype, list(t.shape), t.data) == ("uint8", [28, 28], grey.tobytes())
    t = Client.request(grey / 255.0, "m").tensor  # float64: sent as float32
    assert t.dtype == "float32" and np.array_equal(np.frombuffer(t.data, "<f4"), (grey / 255.0).astype("<f4").ravel())
    assert Client.request(b"\x89PNG...", "m").image == b"\x89PNG..."


@pytest.mark.parametrize("dtype", ["int64", "int32", "uint16", "bool"])
def test_other_dtypes_are_refused_before_sending(dtype: str) -> None:
    """np.array(list_of_ints) is int64: sent as float32 0..255 it was refused by the gateway as
    out of [0, 1], far from the cause."""
    with pytest.raises(TypeError, match=f"a {dtype} array is not an image tensor: send uint8"):
        Client.request(np.zeros((28, 28), dtype=dtype), "m")


def test_the_cli_renders_a_decision_it_does_not_know_by_its_number() -> None:
    """A newer gateway may answer a decision this client has no name for: printed as its
    number, not a KeyError traceback."""
    from robustgate.v1 import classifier_pb2 as pb
    from service.cli import render

    resp = pb.ClassifyResponse(model="m", version="1")
    resp.gate.decision = 7
    resp.gate.policy_decision = pb.DECISION_FLAG
    resp.gate.checks.add(name="squeeze", ran=True, score=0.5, verdict=9)
    text = render(resp)
    assert "gate: 7  (policy decision FLAG" in text and text.rstrip().count(" 9") >= 1
    resp.gate.certified_radius = 0.12  # a certificate short of the policy's target radius
    assert "certified radius: 0.120 (below the policy's target: not certified)" in render(resp)
    resp.gate.certified = True
    assert "certified radius: 0.120\n" in render(resp)


def test_classify_can_name_a_model_version() -> None:
    from types import SimpleNamespace

    with Client("127.0.0.1:9") as client:  # nothing is sent: the stub hands the request back
        client._stub = SimpleNamespace(Classify=lambda req, timeout, metadata: req)  # type: ignore[assignment]
        sent = client.classify(b"png", "fmnist-cnn", version="2", certify=True)
    assert (sent.model, sent.version, sent.certify) == ("fmnist-cnn", "2", True)


def test_the_cli_names_each_stream_answer_by_its_file_even_where_no_id_is_echoed(tmp_path, capsys) -> None:
    """A stream answers in request order; an error answer for an id the gateway refused echoes
    none, and was printed nameless (": error: ..."): it is named by its place. A name whose
    escaped form passes the gateway's limit on ids is cut, and hashed to stay apart."""
    import os

    from robustgate.v1 import classifier_pb2 as pb
    from service import cli
    from service.settings import MAX_REQUEST_ID_CHARS

    files = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    for f in files:
        f.write_bytes(b"\x89PNG")

    class Answers:
        def get_model(self, model, version=""):
            return pb.GetModelResponse(name=model, input=pb.InputSpec(max_image_bytes=1 << 20))

        def classify_stream(self, requests, timeout_s):
            reqs = list(requests)
            yield pb.ClassifyStreamResponse(request_id=reqs[0].request_id, result=pb.ClassifyResponse(model="m"))
            yield pb.ClassifyStreamResponse(error=pb.StreamError(code=3, message="request_id is 300 characters"))
            yield pb.ClassifyStreamResponse(request_id=reqs[2].request_id, error=pb.StreamError(code=3, message="bad"))

    assert cli.classify(Answers(), files, "m", 0, 5.0) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["b.png: error: INVALID_ARGUMENT: request_id is 300 characters", "c.png: error: INVALID_ARGUMENT: bad"]
    one, other = (cli._request_id(tmp_path / os.fsdecode(b"\xff" * 80 + tail)) for tail in (b".png", b".jpg"))
    assert len(one) == len(other) == MAX_REQUEST_ID_CHARS and one != other
    assert cli._request_id(tmp_path / os.fsdecode(b"\xff" * 63)) == "\\xff" * 63  # 252 characters: whole
