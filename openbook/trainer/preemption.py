"""Preemption: SIGTERM (what a scheduler sends before it kills a job) and SIGUSR1 (SLURM's warning ahead of the
time limit, ``#SBATCH --signal``) make the trainer finish the step it is in, write a step checkpoint (the
refresher's state included), shut the pool down and exit with ``PREEMPTED_EXIT``.

Under DDP the ranks agree at every step boundary (one tiny all-reduce), so all of them stop after the same
step even when the signal reached only one. Lightning's own SIGTERM handling (an exception at the next
step, no checkpoint) and its SLURM auto-requeue (an ``hpc_ckpt`` without the refresher's state) are
replaced by ours while fit runs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch

from openbook.errors import PREEMPTED_EXIT
from openbook.trainer.checkpoints import CKPT_FILE, StepCheckpoint, checkpoint_step, list_checkpoints

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption(pl.Callback):
    """Stops the run cleanly on SIGTERM/SIGUSR1; ``stopped_at`` and ``checkpoint`` tell the caller what happened.
    A second signal while the checkpoint is being written ends the process the default way."""

    def __init__(self, checkpoint: StepCheckpoint):
        self.checkpoint = checkpoint
        self.received: int | None = None
        # other reasons to stop the same way (the refresh callback's, when its Ray node is gone): a reason or None
        self.requests: list[Callable[[], str | None]] = []
        self.reason: str | None = None  # why it stopped: the signal's name or a request's reason
        self.stopped_at: int | None = None
        self.path: Path | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning registered its own handlers (Trainer._run), which its teardown restores at fit's end
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                signal.signal(s, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:  # asked twice: the caller will not wait for the checkpoint
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        log.warning("received %s: finishing this step, then a checkpoint, then exit %d", signal.Signals(signum).name,
                    PREEMPTED_EXIT)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        asked = next((r for r in (f() for f in self.requests) if r), None)
        stop = self.received is not None or asked is not None
        if trainer.world_size > 1:  # every rank stops after the same step, whichever got the signal
            flag = torch.tensor([1.0 if stop else 0.0], device=trainer.strategy.root_device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="max").item() > 0)
        if not stop or self.stopped_at is not None:
            return
        step = trainer.global_step
        self.reason = signal.Signals(self.received).name if self.received is not None else asked or "another rank"
        self.stopped_at, self.path = step, self.checkpoint.save(trainer, step)
        trainer.should_stop = True
        if not trainer.is_global_zero:
            return
        if self.path is not None:
            log.warning("preempted: checkpoint %s written at step %d; resume with --resume last", self.path, step)
        elif self.resumable is not None:
            log.warning("preempted at step %d: its checkpoint could not be written (%s); the newest resumable "
                        "checkpoint is %s (step %d, %d steps back)", step, self.checkpoint.last_error,
                        self.resumable, self.resumable_step, step - self.resumable_step)
        else:
            log.warning("preempted at step %d: its checkpoint could not be written (%s) and there is no older one: "
                        "a resume starts the run over", step, self.checkpoint.last_error)

    @property
    def resumable(self) -> Path | None:
        """The checkpoint directory a resume starts from: this stop's, else the newest older one."""
        if self.path is not None:
            return self.path
        found = list_checkpoints(self.checkpoint.root.parent)
        return found[-1] if found else None

    @property
    def resumable_step(self) -> int | None:
        return None if self.resumable is None else checkpoint_step(self.resumable / CKPT_FILE)
