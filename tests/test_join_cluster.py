"""Joining a running Ray cluster (``refresh.address``), as launch/slurm.sbatch and launch/README do: the
cluster was started elsewhere (another working directory, token authentication on, as Ray turns it on for a
new cluster), the trainer joins it by its explicit address from its own directory with relative paths."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_cli import OPENBOOK, ROOT

HEAD = ("import ray, sys; ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False, "
        "object_store_memory=100 * 1024**2); print(ray.get_runtime_context().gcs_address, flush=True); "
        "sys.stdin.read()")  # up until the test closes our stdin


def env_without_auth_mode() -> dict:
    """The trainer's environment as a job script has it: RAY_AUTH_MODE unset (this session's Ray sets it here)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}


@pytest.mark.slow
def test_a_trainer_joins_a_cluster_started_elsewhere_by_its_address_with_relative_paths(tmp_path):
    head_dir, job = tmp_path / "head", tmp_path / "job"
    head_dir.mkdir()
    shutil.copytree(ROOT / "configs", job / "configs")
    head = subprocess.Popen([sys.executable, "-c", HEAD], cwd=head_dir, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env_without_auth_mode())
    try:
        address = head.stdout.readline().strip()
        assert ":" in address, "the head did not start"
        sets = ["train.max_steps=6", "data.world.num_passages=300", "refresh.schedule=3", "refresh.swap_lag=1",
                "run_dir=runs/joined", "data.cache_dir=cache", f"refresh.address={address}",
                "refresh.start_timeout_seconds=600"]
        proc = train(job, sets, env_without_auth_mode())
        # as under `ray job submit`: no refresh.address, RAY_ADDRESS in the environment
        by_env = train(job, [s.replace("runs/joined", "runs/by_env") for s in sets if "address" not in s],
                       {**env_without_auth_mode(), "RAY_ADDRESS": address})
    finally:
        head.stdin.close()
        head.wait(timeout=120)
    for name, run in (("joined", proc), ("by_env", by_env)):
        assert run.returncode == 0, run.stderr[-3000:]
        summary = json.loads(run.stdout[run.stdout.index("{"):])
        assert summary["refreshes_published"] >= 1 and summary["refresh_failures"] == 0, summary
        assert "built by the actor pool" in run.stderr
        # the actors, running in the head's directory, wrote into the trainer's relative run_dir
        versions = sorted(p.name for p in (job / "runs" / name / "snapshots").glob("v*"))
        assert versions[-1] == f"v{summary['index_version']:06d}" and summary["index_version"] >= 2, versions
    assert f"joining the Ray cluster at {address} (RAY_ADDRESS" in by_env.stderr
    assert "joining the Ray cluster" not in proc.stderr
    assert not list(head_dir.iterdir())


def train(job: Path, sets: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([OPENBOOK, "train", "--config", "configs/default.yaml", "--quiet",
                           *[a for s in sets for a in ("--set", s)]], cwd=job, capture_output=True, text=True,
                          timeout=900, env=env)


def test_ray_address_is_joined_unless_an_address_or_local_is_set(monkeypatch):
    from openbook.refresher.cluster import cluster_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(None) == (None, "refresh.address")  # a local Ray of our own
    assert cluster_address("auto") == ("auto", "refresh.address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(None) == ("10.0.0.1:6379", "RAY_ADDRESS")
    assert cluster_address("local") == (None, "refresh.address")
    assert cluster_address("10.0.0.2:6379") == ("10.0.0.2:6379", "refresh.address")


def test_an_address_where_nothing_listens_is_one_line_at_once(monkeypatch):
    """Ray itself retries a dead address for many minutes before it gives up."""
    from openbook.errors import OpenbookError
    from openbook.refresher.cluster import join_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # leave this process's Ray settings alone
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(OpenbookError, match=rf"RAY_ADDRESS '127.0.0.1:{port}': nothing answers there") as e:
        join_ray(f"127.0.0.1:{port}", "RAY_ADDRESS")
    assert "\n" not in str(e.value)
