"""``train.closed_book``: a real Trainer run in which the reader's inputs hold the question and nothing else."""

from __future__ import annotations

import pytest
import torch

from openbook.errors import ConfigError
from openbook.trainer.train import build_parts, make_trainer, train_loader
from tests.helpers import tiny_recipe


def recipe(tmp, model: str, closed_book: bool):
    return tiny_recipe(tmp, model=model, generator={"d_model": 32, "ffn": 64, "dropout": 0.0},
                       reader={"n_docs": 2, "max_context_length": 48},
                       train={"max_steps": 3, "batch_size": 4, "closed_book": closed_book},
                       refresh={"enabled": False})


class Inputs:
    """Records the input ids of every encoder call (a forward pre-hook sees what the model reads)."""

    def __init__(self, encoder: torch.nn.Module):
        self.calls: list[list[list[int]]] = []
        encoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.calls.append([row[m.bool()].tolist() for row, m in zip(ids, mask)])


def fit_and_record(tmp, model: str, closed_book: bool):
    cfg = recipe(tmp, model, closed_book)
    parts = build_parts(cfg)
    seen = Inputs(parts.module.generator.get_encoder())
    questions: list[list[int]] = []
    loader = train_loader(parts)
    for i, batch in enumerate(loader):  # the same order fit will see (seeded shuffle)
        if i == cfg.train.max_steps:
            break
        q = batch["query"]
        questions += [row[m.bool()].tolist() for row, m in zip(q["input_ids"], q["attention_mask"])]
    trainer = make_trainer(cfg, [parts.callback], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    rows = [r for call in seen.calls for r in call]
    return cfg, parts, questions, rows


@pytest.mark.parametrize("model", ["rag", "fid"])
def test_closed_book_reader_reads_the_question_alone(tmp_path, model):
    cfg, parts, questions, rows = fit_and_record(tmp_path / "closed", model, closed_book=True)
    k = cfg.reader.n_docs
    assert len(rows) == len(questions) * k  # every (question, doc) row of the 3 steps
    for i, row in enumerate(rows):  # exactly [CLS] question [SEP]: no title, no passage token
        assert row == questions[i // k]
    sep = parts.tokenizer.sep_token_id
    assert all(row.count(sep) == 1 for row in rows)


def test_open_book_reader_reads_question_and_passage(tmp_path):
    """The contrast: the same run without closed_book puts the passage after the question."""
    _, parts, questions, rows = fit_and_record(tmp_path / "open", "rag", closed_book=False)
    sep = parts.tokenizer.sep_token_id
    assert all(row[: len(questions[i // 2])] == questions[i // 2] for i, row in enumerate(rows))
    assert all(len(row) > len(questions[i // 2]) and row.count(sep) >= 2 for i, row in enumerate(rows))


def test_closed_book_is_refused_for_a_span_reader(tmp_path):
    with pytest.raises(ConfigError, match="closed_book needs a generator"):
        tiny_recipe(tmp_path, model="realm_qa", train={"closed_book": True}, refresh={"enabled": False})
