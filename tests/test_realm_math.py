"""REALM pieces against float64 references written independently here (loops, no shared code)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from openbook.models.realm import (
    IGNORE,
    RegexSpanFinder,
    doc_utility,
    marginal_gain,
    mask_salient_span,
    realm_mlm_loss,
    span_marginal_nll,
    token_logp,
)
from openbook.models.retriever import EncoderConfig, load_tokenizer
from openbook.trainer.retrieval import exclude

B, K, L, V = 2, 3, 6, 11


@pytest.fixture(scope="module")
def mlm():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, K, L, V, generator=g) * 2
    scores = torch.randn(B, K, generator=g) * 2
    labels = torch.full((B, L), IGNORE)
    labels[0, 1], labels[0, 2], labels[1, 4] = 3, 7, 10
    return logits, scores, labels


def _p(logits_row):  # float64 softmax of a list
    m = max(logits_row)
    e = [math.exp(x - m) for x in logits_row]
    return [x / sum(e) for x in e]


def test_realm_loss_is_the_per_token_marginal(mlm):
    logits, scores, labels = mlm
    terms = []
    for b in range(B):
        prior = _p(scores[b].double().tolist())
        for j in range(L):
            y = int(labels[b, j])
            if y == IGNORE:
                continue
            terms.append(-math.log(sum(prior[z] * _p(logits[b, z, j].double().tolist())[y] for z in range(K))))
    assert abs(float(realm_mlm_loss(logits, scores, labels)) - sum(terms) / len(terms)) < 1e-5


def test_doc_utility_is_each_docs_gain_over_the_null_doc(mlm):
    logits, _, labels = mlm
    got = doc_utility(logits, labels, null_index=0)
    assert got.shape == (B, K)
    for b in range(B):
        for z in range(K):
            gain = sum(math.log(_p(logits[b, z, j].double().tolist())[int(labels[b, j])])
                       - math.log(_p(logits[b, 0, j].double().tolist())[int(labels[b, j])])
                       for j in range(L) if int(labels[b, j]) != IGNORE)
            assert abs(float(got[b, z]) - gain) < 1e-5
    assert torch.all(got[:, 0] == 0)


def test_marginal_gain_is_the_marginals_gain_over_the_null_doc(mlm):
    logits, scores, labels = mlm
    got = marginal_gain(logits, scores, labels, null_index=0)
    for b in range(B):
        prior = _p(scores[b].double().tolist())
        gain = 0.0
        for j in range(L):
            y = int(labels[b, j])
            if y == IGNORE:
                continue
            marginal = sum(prior[z] * _p(logits[b, z, j].double().tolist())[y] for z in range(K))
            gain += math.log(marginal) - math.log(_p(logits[b, 0, j].double().tolist())[y])
        assert abs(float(got[b]) - gain) < 1e-5


def test_the_training_steps_shared_token_logp_gives_the_same_values(mlm):
    """The training step computes token_logp once and hands it to the loss and both metrics (tok=): each equals
    its own computation from the logits, which the float64 tests above check."""
    logits, scores, labels = mlm
    tok = token_logp(logits, labels)
    assert float(realm_mlm_loss(None, scores, labels, tok=tok)) == float(realm_mlm_loss(logits, scores, labels))
    torch.testing.assert_close(doc_utility(None, labels, 1, tok=tok), doc_utility(logits, labels, 1), atol=0, rtol=0)
    torch.testing.assert_close(marginal_gain(None, scores, labels, 2, tok=tok), marginal_gain(logits, scores, labels, 2),
                               atol=0, rtol=0)


def test_utility_is_zero_when_every_doc_is_the_null_doc(mlm):
    logits, scores, labels = mlm
    same = logits[:, :1].expand(-1, K, -1, -1)
    torch.testing.assert_close(marginal_gain(same, scores, labels), torch.zeros(B), atol=1e-5, rtol=0)
    torch.testing.assert_close(doc_utility(same, labels), torch.zeros(B, K), atol=1e-5, rtol=0)


def test_span_marginal_against_brute_force():
    g = torch.Generator().manual_seed(1)
    start, end = torch.randn(B, K, L, generator=g), torch.randn(B, K, L, generator=g)
    rel = torch.randn(B, K, generator=g)
    evidence = torch.ones(B, K, L, dtype=torch.bool)
    evidence[:, :, 0] = False  # e.g. the question tokens
    answer = torch.zeros(B, K, L, L, dtype=torch.bool)
    answer[0, 1, 2, 3] = answer[0, 2, 4, 4] = answer[1, 0, 1, 2] = True
    width = 3
    got = span_marginal_nll(start, end, rel, evidence, answer, max_width=width)
    for b in range(B):
        total, gold = [], []
        for z in range(K):
            for i in range(1, L):
                for j in range(i, min(L, i + width)):
                    s = float(rel[b, z] + start[b, z, i] + end[b, z, j])
                    total.append(s)
                    if answer[b, z, i, j]:
                        gold.append(s)
        lse = lambda xs: max(xs) + math.log(sum(math.exp(x - max(xs)) for x in xs))  # noqa: E731
        assert abs(float(got[b]) - (lse(total) - lse(gold))) < 1e-5


def test_exclude_drops_the_query_document():
    rows = np.array([[5, 1, 2, 3], [0, 9, 8, 7]])
    np.testing.assert_array_equal(exclude(rows, np.array([1, 7]), 3), [[5, 2, 3], [0, 9, 8]])
    np.testing.assert_array_equal(exclude(rows, np.array([42, 0]), 3), [[5, 1, 2], [9, 8, 7]])
    with pytest.raises(ValueError, match="after excluding"):
        exclude(np.array([[1, 2]]), np.array([1]), 2)


def test_regex_span_finder_finds_dates_numbers_and_names():
    text = "In 1813, Brurbrei Thirzendis moved to Gousby. On 12 March 1840 the Bank of Ondor paid 35 crowns."
    found = {text[s:e] for s, e in RegexSpanFinder()(text)}
    assert {"1813", "Brurbrei Thirzendis", "Gousby", "12 March 1840", "Bank of Ondor", "35"} <= found
    assert "In" not in found and "On" not in found  # sentence-initial single words are not salient


def test_mask_salient_span_masks_exactly_one_span():
    tok = load_tokenizer(EncoderConfig())
    text = "Brurbrei Thirzendis was born in Gousby."
    masked, labels = mask_salient_span(tok, text, RegexSpanFinder(), random.Random(0), 32)
    positions = [i for i, y in enumerate(labels) if y != IGNORE]
    assert positions and all(masked[i] == tok.mask_token_id for i in positions)
    assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous span
    span = tok.decode([labels[i] for i in positions])
    assert span.lower() in {"brurbrei thirzendis", "gousby"}
    assert mask_salient_span(tok, "nothing salient here.", RegexSpanFinder(), random.Random(0), 32) is None


@pytest.mark.slow
def test_realm_pretraining_runs_with_refresh(tmp_path, ray_session):
    """A short real run: finite falling loss, the utility is logged, the index refreshes."""
    import pytorch_lightning as pl

    from openbook.trainer.train import build_parts, make_trainer, train_loader
    from tests.helpers import tiny_recipe

    class Record(pl.Callback):
        def __init__(self):
            self.losses, self.utility = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"]))
            self.utility.append(float(trainer.callback_metrics["train/retrieval_utility"]))
            rows, source = outputs["rows"], batch["source_row"].numpy()  # trivial retrieval: never its own passage
            assert not (rows == source[:, None]).any() and rows.shape[1] == 3

    cfg = tiny_recipe(tmp_path, model="realm_pretrain",
                      reader={"n_docs": 3, "max_context_length": 48}, realm={"reader_hidden": 32, "reader_ffn": 64},
                      train={"max_steps": 20, "batch_size": 8}, refresh={"schedule": "6", "mode": "sync"})
    parts = build_parts(cfg)
    rec = Record()
    trainer = make_trainer(cfg, [parts.callback, rec], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert len(rec.losses) == 20 and all(np.isfinite(rec.losses + rec.utility))
    assert np.mean(rec.losses[-5:]) < np.mean(rec.losses[:5])
    assert parts.holder.version >= 2


def test_minilm_reader_starts_from_the_offline_encoder():
    """``realm.reader: minilm``: both readers carry MiniLM's encoder weights; the MLM output layer is
    tied to the word embeddings (the package has no MLM head)."""
    from transformers import BertModel

    from openbook.models.realm import RealmConfig, build_mlm_reader
    from openbook.models.realm_reader import build_span_reader
    from openbook.models.retriever import minilm_path

    ref = BertModel.from_pretrained(minilm_path(), add_pooling_layer=False).state_dict()
    cfg = RealmConfig(reader="minilm")
    mlm, span = build_mlm_reader(cfg, 30522, 96), build_span_reader(cfg, 30522, 96)
    for bert in (mlm.bert, span.bert):
        state = bert.state_dict()
        assert all(torch.equal(state[k], v) for k, v in ref.items())
    assert mlm.cls.predictions.decoder.weight.data_ptr() == mlm.bert.embeddings.word_embeddings.weight.data_ptr()
    with pytest.raises(ValueError, match="WordPieces"):
        build_mlm_reader(cfg, 1000, 96)
