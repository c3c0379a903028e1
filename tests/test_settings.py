"""Gateway settings: every value out of range or of the wrong kind is refused at start with a
message naming the setting; ``python -m service`` says so in one line, without a traceback."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import REPO, Settings, from_args


@pytest.mark.parametrize("env, message", [
    ({"ROBUSTGATE_PORT": "70000"}, r"port must be in \[0, 65535\]"),  # gRPC wrapped it to 4464
    ({"ROBUSTGATE_PORT": "-1"}, r"port must be in \[0, 65535\]"),
    ({"ROBUSTGATE_METRICS_PORT": "70000"}, "metrics_port must be"),
    ({"ROBUSTGATE_METRICS_PORT": "-7"}, "metrics_port must be"),  # only -1 turns it off
    ({"ROBUSTGATE_WORKER_TIMEOUT_S": "nan"}, "worker_timeout_s must be a finite number"),
    ({"ROBUSTGATE_GRACE_S": "inf"}, "grace_s must be a finite number"),
    ({"ROBUSTGATE_BACKEND_TIMEOUT_S": "NaN"}, "backend_timeout_s must be a finite number"),
    ({"ROBUSTGATE_MODELS": " , "}, "at least one model"),
    ({"ROBUSTGATE_MODELS": ""}, "at least one model"),
    ({"ROBUSTGATE_MAX_MESSAGE_BYTES": "0"}, "max_message_bytes"),
    ({"ROBUSTGATE_MAX_MESSAGE_BYTES": "2048"}, r"max_message_bytes must be > 2048 \(a request.s fields"),
    ({"ROBUSTGATE_MAX_IMAGE_PIXELS": "-1"}, "max_image_pixels"),
    ({"ROBUSTGATE_LOG_LEVEL": "loud"}, "log_level must be one of"),
    ({"ROBUSTGATE_PORT": "abc"}, "port must be an integer, got 'abc'"),
    ({"ROBUSTGATE_GRACE_S": "soon"}, "grace_s must be a number, got 'soon'"),
    # a misspelt name started with the default, in silence
    ({"ROBUSTGATE_WORKRS": "9"}, "unknown setting ROBUSTGATE_WORKRS"),
    # gRPC's options are 32-bit: an OverflowError traceback at start, or a health probe that
    # never answered (a deadline past int64 nanoseconds)
    ({"ROBUSTGATE_MAX_MESSAGE_BYTES": str(2**32)}, r"max_message_bytes must be <= 2147483647"),
    ({"ROBUSTGATE_MAX_CONNECTION_AGE_S": "2592000"}, r"max_connection_age_s must be <= 2147483 s"),
    ({"ROBUSTGATE_KEEPALIVE_TIME_S": "2592000"}, r"keepalive_time_s must be <= 2147483 s"),
    ({"ROBUSTGATE_KEEPALIVE_TIMEOUT_S": "2592000"}, r"keepalive_timeout_s must be <= 2147483 s"),
    ({"ROBUSTGATE_BACKEND_TIMEOUT_S": "1e10"}, r"backend_timeout_s must be <= 2147483 s"),
    ({"ROBUSTGATE_REQUEST_TIMEOUT_S": "1e10"}, r"request_timeout_s must be <= 2147483 s"),
    # tiny but positive: a health probe back to back, a backend never in time, connections
    # closed or pinged as they open
    ({"ROBUSTGATE_HEALTH_INTERVAL_S": "0.0001"}, r"health_interval_s must be at least 0.1 s, got 0.0001"),
    ({"ROBUSTGATE_BACKEND_TIMEOUT_S": "0.001"}, r"backend_timeout_s must be at least 0.01 s"),
    ({"ROBUSTGATE_REQUEST_TIMEOUT_S": "0.001"}, r"request_timeout_s must be at least 0.01 s"),
    ({"ROBUSTGATE_MAX_CONNECTION_AGE_S": "0.001"}, r"max_connection_age_s must be at least 0.1 s"),
    ({"ROBUSTGATE_KEEPALIVE_TIME_S": "0.001"}, r"keepalive_time_s must be at least 0.1 s"),
    ({"ROBUSTGATE_KEEPALIVE_TIMEOUT_S": "0.001"}, r"keepalive_timeout_s must be at least 0.1 s"),
])
def test_bad_settings_are_refused_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_args([], environ=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "10.0.0.7", "gateway.example.com"])
def test_an_address_other_machines_reach_needs_a_caller_credential(host: str) -> None:
    """Security by default: the image sets 0.0.0.0 (a pod's Service reaches it there); run
    outside Kubernetes without a token, every machine that reached the port could classify.
    Refused unless a credential is set or the operator says so in as many words."""
    with pytest.raises(ValueError, match=rf"host {re.escape(host)} takes calls from other machines"):
        from_args([], environ={"ROBUSTGATE_HOST": host})
    assert from_args([], environ={"ROBUSTGATE_HOST": host, "ROBUSTGATE_AUTH_TOKEN_FILE": "/run/token"}).host == host
    assert from_args([], environ={"ROBUSTGATE_HOST": host, "ROBUSTGATE_AUTH_TOKEN": "t"}).host == host
    assert from_args(["--allow-unauthenticated", "true"], environ={"ROBUSTGATE_HOST": host}).allow_unauthenticated
    mtls = {"ROBUSTGATE_HOST": host, "ROBUSTGATE_TLS_CERT_FILE": "c.pem", "ROBUSTGATE_TLS_KEY_FILE": "k.pem",
            "ROBUSTGATE_TLS_CLIENT_CA_FILE": "ca.pem"}
    assert from_args([], environ=mtls).host == host
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert from_args([], environ={"ROBUSTGATE_HOST": loopback}).host == loopback


def test_edges_and_spellings_that_are_accepted() -> None:
    assert from_args([], environ={"ROBUSTGATE_PORT": "65535", "ROBUSTGATE_METRICS_PORT": "-1"}).metrics_port == -1
    assert from_args(["--port", "0", "--metrics-port", "0"], environ={}).port == 0
    assert from_args(["--log-level", "debug"], environ={}).log_level == "DEBUG"  # logging wants it upper
    beside = {"ROBUSTGATE_POLICY_DIR": "/p", "ROBUSTGATE_KEY_FILE_WAIT_S": "9", "ROBUSTGATE_MODEL": "m", "OTHER": "x"}
    assert from_args([], environ=beside).workers == Settings().workers  # read by the entrypoint and run.sh
    assert Settings().log_level == "INFO" and Settings().models == ("fmnist-cnn",)
    edge = {"ROBUSTGATE_MAX_MESSAGE_BYTES": str(2**31 - 1), "ROBUSTGATE_MAX_CONNECTION_AGE_S": "2147483"}
    assert from_args([], environ=edge).max_connection_age_s == 2147483


def test_the_gateway_names_a_bad_setting_in_one_line() -> None:
    for args in (["--port", "abc"], ["--workers", "0"], ["--worker-timeout-s", "nan"],
                 ["--max-connection-age-s", "2592000"]):
        out = subprocess.run([sys.executable, "-m", "service", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 2, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("python -m service: error: ")


def test_the_probe_seed_is_a_secret_drawn_at_start_unless_set() -> None:
    """An attacker who can compute the noise and jitter copies its image will meet can fit
    the image to them: the key is drawn at random (never shown, kept by the workers, which
    get the supervisor's settings pickled) unless a deployment sets one."""
    import dataclasses
    import pickle

    a, b = Settings(), Settings()
    assert 0 <= a.seed < 2**63 and a.seed != b.seed
    assert str(a.seed) not in repr(a)
    assert pickle.loads(pickle.dumps(a)).seed == a.seed == dataclasses.replace(a, port=1).seed
    assert from_args(["--seed", "7"], environ={}).seed == 7
    with pytest.raises(ValueError, match="seed must be in"):
        Settings(seed=-2)


def test_a_yes_no_setting_refuses_a_word_it_does_not_know() -> None:
    """Anything but 1/true/yes/on read as false: ``--allow-certify ture`` or
    ``ROBUSTGATE_ALLOW_UNAUTHENTICATED=ture`` switched the setting off in silence."""
    for word, value in (("true", True), ("ON", True), ("1", True), (" yes ", True),
                        ("false", False), ("off", False), ("0", False), ("No", False)):
        assert from_args(["--allow-certify", word], environ={}).allow_certify is value, word
        assert from_args([], environ={"ROBUSTGATE_ALLOW_CERTIFY": word}).allow_certify is value, word
    for word in ("ture", "flase", "", "2", "enabled"):
        with pytest.raises(ValueError, match="allow_certify must be true or false"):
            from_args(["--allow-certify", word], environ={})
    with pytest.raises(ValueError, match="auth_token must be printable ASCII"):
        Settings(auth_token="abc\ndef")


def test_the_callers_token_is_not_in_the_settings_repr() -> None:
    """A logged or traced Settings (a start-up failure, a debugging print) must not carry the
    bearer token every caller sends."""
    s = Settings(auth_token="s3cret-token-value")
    assert s.auth_token == "s3cret-token-value" and "s3cret" not in repr(s) and "s3cret" not in str(s)


def test_the_probe_key_comes_from_a_file_that_may_be_absent(tmp_path: Path) -> None:
    """seed_file: the key kept out of env and ps (a Secret's key as a file). A file that is
    not there (the Secret's optional key unset) draws one, as without it; one that holds
    anything but a whole number in [0, 2^63) refuses the start, naming the file; seed and
    seed_file together are refused."""
    f = tmp_path / "seed"
    f.write_text("12345\n")
    assert from_args(["--seed-file", str(f)], environ={}).seed == 12345
    assert from_args([], environ={"ROBUSTGATE_SEED_FILE": str(f)}).seed == 12345
    s = Settings(seed_file=str(f))  # in code too, not only from flags and env
    f.write_text("0")
    assert s.seed == dataclasses.replace(s, port=1).seed == 12345  # read once: a copy keeps it
    assert Settings(seed_file=str(f)).seed == 0
    absent = [from_args(["--seed-file", str(tmp_path / "none")], environ={}).seed for _ in range(2)]
    assert absent[0] != absent[1] and all(0 <= s < 2**63 for s in absent)
    for text, words in (("", "does not hold a whole number"), ("-1", "does not hold a whole number"),
                        ("12 34", "does not hold a whole number"), ("0x10", "does not hold a whole number"),
                        (str(2**63), "holds a seed outside [0, 2^63)"), ("\xe9", "is not ASCII text")):
        f.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=re.escape(f"seed_file {f} {words}")):
            from_args(["--seed-file", str(f)], environ={})
    with pytest.raises(ValueError, match="cannot be read"):
        from_args(["--seed-file", str(tmp_path)], environ={})  # a folder
    f.write_text("7")
    with pytest.raises(ValueError, match="seed and seed_file: set one"):
        from_args(["--seed-file", str(f), "--seed", "7"], environ={})


def test_a_gateway_whose_seed_file_is_not_there_says_so(tmp_path: Path, caplog) -> None:
    import logging

    from service import __main__ as gateway_main

    with caplog.at_level(logging.WARNING, logger="service"):
        rc = gateway_main.main(["--seed-file", str(tmp_path / "none"), "--models", "no-such-model",
                                "--store", str(tmp_path), "--metrics-port", "-1", "--port", "0"])
    assert rc == 2  # no such model: it stops before serving
    assert any("seed_file" in r.getMessage() and "drew its own probe key" in r.getMessage()
               for r in caplog.records)


def test_an_images_seed_tells_nothing_of_another_without_the_key() -> None:
    """Keyed (HMAC), not the key XOR a public hash: there, the key cancelled out of two
    images' seeds, so one seed learnt gave every other image's."""
    import numpy as np

    from service.pipeline import request_seed

    a, b = np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 9, np.uint8)
    assert request_seed(7, a) == request_seed(7, a.copy()) != request_seed(8, a)
    assert request_seed(7, a) ^ request_seed(7, b) != request_seed(8, a) ^ request_seed(8, b)
