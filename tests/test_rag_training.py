"""RAG LightningModule: a real Trainer with refresh on, both variants; bad inputs refused clearly."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pytorch_lightning as pl

from openbook.config import from_dict
from openbook.errors import SnapshotError
from openbook.recipe import RecipeConfig
from openbook.trainer.batches import QACollator
from openbook.trainer.train import build_parts, dev_loader, make_trainer, train_loader
from tests.helpers import tiny_recipe


def rag_recipe(tmp, variant, **train):
    return tiny_recipe(tmp, model="rag", generator={"d_model": 32, "ffn": 64, "dropout": 0.0},
                       reader={"n_docs": 3, "max_context_length": 48}, rag={"variant": variant, "num_beams": 2},
                       train={"max_steps": 24, "batch_size": 8, "lr": 3e-3, "val_questions": 8, **train},
                       refresh={"schedule": "8", "mode": "sync"})  # sync: the swap is certain


class Losses(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["token", "sequence"])
def test_rag_trains_with_refresh_and_evaluates(tmp_path, ray_session, variant):
    cfg = rag_recipe(tmp_path, variant)
    parts = build_parts(cfg)
    rec = Losses()
    trainer = make_trainer(cfg, [parts.callback, rec], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert len(rec.losses) == 24 and all(np.isfinite(rec.losses))
    assert np.mean(rec.losses[-6:]) < np.mean(rec.losses[:6])  # it learns something
    assert parts.holder.version >= 2  # the index was refreshed under the RAG trainer
    metrics = trainer.validate(parts.module, dev_loader(parts), verbose=False)[0]
    assert {"val/em", "val/f1", "val/recall@3"} <= set(metrics)
    assert 0.0 <= metrics["val/em"] <= metrics["val/f1"] <= 1.0  # an exact match scores F1 1


def test_snapshot_dim_mismatch_is_refused(tmp_path, ray_session):
    cfg = rag_recipe(tmp_path, "token", max_steps=2)
    parts = build_parts(cfg)
    other = from_dict(RecipeConfig, {**_as_dict(cfg), "retriever": {**_as_dict(cfg)["retriever"],
                                                                     "projection_dim": 8}})
    wrong = build_parts(other)  # a retriever whose embeddings are 8-d
    trainer = make_trainer(other, [wrong.callback], logger=False, enable_progress_bar=False, max_steps=1)
    trainer.fit(wrong.module, train_loader(wrong))
    parts.holder.swap(wrong.holder.get())  # an 8-d snapshot under a 32-d query encoder
    with pytest.raises(SnapshotError, match=r"snapshot dim 8 does not match the query encoder's 32"):
        parts.module.training_step(next(iter(train_loader(parts))), 0)


def _as_dict(cfg):
    import dataclasses
    return dataclasses.asdict(cfg)


def test_long_questions_are_truncated_with_one_warning(caplog):
    from openbook.data.qa import QAExample
    from openbook.models.retriever import EncoderConfig, load_tokenizer

    tok = load_tokenizer(EncoderConfig())
    collate = QACollator(tok, query_max_length=8, answer_max_length=6)
    long = QAExample(question="word " * 40 + "?", answers=["yes"])
    with caplog.at_level(logging.WARNING):
        b1 = collate([(long, -1)])
        collate([(long, -1)])
    assert b1["query"]["input_ids"].shape[1] == 8
    assert sum("truncated" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize("scale", [0.0, 0.1])
def test_reader_lr_scale_sets_the_generators_rate(tmp_path, scale):
    cfg = tiny_recipe(tmp_path, model="rag", generator={"d_model": 32, "ffn": 64},
                      reader={"n_docs": 2, "lr_scale": scale}, train={"lr": 2e-3})
    module = build_parts(cfg).module
    opt = module.configure_optimizers()["optimizer"]
    in_opt = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in module.named_parameters():
        if name.startswith("generator."):
            assert p.requires_grad == (scale > 0)
            assert in_opt.get(id(p)) == (pytest.approx(2e-3 * scale) if scale else None)
        else:
            assert in_opt[id(p)] == pytest.approx(2e-3)


@pytest.mark.parametrize("at_start", [True, False])
def test_validate_at_start_off_skips_only_the_first_answer_evaluation(tmp_path, at_start):
    from openbook.trainer.train import run_train

    cfg = tiny_recipe(tmp_path, model="rag", generator={"d_model": 32, "ffn": 64, "dropout": 0.0},
                      reader={"n_docs": 2, "max_context_length": 48}, refresh={"enabled": False},
                      train={"max_steps": 2, "batch_size": 4, "val_questions": 8, "validate_at_start": at_start})
    s = run_train(cfg, progress=False)
    assert ("dev_em_at_start" in s) == at_start
    assert "dev_em" in s and "dev_recall@5_at_start" in s  # the final evaluation and the start's gold recall stay
