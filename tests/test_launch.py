"""launch/: the dry-run plans with their values resolved, the scripts' syntax, the Ray cluster YAML as
``ray up`` validates it, and a real 2-process CPU training through launch/torchrun.sh."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from openbook.cli import main
from openbook.errors import OpenbookError
from openbook.launch_plan import LaunchRequest, plan

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "default.yaml")


def dry_run(capsys, tmp_path, monkeypatch, *args: str) -> str:
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "--config", CONFIG, "--dry-run", *args]) == 0
    assert not any(tmp_path.iterdir()), "a dry run must not write or start anything"
    return capsys.readouterr().out


def sbatch_script(out: str) -> str:
    return re.search(r"# --- \S+slurm\.sbatch ---\n(.*?)# --- end ---", out, re.S).group(1)


def test_slurm_dry_run_renders_the_sbatch_script(capsys, tmp_path, monkeypatch):
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "slurm", "--nodes", "2", "--gpus-per-node", "4",
                  "--partition", "gpu", "--set", "train.max_steps=500")
    script = sbatch_script(out)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --job-name=openbook-default"):
        assert line in script.splitlines(), line
    assert not re.search(r"\{\{\w+\}\}", script), "unfilled placeholder"
    assert '"$RAY" start --head' in script and 'refresh.address="$ray_address"' in script
    for line in ("#SBATCH --requeue", "#SBATCH --signal=B:USR1@300"):  # preemption: checkpoint, exit 75, requeue
        assert line in script.splitlines(), line
    assert "--resume auto" in script and "(( rc == 75 ))" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    train = next(line.strip() for line in script.splitlines() if line.strip().startswith('srun --overlap "$OPENBOOK" train'))
    for arg in (f"--config {CONFIG}", "train.devices=4", "train.num_nodes=2", "train.accelerator=gpu",
                "train.strategy=ddp", "train.max_steps=500"):
        assert arg in train, arg
    assert re.search(r"^\[here\] sbatch \S+/launch/slurm\.sbatch$", out, re.M), out
    (tmp_path / "s.sbatch").write_text(script)
    for path in (tmp_path / "s.sbatch", ROOT / "launch" / "slurm.sbatch"):  # rendered and template
        proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_slurm_gives_the_refresh_pool_the_gpus_the_trainers_leave(capsys, tmp_path, monkeypatch):
    """--procs-per-node below --gpus-per-node: trainer rank r takes GPU r, each node's Ray offers the rest (cut
    from the step's own CUDA_VISIBLE_DEVICES, counted by --num-gpus); GPU actors with no GPU left is a problem."""
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "slurm", "--gpus-per-node", "4", "--procs-per-node",
                  "3", "--set", "refresh.gpus_per_worker=1")
    script = sbatch_script(out)
    assert "PROBLEM" not in out and "#SBATCH --ntasks-per-node=3" in script and "#SBATCH --gpus-per-node=4" in script
    assert "TRAIN_GPUS=3 " in script and "RAY_GPUS=1 " in script and script.count('--num-gpus="$RAY_GPUS"') == 2
    node = re.search(r"^ray_node=\((.*)\)$", script, re.M).group(1)

    def pool_sees(train: int, pool: int, visible: str) -> str:  # what a Ray node started by the script sees
        probe = (f"export TRAIN_GPUS={train} RAY_GPUS={pool} CUDA_VISIBLE_DEVICES={visible}; ray_node=({node}); "
                 "\"${ray_node[@]}\" bash -c 'echo \"[$CUDA_VISIBLE_DEVICES]\"'")
        return subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.strip()

    assert pool_sees(3, 1, "4,5,6,7") == "[7]"  # the 4th of the job's GPUs, whatever their ids
    assert pool_sees(2, 2, "0,1,2,3") == "[2,3]"
    assert pool_sees(4, 0, "0,1,2,3") == "[]"  # no GPU for the pool: its actors see none
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "slurm", "--gpus-per-node", "4",
                  "--set", "refresh.gpus_per_worker=1")
    assert "PROBLEM: refresh.gpus_per_worker=1 but the trainers take every GPU" in out


def test_torchrun_dry_run_gives_each_node_its_line(capsys, tmp_path, monkeypatch):
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "torchrun", "--nodes", "2",
                  "--gpus-per-node", "4", "--master-addr", "10.1.2.3")
    lines = [line for line in out.splitlines() if "torchrun.sh" in line]
    assert [line.split("]")[0] for line in lines] == ["[node 0", "[node 1"]
    for rank, line in enumerate(lines):
        for arg in ("--nnodes 2", "--nproc_per_node 4", f"--node_rank {rank}", "--master_addr 10.1.2.3",
                    f"--config {CONFIG}", "train.accelerator=gpu", '"refresh.address=10.1.2.3:6379"'):
            assert arg in line, (arg, line)
    # every GPU is a trainer's: the Ray nodes of the refresh pool offer none
    assert "[node 0] CUDA_VISIBLE_DEVICES= ray start --head --port=6379 --num-gpus=0" in out
    assert "[node 1] CUDA_VISIBLE_DEVICES= ray start --address=10.1.2.3:6379 --num-gpus=0" in out


def test_ray_dry_run_sizes_the_cluster_and_the_workers(capsys, tmp_path, monkeypatch):
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "ray", "--nodes", "3", "--gpus-per-node", "2")
    up, run = [line for line in out.splitlines() if line.startswith("[here]")]
    assert "ray up -y" in up and "--min-workers 2 --max-workers 2" in up and "ray_cluster.yaml" in up
    assert "ray exec" in run and "launch/ray_train.py" in run
    assert f"--config {CONFIG}" in run and "--num-workers 6" in run and "--use-gpu" in run


def test_launch_refuses_bad_requests_in_one_line():
    with pytest.raises(OpenbookError, match="one process per GPU at most"):
        LaunchRequest(config=CONFIG, target="slurm", gpus_per_node=4, procs_per_node=6)
    with pytest.raises(OpenbookError, match="--gpus-per-node / --nodes"):
        LaunchRequest(config=CONFIG, target="torchrun", overrides=("train.devices=8",))
    with pytest.raises(OpenbookError, match="unknown key"):  # the recipe is checked before anything runs
        plan(LaunchRequest(config=CONFIG, target="slurm", overrides=("train.nope=1",)))


def test_ray_cluster_yaml_passes_ray_up_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(yaml.safe_load((ROOT / "launch" / "ray_cluster.yaml").read_text()))
    validate_config(cfg)  # raises on a schema violation: what `ray up` checks first
    assert cfg["provider"]["type"] == "local" and cfg["max_workers"] == 1


def test_torchrun_script_checks_its_arguments():
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "torchrun.sh")]).returncode == 0
    proc = subprocess.run(["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc_per_node", "2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--config is required" in proc.stderr


@pytest.mark.slow
def test_torchrun_script_trains_two_cpu_processes(tmp_path):
    """launch/torchrun.sh --nproc_per_node 2: two gloo processes under torchrun (TorchElasticEnvironment).
    Refresh is off to keep it near 40 s here; torchrun with the Ray refresher was checked by hand."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = ["train.accelerator=cpu", "refresh.enabled=false", "train.max_steps=6",
            "data.world.num_passages=300", "retriever.encoder.num_layers=1"]
    cmd = ["bash", str(ROOT / "launch" / "torchrun.sh"), "--nproc_per_node", "2", "--master_port", str(port),
           "--config", "configs/default.yaml", *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr  # Lightning saw a world of two torchrun processes
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 6 and proc.stdout.count('"steps"') == 1  # rank 0 alone reports
    run_dir = tmp_path / "runs" / "default"
    h0, h1 = (json.loads((run_dir / f"refresh_history_rank{r}.json").read_text()) for r in (0, 1))
    assert len(h0["versions"]) == len(h1["versions"]) == 6


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="a real SLURM submit host")
def test_launch_without_the_tools_fails_in_one_line_and_writes_nothing(tmp_path):
    proc = subprocess.run([str(Path(sys.executable).parent / "openbook"), "launch", "--config", CONFIG,
                           "--target", "slurm", "--nodes", "2"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "'sbatch' not found on PATH" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_a_multi_node_plan_refuses_a_run_dir_on_a_local_filesystem(tmp_path, capsys, monkeypatch):
    """Several nodes read the token cache and write/load shards by path: a local run dir is a PROBLEM line in
    the plan and a real launch refuses it in one line (unless --assume-shared-fs); one node is fine."""
    from openbook.launch_plan import LOCAL_FILESYSTEMS, filesystem_type, run_plan

    mounts = tmp_path / "mounts"
    mounts.write_text(f"server:/export {tmp_path} nfs4 rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"
                      f"tmpfs {tmp_path}/scratch tmpfs rw 0 0\n")
    (tmp_path / "scratch").mkdir()
    assert filesystem_type(tmp_path / "runs" / "x", str(mounts)) == "nfs4"  # the longest mount wins
    assert filesystem_type(tmp_path / "scratch" / "y", str(mounts)) == "tmpfs"
    assert filesystem_type("/usr", str(mounts)) == "ext4"
    local = Path("/dev/shm")
    if filesystem_type(local) not in LOCAL_FILESYSTEMS:
        pytest.skip("no local tmpfs at /dev/shm here")
    sets = (f"run_dir={local}/openbook-launch-test", f"data.cache_dir={local}/openbook-launch-cache")
    req = LaunchRequest(config=CONFIG, target="torchrun", nodes=2, overrides=sets)
    p = plan(req)
    assert len(p.problems) == 3 and "run_dir /dev/shm/openbook-launch-test is on a local filesystem (tmpfs)" in \
        p.problems[0]
    assert "# PROBLEM: run_dir" in p.render()
    monkeypatch.setattr("shutil.which", lambda tool: "/usr/bin/" + tool)  # the tools "exist": the fs check speaks
    with pytest.raises(OpenbookError, match="launch: run_dir .* shared filesystem"):
        run_plan(p)
    assert not plan(LaunchRequest(config=CONFIG, target="torchrun", nodes=2, overrides=sets,
                                  assume_shared_fs=True)).problems
    assert not plan(LaunchRequest(config=CONFIG, target="torchrun", nodes=1, overrides=sets)).problems
    assert not local.joinpath("openbook-launch-test").exists()


def test_ray_train_refuses_gpu_actors_the_cluster_cannot_seat():
    """Under Ray Train each trainer worker holds a GPU for the whole run: GPU encoder actors need GPUs beyond
    those, else the pool never starts; ray_train.py says so in one line before starting anything."""
    import importlib.util

    from openbook.recipe import load_recipe

    spec = importlib.util.spec_from_file_location("ray_train", ROOT / "launch" / "ray_train.py")
    ray_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ray_train)
    gpu_pool = load_recipe(CONFIG, ["refresh.gpus_per_worker=1", "refresh.num_workers=2"])
    assert "4 trainer worker GPUs + 2 for the refresh pool" in ray_train.gpu_shortage(gpu_pool, 4, 4)
    assert ray_train.gpu_shortage(gpu_pool, 4, 6) is None
    assert ray_train.gpu_shortage(load_recipe(CONFIG, []), 4, 4) is None  # CPU actors
    # the same for CPUs (on a 2-core machine two workers of 1 CPU left the actor none: a 10-minute wait)
    pool = load_recipe(CONFIG, ["refresh.num_workers=1", "refresh.cpus_per_worker=1"])
    assert "2 trainer workers x 1 CPUs + 1 for the refresh pool" in ray_train.cpu_shortage(pool, 2, 1.0, 2)
    assert ray_train.cpu_shortage(pool, 2, 0.5, 2) is None
    assert ray_train.cpu_shortage(load_recipe(CONFIG, ["refresh.enabled=false"]), 2, 1.0, 2) is None


def test_a_time_limit_shorter_than_the_warning_is_a_problem(capsys, tmp_path, monkeypatch):
    """SLURM sends --signal=B:USR1@N up to a minute early: a limit within a minute of the warning would stop every
    attempt before it trains (and requeue it, again and again)."""
    from openbook.launch_plan import slurm_seconds

    assert [slurm_seconds(t) for t in ("30", "5:00", "1:00:00", "2-00:00:00", "1-2", "x")] == [
        1800, 300, 3600, 172800, 93600, None]
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "slurm", "--time", "5:00")
    assert "PROBLEM: --signal-seconds 300 within a minute of --time 5:00" in out
    out = dry_run(capsys, tmp_path, monkeypatch, "--target", "slurm", "--time", "10:00", "--signal-seconds", "120")
    assert "PROBLEM" not in out
