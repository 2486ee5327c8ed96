"""``openbook train``: fit a recipe with the asynchronous index refresh wired in.

The recipe's ``model`` names a spec (``openbook/registry.py``); the spec builds the LightningModule and
its loaders from the parts every model shares, and this file wires them to the refresh callback and a
Lightning Trainer. Nothing here knows one model from another.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ProgressBar
from torch.utils.data import DataLoader

from openbook.config import to_dict
from openbook.data import tokenize_corpus
from openbook.data.bundle import DataBundle, prepare_data
from openbook.data.cache_lock import cache_lock
from openbook.index import IndexHolder
from openbook.models.retriever import build_retriever
from openbook.recipe import RecipeConfig
from openbook.refresher.publish import publish_in_process
from openbook.registry import model_spec
from openbook.trainer.exchange import trainer_part
from openbook.trainer.pipeline import dev_recall, index_target
from openbook.trainer.refresh_callback import IndexRefreshCallback, Published
from openbook.trainer.spec import ModelSpec, Shared
from openbook.trainer.tb import (
    DevRecallLogger,
    RunLogger,
    StartRecall,
    close_loggers,
    log_hparams,
    log_scalars,
    recall_tag,
)

log = logging.getLogger(__name__)


@dataclass
class TrainParts(Shared):
    """Everything ``fit`` needs, built from a recipe (tests assemble variations of it)."""

    spec: ModelSpec
    module: pl.LightningModule
    callback: IndexRefreshCallback


def build_parts(cfg: RecipeConfig, data: DataBundle | None = None, progress: bool = False) -> TrainParts:
    """``data``: the Python API's own corpus and QA (``prepare_data(cfg.data, corpus=dataset, ...)``);
    ``progress``: bars for world generation and the first in-process encode (log lines come regardless)."""
    pl.seed_everything(cfg.train.seed, workers=True)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    spec = model_spec(cfg.model)
    with cache_lock(cfg.data.cache_dir):  # DDP ranks: the first prepares the data caches, the others find them
        data = data or prepare_data(cfg.data, progress=progress)
        model, tokenizer = build_retriever(cfg.retriever)
        tokens = tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir),
                                 prefix=cfg.retriever.passage_prefix)
        shared = Shared(cfg, data, model, tokenizer, tokens, IndexHolder())
        module = spec.build(shared)  # a generator's own token cache, too
    return TrainParts(**vars(shared), spec=spec, module=module, callback=refresh_callback(shared, spec, progress))


def train_loader(parts: TrainParts) -> DataLoader:
    return parts.spec.train_loader(parts)


def dev_loader(parts: TrainParts) -> DataLoader | None:
    return parts.spec.dev_loader(parts)


def refresh_callback(s: Shared, spec: ModelSpec, progress: bool = False) -> IndexRefreshCallback:
    """The refresh callback, with Ray's pool on rank 0 if the doc encoder trains (else refresh is off:
    every refresh would rebuild the same index) and an in-process build of the first index otherwise."""
    cfg, refresh = s.cfg, s.cfg.refresh
    if refresh.enabled and not spec.trains_doc_encoder(cfg):
        log.info("refresh off: the doc encoder does not train (train.freeze_doc_encoder, train.freeze_retriever, "
                 "refresh.strategy query_side, or FiD without distill)")
        refresh = dataclasses.replace(refresh, enabled=False)

    target = index_target(cfg, s.data.corpus)

    def make_coordinator():
        import ray

        from openbook.refresher.coordinator import RefreshCoordinator
        from openbook.refresher.host import HostedCoordinator

        # Ray's driver in a child process, so a dead Ray node does not take the trainer with it (refresher/host.py);
        # where Ray is up in this process already (a Ray Train worker, a test's session) the trainer shares its fate
        kind = RefreshCoordinator if ray.is_initialized() else HostedCoordinator
        return kind(refresh, cfg.encode, spec.encoder_spec(s), s.tokens, s.data.corpus.ids, target,
                    gpus=refresh_gpus(cfg))

    def build_initial(module: pl.LightningModule, step: int) -> Published:
        snap, stats = publish_in_process(target, spec.doc_encoder(module), s.tokens, s.data.corpus.ids, step,
                                         cfg.encode.batch_size, progress, sharded=refresh.strategy == "rolling")
        log.info("index v%d built in this process from the step-%d weights: %d passages, %.0f passages/s, "
                 "published in %.1f s", snap.version, step, stats["docs"], stats["docs_per_second"],
                 stats["publish_seconds"])
        return Published(snap.version, str(snap.path), step, snap.manifest.weights_time)

    return IndexRefreshCallback(refresh, s.holder, make_coordinator, build_initial, spec.doc_encoder, cfg.index)


def refresh_gpus(cfg: RecipeConfig) -> list[int] | None:
    """The GPUs of this node a local Ray offers the encoder actors: none the trainer's ranks train on
    (``refresher.cluster.pool_gpus``); None where no GPU is visible (Ray finds none either)."""
    import ray

    from openbook.refresher.cluster import cluster_address, pool_gpus

    visible = torch.cuda.device_count()
    if not visible or ray.is_initialized() or cluster_address(cfg.refresh.address)[0] is not None:
        return None  # no GPU, or a Ray that is not ours to start (Ray Train's, a joined cluster) keeps its own
    on_gpu = cfg.train.accelerator in ("gpu", "cuda", "auto")
    return pool_gpus(cfg.refresh.gpu_ids, cfg.refresh.gpus_per_worker, cfg.train.devices if on_gpu else 0, visible)


def make_trainer(cfg: RecipeConfig, callbacks: list, logger=None, **overrides) -> pl.Trainer:
    t = cfg.train
    if logger is None:
        logger = RunLogger(cfg.run_dir)
    if overrides.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        from openbook.trainer.progress_bar import StepProgressBar
        callbacks = [*callbacks, StepProgressBar()]
    if cfg.monitor.prometheus_port:  # after the refresh callback: the exporter reads what it logged
        from openbook.trainer.metrics_exporter import monitor_callbacks
        callbacks = [*callbacks, *monitor_callbacks(cfg.monitor, run_name(cfg))]
    # Always there: periodic checkpoints (if asked for), the preemption checkpoint, and the RNG state a resume
    # restores. Lightning runs checkpoint callbacks last, after the refresh callback and Preemption.
    from openbook.trainer.checkpoints import StepCheckpoint
    from openbook.trainer.preemption import Preemption
    step_ckpt = StepCheckpoint(cfg.run_dir, t.checkpoint_every_n_steps, t.keep_checkpoints, config_yaml(cfg))
    step_ckpt.free_more = next((c.free_snapshots for c in callbacks if isinstance(c, IndexRefreshCallback)), None)
    pre = Preemption(step_ckpt)
    pre.requests += [lambda c=c: c.stop_request for c in callbacks if isinstance(c, IndexRefreshCallback)]
    callbacks = [*callbacks, pre, step_ckpt]
    val = {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None} if t.val_every_n_steps else {}
    kwargs = dict(**val, max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
                  strategy=t.strategy, precision=t.precision, log_every_n_steps=t.log_every_n_steps,
                  callbacks=callbacks, logger=logger, enable_checkpointing=True,
                  enable_model_summary=False,
                  num_sanity_val_steps=0, deterministic=False)
    kwargs.update(overrides)
    if "plugins" not in kwargs:
        from lightning_fabric.plugins.environments import SLURMEnvironment

        if SLURMEnvironment.detect():  # openbook's Preemption checkpoints and launch/slurm.sbatch requeues, not Lightning
            kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    return pl.Trainer(**kwargs)


def run_name(cfg: RecipeConfig) -> str:
    """What tells this run from others in shared monitoring: its run dir's name (unique per run, where the
    recipe's name is shared by every run of it), else the recipe's name."""
    return Path(cfg.run_dir).resolve().name or cfg.name


def fit(trainer: pl.Trainer, parts: TrainParts, loader: DataLoader, ckpt_path=None, **kwargs) -> None:
    """``trainer.fit``, resuming from ``ckpt_path`` (our own checkpoint, so not weights-only) when given."""
    extra = {"ckpt_path": str(ckpt_path), "weights_only": False} if ckpt_path else {}
    trainer.fit(parts.module, loader, **extra, **kwargs)


def validate_at_start(parts: TrainParts, trainer: pl.Trainer, dev: DataLoader) -> dict:
    """Dev metrics of the untrained models on the first snapshot (which the refresh callback builds for this
    validate and fit then starts from); every rank takes part."""
    metrics = trainer.validate(parts.module, dev, verbose=False)[0]
    return {f"dev_{key.split('/')[-1]}_at_start": round(v, 4) for key, v in metrics.items()}


def run_train(cfg: RecipeConfig, progress: bool = True, data: DataBundle | None = None, overwrite: bool = False,
              **trainer_overrides) -> dict:
    """``trainer_overrides`` go to ``pl.Trainer`` (launch/ray_train.py passes Ray's strategy and plugin); ``data``
    as in ``build_parts``. Rank 0 holds the run directory's lock throughout; a new run (no resume) into a directory
    holding a previous run's results is refused unless ``overwrite``. Returns the summary on rank 0 (``{}``
    elsewhere); a preempted run returns ``{"preempted": True, ...}`` on every rank."""
    from openbook.trainer.rundir import RunLock, check_fresh, launch_rank

    ckpt = None
    if cfg.train.resume_from:  # before building anything: a wrong path or setting fails fast, in one line
        from openbook.trainer.checkpoints import resolve_checkpoint
        from openbook.trainer.resume import check_resume
        ckpt = resolve_checkpoint(cfg.train.resume_from, cfg.run_dir)
        check_resume(cfg, ckpt)
        check_unfinished(cfg, ckpt)
        log.info("resuming from %s", ckpt)
    lock = RunLock(cfg.run_dir).acquire() if launch_rank() == 0 else None
    try:
        if lock is not None and ckpt is None:
            check_fresh(cfg.run_dir, overwrite)
        return _train(cfg, progress, data, ckpt, trainer_overrides)
    finally:
        if lock is not None:
            lock.release()


def check_unfinished(cfg: RecipeConfig, ckpt: Path) -> None:
    """A resume from a checkpoint at ``train.max_steps`` or beyond would train nothing and report a NaN loss
    and an empty history over the run's results: refused in one line (:class:`FinishedRun`)."""
    from openbook.errors import FinishedRun
    from openbook.trainer.checkpoints import checkpoint_step

    step = checkpoint_step(ckpt)
    if step >= cfg.train.max_steps:
        raise FinishedRun(f"{ckpt} is at step {step} and train.max_steps is {cfg.train.max_steps}: the run is "
                          f"finished, nothing to train (its results are kept); to train on, add --set "
                          f"train.max_steps=N with N > {step}")


def _train(cfg: RecipeConfig, progress: bool, data: DataBundle | None, ckpt, trainer_overrides: dict) -> dict:
    parts = build_parts(cfg, data, progress)
    try:
        return _fit_and_report(parts, ckpt, progress, trainer_overrides)
    finally:
        parts.callback.close()


def _fit_and_report(parts: TrainParts, ckpt, progress: bool, trainer_overrides: dict) -> dict:
    """Fit, then the final evaluation on every rank (a rank that left early would hang the others' collectives);
    rank 0 saves and reports."""
    cfg = parts.cfg
    dev = parts.spec.dev_loader(parts)
    has_gold = any(e.gold_ids for e in parts.data.dev)  # no gold passages (pydoc text): no recall to report
    own_recall = has_gold and dev is None  # no validation loop logs val/recall@k: it is logged here
    start = StartRecall(parts, log=own_recall) if has_gold else None
    callbacks = [parts.callback, *([start] if start else []),
                 *([DevRecallLogger(parts, cfg.train.val_every_n_steps)] if own_recall else [])]
    trainer = make_trainer(cfg, callbacks, enable_progress_bar=progress, **trainer_overrides)
    first = dev is not None and cfg.train.validate_at_start and ckpt is None
    at_start = validate_at_start(parts, trainer, dev) if first else {}
    t0 = time.time()
    fit(trainer, parts, parts.spec.train_loader(parts), ckpt, val_dataloaders=dev if cfg.train.val_every_n_steps
        else None)
    seconds = time.time() - t0
    loss = float(trainer.callback_metrics.get("train/loss", float("nan")))  # before validate replaces the metrics
    save_history(parts, trainer.global_rank)
    preempted = preemption_summary(trainer)
    if preempted is not None:  # the checkpoint is written and the pool is down: no final evaluation
        close_loggers(trainer)
        return preempted if trainer.is_global_zero else {"preempted": True}
    final = final_evaluation(parts, trainer, dev, has_gold)
    if not trainer.is_global_zero:  # rank 0 saves and reports for the run
        return {}
    save_final(parts, trainer.global_step)
    summary = run_summary(parts, trainer, seconds, loss)
    k = cfg.train.eval_k
    if start is not None and start.value is not None:
        summary[f"dev_recall@{k}_at_start"] = start.value
    summary.update({**at_start, **final})
    if own_recall:
        log_scalars(trainer, {recall_tag(cfg): summary[f"dev_recall@{k}_index_in_use"]}, trainer.global_step)
    log_hparams(trainer, cfg, summary)
    close_loggers(trainer)
    return summary


def final_evaluation(parts: TrainParts, trainer: pl.Trainer, dev: DataLoader | None, has_gold: bool) -> dict:
    """Every rank: dev gold recall@k against the snapshot in use and against a fresh encode of the corpus by the
    final doc encoder (encoded in blocks shared out over the ranks), and the validation loop's answer metrics
    (each rank evaluates whole batches, each question counts once): the figures one process gets."""
    out: dict = {}
    if has_gold:
        k, part = parts.cfg.train.eval_k, trainer_part(trainer)
        out = {f"dev_recall@{k}_index_in_use": dev_recall(parts, parts.holder.get(), part),
               f"dev_recall@{k}_fresh_encode": dev_recall(parts, part=part)}
    if dev is not None:
        metrics = trainer.validate(parts.module, dev, verbose=False)[0]
        out.update({f"dev_{key.split('/')[-1]}": round(v, 4) for key, v in metrics.items()})
    return out


def preemption_summary(trainer: pl.Trainer) -> dict | None:
    from openbook.trainer.preemption import PREEMPTED_EXIT, Preemption

    pre = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    if pre is None or pre.stopped_at is None:
        return None
    run_dir = shlex.quote(str(pre.checkpoint.root.parent))  # run_dir/checkpoints: whatever set it (--set run_dir=...)
    resumable = pre.resumable  # the newest checkpoint a resume starts from (an older one if this one failed)
    return {"preempted": True, "reason": pre.reason, "steps": pre.stopped_at,
            "checkpoint": str(resumable) if resumable else None,
            "checkpoint_step": pre.resumable_step, "checkpoint_written": pre.path is not None,
            **({} if pre.path else {"checkpoint_error": pre.checkpoint.last_error}),
            "exit_code": PREEMPTED_EXIT, "resume": f"openbook train --resume {run_dir}", **scheduler_job()}


def run_summary(parts: TrainParts, trainer: pl.Trainer, seconds: float, loss: float | None = None) -> dict:
    stats = parts.callback.stats
    stalls = np.array(stats.stalls) if stats.stalls else np.zeros(1)
    return {"steps": trainer.global_step, "seconds": round(seconds, 2),
            "final_loss": round(float(trainer.callback_metrics.get("train/loss", float("nan")))
                                if loss is None else loss, 4),
            "index_version": parts.holder.version, "index_encoder_step": parts.holder.get().encoder_step,
            "refreshes_published": len(stats.events), "refreshes_skipped": stats.skipped,
            "passages_encoded_by_refresh": stats.initial_docs + sum(e.docs for e in stats.events),
            "passages_encoded_initial": stats.initial_docs,
            "refresh_failures": stats.failures, "refresh_waits": stats.waits,
            "swap_stall_p99_ms": round(float(np.percentile(stalls, 99)) * 1e3, 3),
            "checkpoint_failures": checkpoint_failures(trainer),
            "tensorboard": str(Path(parts.cfg.run_dir) / "tb"), **scheduler_job(),
            **({"missing_gold_dropped": parts.data.dropped} if parts.data.dropped else {})}


def scheduler_job() -> dict:
    """Under SLURM: the job id and how many times it was requeued (what the run lock records too)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job_id": job, "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else {}


def checkpoint_failures(trainer: pl.Trainer) -> int:
    """Step checkpoints that could not be written (a full disk...); 0 without checkpointing."""
    from openbook.trainer.checkpoints import StepCheckpoint

    return sum(c.failed for c in trainer.callbacks if isinstance(c, StepCheckpoint))


def config_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_final(parts, step: int | None = None) -> None:
    """The resolved recipe and the weights the model's spec saves (``openbook search`` and later stages load them),
    with the global ``step`` they were taken at (``build-index`` stamps its snapshot with it; ``search`` compares)."""
    from openbook.trainer.weights import FINAL_STEP_FILE, write_final_step

    run = Path(parts.cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_yaml(parts.cfg))
    parts.spec.save(parts.module, run)
    if step is not None:
        write_final_step(run, step)
    else:  # a step left by an earlier run must not describe these weights
        (run / FINAL_STEP_FILE).unlink(missing_ok=True)


def save_history(parts, rank: int) -> Path:
    """Per rank: the index version in use after every step and each refresh's timeline (JSON)."""
    stats = parts.callback.stats
    path = Path(parts.cfg.run_dir) / f"refresh_history_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"versions": stats.versions, "events": [dataclasses.asdict(e) for e in stats.events],
                                "skipped": stats.skipped, "failures": stats.failures, "waits": stats.waits,
                                "initial_docs": stats.initial_docs}))
    return path
