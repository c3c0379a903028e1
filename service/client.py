"""A small Python client of the RobustGate API.

    with Client("127.0.0.1:50051") as c:
        answer = c.classify(Path("shoe.png").read_bytes(), model="fmnist-cnn")
        if answer.classes:  # empty where the gate REJECTs in enforce mode
            print(answer.classes[0].label, answer.gate.decision)
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from robustgate.v1 import classifier_pb2 as pb
from robustgate.v1 import classifier_pb2_grpc as pb_grpc
from robustgate.v1 import probe_pb2


def tls_credentials(ca_file: Path | None = None, cert_file: Path | None = None,
                    key_file: Path | None = None) -> grpc.ChannelCredentials:
    """TLS to the gateway: ``ca_file`` verifies the server (None: system roots); ``cert_file``
    and ``key_file`` are the client's certificate for mutual TLS, both or neither (gRPC's core
    aborts the process on a certificate without its key). Each file is loaded with OpenSSL
    first (ValueError naming it): gRPC's core takes a file that is no PEM, prints lines of C
    and fails every call UNAVAILABLE, naming no file."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("a client certificate and its private key go together: give both or neither")

    def read(p: Path | None, what: str = "") -> bytes | None:  # OSError's message names no file
        try:
            return Path(p).read_bytes() if p else None
        except OSError as e:
            raise ValueError(f"{what}{p} cannot be read: {e.strerror or e}") from None

    ca, cert, key = read(ca_file, "CA file "), read(cert_file), read(key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_file:
        try:
            context.load_verify_locations(ca_file)
        except ssl.SSLError as e:
            raise ValueError(f"CA file {ca_file} holds no PEM certificate ({e.reason or e})") from None
    if cert_file:
        try:
            context.load_cert_chain(cert_file, key_file, password=lambda: b"")
        except ssl.SSLError as e:
            raise ValueError(f"{cert_file} and {key_file} are not a PEM certificate and its unencrypted "
                             f"private key ({e.reason or e})") from None
    return grpc.ssl_channel_credentials(ca, key, cert)


class Client:
    def __init__(self, address: str = "127.0.0.1:50051", timeout_s: float = 10.0,
                 credentials: grpc.ChannelCredentials | None = None, max_message_bytes: int = 8 * 1024 * 1024,
                 token: str | None = None) -> None:
        opts = [("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes)]
        self._channel = (grpc.secure_channel(address, credentials, options=opts) if credentials
                         else grpc.insecure_channel(address, options=opts))
        self._stub = pb_grpc.ClassifierServiceStub(self._channel)
        self.timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @staticmethod
    def request(image: bytes | np.ndarray, model: str, top_k: int = 0, request_id: str = "",
                version: str = "", certify: bool | None = None) -> pb.ClassifyRequest:
        """Bytes are sent as an encoded image; an array as a raw tensor: uint8 (0..255) as it
        is, any float (0..1) as float32. Other dtypes are refused here: an int64 array of
        0..255 sent as floats would be refused by the gateway as out of range, a puzzle."""
        req = pb.ClassifyRequest(model=model, version=version, top_k=top_k, request_id=request_id)
        if certify is not None:
            req.certify = certify
        if isinstance(image, np.ndarray):
            if image.dtype == np.uint8:
                dtype, wire = "uint8", "<u1"
            elif np.issubdtype(image.dtype, np.floating):
                dtype, wire = "float32", "<f4"
            else:
                raise TypeError(f"a {image.dtype} array is not an image tensor: send uint8 (0..255) or float (0..1)")
            arr = np.ascontiguousarray(image, dtype=wire)
            req.tensor.CopyFrom(probe_pb2.Tensor(shape=list(arr.shape), dtype=dtype, data=arr.tobytes()))
        else:
            req.image = bytes(image)
        return req

    def classify(self, image: bytes | np.ndarray, model: str, top_k: int = 0, request_id: str = "",
                 timeout_s: float | None = None, certify: bool | None = None,
                 version: str = "") -> pb.ClassifyResponse:
        return self._stub.Classify(self.request(image, model, top_k, request_id, version=version, certify=certify),
                                   timeout=timeout_s or self.timeout_s,
                                   metadata=self._metadata)

    def classify_stream(self, requests: Iterable[pb.ClassifyRequest],
                        timeout_s: float | None = None) -> Iterator[pb.ClassifyStreamResponse]:
        """One ClassifyStream. ``timeout_s`` bounds the whole stream; None: no deadline (a
        stream may be long-lived), unlike the unary calls, which default to ``timeout_s``."""
        return self._stub.ClassifyStream((pb.ClassifyStreamRequest(request=r) for r in requests), timeout=timeout_s,
                                        metadata=self._metadata)

    def health(self, service: str = "") -> str:
        """The gateway's grpc.health.v1 status of ``service`` ("" the whole gateway, as its
        readiness probe asks), by name: "SERVING", "NOT_SERVING", ...; NOT_FOUND for a service
        it does not report. Needs no token."""
        reply = health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s, metadata=self._metadata)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def list_models(self) -> pb.ListModelsResponse:
        return self._stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s, metadata=self._metadata)

    def get_model(self, model: str, version: str = "") -> pb.GetModelResponse:
        """What ``model`` takes and answers, and its gate policy; ``version`` names the one
        served (NOT_FOUND for another), empty for the served default."""
        return self._stub.GetModel(pb.GetModelRequest(model=model, version=version), timeout=self.timeout_s,
                                     metadata=self._metadata)
