"""What ``openbook train`` writes to TensorBoard beside the modules' own ``self.log``: the recipe's
hyperparameters with the run's results (the HParams tab), and dev recall@k for the models whose
validation does not log it (the dense retriever, ICT and REALM pretraining answer no questions, so they
have no validation loop)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from openbook.config import to_dict
from openbook.trainer.exchange import trainer_part
from openbook.trainer.pipeline import dev_recall

HPARAM_METRIC_PREFIX = "hparams/"


class RunLogger(TensorBoardLogger):
    """One events file per run. Lightning closes the writer after every ``fit`` and ``validate`` and the
    next write opens a new file, so validate-at-start, fit, the final validate and the hparams would each
    land in their own file (and ``openbook report``, which reads the newest file of a run directory, would
    see only the last). Here ``finalize`` only flushes; :meth:`close` ends the run."""

    def __init__(self, save_dir: str):
        super().__init__(save_dir, name="tb", version="", default_hp_metric=False)  # run_train logs the hparams

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:
            self.experiment.flush()
        if status == "success":
            self.save()  # hparams.yaml, as Lightning's finalize writes it

    @rank_zero_only
    def close(self) -> None:
        super().finalize("success")


def flat_hparams(tree: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"train.lr": 1e-3, ...}``: nested config sections joined with dots; only scalar values (None,
    lists and mappings have no HParams column)."""
    out: dict[str, bool | int | float | str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[f"{prefix}{key}"] = value
    return out


def result_metrics(summary: dict) -> dict[str, float]:
    """The run's results for the HParams tab: final loss and every dev metric of the summary."""
    keep = [k for k in summary if k == "final_loss" or k.startswith("dev_")]
    return {f"{HPARAM_METRIC_PREFIX}{k}": float(summary[k]) for k in keep
            if isinstance(summary[k], (int, float)) and math.isfinite(summary[k])}


def log_hparams(trainer: pl.Trainer, cfg, summary: dict) -> None:
    """The resolved recipe (flattened, scalars) with the run's results as its metrics, at the last step."""
    params, metrics = flat_hparams(to_dict(cfg)), result_metrics(summary)
    metrics = metrics or {f"{HPARAM_METRIC_PREFIX}steps": float(trainer.global_step)}  # none: no hparams entry
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics, step=trainer.global_step)
        else:
            logger.log_hyperparams(params)
            logger.log_metrics(metrics, trainer.global_step)
        logger.save()


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step)


def close_loggers(trainer: pl.Trainer) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, RunLogger):
            logger.close()


def recall_tag(cfg) -> str:
    return f"val/recall@{cfg.train.eval_k}"


class DevRecallLogger(pl.Callback):
    """``val/recall@k`` (k = train.eval_k) of the dev questions against the snapshot in use, every
    ``every`` steps of fit (``train.val_every_n_steps``), for a model without a validation loop. The value
    at step 0 and after the last step are ``run_train``'s own summary numbers, which it logs itself."""

    def __init__(self, parts, every: int):
        self.parts, self.every, self.last = parts, every, -1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every or step % self.every or step == self.last or step >= trainer.max_steps:
            return
        self.last = step
        recall = dev_recall(self.parts, self.parts.holder.get(), trainer_part(trainer))  # every rank takes part
        if trainer.is_global_zero:
            log_scalars(trainer, {recall_tag(self.parts.cfg): recall}, step)


class StartRecall(pl.Callback):
    """Dev gold recall@k (k = train.eval_k) of the untrained query tower against the first snapshot in use, taken
    before step 1 (the summary's ``dev_recall@k_at_start``): that snapshot is the initial weights' encode of the
    corpus, built once by the pool (or rank 0), so no rank encodes the corpus for this figure. A checkpoint
    carries it, so a resumed run reports the figure of its start. ``log``: also log it as ``val/recall@k`` at
    step 0 (models without a validation loop)."""

    def __init__(self, parts, log: bool):
        self.parts, self.log, self.value = parts, log, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.value is not None or trainer.global_step > 0:  # measured before, or resumed: not the start
            return
        self.value = dev_recall(self.parts, self.parts.holder.get(), trainer_part(trainer))  # shared by the ranks
        if self.log and trainer.is_global_zero:
            log_scalars(trainer, {recall_tag(self.parts.cfg): self.value}, 0)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state.get("value")
