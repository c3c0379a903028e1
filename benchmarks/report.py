"""What every benchmark command shares: its common flags, how it leaves its report (the
figures as JSON, the Markdown rendered from them), and stores with an edited policy."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from model_store import archive

REPO = Path(__file__).resolve().parent.parent


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """``python -m <module>``'s parser with the flags every benchmark takes: --store, --model,
    --out, --smoke. The caller adds its own and parses."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, default=REPO / "model_store" / "artifacts")
    p.add_argument("--model", default="fmnist-cnn")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--smoke", action="store_true", help="tiny budgets (seconds), for the test suite")
    return p


def run_facts(command: str) -> dict[str, str]:
    """When and where a benchmark ran (date, machine, and its GPU where torch sees one), and
    ``command``, which reproduces it."""
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    gpu = gpu_name()
    return {"date": dt.date.today().isoformat(),
            "machine": machine + (f", GPU: {gpu}" if gpu else ""),
            "command": command}


def gpu_name() -> str | None:
    """The name of the GPU torch would run a model on (CUDA device 0), or None without one."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def short_commit(rev: str) -> str:
    """Git revision ``rev`` as its short commit hash, for argparse's ``type``: a report that
    names "HEAD" or a branch names another commit once the repository moves on. A revision
    git cannot resolve is the argument's error."""
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "--verify", "--end-of-options",
                               f"{rev}^{{commit}}"], check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        raise argparse.ArgumentTypeError(f"cannot resolve git revision {rev!r} (a git checkout with it is "
                                         f"needed): {str(detail).strip()}") from None


def invocation(module: str, argv: list[str] | None) -> str:
    """The command line this run was given: ``python -m <module>`` and its arguments
    (``argv``, or this process's when None)."""
    return " ".join([f"python -m {module}", *(sys.argv[1:] if argv is None else argv)])


def report_stem(module: str, smoke: bool) -> str:
    """The file stem of ``module``'s report: its last name, with ``-smoke`` for a smoke run."""
    name = module.rsplit(".", 1)[-1]
    return f"{name}-smoke" if smoke else name


def study_command(module: str, args: argparse.Namespace) -> str:
    """The command that reproduces an in-process study run with ``--clean`` and
    ``--attack-images`` (its other flags at their defaults)."""
    return f"python -m {module}" + (
        " --smoke" if args.smoke else f" --clean {args.clean} --attack-images {args.attack_images}")


def write_report(out: Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """Write ``<out>/<stem>.json`` and ``<out>/<stem>.md`` (creating ``out``), and print the
    Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
    print(markdown)


def store_with_policy(src: Path, dst: Path, model: str, edit: Callable[[dict], None]) -> Path:
    """A store at ``dst`` holding what the gateway (and calibration) read of ``model``: its
    card and weights from ``src``, and its policy as ``edit`` leaves the JSON of ``src``'s.
    TorchServe keeps serving the archives of ``src``."""
    archive.verify_manifest(src, only=[f"{model}/card.json", f"{model}/model.pt"])
    (dst / model).mkdir(parents=True)
    for f in ("card.json", "model.pt"):
        shutil.copy(src / model / f, dst / model / f)
    pol = json.loads((src / model / "policy.json").read_text())
    edit(pol)
    (dst / model / "policy.json").write_text(json.dumps(pol))
    archive.write_manifest(dst)  # the gateway verifies what it reads of a store
    return dst
