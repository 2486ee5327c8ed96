"""REALM open QA: the span reader's gold spans and EM prediction against brute-force references
written here (decode every span, loop over every (doc, span)); a short real fine-tuning run."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from openbook.data.qa import exact_match, normalize_answer
from openbook.models.rag import join_context
from openbook.models.realm_reader import best_spans, decode_spans, gold_spans, passage_mask
from openbook.models.retriever import EncoderConfig, load_tokenizer

W = 5  # max span width in these tests ("the bra ##sg ##res guild" has 5 pieces, with "." 6)
QUESTIONS = [("Which instrument does Ana O'Neil play?", ["the violin", "fiddle", "ONeil"]),  # 3rd: apostrophe
             ("Who employs Brurbrei Thirzendis?", ["Brasgres Guild"])]
DOCS = [  # (title, text) per question, K = 3
    [("Ana O'Neil", "Ana O'Neil plays the Violin. Her violinist friend plays the fiddle."),
     ("Violin", "A violin has four strings; fiddle is another name."),
     ("Kel Dorsen", "Kel Dorsen plays the cello.")],
    [("Brurbrei Thirzendis", "Brurbrei Thirzendis is employed by the Brasgres Guild."),
     ("Brasgres Guild", "The Brasgres-Guild and the brasgres guild, of Gousby."),
     ("Other", "Nothing to see: Brasgres Guildhall.")],
]


@pytest.fixture(scope="module")
def batch():
    tok = load_tokenizer(EncoderConfig())
    q = tok([qq for qq, _ in QUESTIONS], padding=True, return_tensors="pt")
    flat = [d for docs in DOCS for d in docs]
    d = tok([t for t, _ in flat], [x for _, x in flat], padding=True, return_tensors="pt")
    ctx, mask = join_context(q["input_ids"], q["attention_mask"], d["input_ids"], d["attention_mask"], 3, 64,
                             tok.pad_token_id)
    return tok, ctx, mask


def decode(tok, ids) -> str:
    return tok.decode(ids, clean_up_tokenization_spaces=True)


def reference_evidence(tok, ids: list[int]) -> list[bool]:
    """Passage tokens: after the question's and the title's [SEP], before the final one."""
    seps = [i for i, t in enumerate(ids) if t == tok.sep_token_id]
    return [seps[1] < i < seps[2] for i in range(len(ids))]


def test_gold_spans_against_decoding_every_span(batch):
    tok, ctx, mask = batch
    answers = [a for _, a in QUESTIONS]
    got = gold_spans(ctx, passage_mask(ctx, mask, tok.sep_token_id), answers, 3, tok, W)
    want = torch.zeros_like(got)
    for row in range(ctx.shape[0]):
        ids = ctx[row].tolist()
        ev, pieces = reference_evidence(tok, ids), tok.convert_ids_to_tokens(ids) + ["[PAD]"]
        golds = {normalize_answer(a) for a in answers[row // 3]}
        for i, j in itertools.product(range(len(ids)), repeat=2):
            whole_words = not pieces[i].startswith("##") and not pieces[j + 1].startswith("##")
            if i <= j < i + W and all(ev[i: j + 1]) and whole_words:
                want[row // 3, row % 3, i, j] = normalize_answer(decode(tok, ids[i: j + 1])) in golds
    assert torch.equal(got, want)
    texts = {decode(tok, ctx[b * 3 + k, i: j + 1]) for b, k, i, j in got.nonzero().tolist()}
    assert {"violin", "the violin.", "fiddle", "the brasgres guild", "brasgres - guild"} <= texts
    assert "the brasgres guild," not in texts  # 6 pieces: wider than W
    assert {normalize_answer(t) for t in texts} == {"violin", "fiddle", "oneil", "brasgres guild"}
    assert "o'neil" in texts  # "o ' neil" joined up, or EM could never match it
    assert got[0, 2].sum() == 0 and got[1, 2].sum() == 0  # "violinist", "Guildhall": not whole words
    assert not got[1, 0, :, :12].any()  # the question and the title name the Guild too: not evidence


def test_passage_mask_is_the_passage(batch):
    tok, ctx, mask = batch
    ev = passage_mask(ctx, mask, tok.sep_token_id)
    for row in range(ctx.shape[0]):
        assert ev[row].tolist() == reference_evidence(tok, ctx[row].tolist())
    assert decode(tok, ctx[2][ev[2]]) == "kel dorsen plays the cello."


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prediction_is_the_argmax_over_docs_and_spans(batch, seed):
    tok, ctx, mask = batch
    g = torch.Generator().manual_seed(seed)
    b, k, length = 2, 3, ctx.shape[1]
    start, end = torch.randn(b, k, length, generator=g) * 3, torch.randn(b, k, length, generator=g) * 3
    rel = torch.randn(b, k, generator=g) * 3
    ev = passage_mask(ctx, mask, tok.sep_token_id).view(b, k, length)
    preds = decode_spans(tok, ctx.view(b, k, length), *best_spans(start, end, rel, ev, W))
    for q in range(b):
        best, text = -np.inf, None
        for z in range(k):
            ids, evz = ctx[q * k + z].tolist(), reference_evidence(tok, ctx[q * k + z].tolist())
            for i in range(length):
                for j in range(i, min(length, i + W)):
                    score = float(rel[q, z]) + float(start[q, z, i]) + float(end[q, z, j])
                    if all(evz[i: j + 1]) and score > best:
                        best, text = score, decode(tok, ids[i: j + 1])
        assert preds[q] == text
        assert exact_match(preds[q], QUESTIONS[q][1]) == exact_match(text, QUESTIONS[q][1])


def test_no_valid_span_predicts_nothing():
    ev = torch.zeros(1, 2, 5, dtype=torch.bool)
    doc, i, j, found = best_spans(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.zeros(1, 2), ev, 3)
    assert not found[0]
    assert decode_spans(None, torch.zeros(1, 2, 5, dtype=torch.long), doc, i, j, found) == [""]


# ------------------------------------------------------------------------------ real runs

READER = {"reader_hidden": 64, "reader_ffn": 128}
SHARED = {"n_docs": 4, "max_context_length": 64}


def tb_scalars(run_dir, tag: str, steps: bool = False) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [e.step if steps else e.value for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_realm_qa_fine_tuning_runs_with_refresh(tmp_path, ray_session):
    """Through ``run_train``: the loss falls, train recall rises, dev EM and recall are reported."""
    from openbook.trainer.train import run_train
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model="realm_qa", data={"world": {"num_passages": 300, "seed": 0}}, realm=READER, reader=SHARED,
                      retriever={"doc_max_length": 48},  # whole passages: the gold one always holds the answer
                      train={"max_steps": 120, "batch_size": 16, "lr": 3e-3, "val_every_n_steps": 60,
                             "val_questions": 30},
                      refresh={"schedule": "20", "mode": "sync"})
    summary = run_train(cfg, progress=False)
    losses, recall = tb_scalars(tmp_path / "run", "train/loss"), tb_scalars(tmp_path / "run", "train/recall@4")
    assert summary["steps"] == 120 and len(losses) == 120 and np.isfinite(losses).all()
    assert np.mean(losses[-20:]) < np.mean(losses[:20])
    assert np.mean(recall[-20:]) > np.mean(recall[:20])
    val_steps = tb_scalars(tmp_path / "run", "val/em", steps=True)
    assert sum(0 < s < 120 for s in val_steps) == 2  # validated during fit, every 60 steps
    assert 0.0 <= summary["dev_em"] <= 1.0 and 0.0 <= summary["dev_recall@4"] <= 1.0
    assert {"dev_em_at_start", "dev_recall@4_at_start"} <= set(summary)
    assert summary["dev_answer_in_docs"] >= summary["dev_recall@4"] - 1e-6  # the gold passage holds the answer
    assert summary["index_version"] >= 2 and summary["refresh_failures"] == 0


def test_init_from_a_pretraining_run(tmp_path):
    """realm.init_from loads what a realm_pretrain run saved: retriever and reader encoder."""
    from openbook.errors import ConfigError
    from openbook.trainer.train import build_parts, make_trainer, save_final, train_loader
    from tests.helpers import tiny_recipe

    cache = tmp_path / "cache"
    pre = tiny_recipe(tmp_path / "pre", cache, model="realm_pretrain", data={"world": {"num_passages": 100}},
                      realm=READER, reader=SHARED, train={"max_steps": 2}, refresh={"enabled": False})
    parts = build_parts(pre)
    make_trainer(pre, [parts.callback], logger=False, enable_progress_bar=False).fit(
        parts.module, train_loader(parts))  # two real steps move the weights
    save_final(parts)

    def qa(**realm):
        return tiny_recipe(tmp_path / "qa", cache, model="realm_qa", data={"world": {"num_passages": 100}},
                           realm={**READER, **realm}, reader=SHARED, refresh={"enabled": False})

    loaded, fresh = build_parts(qa(init_from=pre.run_dir)).module, build_parts(qa()).module
    for name, want in parts.module.reader.bert.state_dict().items():
        assert torch.equal(loaded.reader.bert.state_dict()[name], want), name
    for name, want in parts.model.state_dict().items():
        assert torch.equal(loaded.retriever.state_dict()[name], want), name
    assert not torch.equal(fresh.reader.bert.embeddings.word_embeddings.weight,
                           loaded.reader.bert.embeddings.word_embeddings.weight)
    with pytest.raises(ConfigError, match="does not fit this recipe's sizes"):
        build_parts(qa(init_from=pre.run_dir, reader_hidden=32, reader_ffn=64))
    with pytest.raises(ConfigError, match="model.pt not found"):
        build_parts(qa(init_from=str(tmp_path / "nowhere")))
