"""A full disk (issue 19): a checkpoint or a snapshot that does not fit costs that write only.

The disks are real and small: a tmpfs mounted by a child process in user and mount namespaces of its own
(``unshare -Urm``, no root; tests/helpers.py ``on_small_disks``). Writes past its size fail with ENOSPC
as on a full volume, and deleting files frees room, which the snapshot store's retry relies on. The tmpfs
goes with the child, so each child reports what it saw (and copies out what the test checks later)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import pytorch_lightning as pl

from tests.helpers import mount_small_disk, on_small_disks, small_disks_work, tiny_recipe

needs_small_disks = pytest.mark.skipif(not small_disks_work(),
                                       reason="cannot mount a tmpfs in a user namespace here (unshare -Urm)")
PAGE = 4096


@contextmanager
def logged(name: str, level: int = logging.WARNING):
    """The messages logger ``name`` emits at ``level`` and above inside the block."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def on_disk(path: Path) -> int:
    """Bytes the files under ``path`` take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ checkpoints

def _ckpt_recipe(tmp: Path, max_steps: int):
    return tiny_recipe(tmp, train={"max_steps": max_steps, "checkpoint_every_n_steps": 2, "keep_checkpoints": 1,
                                   "log_every_n_steps": 1}, refresh={"enabled": False})


def train_with_a_small_checkpoint_disk(tmp: str) -> dict:
    """(In the child.) ``openbook train``'s run, 6 steps, a checkpoint every 2 on a disk one checkpoint fills."""
    from openbook.models.retriever import build_retriever
    from openbook.trainer.checkpoints import checkpoint_root
    from openbook.trainer.train import run_train

    tmp = Path(tmp)
    cfg = _ckpt_recipe(tmp, 6)
    model, _ = build_retriever(cfg.retriever)
    one = 12 * sum(p.numel() for p in model.parameters())  # fp32 weights + Adam's 2 moments: one model.ckpt
    root = checkpoint_root(cfg.run_dir)
    mount_small_disk(root, one * 3 // 2)  # the step-2 checkpoint fits; the step-4 one does not beside it
    with logged("openbook.trainer.checkpoints") as warnings:
        summary = run_train(cfg, progress=False)
    names = sorted(p.name for p in root.iterdir())
    shutil.copytree(root, tmp / "kept")  # the tmpfs goes with this process
    return {"summary": summary, "names": names, "warnings": warnings}


class Losses(pl.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(trainer.global_step)


@needs_small_disks
def test_a_checkpoint_that_does_not_fit_is_skipped_and_training_goes_on(tmp_path):
    from openbook.trainer.checkpoints import list_checkpoints, resolve_checkpoint
    from openbook.trainer.train import build_parts, fit, make_trainer, train_loader
    from tests.test_cli import tb_scalars

    out = on_small_disks("tests.test_disk_full:train_with_a_small_checkpoint_disk", str(tmp_path))
    assert out["summary"]["steps"] == 6 and out["summary"]["checkpoint_failures"] == 2, out["summary"]
    assert out["names"] == ["step-00000002"]  # no partial .tmp-* dir; the failures pruned nothing
    assert len(out["warnings"]) == 2, out["warnings"]
    for step, line in zip((4, 6), out["warnings"]):
        assert line.startswith(f"checkpoint step-{step:08d} not written: No space left on device (partial files "
                               "removed); training goes on, the last good checkpoint is step-00000002"), line
        assert "\n" not in line
    assert (tmp_path / "run" / "retriever.pt").is_file()  # the run ended normally, final weights saved
    failures = tb_scalars(tmp_path / "run", "checkpoint/failures")
    assert min(failures.values()) == 0.0 and max(failures.values()) == 2.0, failures
    # the checkpoint written before the disk filled resumes the run (on a disk with room now)
    cfg = _ckpt_recipe(tmp_path, 8)
    parts, seen = build_parts(cfg), Losses()
    trainer = make_trainer(cfg, [parts.callback, seen], logger=False, enable_progress_bar=False)
    fit(trainer, parts, train_loader(parts), resolve_checkpoint(str(tmp_path / "kept" / "step-00000002"), cfg.run_dir))
    assert seen.steps == list(range(3, 9)) and trainer.global_step == 8
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-00000008"]
    assert trainer.callback_metrics["checkpoint/failures"] == 0.0  # the step-2 checkpoint predates the failures


# --------------------------------------------------------------------------------------------- snapshots

def _publish(store, seed: int, n: int = 300, protect=()):
    import numpy as np

    from openbook.index import IndexConfig

    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return store.publish(x, [f"doc-{seed}-{i}" for i in range(n)], encoder_step=seed, index_cfg=IndexConfig(),
                         protect=protect)


def publish_on_a_small_disk(tmp: str) -> dict:
    """(In the child.) Snapshots on a disk with room for three and a half of them, v1 protected."""
    from openbook.errors import SnapshotError
    from openbook.index import SnapshotStore

    tmp = Path(tmp)
    one = on_disk(_publish(SnapshotStore(tmp / "probe"), 0).path)
    root = tmp / "snaps"
    mount_small_disk(root, one * 7 // 2)
    store = SnapshotStore(root, keep=10)  # nothing pruned by count: only the lack of room deletes
    out = {"first": [_publish(store, s, protect=[1]).version for s in range(3)]}
    with logged("openbook.index.snapshot") as warnings:
        out["fourth"] = _publish(store, 3, protect=[1]).version  # fits once v2 is gone
        out["after_fourth"] = store.versions()
        try:
            _publish(store, 4, n=3000, protect=[1])  # ten times bigger: fits nowhere
        except SnapshotError as e:
            out["error"] = str(e)
    out["warnings"] = warnings
    out["after_big"] = store.versions()
    latest = store.latest()  # verified: every byte hashed
    out["latest"] = [latest.version, latest.encoder_step]
    out["hidden"] = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".highwater")
    return out


@needs_small_disks
def test_a_publish_out_of_room_deletes_old_snapshots_and_retries_once(tmp_path):
    out = on_small_disks("tests.test_disk_full:publish_on_a_small_disk", str(tmp_path))
    assert out["first"] == [1, 2, 3]
    # v4 did not fit: v2 went (v1 is protected, v3 the newest good one), and the retry published v4
    assert out["fourth"] == 4 and out["after_fourth"] == [1, 3, 4]
    assert out["warnings"][0].endswith("No space left on device; deleted v000002 to make room, trying once more")
    # the big one fails even after v3 (now neither protected nor the newest) is deleted: one line
    error = out["error"]
    assert error == (f"{tmp_path / 'snaps'}: cannot publish a snapshot: No space left on device, even after "
                     "deleting v000003"), error
    assert out["after_big"] == [1, 4] and out["latest"] == [4, 3]  # the previous snapshot still loads
    assert out["hidden"] == []  # no partial files left by either attempt


# ------------------------------------------------------------------------------- refreshes (Ray actors)

def refresh_on_a_small_disk(tmp: str) -> dict:
    """(In the child, with a Ray of its own: the actors must see the tmpfs.) Refreshes whose shards the
    actors write onto a disk with room for three and a half snapshots, then onto one other data filled."""
    import dataclasses

    import ray

    from openbook.data import tokenize_corpus
    from openbook.data.bundle import prepare_data
    from openbook.index import SnapshotStore
    from openbook.index.snapshot import write_error
    from openbook.models.retriever import build_retriever
    from openbook.refresher.cluster import local_ray_options
    from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator
    from openbook.refresher.encode import numpy_state

    tmp = Path(tmp)
    ray.init(num_cpus=1, object_store_memory=100 * 1024**2, log_to_driver=False, **local_ray_options())
    cfg = tiny_recipe(tmp, refresh={"num_workers": 1})
    data = prepare_data(cfg.data)
    model, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, tmp / "cache")
    state = numpy_state(model.doc_encoder)

    def coordinator(root: Path) -> RefreshCoordinator:
        target = IndexTarget(root, dataclasses.replace(cfg.index, shards=3), 10, {})
        return RefreshCoordinator(cfg.refresh, cfg.encode, model.doc_tower_spec(), tokens, data.corpus.ids, target)

    def refresh(coord, step: int, protect=(1,)):
        coord.submit(state, step, protect)
        return coord.wait(timeout=600)

    out = {}
    coord = coordinator(tmp / "probe").start()
    try:
        one = on_disk(Path(refresh(coord, 0).path))
        root = tmp / "snaps"
        mount_small_disk(root, one * 7 // 2)
        coord.target = dataclasses.replace(coord.target, root=root)
        out["first"] = [refresh(coord, s).version for s in (1, 2, 3)]
        with logged("openbook.index.snapshot") as warnings:
            out["fourth"] = refresh(coord, 4).version  # its shards do not fit until v2 is deleted
            out["after_fourth"] = SnapshotStore(root).versions()
            fill(root / "other-data")  # someone else's data fills the disk
            out["fifth"] = refresh(coord, 5, protect=(1, 3))  # and v3 is needed too: nothing may go
        out["warnings"] = warnings
        out["failures"], out["last_error"] = coord.failures, coord.last_error
        out["after_fifth"] = SnapshotStore(root).versions()
        out["latest"] = SnapshotStore(root).latest().encoder_step
        out["hidden"] = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".highwater")
        # how an actor's full disk reaches the driver: a task error that is also an OSError, the actor's in `cause`
        staging = SnapshotStore(root).stage()
        try:
            ray.get(coord.actors[0].encode_shard.remote(99, ray.put(state), str(staging), 0, 0, 100, cfg.index,
                                                        None))
        except Exception as e:  # noqa: BLE001 - what it is, is the point
            out["task_error"] = [type(e).__name__, isinstance(e, OSError), write_error(e).errno]
    finally:
        coord.shutdown()
        ray.shutdown()
    return out


@pytest.mark.slow
@needs_small_disks
def test_a_refresh_out_of_room_deletes_old_snapshots_and_retries_once(tmp_path):
    out = on_small_disks("tests.test_disk_full:refresh_on_a_small_disk", str(tmp_path))
    assert out["first"] == [1, 2, 3]
    assert out["fourth"] == 4 and out["after_fourth"] == [1, 3, 4]
    assert out["warnings"][0].endswith("No space left on device; deleted v000002 to make room, trying once more")
    # the disk full of other data and nothing it may delete (v1, v3 protected, v4 the newest): the refresh
    # fails, counted, in one line, and v4 stays
    assert out["fifth"] is None and out["failures"] == 1
    assert out["last_error"] == (f"SnapshotError: {tmp_path / 'snaps'}: cannot publish a snapshot: No space left on "
                                 "device; no old snapshot to delete"), out["last_error"]
    assert out["after_fifth"] == [1, 3, 4] and out["latest"] == 4 and out["hidden"] == []
    assert out["task_error"] == ["RayTaskError(OSError)", True, errno.ENOSPC]


def ddp_train_with_a_small_checkpoint_disk(tmp: str) -> dict:
    """(In the child.) ``openbook train`` under 2-process DDP (gloo), the checkpoints on a disk one fills."""
    import subprocess
    import sys

    from openbook.models.retriever import build_retriever
    from openbook.trainer.checkpoints import checkpoint_root
    from openbook.trainer.train import config_yaml

    tmp = Path(tmp)
    cfg = _ckpt_recipe(tmp, 6)
    (tmp / "recipe.yaml").write_text(config_yaml(cfg))
    model, _ = build_retriever(cfg.retriever)
    root = checkpoint_root(cfg.run_dir)
    mount_small_disk(root, 12 * sum(p.numel() for p in model.parameters()) * 3 // 2)
    sets = ["train.devices=2", "train.strategy=ddp", "train.accelerator=cpu"]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "openbook"), "train", "--config",
                             str(tmp / "recipe.yaml"), "--quiet", *[a for s in sets for a in ("--set", s)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:  # a rank stuck in a collective the other skipped: both ranks go
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    return {"rc": proc.returncode, "stdout": stdout, "stderr": stderr[-3000:],
            "names": sorted(p.name for p in root.iterdir())}


@pytest.mark.slow
@needs_small_disks
def test_under_ddp_a_checkpoint_that_does_not_fit_is_skipped_on_every_rank(tmp_path):
    """Rank 0 writes, and its failure must not leave rank 1 waiting in a collective rank 0 skipped (without
    the extra barrier in ``StepCheckpoint.save`` this run hangs): it ends, both ranks train every step, and
    one line per failure is logged (by rank 0)."""
    import json

    from tests.test_cli import rank_histories

    out = on_small_disks("tests.test_disk_full:ddp_train_with_a_small_checkpoint_disk", str(tmp_path))
    assert out["rc"] == 0, out["stderr"]
    summary = json.loads(out["stdout"][out["stdout"].index("{"):])
    assert summary["steps"] == 6 and summary["checkpoint_failures"] == 2
    assert out["names"] == ["step-00000002"]
    assert out["stderr"].count("not written: No space left on device (partial files removed)") == 2
    h0, h1 = rank_histories(tmp_path / "run")
    assert h0["versions"] == h1["versions"] and len(h0["versions"]) == 6  # both ranks trained every step


# ------------------------------------------------------------------------- preemption on a full disk (issue 33)

def _sigterm_once(path: Path) -> None:
    """A real SIGTERM to this process as soon as ``path`` exists (a thread: the trainer runs meanwhile)."""
    import threading
    import time

    def watch() -> None:
        while not path.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()


def preempted_on_a_full_disk(tmp: str, case: str) -> dict:
    """(In the child.) ``openbook train`` gets a SIGTERM once its step-2 checkpoint (``room``: step-4) exists, on a
    disk where the preemption checkpoint does not fit. ``room``: keep 2, on a disk for 2.5 checkpoints: deleting the older
    checkpoint makes room. ``snapshots``: keep 1, checkpoints and snapshots on one disk that two old snapshots
    fill: deleting them (not the one in use) makes room. ``none``: keep 1, nothing openbook may delete."""
    import numpy as np

    from openbook.cli import preempted_line
    from openbook.index import IndexConfig, SnapshotStore
    from openbook.models.retriever import build_retriever
    from openbook.trainer.checkpoints import checkpoint_root
    from openbook.trainer.train import run_train

    tmp = Path(tmp)
    keep = 2 if case == "room" else 1
    cfg = tiny_recipe(tmp, train={"max_steps": 400, "checkpoint_every_n_steps": 2, "keep_checkpoints": keep},
                      refresh={"enabled": False}, snapshots={"dir": str(tmp / "disk" / "snapshots")})
    model, _ = build_retriever(cfg.retriever)
    one = 12 * sum(p.numel() for p in model.parameters())  # one model.ckpt: fp32 weights + Adam's 2 moments
    disk = tmp / "disk"
    if case == "snapshots":
        rows = one * 7 // 10 // (16 * 6)  # a snapshot of ~0.7 checkpoints: float16 rows + a flat float32 index
        mount_small_disk(disk, one * 3 // 2 + 2 * rows * 16 * 6 + 2**20)
        store = SnapshotStore(disk / "snapshots", keep=10)
        for seed in (1, 2):
            x = np.random.default_rng(seed).standard_normal((rows, 16)).astype(np.float32)
            store.publish(x, [f"d{seed}-{i}" for i in range(rows)], encoder_step=0, index_cfg=IndexConfig())
    else:
        mount_small_disk(disk, one * 5 // 2 if case == "room" else one * 3 // 2)
    (disk / "checkpoints").mkdir()
    Path(cfg.run_dir).mkdir(parents=True)
    checkpoint_root(cfg.run_dir).symlink_to(disk / "checkpoints")  # the checkpoints and snapshots share the disk
    _sigterm_once(disk / "checkpoints" / ("step-00000004" if case == "room" else "step-00000002"))
    with logged("openbook.trainer") as warnings:
        summary = run_train(cfg, progress=False)
    return {"summary": summary, "warnings": warnings, "line": preempted_line(summary),
            "names": sorted(p.name for p in (disk / "checkpoints").iterdir()),
            "snapshots": SnapshotStore(disk / "snapshots").versions()}


@needs_small_disks
@pytest.mark.parametrize("case", ["room", "snapshots", "none"])
def test_a_preemption_checkpoint_that_does_not_fit_frees_room_or_names_the_newest_resumable_one(tmp_path, case):
    out = on_small_disks("tests.test_disk_full:preempted_on_a_full_disk", str(tmp_path), case)
    s = out["summary"]
    assert s["preempted"] and s["exit_code"] == 75 and s["steps"] > 2, s
    if case == "none":  # its own checkpoint failed: the summary and the exit line name the newest one that resumes
        assert not s["checkpoint_written"] and s["checkpoint_error"] == "No space left on device", s
        assert s["checkpoint_step"] == 2 and s["checkpoint"].endswith("step-00000002") and out["names"] == [
            "step-00000002"], s
        assert f"resumes from {s['checkpoint']} (step 2, {s['steps'] - 2} steps back" in out["line"], out["line"]
        assert any(w.startswith(f"preempted at step {s['steps']}: its checkpoint could not be written (No space left "
                                f"on device); the newest resumable checkpoint is ") for w in out["warnings"])
        return
    assert s["checkpoint_written"] and s["checkpoint_step"] == s["steps"], s
    assert s["checkpoint"].endswith(f"step-{s['steps']:08d}") and out["names"][-1] == f"step-{s['steps']:08d}", out
    assert f"resumes from {s['checkpoint']} (step {s['steps']})" in out["line"], out["line"]
    made_room = [w for w in out["warnings"] if "to make room, trying once more" in w]
    assert made_room and all("\n" not in w for w in made_room), out["warnings"]
    if case == "snapshots":
        assert "snapshots/v000001, snapshots/v000002" in made_room[0], made_room
        assert out["snapshots"] == [3], out  # the one in use (built at the start) stays
