"""``robustgate``: the command-line client.

    robustgate classify shoe.png --model fmnist-cnn
    robustgate classify *.png            # several images: one ClassifyStream, answers in order
    robustgate classify shoe.png --certify   # with a randomized-smoothing certificate
    robustgate models
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc

from robustgate.v1 import classifier_pb2 as pb
from service.client import Client, tls_credentials
from service.settings import MAX_DURATION_S, MAX_REQUEST_ID_CHARS, read_tokens_file

_DECISION = {pb.DECISION_PASS: "PASS", pb.DECISION_FLAG: "FLAG", pb.DECISION_REJECT: "REJECT",
             pb.DECISION_UNSPECIFIED: "-"}
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}  # a stream item's error code, by number


def _decision(value: int) -> str:
    return _DECISION.get(value, str(value))  # a newer gateway's decision: its number


def render(resp: pb.ClassifyResponse) -> str:
    g = resp.gate
    lines = [f"model {resp.model} v{resp.version}   request {resp.request_id or '-'}", ""]
    if resp.classes:
        lines += ["  rank  class          probability"]
        lines += [f"  {i + 1:>4}  {c.label:<14} {c.probability:>10.4f}" for i, c in enumerate(resp.classes)]
    else:
        lines += ["  (label withheld: the gate rejected this image)"]
    lines += ["", f"gate: {_decision(g.decision)}  (policy decision {_decision(g.policy_decision)}, mode {g.mode}, "
              f"policy {g.policy_version}, {g.forward_passes} forward passes)"]
    lines += ["  check       ran   score      flag >     reject >   verdict"]
    for c in g.checks:
        ran = "yes" if c.ran else "no"
        score = f"{c.score:.4f}" if c.ran else "-"
        lines.append(f"  {c.name:<10}  {ran:<4}  {score:<9}  {c.flag_threshold:<9.4g}  {c.reject_threshold:<9.4g}  "
                     f"{_decision(c.verdict) if c.ran else '-'}")
    if g.certified:
        lines.append(f"  certified radius: {g.certified_radius:.3f}")
    elif g.certified_radius > 0:  # a certificate below the policy's target radius
        lines.append(f"  certified radius: {g.certified_radius:.3f} (below the policy's target: not certified)")
    else:
        lines.append("  certified radius: - (not certified)")
    t = resp.timings
    lines.append(f"timings: decode {1e3 * t.decode_seconds:.2f} ms, backend {1e3 * t.backend_seconds:.2f} ms, "
                 f"gate {1e3 * t.gate_seconds:.2f} ms, total {1e3 * t.total_seconds:.2f} ms")
    return "\n".join(lines)


def classify(client: Client, images: list[Path], model: str, top_k: int, timeout_s: float,
             certify: bool | None = None, version: str = "") -> int:
    """One image: one Classify call. Several: one ClassifyStream (the gateway works on a window
    of them at once), each file read only as the stream takes it, each answer printed under
    its file name; a file that cannot be read or is larger than the gateway takes (GetModel's
    ``max_image_bytes``; one past the gateway's message limit ended the whole stream) and an
    answer that failed go to stderr and the others go on; exit code 2 when any failed. The
    timeout is per image."""
    if len(images) == 1:
        print(render(client.classify(images[0].read_bytes(), model=model, top_k=top_k, version=version,
                                     request_id=_request_id(images[0]), certify=certify)))
        return 0
    unread: list[Path] = []
    sent: list[str] = []  # each request's id, in order: the stream answers in this order
    limit = client.get_model(model, version).input.max_image_bytes

    def requests() -> Iterator[pb.ClassifyRequest]:  # run by gRPC's thread as it sends
        for path in images:
            try:
                with path.open("rb") as f:  # at most one byte past the limit: a pipe or a device too
                    data = f.read(limit + 1)
            except OSError as e:
                unread.append(path)
                print(f"{_request_id(path)}: error: cannot read: {e.strerror or e}", file=sys.stderr)
                continue
            if len(data) > limit:
                unread.append(path)
                print(f"{_request_id(path)}: error: more than {limit} bytes, the most the gateway takes for "
                      "an image", file=sys.stderr)
                continue
            sent.append(_request_id(path))
            yield Client.request(data, model, top_k=top_k, request_id=sent[-1], version=version,
                                 certify=certify)

    failed = 0
    stream = client.classify_stream(requests(), timeout_s=min(timeout_s * len(images), MAX_DURATION_S))
    for k, answer in enumerate(stream):
        if answer.WhichOneof("outcome") == "error":
            failed += 1
            code = _CODE_NAMES.get(answer.error.code, str(answer.error.code))
            name = answer.request_id or (sent[k] if k < len(sent) else "?")  # an id it refused is not echoed
            print(f"{name}: error: {code}: {answer.error.message}", file=sys.stderr)
            continue
        print(("\n" if k else "") + f"== {answer.request_id}\n" + render(answer.result))
    return 2 if failed or unread else 0


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_DURATION_S:  # beyond, gRPC's deadline overflows: it expires at once
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number of seconds in (0, {MAX_DURATION_S}]")
    return value


MAX_TOP_K = 2**32 - 1  # the field is a uint32


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a whole number") from None
    if not 0 <= value <= MAX_TOP_K:
        raise argparse.ArgumentTypeError(f"{raw!r} is not in [0, {MAX_TOP_K}] (0: the gateway's default)")
    return value


def _request_id(path: Path) -> str:
    """A file's name as the request id: a name that is no UTF-8 (bytes the file system kept)
    with those bytes escaped, which protobuf's strings refuse as they are. Escaped, a name of
    up to 255 bytes can pass the gateway's limit on ids: such a one is cut and told apart by
    a hash of the whole name (the gateway would refuse the image for its name)."""
    raw = os.fsencode(path.name)
    name = raw.decode("utf-8", "backslashreplace")
    if len(name) <= MAX_REQUEST_ID_CHARS:
        return name
    return f"{name[:MAX_REQUEST_ID_CHARS - 13]}~{hashlib.sha256(raw).hexdigest()[:12]}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="robustgate", description="RobustGate client")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--timeout", type=_positive_seconds, default=10.0, help="seconds per call (per image)")
    p.add_argument("--tls", action="store_true", help="connect with TLS (implied by --tls-ca/--tls-cert)")
    p.add_argument("--tls-ca", type=Path, help="PEM CA that signed the gateway's certificate (default: system roots)")
    p.add_argument("--tls-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", type=Path, help="client private key (PEM) for mutual TLS")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token the gateway expects (of "
                                                     "several lines, as during a rotation: the last)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("classify", help="classify image files (PNG or JPEG); several go over one stream")
    c.add_argument("images", type=Path, nargs="+", metavar="image")
    c.add_argument("--model", default="fmnist-cnn")
    c.add_argument("--top-k", type=_count, default=3)
    c.add_argument("--model-version", default="", help="the model version to ask for (default: the one served)")
    c.add_argument("--certify", action="store_true",
                   help="ask for a randomized-smoothing certificate (up to the policy's noise budget: about 30 "
                        "times a request's forward passes; refused where the gateway runs --allow-certify false)")
    sub.add_parser("models", help="list served models")
    h = sub.add_parser("health", help="the gateway's health (grpc.health.v1) as an exit status: 0 SERVING, 1 not "
                                      "serving; an exec probe where the kubelet's gRPC probe cannot speak TLS")
    h.add_argument("--service", default="", help="'' the gateway's readiness (default), robustgate.liveness "
                                                  "its process alone, or robustgate.v1.ClassifierService")
    args = p.parse_args(argv)
    try:
        creds = (tls_credentials(args.tls_ca, args.tls_cert, args.tls_key)
                 if args.tls or args.tls_ca or args.tls_cert or args.tls_key else None)
        # its last token: during a rotation the gateway's own file holds the old and the new one, the new last
        token = read_tokens_file(args.token_file)[-1] if args.token_file else None
        with Client(args.address, timeout_s=args.timeout, credentials=creds, token=token) as client:
            if args.cmd == "classify":
                code = classify(client, args.images, args.model, args.top_k, args.timeout,
                                certify=True if args.certify else None, version=args.model_version)
            elif args.cmd == "health":
                status = client.health(args.service)
                print(status)
                code = 0 if status == "SERVING" else 1
            else:
                code = 0
                for m in client.list_models().models:
                    print(f"{m.name}  version {m.version}  formats {','.join(m.formats)}  ready {m.ready}")
            sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
            return code
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`robustgate classify *.png | head`): stop quietly
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # as a command killed by SIGPIPE exits in the shell
    except (OSError, ValueError) as e:  # unreadable files, a certificate without its key
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: no traceback
        return 128 + 2


if __name__ == "__main__":
    sys.exit(main())
