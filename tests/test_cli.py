"""The ``openbook`` command and the README's two commands, run for real."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPENBOOK = str(Path(sys.executable).parent / "openbook")  # the installed console entry point


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    return [next(line for line in b.splitlines() if line and not line.startswith("#")) for b in blocks]


def run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([OPENBOOK, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_readme_has_exactly_two_commands_and_ci_runs_the_second():
    setup_cmd, test_cmd = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci
    for cmd in (setup_cmd, test_cmd):
        assert cmd.startswith("python3 -m venv .venv && .venv/bin/pip install")
        assert "-c constraints.txt" in cmd and "-e '.[cpu,dev]'" in cmd
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text()
    assert test_cmd.endswith("pytest")


def _workdir(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    return tmp_path


@pytest.mark.slow
def test_readme_main_job_runs(tmp_path):
    """The part of README command 1 after set-up, in a scratch directory."""
    main_job = readme_commands()[0].split("&&")[-1].strip()
    assert main_job.startswith(".venv/bin/openbook ")
    args = main_job.split()[1:]
    proc = run(args, _workdir(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["index_version"] >= 2 and summary["refreshes_published"] >= 1
    assert summary["refresh_failures"] == 0
    # retrieval learned: gold-passage recall through the refreshed index rose well above the start
    assert summary["dev_recall@5_index_in_use"] > summary["dev_recall@5_at_start"] + 0.3, summary
    assert (tmp_path / "runs" / "default" / "snapshots").is_dir()
    assert (tmp_path / "runs" / "default" / "retriever.pt").is_file()
    assert list((tmp_path / "runs" / "default" / "tb").glob("events.out.tfevents.*"))


def test_build_index_then_search(tmp_path):
    """search before any index: one line whose build-index command carries the --set values (run_dir among them);
    that very command builds the index the same search then uses."""
    wd = _workdir(tmp_path)
    sets = ["--set", "data.world.num_passages=300", "--set", "retriever.encoder.num_layers=1", "--set",
            "run_dir=runs/elsewhere"]
    proc = run(["search", "--config", "configs/default.yaml", *sets, "-k", "3", "anything"], wd)
    assert proc.returncode == 2 and "no valid snapshot" in proc.stderr, proc.stderr[-2000:]
    hint = proc.stderr.split("run `", 1)[1].split("`", 1)[0]
    assert hint == ("openbook build-index --config configs/default.yaml --set data.world.num_passages=300 --set "
                    "retriever.encoder.num_layers=1 --set run_dir=runs/elsewhere"), hint
    proc = run([*shlex.split(hint)[1:], "--quiet"], wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["version"] == 1 and summary["docs"] == 300
    assert 0.0 <= summary["dev_recall@10"] <= 1.0
    first = json.loads((wd / ".openbook_cache").rglob("corpus.jsonl").__next__().read_text().splitlines()[0])
    proc = run(["search", "--config", "configs/default.yaml", *sets, "-k", "3", first["title"]], wd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("snapshot v1") and len(lines) == 4


def test_errors_are_one_line(tmp_path):
    proc = run(["build-index", "--config", str(tmp_path / "missing.yaml")], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "config file not found" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "t", "text": "x"}\n{"id": "b", "title": "t"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  corpus: {bad}\n  cache_dir: {tmp_path / 'cache'}\nrun_dir: {tmp_path / 'run'}\n")
    proc = run(["build-index", "--config", str(cfg)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "bad.jsonl:2" in last and "text" in last


def test_config_help_lists_every_section():
    proc = subprocess.run([OPENBOOK, "config"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for key in ("data.corpus", "retriever.pooling", "index.factory", "snapshots.keep", "refresh.schedule"):
        assert key in proc.stdout


DDP = ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu",  # 2 processes on CPU (gloo)
       "refresh.start_timeout_seconds=600"]  # a loaded CI machine can take minutes to start an actor


def ddp_train(wd: Path, config: str, sets: list[str], *extra: str) -> subprocess.CompletedProcess:
    """``openbook train`` with 2-process DDP and ``--set`` overrides; fails the test on a non-zero exit."""
    proc = run(["train", "--config", config, *[a for s in DDP + sets for a in ("--set", s)], *extra], wd, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rank_histories(run_dir: Path) -> tuple[dict, dict]:
    return tuple(json.loads((run_dir / f"refresh_history_rank{r}.json").read_text()) for r in (0, 1))


def tb_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """``tag`` by step over every event file of the run (a resumed run writes one more), the newest last."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for path in sorted((run_dir / "tb").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime_ns):
        events = EventAccumulator(str(path))
        events.Reload()
        out.update({e.step: e.value for e in events.Scalars(tag)} if tag in events.Tags()["scalars"] else {})
    return out


# The 2-process DDP tests share one reference run (each launch costs ~35 s of start-up on 2 cores): a replicated
# 4-shard index refreshed every 4 steps, each refresh in use 2 steps after its trigger, a checkpoint every 4 steps.
DDP_SETS = ["refresh.schedule=4", "refresh.swap_lag=2", "data.world.num_passages=600", "index.shards=4",
            "train.checkpoint_every_n_steps=4"]
DDP_PLAN = [1] * 5 + [2] * 4 + [3] * 4 + [4] * 3  # 16 steps: triggers after 4, 8, 12, each in use from s + 2


@pytest.fixture(scope="module")
def ddp_reference(tmp_path_factory) -> tuple[Path, dict]:
    """One uninterrupted 16-step DDP run on the default recipe with ``DDP_SETS``: (workdir, its summary)."""
    wd = _workdir(tmp_path_factory.mktemp("ddp"))
    proc = ddp_train(wd, "configs/default.yaml", [*DDP_SETS, "train.max_steps=16", "run_dir=runs/reference"],
                     "--quiet")
    assert proc.stdout.count('"steps": 16') == 1  # one summary, from rank 0
    return wd, json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.mark.slow
def test_two_process_ddp_runs_reproduce_with_a_slowed_pool(ddp_reference):
    """2-process DDP on CPU (gloo) with refresh on: rank 0 drives Ray, both ranks use the same snapshot
    version at every step; and a second run whose encoder actors are slowed by an injected delay swaps the
    same versions at the same steps (those the config plans) and logs the same loss at every step."""
    wd, _ = ddp_reference
    ddp_train(wd, "configs/default.yaml", [*DDP_SETS, "train.max_steps=16", "run_dir=runs/slow",
                                           "refresh.inject_delay_seconds=0.5"], "--quiet")
    runs = {}
    for name in ("reference", "slow"):
        h0, h1 = rank_histories(wd / "runs" / name)
        assert h0["versions"] == h1["versions"] and len(h0["versions"]) == 16
        assert h0["events"] and not h1["events"]  # only rank 0 drives the refresher
        runs[name] = (h0, tb_scalars(wd / "runs" / name, "train/loss"))
    (fast, fast_loss), (slow, slow_loss) = runs["reference"], runs["slow"]
    assert [v for _, v in fast["versions"]] == [v for _, v in slow["versions"]] == DDP_PLAN
    assert all(e["duration"] >= 4 * 0.5 for e in slow["events"])  # the delay was in force (4 shards, 1 actor)
    assert len(fast_loss) == 16 and fast_loss == slow_loss


@pytest.mark.slow
def test_two_process_ddp_run_resumes_from_its_checkpoint(ddp_reference):
    """2-process DDP (gloo), stopped at step 8 and resumed with ``--resume last``: both ranks restore the
    checkpoint's snapshot without re-encoding and carry on in step; the missed step-8 refresh runs at resume.
    Every rank goes on mid-epoch with its own data and RNG states, so every step's loss equals that of the
    uninterrupted reference run (Lightning's own DistributedSampler would start the epoch over at resume)."""
    wd, _ = ddp_reference
    ddp_train(wd, "configs/default.yaml", [*DDP_SETS, "train.max_steps=8", "run_dir=runs/resumed"])
    second = ddp_train(wd, "configs/default.yaml", [*DDP_SETS, "train.max_steps=16", "run_dir=runs/resumed"],
                       "--resume", "last")
    assert second.stderr.count("not re-encoded") == 2  # one line per rank, the step-4 snapshot (v2) reused
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    # the history goes on across the resume: the step-4 refresh from before it, the step-8 and step-12 ones after
    assert summary["steps"] == 16 and summary["refreshes_published"] == 3 and summary["index_version"] == 4
    h0, h1 = rank_histories(wd / "runs" / "resumed")
    assert h0["versions"] == h1["versions"] and [s for s, _ in h0["versions"]] == list(range(1, 17))
    assert [e["submitted_step"] for e in h0["events"]] == [4, 8, 12] and not h1["events"]
    # the step-8 refresh (triggered at resume) is in use from step 10, the step-12 one from 14
    assert [v for _, v in h0["versions"]] == DDP_PLAN
    full, resumed = tb_scalars(wd / "runs" / "reference", "train/loss"), tb_scalars(wd / "runs" / "resumed", "train/loss")
    assert len(full) == 16 and sorted(resumed) == sorted(full), (sorted(full), sorted(resumed))
    for step, loss in full.items():
        assert resumed[step] == pytest.approx(loss, abs=1e-4), (step, full, resumed)


@pytest.mark.slow
def test_two_process_sharded_index_trains_as_the_replicated_one(ddp_reference):
    """index.placement sharded under 2-process DDP (gloo): each rank holds 2 of the 4 shards, searches are
    all-gathered and merged; with a Flat index every step's loss and index version equal those of the
    replicated placement (the reference run). The sharded run then resumes in one process (another world
    size): the shards are re-assigned (this process holds all 4) and training carries on from the
    checkpoint's snapshot."""
    wd, reference = ddp_reference
    proc = ddp_train(wd, "configs/default.yaml", [*DDP_SETS, "train.max_steps=16", "run_dir=runs/sharded",
                                                  "index.placement=sharded"], "--quiet")
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    runs = {}
    for name in ("reference", "sharded"):
        h0, h1 = rank_histories(wd / "runs" / name)
        assert h0["versions"] == h1["versions"]
        runs[name] = ([v for _, v in h0["versions"]], tb_scalars(wd / "runs" / name, "train/loss"))
    (rv, rloss), (sv, sloss) = runs["reference"], runs["sharded"]
    assert rv == sv == DDP_PLAN
    assert len(sloss) == 16 and sloss == rloss
    assert summary["dev_recall@5_index_in_use"] == reference["dev_recall@5_index_in_use"]  # dev search over both ranks
    shard_dirs = sorted(p.name for p in (wd / "runs" / "sharded" / "snapshots" / "v000004").glob("shard-*"))
    assert shard_dirs == ["shard-00000", "shard-00001", "shard-00002", "shard-00003"]
    resumed = run(["train", "--config", "configs/default.yaml", "--resume", "last", "--quiet",
                   *[a for s in [*DDP_SETS, "train.max_steps=20", "run_dir=runs/sharded", "index.placement=sharded",
                                 "refresh.start_timeout_seconds=600"] for a in ("--set", s)]], wd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not re-encoded" in resumed.stderr
    assert json.loads(resumed.stdout[resumed.stdout.index("{"):])["steps"] == 20
