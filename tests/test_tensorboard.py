"""What ``openbook train`` leaves in TensorBoard, read back with TensorBoard's own reader: one events file
per run, the recipe's hyperparameters with the run's results (the HParams tab), and dev recall@k for
every model, the ones without a validation loop included."""

from __future__ import annotations

from pathlib import Path

import pytest

from openbook.trainer.tb import flat_hparams, result_metrics
from tests.helpers import tiny_recipe

READER = {"n_docs": 3, "max_context_length": 48}
MODELS = {  # the models whose validation logged no recall, and RAG, whose validation does
    "dense_retriever": {},
    "ict": {"retriever": {"doc_max_length": 48}},
    "realm_pretrain": {"reader": READER, "realm": {"salient_spans": "title_words", "reader_hidden": 32,
                                                   "reader_ffn": 64}},
    "rag": {"reader": READER, "generator": {"d_model": 32, "ffn": 64, "dropout": 0.0}},
}


def events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run_dir / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    return files, acc


def hparams(acc) -> tuple[dict, set[str]]:
    """The logged hyperparameters and the names of the metrics the HParams tab shows."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    params = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in start.session_start_info.hparams.items()}
    return params, {m.name.tag for m in experiment.experiment.metric_infos}


@pytest.mark.parametrize("model", list(MODELS))
def test_a_run_logs_hparams_with_its_results_and_dev_recall(tmp_path, model):
    from openbook.trainer.train import run_train

    cfg = tiny_recipe(tmp_path, model=model, data={"world": {"num_passages": 100, "seed": 0}},
                      train={"max_steps": 10, "batch_size": 8, "val_every_n_steps": 5, "val_questions": 8},
                      refresh={"enabled": False}, **MODELS[model])
    summary = run_train(cfg, progress=False)
    files, acc = events(tmp_path / "run")
    assert len(files) == 1  # validate-at-start, fit, the final validate and the hparams: one file
    k = 3 if model == "rag" else cfg.train.eval_k  # RAG's validation reports recall@n_docs
    recall = {e.step: e.value for e in acc.Scalars(f"val/recall@{k}")}
    assert len(recall) >= 3 and 0 in recall and max(recall) >= 9  # at the start, in fit, after the last step
    if model != "rag":  # logged by run_train: its own summary's numbers
        assert sorted(recall) == [0, 5, 10]
        assert recall[0] == pytest.approx(summary["dev_recall@5_at_start"])
        assert recall[10] == pytest.approx(summary["dev_recall@5_index_in_use"])
    params, metrics = hparams(acc)
    assert params["model"] == model and params["train.max_steps"] == 10 and params["index.shards"] == 3
    assert params["retriever.encoder.hidden_size"] == 32 and "data.corpus" not in params  # None: no column
    assert {"hparams/final_loss", "hparams/dev_recall@5_index_in_use"} <= metrics
    assert ("hparams/dev_em" in metrics) == (model == "rag")
    logged = acc.Scalars("hparams/dev_recall@5_index_in_use")
    assert [(e.step, e.value) for e in logged] == [(10, pytest.approx(summary["dev_recall@5_index_in_use"]))]


def test_hparams_are_the_recipe_flattened_to_scalars_and_results_skip_nan():
    tree = {"model": "rag", "train": {"lr": 1e-3, "max_steps": 5, "closed_book": False},
            "data": {"corpus": None, "columns": {"id": "docid"}, "world": {"seed": 0}}, "tags": ["a"]}
    assert flat_hparams(tree) == {"model": "rag", "train.lr": 1e-3, "train.max_steps": 5,
                                  "train.closed_book": False, "data.columns.id": "docid", "data.world.seed": 0}
    summary = {"steps": 5, "final_loss": float("nan"), "dev_em": 0.25, "dev_recall@5_at_start": 0.1,
               "tensorboard": "runs/x/tb", "index_version": 2}
    assert result_metrics(summary) == {"hparams/dev_em": 0.25, "hparams/dev_recall@5_at_start": 0.1}
