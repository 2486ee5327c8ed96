"""refresh.strategy rolling (issue 20) under a real Lightning Trainer and the real Ray pool: bounded staleness,
the lag metrics, and a resume in the middle of a rotation that goes on as if uninterrupted."""

from __future__ import annotations

import shutil

import pytest
import pytorch_lightning as pl

from openbook.index import SnapshotStore
from openbook.index.snapshot import read_manifest
from openbook.trainer.checkpoints import resolve_checkpoint
from openbook.trainer.train import build_parts, fit, make_trainer, run_summary, train_loader
from tests.helpers import tiny_recipe
from tests.test_checkpoint_resume import Kill

pytestmark = pytest.mark.slow


class Watch(pl.Callback):
    """After every step: the refresh metrics, the loss, and (rotation part, per-shard encoder steps) of the
    snapshot in use."""

    def __init__(self, parts):
        self.parts, self.metrics, self.losses, self.index = parts, {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        self.metrics[step] = self.parts.callback.metrics(trainer)
        self.losses[step] = float(outputs["loss"])
        m = self.parts.holder.get().manifest
        self.index[step] = (m.rotation.get("part"), tuple(s["encoder_step"] for s in m.shards))


def test_rolling_refresh_bounds_staleness_and_reports_the_shard_lags(tmp_path, ray_session):
    """6 shards, R=3, a refresh every 4 steps swapped in 2 steps later (deterministic async): the stalest
    shard is never more than R*4 + 2 steps behind, oldest >= mean >= the newest shard's lag at every step, the
    rotation goes 0, 1, 2, 0, ..., and each refresh encodes a third of the corpus."""
    interval, lag, parts_r, steps = 4, 2, 3, 26
    cfg = tiny_recipe(tmp_path, train={"max_steps": steps}, index={"shards": 6},
                      refresh={"schedule": str(interval), "swap_lag": lag, "strategy": "rolling",
                               "rolling_parts": parts_r})
    parts = build_parts(cfg)
    watch = Watch(parts)
    trainer = make_trainer(cfg, [parts.callback, watch], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert trainer.global_step == steps
    for step, m in watch.metrics.items():
        oldest, mean, newest = m["index/lag_steps_oldest"], m["index/lag_steps_mean"], m["index/lag_steps"]
        assert oldest >= mean >= newest >= 0, (step, m)
        assert oldest <= parts_r * interval + lag, (step, m)
    assert max(m["index/lag_steps_oldest"] for m in watch.metrics.values()) > interval + lag  # not a full refresh
    assert any(m["index/lag_steps_mean"] > m["index/lag_steps"] for m in watch.metrics.values())
    events = parts.callback.stats.events
    assert [e.part for e in events] == [i % 3 for i in range(len(events))] and len(events) == 6
    n = len(parts.tokens)
    assert all(n // 3 - 2 <= e.docs <= n // 3 + 2 for e in events), [e.docs for e in events]
    assert parts.callback.stats.failures == 0
    summary = run_summary(parts, trainer, 0.0)
    assert summary["passages_encoded_by_refresh"] == n + sum(e.docs for e in events)
    assert summary["passages_encoded_initial"] == n
    # the snapshot swapped in at step 23 (the step-20 refresh, part 1) holds shards of the last 3 refreshes
    assert watch.index[23] == (1, (16, 16, 20, 20, 12, 12)), watch.index


def _recipe(tmp, cache, max_steps=20):
    return tiny_recipe(tmp, cache=cache, train={"max_steps": max_steps, "checkpoint_every_n_steps": 8, "seed": 3},
                       refresh={"schedule": "4", "mode": "sync", "strategy": "rolling", "rolling_parts": 3})


def _run(cfg, resume=None, kill=None):
    parts = build_parts(cfg)
    watch = Watch(parts)
    trainer = make_trainer(cfg, [parts.callback, watch, *([Kill(kill)] if kill else [])], logger=False,
                           enable_progress_bar=False)
    ckpt = resolve_checkpoint(resume, cfg.run_dir) if resume else None
    if kill:
        with pytest.raises(RuntimeError, match="killed"):
            fit(trainer, parts, train_loader(parts), ckpt)
    else:
        fit(trainer, parts, train_loader(parts), ckpt)
    return parts, watch


@pytest.mark.parametrize("lost", [False, True])
def test_a_run_resumed_mid_rotation_continues_the_rotation(tmp_path, ray_session, lost):
    """R=3, a refresh every 4 steps (sync: swapped in at the next step). Killed after step 8, with the step-4
    refresh (part 0) in use and the step-8 one (part 1) published but waiting for its swap; resumed to step 20.
    The snapshots in use at every step, as (rotation part, per-shard encoder steps), and the losses equal an
    uninterrupted run's. ``lost``: the waiting refresh's snapshot is gone, so the resume redoes it, on the
    snapshot in use, from the weights the checkpoint kept."""
    cache = tmp_path / "cache"
    _, full = _run(_recipe(tmp_path / "full", cache))
    assert full.index[20] == (0, (16, 8, 12)) and full.index[9] == (1, (4, 8, 0)), full.index
    first, cut = _run(_recipe(tmp_path / "cut", cache), kill=8)
    assert cut.index[8] == (0, (4, 0, 0))
    if lost:  # the checkpoint's waiting refresh (step 8, swapped in by the killed process just before the kill)
        store = SnapshotStore(first.cfg.snapshot_dir)
        (waiting,) = [v for v in store.versions() if read_manifest(store.path(v)).encoder_step == 8]
        shutil.rmtree(store.path(waiting))
    _, resumed = _run(_recipe(tmp_path / "cut", cache), resume="last")
    assert sorted(resumed.index) == list(range(9, 21))
    assert {**cut.index, **resumed.index} == full.index
    both = {**cut.losses, **resumed.losses}
    for step, loss in full.losses.items():
        assert loss == pytest.approx(both[step], abs=1e-4), step
