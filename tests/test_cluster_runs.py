"""Cluster-grade runs (issue 19): one writer per run directory, resume that keeps its settings, preemption."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from openbook.cli import main
from openbook.trainer.rundir import LOCK_FILE, RunLock, process_start
from tests.helpers import small_disks_work
from tests.test_cli import OPENBOOK

HOLD = "import sys, time; from openbook.trainer.rundir import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def recipe(tmp_path: Path, cache: Path | None = None, **train) -> Path:
    """A small default-style recipe file (tiny encoder, 300 passages, deterministic refresh every 4 steps)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = {"run_dir": str(tmp_path / "run"),
            "data": {"world": {"num_passages": 300}, "cache_dir": str(cache or tmp_path / "c")},
            "retriever": {"encoder": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                          "doc_max_length": 32},
            "train": {"max_steps": 8, "batch_size": 8, "negatives": 4, "num_threads": 1, "val_questions": 20, **train},
            "encode": {"batch_size": 64}, "index": {"shards": 2},
            "refresh": {"schedule": "4", "swap_lag": 2, "start_timeout_seconds": 600}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([OPENBOOK, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_trainer_on_a_held_run_dir_exits_in_one_line(tmp_path, capsys, caplog):
    path = recipe(tmp_path)
    other = holder(tmp_path / "run")
    try:
        assert main(["train", "--config", str(path), "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("openbook: error:") and "in use by another trainer" in err and "\n" not in err, err
        assert f"pid {other.pid}" in err
    finally:
        other.kill()
        other.wait()
    # the holder is gone (SIGKILL: its lock file stays): the next writer takes the stale lock over, with a warning
    assert (tmp_path / "run" / LOCK_FILE).is_file()
    with RunLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert any("taking over a stale lock" in r.getMessage() and str(other.pid) in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released


@pytest.mark.skipif(not small_disks_work(), reason="cannot mount a tmpfs in a user namespace here (unshare -Urm)")
def test_a_read_only_run_dir_is_one_line(tmp_path):
    """A run_dir on a read-only filesystem (a real read-only tmpfs, mounted in a user namespace of the test's own):
    one line naming the directory, exit 2, before anything starts (it was an OSError traceback from the lock)."""
    path, ro = recipe(tmp_path), tmp_path / "ro"
    ro.mkdir()
    cmd = f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && exec {OPENBOOK} train --config {path} --set run_dir={ro}/run"
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", cmd], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (f"openbook: error: {ro}/run: the run directory cannot be written "
                                                    "(Read-only file system); give a writable run_dir")
    assert "Traceback" not in proc.stderr


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """A lock naming a live pid with another start time (the pid was reused) is stale; with the right one it holds."""
    run = tmp_path / "run"
    run.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getppid(), "job": None, "restart": None}
    (run / LOCK_FILE).write_text(json.dumps({**me, "started": process_start(os.getppid()) - 1000}))
    RunLock(run).acquire().release()
    (run / LOCK_FILE).write_text(json.dumps({**me, "started": process_start(os.getppid())}))
    with pytest.raises(Exception, match="in use by another trainer"):
        RunLock(run).acquire()


def test_a_requeued_slurm_job_takes_its_own_lock_over(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    lock = {"host": "node-that-went-away", "pid": 1, "started": time.time(), "job": "4242", "restart": "0"}
    (run / LOCK_FILE).write_text(json.dumps(lock))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(Exception, match="in use by another trainer"):  # the same incarnation, on another host
        RunLock(run).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    RunLock(run).acquire().release()


@pytest.mark.slow
def test_results_are_kept_unless_resume_or_overwrite_and_resume_keeps_its_settings(tmp_path, capsys):
    """A run started with --set train.checkpoint_every_n_steps=4, resumed with the plain recipe and --resume last:
    the checkpoint's settings go on (checkpoints after the resume), the recipe's other values are named as not
    applied; a shape or data-order change is refused naming both values; --overwrite starts afresh."""
    path = recipe(tmp_path)
    first = cli("train", "--config", str(path), "--quiet", "--set", "train.checkpoint_every_n_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    # refusals come before anything is built: in this process, one line each
    assert main(["train", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a previous run's results" in err and "--overwrite" in err and "\n" not in err, err
    for change, field in (("train.batch_size=4", "train.batch_size"),
                          ("retriever.encoder.hidden_size=64", "retriever.encoder.hidden_size")):
        assert main(["train", "--config", str(path), "--resume", "last", "--quiet", "--set", change]) == 2
        err = capsys.readouterr().err.strip()
        assert field in err and "the checkpoint's run used" in err and "\n" not in err, err
    resumed = cli("train", "--config", str(path), "--resume", "last", "--quiet", "--set", "train.max_steps=12",
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "train.checkpoint_every_n_steps=0 (checkpoint: 4)" in resumed.stderr  # --config's value, not applied
    steps = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert steps == ["step-00000004", "step-00000008", "step-00000012"], steps
    assert "StepCheckpoint" not in resumed.stderr  # Lightning's "callback state missing" warning is gone
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["steps"] == 12
    fresh = cli("train", "--config", str(path), "--quiet", "--overwrite", cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # the old run's checkpoints went with it


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by step from every TensorBoard event file of the run (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for f in sorted((run_dir / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars("train/loss")})
    return out


def versions(run_dir: Path) -> list:
    return json.loads((run_dir / "refresh_history_rank0.json").read_text())["versions"]


@pytest.mark.slow
def test_a_preempted_run_checkpoints_exits_75_and_resumes_as_if_uninterrupted(tmp_path):
    """A real `openbook train` gets SIGTERM once its step-4 checkpoint exists (it is then somewhere in a
    10,000-step run): it finishes the step, writes a checkpoint, releases its lock and exits 75. Resumed with
    --resume last to 6 steps past the preemption, every step's loss and index version equal those of a run that
    was never interrupted (the deterministic swap: whichever step the signal came at, the plan is the config's)."""
    path = recipe(tmp_path, max_steps=10000, checkpoint_every_n_steps=4)
    run, out_file, err_file = tmp_path / "run", tmp_path / "out.txt", tmp_path / "err.txt"
    with out_file.open("w") as out_f, err_file.open("w") as err_f:  # files: a full pipe would stall the trainer
        proc = subprocess.Popen([OPENBOOK, "train", "--config", str(path), "--quiet"], cwd=tmp_path, stdout=out_f,
                                stderr=err_f, text=True)
        while not (run / "checkpoints" / "step-00000004").is_dir():
            assert proc.poll() is None, err_file.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=600)
    out, err = out_file.read_text(), err_file.read_text()
    assert proc.returncode == 75, err[-3000:]
    summary = json.loads(out[out.index("{"):])
    stopped = summary["steps"]
    assert summary["preempted"] and stopped >= 4 and summary["checkpoint"].endswith(f"step-{stopped:08d}")
    assert (run / "checkpoints" / f"step-{stopped:08d}" / "model.ckpt").is_file()
    assert not (run / LOCK_FILE).exists() and not list((run / "checkpoints").glob(".tmp-*"))
    assert "received SIGTERM" in err
    before = versions(run)
    end = stopped + 6
    assert summary["resume"] == f"openbook train --resume {run}"  # the hint names the run (no --config needed)
    resumed = cli(*shlex.split(summary["resume"])[1:], "--quiet", "--set", f"train.max_steps={end}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = versions(run)
    ref_path = recipe(tmp_path / "ref", tmp_path / "c", max_steps=end, checkpoint_every_n_steps=4)
    ref = cli("train", "--config", str(ref_path), "--quiet", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert after[:len(before)] == before  # the history goes on across the resume (issue 33)
    assert after == versions(tmp_path / "ref" / "run")
    got, want = losses(run), losses(tmp_path / "ref" / "run")
    assert sorted(got) == sorted(want) and len(want) == end
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), step


def raylets() -> set[int]:
    return {int(p) for p in subprocess.run(["pgrep", "-f", "raylet"], capture_output=True, text=True).stdout.split()}


@pytest.mark.parametrize("sig, after", [(signal.SIGUSR1, " openbook."), (signal.SIGTERM, "TPU available")])
def test_a_stop_signal_during_start_up_exits_75_at_once_and_leaves_no_lock(tmp_path, sig, after):
    """A stop signal while the run starts up, as a requeued SLURM job that the scheduler warns (USR1, while the data
    is prepared) or stops (TERM, while Ray starts: Ray's own handler made it exit 15 with no message) before it
    trains: one line, exit 75 (the sbatch script requeues on it; USR1's default action killed it with 138 and
    failed the job), no lock left, nothing checkpointed, no Ray left running. The first index takes >= 5 s (the
    encoder actor is slowed), so the signal lands before training."""
    path = recipe(tmp_path, max_steps=10000)
    before = raylets()
    proc = subprocess.Popen([OPENBOOK, "train", "--config", str(path), "--quiet", "--set",
                             "refresh.inject_delay_seconds=5"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the first log line of openbook comes after its handlers are up
        seen.append(line)
        if after in line:
            break
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 75, err[-3000:]
    name = signal.Signals(sig).name
    assert f"openbook: {name} outside the training loop: stopped, nothing new to checkpoint; exit 75" in err
    assert "Traceback" not in err and "steps" not in out
    assert not (tmp_path / "run" / LOCK_FILE).exists() and not (tmp_path / "run" / "checkpoints").exists()
    deadline = time.time() + 60
    while raylets() - before and time.time() < deadline:  # Ray's own shutdown at exit, not instant
        time.sleep(0.5)
    assert not raylets() - before


@pytest.mark.parametrize("when", ["spawning", "ray-starting"])
def test_ctrl_c_twice_during_start_up_is_a_clean_stop(tmp_path, when):
    """Ctrl-C twice (SIGINT to the whole process group, as a terminal sends it) while the child process that hosts
    Ray is being spawned (right after Lightning's first lines), or once Ray's first process runs under it: it was a
    segmentation fault (exit 139) inside Ray's driver. Now Lightning's one line or openbook's, no traceback from
    either process, no lock, no Ray left."""
    import threading

    path = recipe(tmp_path, max_steps=10000)
    before = raylets()
    proc = subprocess.Popen([OPENBOOK, "train", "--config", str(path), "--quiet", "--set",
                             "refresh.inject_delay_seconds=5"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # never blocks the test
    reader.start()
    deadline = time.time() + 300

    def ready() -> bool:
        if when == "spawning":
            return any("TPU available" in line for line in list(lines))
        return any("gcs_server" in cmd for cmd in descendants(proc.pid).values())

    while not ready():
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.05)
    for _ in range(2):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.3)
    proc.wait(timeout=300)
    reader.join(30)
    out, err = proc.stdout.read(), "".join(lines)
    assert proc.returncode in (1, 130), (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "Segmentation" not in err and "steps" not in out, err[-3000:]
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    deadline = time.time() + 60
    while raylets() - before and time.time() < deadline:
        time.sleep(0.5)
    assert not raylets() - before


def descendants(pid: int) -> dict[int, str]:
    """The processes under ``pid`` (any depth): pid -> command line, read from /proc."""
    parent, cmd = {}, {}
    for d in Path("/proc").iterdir():
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ValueError, OSError, IndexError):
            continue
    out, todo = {}, [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out.update({c: cmd[c] for c in kids})
        todo += kids
    return out


@pytest.mark.slow
@pytest.mark.parametrize("on_lost", ["checkpoint", "continue"])
def test_a_raylet_killed_under_the_trainer_checkpoints_and_exits_75_or_goes_on(tmp_path, on_lost):
    """The Ray node under a running `openbook train` dies (its raylet SIGKILLed once the first refresh is
    published). Before, Ray ended the trainer (exit 1, Ray's state dump, no checkpoint, the lock left). Now the
    trainer (Ray's driver runs in a child process of its own) says so in one line and, by refresh.on_ray_lost,
    checkpoints and exits 75 (and the resume starts a new Ray) or trains on with the index it has."""
    steps = 10000 if on_lost == "checkpoint" else 40
    path = recipe(tmp_path, max_steps=steps, checkpoint_every_n_steps=1000)
    run, out_file, err_file = tmp_path / "run", tmp_path / "out.txt", tmp_path / "err.txt"
    with out_file.open("w") as out_f, err_file.open("w") as err_f:
        proc = subprocess.Popen([OPENBOOK, "train", "--config", str(path), "--quiet", "--set",
                                 f"refresh.on_ray_lost={on_lost}"], cwd=tmp_path, stdout=out_f, stderr=err_f, text=True)
        while not (run / "snapshots" / "v000002").is_dir():
            assert proc.poll() is None, err_file.read_text()[-3000:]
            time.sleep(0.2)
        (raylet,) = [p for p, cmd in descendants(proc.pid).items() if "raylet/raylet" in cmd]
        os.kill(raylet, signal.SIGKILL)
        proc.wait(timeout=600)
    out, err = out_file.read_text(), err_file.read_text()
    assert "Traceback" not in err, err[-3000:]
    assert err.count("the Ray node under this trainer is gone at step") == 1, err[-3000:]
    summary = json.loads(out[out.index("{"):])
    assert not (run / LOCK_FILE).exists()
    if on_lost == "continue":
        assert proc.returncode == 0 and summary["steps"] == steps and summary["refresh_failures"] >= 1, summary
        assert "training goes on with index" in err
        return
    assert proc.returncode == 75, err[-3000:]
    stopped = summary["steps"]
    assert summary["reason"] == "the Ray node under this trainer is gone" and summary["checkpoint_written"], summary
    assert (run / "checkpoints" / f"step-{stopped:08d}" / "model.ckpt").is_file()
    assert f"preempted at step {stopped} (the Ray node under this trainer is gone), exit 75" in err
    resumed = cli(*shlex.split(summary["resume"])[1:], "--quiet", "--set", f"train.max_steps={stopped + 8}",
                  cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["steps"] == stopped + 8


@pytest.mark.slow
def test_a_two_process_ddp_run_stops_on_every_rank_after_the_same_step(tmp_path):
    """2-process DDP (gloo): SIGUSR1 (SLURM's ``--signal=USR1@90``; the single-process test sends SIGTERM) reaches
    rank 0 only; the ranks agree at the next step boundary, both stop after the same step, the checkpoint is
    written once and every process exits 75."""
    from tests.test_cli import DDP

    path = recipe(tmp_path, max_steps=10000, checkpoint_every_n_steps=4)
    run, err_file = tmp_path / "run", tmp_path / "err.txt"
    with err_file.open("w") as err_f:
        proc = subprocess.Popen([OPENBOOK, "train", "--config", str(path), "--quiet",
                                 *[a for s in DDP for a in ("--set", s)]], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=err_f, text=True)
        while not (run / "checkpoints" / "step-00000004").is_dir():
            assert proc.poll() is None, err_file.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)  # the launching process is rank 0; rank 1 is its child
        proc.wait(timeout=600)
    err = err_file.read_text()
    assert proc.returncode == 75, err[-3000:]
    h0, h1 = (json.loads((run / f"refresh_history_rank{r}.json").read_text())["versions"] for r in (0, 1))
    assert h0 == h1 and h0, (h0, h1)
    stopped = h0[-1][0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == f"step-{stopped:08d}"
    assert err.count("received SIGUSR1") == 1 and not (run / LOCK_FILE).exists()


def test_empty_output_dirs_are_not_results(tmp_path):
    """A run dir with empty checkpoints/ and tb/ (made by hand, or a mount point for them) is not a finished
    run's; one TensorBoard event file is."""
    from openbook.trainer.rundir import results_in

    for name in ("checkpoints", "tb", "snapshots"):
        (tmp_path / name).mkdir()
    assert results_in(tmp_path) == []
    (tmp_path / "tb" / "events.out.tfevents.1").write_bytes(b"x")
    assert results_in(tmp_path) == ["tb"]
