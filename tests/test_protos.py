"""The committed stubs are what scripts/gen_protos.sh generates, and the API is buf-lint clean."""

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _generated(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in (root / "proto").rglob("*")
            if p.is_file() and p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts}


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    shutil.copytree(REPO / "proto", tmp_path / "proto", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "gen_protos.sh", tmp_path / "scripts")
    for p in _generated(tmp_path).values():  # regenerate from the .proto files alone
        if not p.name == "__init__.py":
            p.unlink()
    subprocess.run(["bash", str(tmp_path / "scripts" / "gen_protos.sh")], check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    fresh, committed = _generated(tmp_path), _generated(REPO)
    assert fresh.keys() == committed.keys()
    stale = [k for k in fresh if not filecmp.cmp(fresh[k], committed[k], shallow=False)]
    assert not stale, f"stubs differ from the .proto files: run scripts/gen_protos.sh ({stale})"


def test_buf_lint_is_clean() -> None:
    buf = Path(sys.executable).parent / "buf"
    result = subprocess.run([str(buf), "lint"], cwd=REPO / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
