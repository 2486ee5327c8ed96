"""``build-index`` after ``train`` encodes with the run's latest weights (issue 19), and ``search`` says when the
snapshot it searches was encoded at another step than its query encoder."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from openbook.cli import main
from openbook.data import tokenize_corpus
from openbook.data.bundle import prepare_data
from openbook.index import SnapshotStore
from openbook.models.retriever import build_retriever
from openbook.refresher.encode import encode_rows
from openbook.trainer.checkpoints import list_checkpoints, resolve_checkpoint
from openbook.trainer.train import build_parts, config_yaml, fit, make_trainer, train_loader
from openbook.trainer.weights import FINAL_STEP_FILE, latest_weights
from tests.helpers import tiny_recipe


def _recipe(tmp: Path, max_steps: int = 6):
    return tiny_recipe(tmp, train={"max_steps": max_steps, "checkpoint_every_n_steps": 4},
                       refresh={"enabled": False})


def _build_index(path: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["build-index", "--config", str(path), "--quiet", *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def _direct(cfg, model) -> np.ndarray:
    """The corpus encoded here with ``model``'s doc encoder (float16, as snapshots store it)."""
    data = prepare_data(cfg.data)
    _, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir))
    return encode_rows(model.doc_encoder, tokens, 0, len(tokens), 64)


def _stored(cfg, version: int) -> np.ndarray:
    return np.asarray(SnapshotStore(cfg.snapshot_dir).load(version).embeddings, np.float32)


def _search_warnings(path: Path, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openbook.trainer.search"):
        assert main(["search", "--config", str(path), "-k", "2", "who wrote the passage"]) == 0
    return [r.getMessage() for r in caplog.records if r.name == "openbook.trainer.search"]


def test_build_index_after_train_encodes_with_the_trained_weights_and_search_warns_on_a_mismatch(
        tmp_path, capsys, caplog):
    cfg = _recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(cfg))
    assert main(["train", "--config", str(path), "--quiet"]) == 0  # 6 steps, a checkpoint at 4
    run = Path(cfg.run_dir)
    assert json.loads((run / FINAL_STEP_FILE).read_text()) == {"step": 6}
    assert [p.name for p in list_checkpoints(run)] == ["step-00000004"]
    trained, _ = build_retriever(cfg.retriever)
    trained.load_state_dict(torch.load(run / "retriever.pt", weights_only=True))
    untrained, _ = build_retriever(cfg.retriever)

    latest = _build_index(path, capsys)  # the default: the run's latest weights, the final ones (step 6 > 4)
    assert (latest["weights"], latest["weights_step"], latest["encoder_step"]) == ("final", 6, 6)
    assert latest["weights_path"] == str(run / "retriever.pt")
    assert SnapshotStore(cfg.snapshot_dir).load(latest["version"]).encoder_step == 6
    np.testing.assert_allclose(_stored(cfg, latest["version"]), _direct(cfg, trained).astype(np.float32), atol=2e-3)
    assert _search_warnings(path, caplog) == []  # the newest snapshot and the query encoder: both step 6

    init = _build_index(path, capsys, "--weights", "init")  # as before issue 19: the recipe's own weights
    assert (init["weights"], init["weights_step"], init["encoder_step"], init["weights_path"]) == ("init", 0, 0, None)
    assert init["version"] == latest["version"] + 1
    np.testing.assert_allclose(_stored(cfg, init["version"]), _direct(cfg, untrained).astype(np.float32), atol=2e-3)
    assert not np.allclose(_stored(cfg, init["version"]), _stored(cfg, latest["version"]), atol=2e-3)
    (line,) = _search_warnings(path, caplog)  # now the newest snapshot is the untrained one: said, in one line
    assert line.startswith(f"snapshot v{init['version']} was encoded with the weights of step 0, the query encoder "
                           "is the final weights of step 6") and "\n" not in line, line
    frozen = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, freeze_doc_encoder=True))
    from openbook.trainer.search import warn_if_mismatched
    snap = SnapshotStore(cfg.snapshot_dir).load(init["version"])
    assert not warn_if_mismatched(frozen, str(path), snap, latest_weights(run))  # one doc encoder at every step

    again = _build_index(path, capsys)
    assert again["encoder_step"] == 6 and _search_warnings(path, caplog) == []


def test_build_index_takes_a_step_checkpoint_newer_than_the_final_weights(tmp_path, capsys):
    """A finished run (final weights of step 6) resumed to step 8 and not finished yet: its step-8 checkpoint
    is the latest, and build-index reads the retriever's weights out of that Lightning checkpoint."""
    cfg = _recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(cfg))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    longer = _recipe(tmp_path, max_steps=8)
    parts = build_parts(longer)
    trainer = make_trainer(longer, [parts.callback], logger=False, enable_progress_bar=False)
    fit(trainer, parts, train_loader(parts), resolve_checkpoint("last", longer.run_dir))  # no final save
    assert [p.name for p in list_checkpoints(cfg.run_dir)] == ["step-00000004", "step-00000008"]
    summary = _build_index(path, capsys)
    assert (summary["weights"], summary["weights_step"], summary["encoder_step"]) == ("checkpoint", 8, 8)
    assert summary["weights_path"].endswith("step-00000008/model.ckpt")
    np.testing.assert_allclose(_stored(cfg, summary["version"]),
                               _direct(cfg, parts.module.retriever).astype(np.float32), atol=2e-3)


def test_final_weights_of_unknown_step_are_weighed_by_file_time(tmp_path, capsys):
    """Runs from before the step was recorded have retriever.pt without weights.json: newer than the newest
    checkpoint by file time, they are the latest, of step -1 (unknown)."""
    cfg = _recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(cfg))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    (Path(cfg.run_dir) / FINAL_STEP_FILE).unlink()
    got = latest_weights(cfg.run_dir)
    assert (got.source, got.step) == ("final", -1)
    ckpt = list_checkpoints(cfg.run_dir)[-1] / "model.ckpt"
    later = (Path(cfg.run_dir) / "retriever.pt").stat().st_mtime + 10
    os.utime(ckpt, (later, later))  # as if the run had been resumed and checkpointed since
    assert latest_weights(cfg.run_dir).source == "checkpoint"


@pytest.mark.parametrize("weights", ["latest", "init"])
def test_build_index_without_a_run_uses_the_recipes_weights(tmp_path, capsys, weights):
    cfg = _recipe(tmp_path)
    path = tmp_path / "recipe.yaml"
    path.write_text(config_yaml(cfg))
    summary = _build_index(path, capsys, "--weights", weights)
    assert (summary["weights"], summary["encoder_step"]) == ("init", 0)
