"""Step checkpoints (``run_dir/checkpoints/step-NNNNNNNN/``) and finding the one to resume from.

Each checkpoint directory holds ``model.ckpt`` (Lightning: weights, optimizer, loops, the training
loader's position, every callback's state, including :class:`IndexRefreshCallback`'s snapshot in use and
schedule position) and ``config.yaml``, the resolved recipe. A directory appears complete or not at all
(written under a temporary name, then renamed); only the newest ``train.keep_checkpoints`` are kept.
"""

from __future__ import annotations

import errno
import logging
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.callbacks import Checkpoint

from openbook.errors import OpenbookError
from openbook.trainer.loaders import process_group

log = logging.getLogger(__name__)
CKPT_FILE = "model.ckpt"
CONFIG_FILE = "config.yaml"
ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write failed for want of room: freeing may help
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))
             and (p / CKPT_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(resume: str, run_dir: str | Path) -> Path:
    """``resume``: ``last`` (newest under run_dir/checkpoints), a checkpoint directory or a ``.ckpt`` file.
    Returns the ``.ckpt`` path; a missing one is an :class:`OpenbookError` with a one-line message."""
    if resume == "last":
        found = list_checkpoints(run_dir)
        if not found:
            raise OpenbookError(f"--resume last: no checkpoint under {checkpoint_root(run_dir)}")
        return found[-1] / CKPT_FILE
    path = Path(resume)
    ckpt = path / CKPT_FILE if path.is_dir() else path
    if not ckpt.is_file():
        raise OpenbookError(f"--resume {resume}: checkpoint not found ({ckpt} does not exist)")
    return ckpt


def checkpoint_step(ckpt: Path) -> int:
    """The global step a ``.ckpt`` was taken at: from its ``step-N`` directory, else from the file itself."""
    named = _STEP_DIR.match(Path(ckpt).parent.name)
    if named:
        return int(named.group(1))
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False, mmap=True)["global_step"])
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line answer
        raise OpenbookError(f"{ckpt}: not a readable Lightning checkpoint ({type(e).__name__})") from None


class StepCheckpoint(Checkpoint):
    """Every ``every`` optimizer steps (0: only when asked, as at preemption), ``trainer.save_checkpoint`` into
    ``step-{n:08d}/model.ckpt`` plus ``config.yaml``; keeps the newest ``keep``. Also saves the Python/NumPy/torch
    RNG states (Lightning does not), every rank's under DDP, so a resumed run draws the same dropout masks and
    negatives on every rank.

    A write that fails for want of room (a full disk, a quota) first frees what openbook may: every checkpoint but
    the newest good one, and ``free_more``'s (the snapshots no swap needs, on that filesystem), then tries once
    more. A write that still fails costs that checkpoint only: its partial files are removed, one line is
    logged, ``failed`` counts it (logged as ``checkpoint/failures``) and training goes on; the last good
    checkpoint stays."""

    def __init__(self, run_dir: str | Path, every: int, keep: int, config_yaml: str):
        self.root, self.every, self.keep, self.config_yaml = checkpoint_root(run_dir), every, keep, config_yaml
        self.saved: list[Path] = []
        self.last_step = -1  # the step last saved (a preemption checkpoint may come first at a periodic step)
        self.failed = 0
        self.last_error: str | None = None  # why the last checkpoint that failed was not written
        # frees more room once old checkpoints are gone (given the checkpoint root): names of what went
        self.free_more: Callable[[Path], list[str]] | None = None
        self._by_rank: list[dict] | None = None  # every rank's RNG states, gathered at each save under DDP

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0 and step != self.last_step:
            self.save(trainer, step)
        pl_module.log("checkpoint/failures", float(self.failed), on_step=True, on_epoch=False, rank_zero_only=True)

    def save(self, trainer: pl.Trainer, step: int) -> Path | None:
        """Write the step-``step`` checkpoint; its final path, or None if it could not be written. Every rank
        calls it (the collectives below run on all of them, in the same order, whatever happens on rank 0).
        Out of room, rank 0 frees what openbook may (:meth:`_make_room`) and every rank tries once more."""
        self.last_step = step
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        error = self._attempt_save(trainer, tmp, final)
        freed = self._make_room(final, error) if trainer.is_global_zero and error is not None else []
        if trainer.strategy.broadcast(bool(freed), src=0):
            error = self._attempt_save(trainer, tmp, final)
        if trainer.is_global_zero and error is not None:
            self._give_up(final, error, freed)
        # rank 0's outcome, so every rank returns and counts the same (and waits for rank 0 to finish)
        ok = trainer.strategy.broadcast(error is None, src=0)
        if not ok:
            self.failed += 1
            return None
        return final

    def _attempt_save(self, trainer: pl.Trainer, tmp: Path, final: Path) -> OSError | None:
        """One try (a collective): rank 0's OSError, its partial files removed; None once ``final`` exists."""
        error = _attempt(lambda: _fresh_dir(tmp)) if trainer.is_global_zero else None
        trainer.strategy.barrier()
        self._by_rank = gather_rng_states()  # a collective (under DDP): before save_checkpoint asks state_dict
        try:
            trainer.save_checkpoint(tmp / CKPT_FILE)  # collective: every rank calls it; rank 0 writes
        except OSError as e:
            error = error or e
            # it raised before its closing barrier, which the other ranks have entered: enter it too
            trainer.strategy.barrier("Trainer.save_checkpoint")
        if trainer.is_global_zero and error is None:
            error = _attempt(lambda: self._commit(tmp, final))
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return error

    def _make_room(self, final: Path, error: OSError) -> list[str]:
        """Out of room (ENOSPC, EDQUOT, EFBIG): delete every checkpoint but the newest good one, and what
        ``free_more`` frees (the refresh callback's unprotected snapshots on the same filesystem); the names of
        what went (nothing: no retry)."""
        if error.errno not in ROOM_ERRNOS:
            return []
        gone = []
        for old in list_checkpoints(self.root.parent)[:-1]:
            shutil.rmtree(old, ignore_errors=True)
            gone.append(old.name)
        if self.free_more is not None:
            gone += self.free_more(self.root)
        if gone:
            log.warning("checkpoint %s: %s; deleted %s to make room, trying once more", final.name,
                        error.strerror or error, ", ".join(gone))
        return gone

    def _commit(self, tmp: Path, final: Path) -> None:
        (tmp / CONFIG_FILE).write_text(self.config_yaml)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        self.saved.append(final)
        self._prune()
        log.info("checkpoint %s", final)

    def _give_up(self, final: Path, error: OSError, freed: list[str]) -> None:
        self.last_error = error.strerror or str(error)
        good = list_checkpoints(self.root.parent)
        last = f"the last good checkpoint is {good[-1].name}" if good else "no checkpoint written yet"
        log.warning("checkpoint %s not written: %s (partial files removed%s); training goes on, %s", final.name,
                    self.last_error, ", even after deleting " + ", ".join(freed) if freed else "", last)

    def _prune(self) -> None:
        for old in list_checkpoints(self.root.parent)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def state_dict(self) -> dict:
        """This rank's RNG states, and under DDP every rank's, gathered by ``save`` (rank 0 writes the file)."""
        return {"rng": rng_state(), "rng_by_rank": self._by_rank, "failed": self.failed}

    def load_state_dict(self, state: dict) -> None:
        self.failed = state.get("failed", 0)  # failures before the resume still count
        replicas, rank = process_group()
        by_rank = state.get("rng_by_rank") or []
        if len(by_rank) == replicas:
            set_rng_state(by_rank[rank])
        elif state.get("rng"):  # a checkpoint from before per-rank states, or another world size
            set_rng_state(state["rng"])
            if replicas > 1:
                log.info("resume: the checkpoint holds no RNG states for %d processes; every rank starts from "
                         "rank 0's (dropout draws differ from an uninterrupted run)", replicas)


def rng_state(cuda=torch.cuda) -> dict:
    """Python's, numpy's and torch's CPU RNG states, and the CUDA generator of this process's own device (a DDP rank
    holds one; dropout on a GPU draws from it) once CUDA is in use: never initialised here, nor other devices'."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if cuda.is_available() and cuda.is_initialized():
        state["cuda"] = cuda.get_rng_state()  # the current device's: Lightning sets each rank's
    return state


def set_rng_state(rng: dict, cuda=torch.cuda) -> None:
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None:
        if cuda.is_available():
            cuda.set_rng_state(rng["cuda"])
        else:
            log.info("resume: the checkpoint holds a CUDA RNG state, and no GPU is visible: GPU dropout draws of "
                     "the original run are not repeated")


def gather_rng_states() -> list[dict] | None:
    """Every rank's RNG states, in rank order (a collective under DDP); None in one process."""
    replicas, _ = process_group()
    if replicas == 1:
        return None
    out: list[dict | None] = [None] * replicas
    dist.all_gather_object(out, rng_state())
    return out

def _fresh_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)  # left by a killed writer
    path.mkdir(parents=True)


def _attempt(write) -> OSError | None:
    """Run ``write()``; the OSError it raised (a full disk, a quota...), or None."""
    try:
        write()
    except OSError as e:
        return e
    return None
