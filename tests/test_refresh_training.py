"""A real Lightning Trainer with the real Ray refresher on a generated world."""

from __future__ import annotations

import time

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from openbook.index import SnapshotStore
from openbook.refresher.encode import build_doc_tower, encode_rows, numpy_state
from openbook.trainer.train import build_parts, make_trainer, question_loader
from tests.helpers import tiny_recipe, wait_gone

pytestmark = pytest.mark.slow


class Recorder(pl.Callback):
    """Keeps the doc-encoder weights after every step, and every step's loss."""

    def __init__(self, keep_weights: bool = True):
        self.weights, self.losses, self.keep_weights = {}, [], keep_weights

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if self.keep_weights:
            self.weights[trainer.global_step] = numpy_state(pl_module.retriever.doc_encoder)


class Pace(pl.Callback):
    """Test pacing: while a refresh is in flight, each step takes at least ``seconds`` (as a bigger
    model's would), so refreshes finish within these short runs even on a loaded 2-core machine.
    Training still never waits for the refresh itself."""

    def __init__(self, refresh_cb, seconds=0.05):
        self.refresh_cb, self.seconds = refresh_cb, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        coord = self.refresh_cb.coordinator
        if coord is not None and coord.busy:
            time.sleep(self.seconds)


def _fit(cfg, keep_weights=True):
    parts = build_parts(cfg)
    rec = Recorder(keep_weights)
    trainer = make_trainer(cfg, [parts.callback, rec, Pace(parts.callback)], logger=False,
                           enable_progress_bar=False)
    trainer.fit(parts.module, question_loader(cfg, parts.data, parts.tokenizer))
    return parts, rec, trainer


def test_index_refreshes_under_a_running_trainer(tmp_path, ray_session):
    # Small shards make each refresh span several steps, so overlap with training is observable.
    cfg = tiny_recipe(tmp_path, train={"max_steps": 40}, refresh={"schedule": "5", "shard_size": 20, "batch_size": 8})
    parts, rec, trainer = _fit(cfg)
    stats = parts.callback.stats
    versions = [v for _, v in stats.versions]
    assert trainer.global_step == 40
    assert versions == sorted(versions) and versions[-1] > versions[0], versions
    swapped = [e for e in stats.events if e.swapped_step is not None]
    assert len(swapped) >= 2, stats.events
    # Training went on while refreshes were in flight: steps passed between trigger and publication.
    assert any(e.seen_step > e.submitted_step for e in stats.events), stats.events
    assert stats.skipped >= 0 and stats.failures == 0
    # The newest snapshot holds exactly what its encoder_step's weights produce.
    snap = SnapshotStore(cfg.snapshot_dir).latest()
    assert snap.encoder_step in rec.weights and snap.encoder_step > 0
    tower = build_doc_tower(cfg.retriever, len(parts.tokenizer))
    tower.load_state_dict({k: torch.from_numpy(v) for k, v in rec.weights[snap.encoder_step].items()})
    direct = encode_rows(tower, parts.tokens, 0, len(parts.tokens), 64)
    np.testing.assert_allclose(np.asarray(snap.embeddings, np.float32), direct.astype(np.float32),
                               rtol=2e-3, atol=2e-3)
    # ... and differs from what the step-1 weights give: the doc encoder really trained.
    tower.load_state_dict({k: torch.from_numpy(v) for k, v in rec.weights[1].items()})
    early = encode_rows(tower, parts.tokens, 0, len(parts.tokens), 64).astype(np.float32)
    assert np.abs(np.asarray(snap.embeddings, np.float32) - early).max() > 1e-2


def test_golden_losses_async_equals_sync_with_frozen_doc_encoder(tmp_path, ray_session):
    losses = {}
    for mode in ("async", "sync"):
        cfg = tiny_recipe(tmp_path / mode, cache=tmp_path / "cache",
                          train={"max_steps": 25, "freeze_doc_encoder": True},
                          refresh={"schedule": "4", "mode": mode})
        parts, rec, _ = _fit(cfg, keep_weights=False)
        assert len(parts.callback.stats.events) >= 1, mode  # at least one swap under each protocol
        losses[mode] = rec.losses
    assert len(losses["async"]) == 25
    assert losses["async"] == losses["sync"]


class Crash(pl.Callback):
    """Raises mid-training while a refresh is in flight, remembering the actors' pids."""

    def __init__(self, refresh_cb, at_step):
        self.refresh_cb, self.at_step, self.pids = refresh_cb, at_step, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        coord = self.refresh_cb.coordinator
        if trainer.global_step == self.at_step and coord is not None:
            import ray

            self.pids = ray.get([a.pid.remote() for a in coord.actors])
            coord.submit(numpy_state(pl_module.retriever.doc_encoder), trainer.global_step)
            raise RuntimeError("boom")


def test_a_crashing_fit_cancels_the_refresh_and_kills_the_actors(tmp_path, ray_session):

    cfg = tiny_recipe(tmp_path, train={"max_steps": 30}, refresh={"schedule": "100", "shard_size": 10,
                                                                  "batch_size": 4})
    parts = build_parts(cfg)
    crash = Crash(parts.callback, at_step=3)
    trainer = make_trainer(cfg, [parts.callback, crash], logger=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(parts.module, question_loader(cfg, parts.data, parts.tokenizer))
    assert parts.callback.coordinator is None and crash.pids
    alive = wait_gone(crash.pids)
    assert not alive, f"orphaned actor processes: {alive}"
    assert SnapshotStore(cfg.snapshot_dir).versions() == [1]  # the cancelled refresh published nothing
