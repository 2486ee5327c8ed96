"""refresh.strategy rerank and query_side, train.freeze_retriever: real FAISS indexes and real (tiny) encoders,
checked against references computed here independently (a direct encode, float64 numpy, a FAISS flat index)."""

from __future__ import annotations

import dataclasses

import faiss
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from openbook.errors import ConfigError
from openbook.models.retriever import build_retriever, encode_batches
from openbook.refresher.encode import numpy_state
from openbook.refresher.publish import publish_in_process
from openbook.trainer.pipeline import index_target
from openbook.trainer.retrieval import RetrievalStep
from openbook.trainer.train import build_parts, make_trainer, train_loader
from tests.helpers import tiny_recipe

N = 100  # passages


def small(tmp, **sections):
    sections.setdefault("data", {"world": {"num_passages": N, "seed": 0}})
    return tiny_recipe(tmp, **sections)


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    """Parts of a dense-retriever recipe with rerank, and in their holder a snapshot encoded by *another* doc
    encoder (encoder seed 1, the live one has seed 0): a deliberately stale index."""
    tmp = tmp_path_factory.mktemp("stale")
    cfg = small(tmp, refresh={"strategy": "rerank", "rerank_candidates": 12})
    parts = build_parts(cfg)
    other, _ = build_retriever(dataclasses.replace(
        cfg.retriever, encoder=dataclasses.replace(cfg.retriever.encoder, seed=1)))
    snap, _ = publish_in_process(index_target(cfg, parts.data.corpus), other.doc_encoder, parts.tokens,
                                 parts.data.corpus.ids, 0, 64)
    parts.holder.swap(snap)
    parts.model.eval()  # no dropout: the live scores below are those of a direct encode
    batch = next(iter(train_loader(parts)))
    with torch.no_grad():
        q = parts.model.encode_queries(batch["query"])
    live = encode_batches(parts.model.doc_encoder,  # float32 (encode_rows gives the snapshot's float16)
                          [parts.tokens.batch(np.arange(lo, min(lo + 64, N))) for lo in range(0, N, 64)])
    live = live.astype(np.float64)
    return parts, snap, q, live


def stale_candidates(snap, q: torch.Tensor, n: int) -> np.ndarray:
    """The stale index's top-n, by a FAISS flat index of our own over the snapshot's stored embeddings."""
    flat = faiss.IndexFlatIP(snap.dim)
    flat.add(np.ascontiguousarray(np.asarray(snap.embeddings, np.float32)))
    return flat.search(np.ascontiguousarray(q.numpy().astype(np.float32)), n)[1]


def live_topk(q: torch.Tensor, live: np.ndarray, cands, k: int) -> np.ndarray:
    qs = q.numpy().astype(np.float64)
    out = []
    for i, c in enumerate(cands):
        c = np.asarray(c)
        s = live[c] @ qs[i]
        out.append(c[np.argsort(-s, kind="stable")[:k]])
    return np.array(out)


@pytest.mark.parametrize("own", [False, True])
def test_rerank_keeps_the_live_top_k_of_the_stale_top_k_prime(stale, own):
    parts, snap, q, live = stale
    kp, k = 12, 4
    step = RetrievalStep(parts.model, parts.tokens, parts.holder, live=True, rerank=kp)
    src = np.arange(len(q)) * 7 % N if own else None
    got = step(q, k, own=src)
    cands = stale_candidates(snap, q, kp + 1 if own else kp)
    if own:  # REALM: the query's own passage is never a candidate; K' remain
        cands = [[r for r in row if r != s][:kp] for row, s in zip(cands, src)]
    np.testing.assert_array_equal(got.rows, live_topk(q, live, cands, k))
    assert not np.array_equal(got.rows, np.array([c[:k] for c in cands]))  # the live choice is not the stale one
    assert step.rerank_encoded_all == len(q) * kp and step.rerank_encoded == 0  # eval mode: not a training step
    # the scores the reader sees are the live ones of the kept rows
    ref = np.einsum("bd,bkd->bk", q.numpy().astype(np.float64), live[got.rows])
    np.testing.assert_allclose(got.scores.detach().numpy(), ref, rtol=1e-4, atol=1e-4)
    if own:
        assert not (got.rows == src[:, None]).any()


def test_rerank_over_the_whole_corpus_is_the_exact_live_top_k_and_not_the_stale_choice(stale):
    parts, snap, q, live = stale
    k = 4
    reranked = RetrievalStep(parts.model, parts.tokens, parts.holder, live=True, rerank=N)(q, k).rows
    exact = live_topk(q, live, [np.arange(N)] * len(q), k)
    np.testing.assert_array_equal(np.sort(reranked, 1), np.sort(exact, 1))
    np.testing.assert_array_equal(reranked, exact)
    full = RetrievalStep(parts.model, parts.tokens, parts.holder, live=True)(q, k).rows  # strategy full
    np.testing.assert_array_equal(full, stale_candidates(snap, q, k))
    assert not np.array_equal(np.sort(full, 1), np.sort(reranked, 1))


def test_rerank_gradients_reach_the_doc_encoder_for_the_kept_rows(stale):
    parts, _, q0, _ = stale
    model = parts.model
    batch = next(iter(train_loader(parts)))
    model.zero_grad()
    q = model.encode_queries(batch["query"])
    step = RetrievalStep(model, parts.tokens, parts.holder, live=True, rerank=12)
    got = step(q, 4)
    got.scores.sum().backward()
    doc = [p.grad for p in model.doc_encoder.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in doc)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.query_encoder.parameters())
    # the same gradient as scoring those rows directly: only the kept k carry it (selection is no_grad)
    direct = [p.grad.clone() for p in model.doc_encoder.parameters()]
    model.zero_grad()
    q = model.encode_queries(batch["query"])
    d = model.encode_docs(parts.tokens.batch(got.rows.reshape(-1)))
    model.score(q, d.view(len(q), 4, -1)).sum().backward()
    for a, b in zip(direct, model.doc_encoder.parameters()):
        torch.testing.assert_close(a, b.grad, rtol=1e-5, atol=1e-6)
    model.zero_grad()


def test_dev_recall_of_a_rerank_run_is_measured_on_the_reranked_list(stale):
    from openbook.trainer.pipeline import dev_recall, encode_queries

    parts, snap, _, live = stale
    dev = [e for e in parts.data.dev if e.gold_ids]
    q = torch.from_numpy(encode_queries(parts.model, parts.tokenizer, [e.question for e in dev],
                                        parts.cfg.retriever.query_max_length))
    k = parts.cfg.train.eval_k
    rows = live_topk(q, live, stale_candidates(snap, q, 12), k)
    ids = parts.data.corpus.ids
    ref = np.mean([bool(set(e.gold_ids) & {str(ids[r]) for r in row}) for row, e in zip(rows, dev)])
    assert dev_recall(parts, snap) == pytest.approx(ref)
    assert parts.module.retrieval.rerank_encoded == 0  # not counted as training


@pytest.mark.parametrize(("sections", "message"), [
    ({"model": "rag", "reader": {"n_docs": 5}, "refresh": {"strategy": "rerank", "rerank_candidates": 5}},
     r"refresh.rerank_candidates=5 must exceed the k the model reads, reader.n_docs=5"),
    ({"refresh": {"strategy": "rerank", "rerank_candidates": 5}},
     r"rerank_candidates=5 must exceed the k the model reads, max\(train.negatives \+ 1, train.eval_k\)=5"),
    ({"refresh": {"strategy": "rerank"}, "train": {"freeze_doc_encoder": True}}, r"nothing live to rerank with"),
    ({"model": "rag", "refresh": {"strategy": "rerank"}, "train": {"freeze_retriever": True}},
     r"nothing live to rerank with"),
    ({"refresh": {"strategy": "query_side"}, "retriever": {"shared": True}}, r"query_side with retriever.shared"),
    ({"train": {"freeze_retriever": True}}, r"freeze_retriever with model dense_retriever: nothing would train"),
    ({"model": "rag", "train": {"freeze_retriever": True}, "reader": {"lr_scale": 0.0}},
     r"freeze_retriever with reader.lr_scale 0: nothing would train"),
])
def test_bad_combinations_fail_in_one_line(tmp_path, sections, message):
    with pytest.raises(ConfigError, match=message):
        small(tmp_path, **sections)


def test_rerank_with_fid_without_distill_is_refused(tmp_path):
    cfg = small(tmp_path, model="fid", generator={"d_model": 32, "ffn": 64}, fid={"distill": False},
                refresh={"strategy": "rerank"}, reader={"n_docs": 2})
    with pytest.raises(ConfigError, match="nothing live to rerank with"):
        build_parts(cfg)


class Keep(pl.Callback):
    def __init__(self):
        self.versions = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.versions.add(pl_module.retrieval.holder.version)


def _fit(cfg, parts=None):
    parts = parts or build_parts(cfg)
    keep = Keep()
    trainer = make_trainer(cfg, [parts.callback, keep], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    return parts, keep, trainer


def test_query_side_trains_the_query_tower_against_one_index(tmp_path):
    cfg = small(tmp_path, train={"max_steps": 6}, refresh={"strategy": "query_side", "schedule": "2"})
    assert cfg.refresh.enabled and cfg.doc_tower_frozen
    parts = build_parts(cfg)
    doc0, query0 = numpy_state(parts.model.doc_encoder), numpy_state(parts.model.query_encoder)
    parts, keep, trainer = _fit(cfg, parts)
    assert trainer.global_step == 6 and not parts.callback.refreshing
    assert keep.versions == {1}
    for name, v in numpy_state(parts.model.doc_encoder).items():
        np.testing.assert_array_equal(v, doc0[name], err_msg=name)
    assert any(not np.array_equal(v, query0[n]) for n, v in numpy_state(parts.model.query_encoder).items())


def test_freeze_retriever_trains_the_reader_only(tmp_path):
    cfg = small(tmp_path, model="rag", generator={"d_model": 32, "ffn": 64, "dropout": 0.0},
                reader={"n_docs": 2, "max_context_length": 48}, train={"max_steps": 4, "freeze_retriever": True},
                refresh={"schedule": "2"})
    parts = build_parts(cfg)
    assert not parts.callback.refreshing and not parts.module.retrieval.live
    before = {k: v.detach().clone() for k, v in parts.module.state_dict().items()}
    parts, keep, trainer = _fit(cfg, parts)
    assert trainer.global_step == 4 and keep.versions == {1}
    after = parts.module.state_dict()
    tower = [k for k in before if k.startswith("retriever.")]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("generator."))


def test_a_rerank_run_trains_refreshes_and_counts_the_passages_it_encodes(tmp_path, ray_session):
    steps, batch, kp = 10, 8, 12
    cfg = small(tmp_path, train={"max_steps": steps, "batch_size": batch},
                refresh={"strategy": "rerank", "rerank_candidates": kp, "schedule": "4", "mode": "sync"})
    parts, keep, trainer = _fit(cfg)
    assert trainer.global_step == steps
    assert max(keep.versions) >= 2  # the index still refreshes on the schedule
    assert parts.module.retrieval.rerank_encoded == steps * batch * kp
    assert float(trainer.callback_metrics["retrieval/rerank_encoded"]) == steps * batch * kp


REALM = {"salient_spans": "title_words", "reader_hidden": 32, "reader_ffn": 64}
GEN = {"d_model": 32, "ffn": 64}


@pytest.mark.parametrize(("model", "extra"), [
    ("dense_retriever", {}),
    ("rag", {"generator": GEN}),
    ("fid", {"generator": GEN, "fid": {"distill": True}}),
    ("realm_qa", {"realm": REALM}),
    ("realm_pretrain", {"realm": REALM}),  # the own passage excluded from the K' + 1 searched
])
def test_every_model_that_retrieves_trains_with_rerank(tmp_path, model, extra):
    steps, batch, kp = 2, 4, 7
    cfg = small(tmp_path, model=model, reader={"n_docs": 2, "max_context_length": 48},
                train={"max_steps": steps, "batch_size": batch}, refresh={"strategy": "rerank", "rerank_candidates": kp,
                                                                        "enabled": False}, **extra)
    parts, _, trainer = _fit(cfg)
    assert trainer.global_step == steps
    assert parts.module.retrieval.rerank_encoded == steps * batch * kp
    assert float(trainer.callback_metrics["retrieval/rerank_encoded"]) == steps * batch * kp
