"""The wheel runs outside a checkout (issue 18): recipes and launch templates ship as package data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_wheel_installs_into_a_fresh_venv_and_trains_the_default_recipe(tmp_path):
    # Build offline (no build isolation: setuptools and wheel come from this environment) from a copy of
    # what an sdist holds, so the checkout gets no build/ directory.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("openbook", "configs", "launch"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
          str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("openbook-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {Path(n).name for n in names if "/_bundled/" in n}
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} <= shipped
    assert {"slurm.sbatch", "ray_cluster.yaml", "ray_train.py", "torchrun.sh"} <= shipped

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)
    # The dependencies (torch, ray, ... 2 GB) come from this environment's site-packages, added as a plain
    # path: its .pth files (this checkout's editable install among them) are not processed from there.
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "openbook_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = _run([str(py), "-c", "import openbook; print(openbook.__file__)"], cwd=empty, env=env).stdout
    assert str(site) in where and str(ROOT) not in where, where
    out = _run([str(venv / "bin" / "openbook"), "train", "--config", "default", "--quiet", "--set",
                "train.max_steps=5"], cwd=empty, env=env).stdout
    assert json.loads(out[out.index("{"):])["steps"] == 5, out[-1000:]
    assert (empty / "runs" / "default" / "retriever.pt").is_file()
    plan = _run([str(venv / "bin" / "openbook"), "launch", "--config", "configs/default.yaml", "--target",
                 "slurm", "--nodes", "1", "--gpus-per-node", "1", "--dry-run"], cwd=empty, env=env).stdout
    assert "sbatch" in plan
