"""The image's recipe, checked without a Docker engine: hadolint passes with a config that
explains every rule it turns off; every file the Dockerfile copies is in the build context
and not excluded by .dockerignore; the wheel lock agrees with pyproject.toml and carries a
hash per wheel; the final stage is non-root and has no build tools. The real build, run,
health check and classification are scripts/docker_smoke.sh (minutes, not in this suite).
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from tests.conftest import dev_tool

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements.lock"
DEV_LOCK = REPO / "requirements-dev.lock"
ENTRYPOINT = REPO / "deploy" / "docker-entrypoint.sh"




def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(text: str) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def copy_sources(args: str) -> list[str]:
    """Sources of COPY ``args`` from the build context ([] for COPY --from=...)."""
    words = shlex.split(args)
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


# --- .dockerignore, as Docker reads it (patternmatcher: last match wins, "!" re-includes) ---

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out += ".*"
            i += 2
            if pattern.startswith("/", i):  # "**/" also matches nothing
                out = out[:-2] + "(.*/)?"
                i += 1
            continue
        out += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
        i += 1
    return re.compile(out + "$")


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.strip().strip("/")
        rules.append((negate, _pattern_regex(pattern)))
    return rules


def excluded(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: a path is excluded when the last pattern matching it, or one of its
    parent directories, is not a "!" pattern."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for negate, rx in rules:
        if any(rx.match(c) for c in candidates):
            result = not negate
    return result


# --- tests -------------------------------------------------------------------------------

def test_hadolint_passes() -> None:
    out = subprocess.run([dev_tool("hadolint"), "--config", str(REPO / ".hadolint.yaml"), str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_rule_turned_off_is_explained() -> None:
    lines = (REPO / ".hadolint.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*-\s*(DL\d+|SC\d+)\s*$", line)
        if m:
            assert i > 0 and lines[i - 1].strip().startswith("#"), f"{m.group(1)} is ignored without a comment"
            assert m.group(1) in "\n".join(lines[max(0, i - 12): i]), f"the comment above {m.group(1)} names it"


def test_every_copied_file_is_in_the_build_context() -> None:
    rules = dockerignore_rules()
    sources = [s for kind, args in instructions(DOCKERFILE.read_text()) if kind in ("COPY", "ADD")
               for s in copy_sources(args)]
    assert sources, "the Dockerfile copies nothing?"
    for src in sources:
        rel = src.strip("/")
        path = REPO / rel
        assert path.exists(), f"COPY {src}: not in the build context"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, f"COPY {src}: an empty directory"
        kept = [f for f in files if "__pycache__" not in f.parts and not f.name.endswith(".pyc")]
        assert kept, f"COPY {src}: every file is a bytecode cache"
        for f in kept:
            name = f.relative_to(REPO).as_posix()
            assert not excluded(name, rules), f"COPY {src}: {name} is excluded by .dockerignore"


def test_model_store_is_baked_whole() -> None:
    """The store's manifest lists every file: none of them may be left out of the context."""
    rules = dockerignore_rules()
    for name in ("model_store/artifacts/manifest.json", "model_store/artifacts/fmnist-cnn/policy.json",
                 "model_store/artifacts/fmnist-cnn/card.json", "model_store/artifacts/fmnist-cnn/model.pt",
                 "model_store/artifacts/fmnist-cnn/sweeps.png", "model_store/artifacts/archives/fmnist-cnn-torchscript.mar",
                 "model_store/config/config.properties"):
        assert not excluded(name, rules), f"{name} would be left out of the image"
    for name in (".venv/bin/python", "tests/test_k8s.py", ".git/HEAD", "var/torchserve/key_file.json",
                 "service/__pycache__/server.cpython-311.pyc", "k8s/base/kustomization.yaml"):
        assert excluded(name, rules), f"{name} would be sent to the build"


def test_dockerignore_matcher_follows_docker() -> None:
    rules = [(False, _pattern_regex("*")), (True, _pattern_regex("src")), (False, _pattern_regex("**/*.pyc"))]
    assert excluded("README.md", rules)
    assert not excluded("src/a.py", rules)
    assert excluded("src/a.pyc", rules) and excluded("src/x/a.pyc", rules)


def _canonical(name: str) -> str:
    """A distribution's name as pip compares it (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _lock_pins(lock: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    pins: dict[str, tuple[str, list[str]]] = {}
    text = lock.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        name, _, version = words[0].partition("==")
        assert version, f"{lock.name}: {words[0]} is not pinned with =="
        hashes = [w.split("=", 1)[1] for w in words[1:] if w.startswith("--hash=")]
        key = _canonical(name)
        assert key not in pins, f"{lock.name}: {name} is pinned twice"
        pins[key] = (version, hashes)
    return pins


def _pyproject_pins(*groups: str) -> list[tuple[str, str]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for group in groups:
        deps += project["optional-dependencies"][group]
    pins = []
    for dep in deps:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)\s*", dep)
        assert m, f"pyproject.toml: {dep!r} is not pinned with =="
        pins.append((_canonical(m.group(1)), m.group(2)))
    return pins


@pytest.mark.parametrize("lock", [LOCK, DEV_LOCK], ids=lambda p: p.name)
def test_lock_pins_every_package_with_a_hash(lock: Path) -> None:
    pins = _lock_pins(lock)
    assert pins
    for name, (_, hashes) in pins.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), name


@pytest.mark.parametrize(("lock", "groups"), [(LOCK, ()), (DEV_LOCK, ("dev",))], ids=["runtime", "dev"])
def test_lock_agrees_with_pyproject(lock: Path, groups: tuple[str, ...]) -> None:
    pins = _lock_pins(lock)
    for name, version in _pyproject_pins(*groups):
        assert name in pins, f"{name} is missing from {lock.name}: run scripts/lock.sh"
        assert pins[name][0] == version, \
            f"{name}: pyproject {version}, {lock.name} {pins[name][0]}: run scripts/lock.sh"


def test_dev_lock_holds_the_build_backend() -> None:
    """setup.sh installs the project with --no-build-isolation: the build backend comes from
    the lock (scripts/lock.sh resolves [build-system] requires), not from a fresh download."""
    pins = _lock_pins(DEV_LOCK)
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for req in requires:
        name = _canonical(re.match(r"[A-Za-z0-9_.\-]+", req).group(0))
        assert name in pins, f"{name} (build-system requires) is missing from requirements-dev.lock: run scripts/lock.sh"


def test_dev_lock_holds_the_runtime_lock() -> None:
    """The tests run on the image's versions: every runtime pin, same version, same file."""
    runtime, dev = _lock_pins(LOCK), _lock_pins(DEV_LOCK)
    for name, (version, hashes) in runtime.items():
        assert name in dev, f"{name} is in requirements.lock, not in requirements-dev.lock: run scripts/lock.sh"
        assert dev[name] == (version, hashes), \
            f"{name}: requirements.lock {version}, requirements-dev.lock {dev[name][0]}: run scripts/lock.sh"


def test_setup_installs_the_dev_lock_and_reinstalls_when_it_changes() -> None:
    lines = [ln.strip() for ln in (REPO / "scripts" / "setup.sh").read_text().splitlines()
             if not ln.strip().startswith("#")]
    installs = [shlex.split(ln) for ln in lines if "pip install" in ln]
    from_lock = [words for words in installs if "requirements-dev.lock" in words]
    assert from_lock, "setup.sh installs requirements-dev.lock"
    assert {"--require-hashes", "--no-deps"} <= set(from_lock[0])
    for words in installs:
        # Nothing installed resolves anything, and everything from an index is checked against
        # a lock's hash: pip itself too (a pinned version alone trusts whatever the index
        # serves under it); only the project, from this checkout, goes without.
        assert "--no-deps" in words, " ".join(words)
        assert "--require-hashes" in words or words[-2:] == ["-e", "."], " ".join(words)
    assert [w for words in installs for w in words if w.endswith(".lock")][:2] == [
        "requirements-pip.lock", "requirements-dev.lock"]  # pip first: it checks the rest
    pip_lock = (REPO / "requirements-pip.lock").read_text()
    assert re.search(r"^pip==[\w.]+ \\\n    --hash=sha256:[0-9a-f]{64}$", pip_lock, re.M), pip_lock
    stamp = next(ln for ln in lines if ln.startswith("stamp="))
    assert all(f in stamp for f in ("requirements-dev.lock", "requirements-pip.lock", "pyproject.toml"))


def test_image_is_built_from_the_lock_by_a_non_root_final_stage() -> None:
    text = DOCKERFILE.read_text()
    all_stages = stages(text)
    assert len(all_stages) >= 2, "multi-stage: the venv is built in a stage of its own"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert all(args.split()[0] == "${BASE_IMAGE}" for _, args in (s[0] for s in all_stages)), \
        "every stage starts from the BASE_IMAGE build argument"
    builder = " ".join(args for _, args in all_stages[0])
    for flag in ("--require-hashes", "--no-deps", "--only-binary :all:", "--no-cache-dir", "requirements.lock"):
        assert flag in builder, f"the builder installs with {flag}"
    final = all_stages[-1]
    final_text = " ".join(args for _, args in final)
    for tool in ("gcc", "build-essential", "pip install", "git ", "curl", "wget"):
        assert tool not in final_text, f"the final stage brings in {tool.strip()}"
    users = [args for kind, args in final if kind == "USER"]
    assert users and not re.match(r"(root|0)(:|$)", users[-1]), "the final stage runs as a non-root user"
    assert re.fullmatch(r"\d+:\d+", users[-1]), "USER is numeric, so runAsNonRoot can check it"
    entry = [args for kind, args in final if kind == "ENTRYPOINT"]
    assert entry and "docker-entrypoint.sh" in entry[-1]
    assert "openjdk-17-jre-headless" in final_text, "Java 17 for TorchServe"


def test_entrypoint_and_every_script_pass_shellcheck() -> None:
    scripts = [str(p) for p in sorted((REPO / "scripts").glob("*.sh"))] + [str(REPO / ".ci" / "run")]
    assert len(scripts) >= 7
    out = subprocess.run([dev_tool("shellcheck"), str(ENTRYPOINT), *scripts],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_entrypoint_refuses_a_policy_for_an_unknown_model(tmp_path: Path) -> None:
    """The gateway role builds its store from the baked one plus mounted policies; a policy
    naming no model of the store stops the container before the gateway starts."""
    store, policies, run = tmp_path / "store", tmp_path / "policies", tmp_path / "run"
    (store / "fmnist-cnn").mkdir(parents=True)
    policies.mkdir()
    run.mkdir()
    (policies / "no-such-model.json").write_text("{}")
    (run / "key_file.json").write_text('{"inference": {"key": "k"}}')
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "ROBUSTGATE_STORE": str(store),
           "TORCHSERVE_RUN_DIR": str(run), "ROBUSTGATE_POLICY_DIR": str(policies), "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(ENTRYPOINT), "gateway"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "names no model" in out.stderr


def test_entrypoint_takes_a_gzipped_policy_which_fits_a_configmap(tmp_path: Path) -> None:
    """A calibrated policy (about 1.5 MB) does not fit a ConfigMap (1 MiB): mounted as
    <model>.json.gz it is unpacked into the gateway's store in place of the baked one; beside
    <model>.json for the same model, or not gzip, the container stops with the reason. A
    stand-in python shows what the gateway would have read."""
    import gzip

    store, policies, run, bin_dir = (tmp_path / d for d in ("store", "policies", "run", "bin"))
    for d in (store / "fmnist-cnn", policies, run, bin_dir):
        d.mkdir(parents=True)
    (store / "fmnist-cnn" / "policy.json").write_text("baked")
    (store / "fmnist-cnn" / "model.onnx").write_text("weights")
    (run / "key_file.json").write_text('{"inference": {"key": "k"}}')
    (bin_dir / "python").write_text('#!/bin/sh\n[ "$2" = service ] || exit 0  # the key file\'s check passes\n'
                                    'cat "$4/fmnist-cnn/policy.json" "$4/fmnist-cnn/model.onnx" > "$RECORD"\n')
    (bin_dir / "python").chmod(0o755)
    record = tmp_path / "read"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ROBUSTGATE_STORE": str(store), "TORCHSERVE_RUN_DIR": str(run),
           "ROBUSTGATE_POLICY_DIR": str(policies), "TMPDIR": str(tmp_path), "RECORD": str(record)}

    def entrypoint() -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ENTRYPOINT), "gateway"], env=env, capture_output=True, text=True, timeout=60)

    (policies / "fmnist-cnn.json.gz").write_bytes(gzip.compress(b'{"mounted": true}'))
    out = entrypoint()
    assert out.returncode == 0, out.stderr
    assert record.read_text() == '{"mounted": true}weights'
    assert "model fmnist-cnn: gate policy from" in out.stderr
    record.unlink()
    (policies / "fmnist-cnn.json").write_text("{}")
    out = entrypoint()
    assert out.returncode == 1 and "two policies for model fmnist-cnn" in out.stderr and not record.exists()
    (policies / "fmnist-cnn.json").unlink()
    (policies / "fmnist-cnn.json.gz").write_text('{"not": "gzip"}')
    out = entrypoint()
    assert out.returncode == 1 and "is not a gzip file" in out.stderr and not record.exists()


def test_entrypoint_passes_torchserve_system_metrics_off(tmp_path: Path) -> None:
    """TORCHSERVE_SYSTEM_METRICS=off (the GPU overlay) reaches `serve start` as a flag; unset,
    none. A stand-in python records the command line (and fails: TorchServe did not start)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "$@" >> "$RECORD"\nexit 1\n')
    (bin_dir / "python").chmod(0o755)
    for value, flagged in ((None, False), ("on", False), ("off", True)):
        record = tmp_path / f"args-{value}"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), "TORCHSERVE_RUN_DIR": str(tmp_path)}
        if value is not None:
            env["TORCHSERVE_SYSTEM_METRICS"] = value
        out = subprocess.run(["bash", str(ENTRYPOINT), "torchserve", "--model", "m-onnx"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and "did not start" in out.stderr
        line = record.read_text()
        assert line.startswith("-m model_store.serve start") and line.rstrip().endswith("--model m-onnx")
        assert ("--no-system-metrics" in line) == flagged, line


def test_entrypoint_torchserve_refuses_to_start_on_the_cpu_where_a_gpu_is_required(tmp_path: Path) -> None:
    """TORCHSERVE_REQUIRE_GPU=true (the GPU overlay): without a usable CUDA device (a node
    whose runtime did not inject the driver) the container stops with a message naming the
    likely cause, instead of TorchServe serving on the CPU with its GPU held idle. Unset, or
    with CUDA usable, `serve start` runs. A stand-in python answers the CUDA question from
    $CUDA and records every command line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text('#!/bin/sh\necho "$@" >> "$RECORD"\n'
                                    'case "$2" in *cuda.is_available*) exit "$CUDA";; esac\nexit 1\n')
    (bin_dir / "python").chmod(0o755)
    for require, cuda, refused in ((None, "1", False), ("true", "1", True), ("true", "0", False)):
        record = tmp_path / f"args-{require}-{cuda}"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(record), "TORCHSERVE_RUN_DIR": str(tmp_path),
               "CUDA": cuda}
        if require is not None:
            env["TORCHSERVE_REQUIRE_GPU"] = require
        out = subprocess.run(["bash", str(ENTRYPOINT), "torchserve"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 1, out.stderr
        started = "model_store.serve start" in record.read_text()
        assert started is not refused, (require, cuda, out.stderr)
        assert ("no CUDA device is usable" in out.stderr) is refused, out.stderr
        assert ("did not start" in out.stderr) is started  # the stand-in's start fails


def test_entrypoint_gateway_leaves_on_sigterm_while_it_waits_for_the_key_file(tmp_path: Path) -> None:
    """As PID 1 a shell ignores a signal it has no handler for: a pod deleted while its
    gateway waited for TorchServe's key file sat out its grace period and was killed."""
    import signal
    import time

    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TORCHSERVE_RUN_DIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), "gateway"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        line = ""
        while "waiting for TorchServe's key file" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143  # its handler's exit, not killed by the signal (-15)
    finally:
        proc.kill()
        proc.wait()
