"""A finished run's final dev figures, recomputed in one process from what the run saved.

The same evaluation ``openbook train`` ends with (``final_evaluation``: gold recall@k against the snapshot in use
and against a fresh encode, the validation loop's answer metrics), from ``run_dir/model.pt`` and a published
snapshot. A multi-process run must report exactly these figures: its ranks evaluate whole batches of the
one-process order and count each question once (tests/test_multiprocess.py compares them).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from openbook.errors import OpenbookError
from openbook.index import SnapshotStore
from openbook.recipe import RecipeConfig
from openbook.trainer.spec import MODULE_WEIGHTS


def evaluate_run(cfg: RecipeConfig, version: int | None = None, **trainer_overrides) -> dict:
    """The dev figures of the weights in ``cfg.run_dir/model.pt`` with snapshot ``version`` (None: the newest) in
    use, in this process (``trainer_overrides``: e.g. ``accelerator="cpu"``); refresh stays off."""
    from openbook.trainer.train import build_parts, final_evaluation, make_trainer

    weights = Path(cfg.run_dir) / MODULE_WEIGHTS
    if not weights.is_file():
        raise OpenbookError(f"{weights}: not found (evaluate a run that finished training)")
    cfg = dataclasses.replace(cfg, refresh=dataclasses.replace(cfg.refresh, enabled=False))
    parts = build_parts(cfg)
    parts.module.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    store = SnapshotStore(cfg.snapshot_dir, index_cfg=cfg.index)
    snap = store.latest() if version is None else store.load(version)
    if snap is None:
        raise OpenbookError(f"{cfg.snapshot_dir}: no usable snapshot to evaluate with")
    parts.holder.swap(snap, force=True)
    dev = parts.spec.dev_loader(parts)
    overrides = {"devices": 1, "num_nodes": 1, "strategy": "auto", "logger": False, "enable_progress_bar": False,
                 **trainer_overrides}
    trainer = make_trainer(cfg, [parts.callback], **overrides)
    try:
        return final_evaluation(parts, trainer, dev, any(e.gold_ids for e in parts.data.dev))
    finally:
        parts.callback.close()
