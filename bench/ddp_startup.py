"""Launch to step 1 of a 2-process DDP run on a 1M-passage corpus, and each rank's peak memory (issue 31).

Before issue 31 every rank encoded the whole corpus in process before step 1 (the dev recall at the start, into a
Flat index of its own), beside the initial index build by the actor pool. Now the start figure comes from that
first snapshot, built once. This script runs the same launch against the code before the change (a git worktree
of ``--before``, default the commit that introduced it) and the code here, side by side, on the default recipe
with a 1M-passage generated world (its token cache prepared once, outside the timing) and the first 2,000 of its
dev questions (the world makes 100k; NQ has 8.7k for 21M passages):

    python -m bench.ddp_startup [--passages 1000000] [--before COMMIT]

Each run is stopped once rank 0 logged step 1 (the time of that TensorBoard event, minus the launch). Peak memory
per rank is each trainer process's VmHWM, read just before the stop; the Ray actor's is reported apart.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "0db3a71"  # main before issue 31


DEV_QUESTIONS = 2000  # of the world's 100k at 1M passages: a dev set of NQ's proportions (8.7k for 21M passages)


EXPLAIN = ("Before, each rank encoded the whole corpus in process (into a Flat index of its own) for the start's "
           "dev recall before fit began, and the actor pool then built the first index: three encodes of 1M "
           "passages where one is needed. Now the "
           "start figure is searched in the pool's first snapshot, the ranks sharing the questions, so the pool's "
           "encode (the first index, needed anyway) and Ray's start are what remains before step 1. Peak memory is "
           "mostly each process's own (torch, transformers, the world's 800k training questions) and the 1M-row "
           "snapshot every rank loads under `index.placement: replicated`, which is as large as the index each rank "
           "used to build; `sharded` halves it.")


def sets(work: Path, passages: int) -> list[str]:
    return [f"data.world.num_passages={passages}", f"data.cache_dir={work}/cache", "train.max_steps=50",
            f"data.qa_dev={work}/dev.jsonl",
            "train.accelerator=cpu", "refresh.start_timeout_seconds=1800", "refresh.timeout_seconds=7200",
            "train.validate_at_start=false"]


def prepare(work: Path, passages: int) -> None:
    """The world and its token cache, once (both trees read the same cache format), and the dev questions."""
    code = f"""
import dataclasses
from openbook.data import tokenize_corpus
from openbook.data.bundle import prepare_data
from openbook.models.retriever import build_retriever
from openbook.recipe import load_recipe
cfg = load_recipe({str(ROOT / 'configs/default.yaml')!r}, {sets(work, passages)!r})
data = prepare_data(dataclasses.replace(cfg.data, qa_dev=None))
model, tokenizer = build_retriever(cfg.retriever)
tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, cfg.data.cache_dir)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=work)
    world = next((work / "cache").glob(f"world-n{passages}-s*"))
    lines = (world / "qa_dev.jsonl").read_text().splitlines()[:DEV_QUESTIONS]
    (work / "dev.jsonl").write_text("\n".join(lines) + "\n")


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (the ranks, the Ray processes rank 0 started and their workers)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit():
                children.setdefault(int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
        except OSError:
            continue
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def ranks(torchrun_pid: int) -> dict[int, int]:
    """{local rank: pid} of torchrun's trainer processes."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = (p / "environ").read_bytes().split(b"\0")
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == torchrun_pid:
            rank = next((e.split(b"=", 1)[1] for e in env if e.startswith(b"LOCAL_RANK=")), None)
            if rank is not None:
                out[int(rank)] = int(p.name)
    return out


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ray_worker_peaks() -> list[float]:
    peaks = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and b"EncoderWorker" in (p / "cmdline").read_bytes():
                peaks.append(peak_mb(int(p.name)))
        except OSError:
            continue
    return peaks


def first_step_time(run: Path) -> float | None:
    """Wall time of rank 0's first train/loss event, or None before it is written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for f in sorted((run / "tb").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        if "train/loss" in acc.Tags()["scalars"] and acc.Scalars("train/loss"):
            return acc.Scalars("train/loss")[0].wall_time
    return None


def launch(tree: Path, work: Path, name: str, label: str, passages: int, timeout: float = 7200) -> dict:
    run = work / "runs" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "openbook.cli", "train", "--config", str(tree / "configs/default.yaml"), "--quiet",
           *[a for s in [*sets(work, passages), f"run_dir={run}", "train.devices=2", "train.strategy=ddp"]
             for a in ("--set", s)]]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    peaks: dict[int, float] = {}
    actor: list[float] = []
    step1, tree_pids = None, []
    while time.time() - t0 < timeout and proc.poll() is None:
        time.sleep(2)
        tree_pids = descendants(proc.pid) or tree_pids
        for rank, pid in ranks(proc.pid).items():
            try:
                peaks[rank] = max(peaks.get(rank, 0.0), peak_mb(pid))
            except OSError:
                pass
        actor = ray_worker_peaks() or actor
        step1 = first_step_time(run)
        if step1 is not None:
            break
    for pid in [proc.pid, *descendants(proc.pid), *tree_pids]:  # the ranks and Ray: nothing left to compete
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    time.sleep(5)
    if step1 is None:
        raise RuntimeError(f"{name}: no step 1 within {timeout:.0f} s: {proc.stderr.read()[-2000:]}")
    return {"code": label, "launch to step 1 (s)": round(step1 - t0, 1),
            **{f"rank {r} peak MB": round(peaks[r]) for r in sorted(peaks)},
            "encoder actor peak MB": round(max(actor)) if actor else "-"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--before", default=BEFORE, help="the commit to compare with")
    args = p.parse_args(argv)
    from bench.common import machine, table, write_section

    with tempfile.TemporaryDirectory() as tmp:
        work, old = Path(tmp) / "work", Path(tmp) / "before"
        work.mkdir()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.before], check=True,
                       capture_output=True)
        try:
            prepare(work, args.passages)
            rows = [launch(old, work, "before", f"before ({args.before})", args.passages),
                    launch(ROOT, work, "now", "now", args.passages)]
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], capture_output=True)
    print(table(rows))
    print(json.dumps(rows))
    write_section("ddp_startup", f"## Multi-process start-up at 1M passages (issue 31)\n\n"
                                 f"`python -m bench.ddp_startup` ({machine()}): the default recipe, "
                                 f"{args.passages:,} generated passages (token cache prepared beforehand), {DEV_QUESTIONS:,} dev "
                                 "questions, 2 gloo "
                                 "processes on CPU, the same launch with the code before and after issue 31.\n\n"
                                 f"{table(rows)}\n\n{EXPLAIN}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
