"""TLS, mutual TLS and the bearer-token check, against the real gateway process on loopback.

Certificates are made in the test with the ``openssl`` CLI (a CA, a server certificate for
127.0.0.1/localhost, a client certificate); nothing secret is committed."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.client import Client, tls_credentials
from tests.conftest import free_port
from tests.test_gateway import gateway_command, stop

REPO = Path(__file__).resolve().parent.parent


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _leaf(d: Path, name: str, cn: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "1", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem, server.{pem,key} (SAN 127.0.0.1, localhost), client.{pem,key}, and a stranger CA's
    client certificate other.{pem,key}."""
    d = tmp_path_factory.mktemp("pki")
    for ca, sub in (("ca", "d"), ("otherca", "o")):
        (d / sub).mkdir()
    for sub in ("d", "o"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", f"/CN=robustgate-test-ca-{sub}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 cwd=d / sub)
    _leaf(d / "d", "server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _leaf(d / "d", "client", "robustgate-client", "extendedKeyUsage=clientAuth\n")
    _leaf(d / "o", "client", "intruder", "extendedKeyUsage=clientAuth\n")
    return d


def _launch(store: Path, ts, tmp: Path, creds: grpc.ChannelCredentials | None, **overrides: str):
    """Start ``python -m service`` and wait for SERVING over ``creds`` (None: plaintext)."""
    port = free_port()
    cmd = gateway_command(store, ts, port=str(port), **overrides)
    logf = tmp / f"gateway-{port}.log"
    proc = subprocess.Popen(cmd, stdout=logf.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    address = f"127.0.0.1:{port}"
    ch = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {logf.read_text()[-3000:]}")
            try:
                st = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if st == health_pb2.HealthCheckResponse.SERVING:
                    return proc, address
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gateway did not become SERVING")
            time.sleep(0.2)
    finally:
        ch.close()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _code(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def _no_internals(details: str) -> None:
    assert "Traceback" not in details and "File \"" not in details and ".py" not in details


def test_tls_and_mutual_tls(calibrated_store: Path, torchserve, tmp_path: Path, pki: Path) -> None:
    d, o = pki / "d", pki / "o"
    server = {"tls-cert-file": str(d / "server.pem"), "tls-key-file": str(d / "server.key")}
    # Server-side TLS only: a TLS client that trusts the CA works, a plaintext client is refused.
    proc, address = _launch(calibrated_store, torchserve, tmp_path, tls_credentials(d / "ca.pem"), **server)
    try:
        with Client(address, credentials=tls_credentials(d / "ca.pem"), timeout_s=10) as c:
            assert c.classify(_png(), model="fmnist-cnn").model == "fmnist-cnn"
        with Client(address, timeout_s=3) as c:
            code, details = _code(lambda: c.classify(_png(), model="fmnist-cnn"))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)  # the handshake fails; nothing reaches the servicer
        with Client(address, credentials=tls_credentials(o / "ca.pem"), timeout_s=3) as c:  # server cert not trusted
            assert _code(lambda: c.classify(_png(), model="fmnist-cnn"))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(proc)
    # Mutual TLS: no client certificate, or one from another CA, is refused; ours works.
    mtls = tls_credentials(d / "ca.pem", d / "client.pem", d / "client.key")
    proc, address = _launch(calibrated_store, torchserve, tmp_path, mtls,
                            **server, **{"tls-client-ca-file": str(d / "ca.pem")})
    try:
        with Client(address, credentials=mtls, timeout_s=10) as c:
            assert c.classify(_png(), model="fmnist-cnn").model == "fmnist-cnn"
        banner = tmp_path / "banner"  # the files by the names the banner gives them
        banner.mkdir()
        for src, name in (("ca.pem", "CA.pem"), ("client.pem", "client.pem"), ("client.key", "client.key")):
            (banner / name).write_bytes((d / src).read_bytes())
        _banner_calls_answer(address, {"ROBUSTGATE_TLS_CERT_FILE": str(d / "server.pem"),
                                       "ROBUSTGATE_TLS_KEY_FILE": str(d / "server.key"),
                                       "ROBUSTGATE_TLS_CLIENT_CA_FILE": str(d / "ca.pem")}, banner)
        for creds in (tls_credentials(d / "ca.pem"), tls_credentials(d / "ca.pem", o / "client.pem", o / "client.key")):
            with Client(address, credentials=creds, timeout_s=3) as c:
                code, details = _code(lambda: c.classify(_png(), model="fmnist-cnn"))
            assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        with Client(address, timeout_s=3) as c:
            assert _code(lambda: c.classify(_png(), model="fmnist-cnn"))[0] == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(proc)


def test_bearer_token(calibrated_store: Path, torchserve, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-0123456789\n")
    proc, address = _launch(calibrated_store, torchserve, tmp_path, None, **{"auth-token-file": str(token_file)})
    try:
        for token in (None, "wrong", "s3cret-token-012345678", "s3cret-token-0123456789x"):
            with Client(address, token=token, timeout_s=5) as c:
                for call in (lambda: c.classify(_png(), model="fmnist-cnn"), c.list_models,
                             lambda: list(c.classify_stream([Client.request(_png(), "fmnist-cnn")], timeout_s=5))):
                    code, details = _code(call)
                    assert code == grpc.StatusCode.UNAUTHENTICATED, (token, code, details)
                    assert details == "missing or invalid bearer token"
                    _no_internals(details)
        with grpc.insecure_channel(address) as ch:  # a bare "Bearer" header and a non-Bearer scheme
            from robustgate.v1 import classifier_pb2 as pb
            from robustgate.v1 import classifier_pb2_grpc as pb_grpc
            stub = pb_grpc.ClassifierServiceStub(ch)
            for md in ((("authorization", "Bearer"),), (("authorization", "Basic s3cret-token-0123456789"),)):
                assert _code(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5, metadata=md))[0] == \
                    grpc.StatusCode.UNAUTHENTICATED
            # Bytes that do not parse: unread without the token (UNAUTHENTICATED, as any call
            # without it), INVALID_ARGUMENT with it.
            raw = ch.unary_unary("/robustgate.v1.ClassifierService/Classify")
            assert _code(lambda: raw(b"\xff\xff\xff", timeout=5))[0] == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", "Bearer s3cret-token-0123456789"),)
            assert _code(lambda: raw(b"\xff\xff\xff", timeout=5, metadata=good))[0] == grpc.StatusCode.INVALID_ARGUMENT
            # Health stays open for probes.
            assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
        with Client(address, token="s3cret-token-0123456789", timeout_s=10) as c:
            assert c.classify(_png(), model="fmnist-cnn").model == "fmnist-cnn"
            assert [m.name for m in c.list_models().models] == ["fmnist-cnn"]
            code, details = _code(lambda: c.classify(b"junk", model="fmnist-cnn"))  # authenticated, bad input
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            _no_internals(details)
        odd = tmp_path / "my dir" / "tok'en $HOME"  # as the shell the calls are pasted into reads it
        odd.parent.mkdir()
        odd.write_bytes(token_file.read_bytes())
        _banner_calls_answer(address, {"ROBUSTGATE_AUTH_TOKEN_FILE": str(odd)}, tmp_path)
        # rotated without a restart: the new token added as a second line, then the old removed
        old, new = "s3cret-token-0123456789", "n3w-token-9876543210"

        def answers(token: str) -> bool:
            with Client(address, token=token, timeout_s=5) as c:
                return _code(c.list_models)[0] != grpc.StatusCode.UNAUTHENTICATED

        def within(seconds: float, done) -> bool:
            deadline = time.monotonic() + seconds
            while not done():
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.2)
            return True

        assert not answers(new)
        token_file.write_text(f"{old}\n{new}\n")
        assert within(15, lambda: answers(new)) and answers(old)
        # the CLI given a file of two lines, as the gateway's own is now: its last token (the first
        # is one the gateway does not take)
        (tmp_path / "shoe.png").write_bytes(_png())
        (tmp_path / "rotating").write_text(f"not-{old}\n{new}\n")
        cli = subprocess.run([sys.executable, "-m", "service.cli", "--address", address, "--token-file",
                              str(tmp_path / "rotating"), "classify", str(tmp_path / "shoe.png")],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0 and "gate: " in cli.stdout, cli.stderr
        token_file.write_text(f"{new}\n")
        assert within(15, lambda: not answers(old)) and answers(new)
        # an update caught half-way (here: empty) keeps the tokens read before
        token_file.write_text("")
        time.sleep(3 * 2.0)  # TOKEN_RECHECK_S, three times over
        assert answers(new) and not answers(old)
    finally:
        stop(proc)


def _banner_calls_answer(address: str, env: dict[str, str], tmp: Path) -> None:
    """The two calls scripts/run.sh prints (scripts/banner.sh), run as printed against the
    gateway at ``address`` configured by ``env``: both answer. They named the default port,
    no token and plaintext whatever the gateway's settings were."""
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(["bash", str(REPO / "scripts" / "banner.sh"), "fmnist-cnn"], check=True, text=True,
                         capture_output=True, env={**os.environ, "ROBUSTGATE_PORT": port, **env}).stdout
    (tmp / "some.png").write_bytes(_png())
    calls = [line.strip() for line in out.splitlines() if line.strip().startswith((".venv/bin/robustgate",
                                                                                   ".venv/bin/grpcurl"))]
    assert len(calls) == 2, out
    for call in calls:
        r = subprocess.run(["bash", "-c", f"cd {tmp} && ln -sfn {REPO / '.venv'} .venv && {call}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "fmnist-cnn" in r.stdout, (call, r.stdout, r.stderr)


def test_caller_tokens_follow_their_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """The callers' token file is looked at every TOKEN_RECHECK_S and re-read when it changed:
    every line a token; a file that cannot be read or holds none keeps the tokens before (and
    is tried again). A token given as a setting has no file to follow."""
    from service.server import TOKEN_RECHECK_S, CallerTokens
    from service.settings import Settings

    path = tmp_path / "token"
    path.write_text("one\n")
    tokens = CallerTokens(Settings(auth_token_file=str(path)))
    t = time.monotonic()
    assert tokens.current(t) == (b"Bearer one",)
    path.write_text(" one \n\n two\n")  # a rotation: both; blank lines and spaces around dropped
    assert tokens.current(t + TOKEN_RECHECK_S / 2) == (b"Bearer one",)  # not looked at yet
    t += TOKEN_RECHECK_S
    assert tokens.current(t) == (b"Bearer one", b"Bearer two")
    with caplog.at_level("WARNING", logger="service.server"):
        for broken in ("\n", "bad\x01token\n", None):  # empty, a control character, gone
            path.unlink()
            if broken is not None:
                path.write_text(broken)
            t += TOKEN_RECHECK_S
            assert tokens.current(t) == (b"Bearer one", b"Bearer two")
    assert "kept the callers' tokens read before" in caplog.text
    path.write_text("two\n")
    t += TOKEN_RECHECK_S
    assert tokens.current(t) == (b"Bearer two",)
    assert CallerTokens(Settings(auth_token="x")).current(t + 100) == (b"Bearer x",)
    assert not CallerTokens(Settings())


def test_settings_refuse_half_tls() -> None:
    from service.settings import Settings

    with pytest.raises(ValueError):
        Settings(tls_cert_file="a.pem")
    with pytest.raises(ValueError):
        Settings(tls_client_ca_file="ca.pem")


def test_bad_tls_files_and_an_empty_token_fail_the_start_in_one_line(calibrated_store: Path, torchserve,
                                                                      tmp_path: Path, pki: Path) -> None:
    """Each is refused before the gateway binds, with exit code 2 and a line that names the
    file: gRPC alone would refuse a certificate that is not its key's only as it binds, in the
    words of a port that is taken; an empty token file was a traceback."""
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    (tmp_path / "empty-token").write_text("\n")
    (tmp_path / "latin1-token").write_bytes("s\xe9cret\n".encode("latin-1"))  # not UTF-8 either
    (tmp_path / "control-token").write_bytes(b"abc\x01def\n")  # no caller could send it: every call refused
    d = pki / "d"
    cases = {
        "not its key": (["--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "client.key")],
                        f"tls_cert_file {d / 'server.pem'} and tls_key_file {d / 'client.key'} are not a PEM"),
        "no PEM": (["--tls-cert-file", str(tmp_path / "junk.pem"), "--tls-key-file", str(d / "server.key")],
                   f"tls_cert_file {tmp_path / 'junk.pem'} and tls_key_file"),
        "client CA no PEM": (["--tls-cert-file", str(d / "server.pem"), "--tls-key-file", str(d / "server.key"),
                              "--tls-client-ca-file", str(tmp_path / "junk.pem")],
                             f"tls_client_ca_file {tmp_path / 'junk.pem'} holds no PEM CA certificate"),
        "empty token": (["--auth-token-file", str(tmp_path / "empty-token")],
                        f"auth_token_file {tmp_path / 'empty-token'} is empty"),
        "token not ASCII": (["--auth-token-file", str(tmp_path / "latin1-token")],
                            f"auth_token_file {tmp_path / 'latin1-token'} is not ASCII text"),
        "token with a control character": (["--auth-token-file", str(tmp_path / "control-token")],
                                           f"auth_token_file {tmp_path / 'control-token'} holds a control character"),
        "no token file": (["--auth-token-file", str(tmp_path / "nowhere")],  # was errno words, no setting
                          f"auth_token_file {tmp_path / 'nowhere'} is not there"),
        "token file a folder": (["--auth-token-file", str(tmp_path)],
                                f"auth_token_file {tmp_path} cannot be read: Is a directory"),
    }
    for case, (flags, says) in cases.items():
        r = subprocess.run([*gateway_command(calibrated_store, torchserve), *flags],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (case, r.stderr[-2000:])
        assert f"cannot start: {says}" in r.stderr, (case, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "port is taken" not in r.stderr, case
