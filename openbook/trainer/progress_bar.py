"""The training progress bar in optimizer steps.

Runs here are bounded by ``train.max_steps`` (``max_epochs`` is -1), so Lightning's own bars mislead:
Rich's reads "Epoch 1/-2" and tqdm's restarts at every epoch over that epoch's batches. This one counts
steps from the first (a resumed run's included) to ``max_steps``, across epochs.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

DESCRIPTION = "step"


class StepProgressBar(TQDMProgressBar):
    @property
    def train_description(self) -> str:
        return DESCRIPTION

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.n = bar.initial = trainer.global_step  # a resumed run: its rate counts from here

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        pass  # no reset and no "Epoch N": the bar counts steps across epochs

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar too
