"""Any local Hugging Face encoder as the retriever (issue 18): BERT, DistilBERT, RoBERTa, DPR pairs.

Checkpoints are made here with ``save_pretrained`` from tiny configs (random weights, WordPiece from the
offline MiniLM, a byte-level BPE trained on Python's help text for RoBERTa: tests/tokenizers_here.py). Embeddings are compared
with the same directories loaded in plain ``transformers`` and pooled by hand.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from openbook.errors import ConfigError
from openbook.models.retriever import EncoderConfig, RetrieverConfig, build_retriever, minilm_path
from openbook.trainer.pipeline import encode_queries
from tests import tokenizers_here

TEXTS = ["who wrote the raven", "a longer question about where the person was born and in which year",
         "x"]
TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def _wordpiece(cls_name: str):
    """MiniLM's WordPiece vocabulary under another family's tokenizer class (all 30,522 pieces)."""
    import transformers

    tok = getattr(transformers, cls_name).from_pretrained(str(minilm_path()))
    assert len(tok) == 30522 and tok("hello world")["input_ids"] == [101, 7592, 2088, 102]
    return tok


def make_encoder_dirs(root: Path) -> dict[str, Path]:
    """Tiny random checkpoints of each encoder family, with their tokenizers, written by save_pretrained."""
    import transformers as tf

    torch.manual_seed(0)
    wp = _wordpiece("BertTokenizerFast")
    bpe = tokenizers_here.bpe("roberta", vocab_size=600)
    models = {
        "bert": (tf.BertModel(tf.BertConfig(vocab_size=len(wp), **TINY)), wp),
        "distilbert": (tf.DistilBertModel(tf.DistilBertConfig(vocab_size=len(wp), dim=32, n_layers=1, n_heads=2,
                                                              hidden_dim=64)), _wordpiece("DistilBertTokenizerFast")),
        "roberta": (tf.RobertaModel(tf.RobertaConfig(vocab_size=len(bpe), max_position_embeddings=130,
                                                     pad_token_id=bpe.pad_token_id, **TINY)), bpe),
        "dpr_question": (tf.DPRQuestionEncoder(tf.DPRConfig(vocab_size=len(wp), **TINY)),
                         _wordpiece("DPRQuestionEncoderTokenizerFast")),
        "dpr_context": (tf.DPRContextEncoder(tf.DPRConfig(vocab_size=len(wp), **TINY)),
                        _wordpiece("DPRContextEncoderTokenizerFast")),
        "roberta_mlm": (tf.RobertaForMaskedLM(tf.RobertaConfig(vocab_size=len(bpe), max_position_embeddings=130,
                                                               pad_token_id=bpe.pad_token_id, **TINY)), bpe),
        "distilbert_mlm": (tf.DistilBertForMaskedLM(tf.DistilBertConfig(vocab_size=len(wp), dim=32, n_layers=1,
                                                                        n_heads=2, hidden_dim=64)),
                           _wordpiece("DistilBertTokenizerFast")),
        "bart": (tf.BartModel(tf.BartConfig(vocab_size=len(wp), d_model=32, encoder_layers=1, decoder_layers=1,
                                            encoder_attention_heads=2, decoder_attention_heads=2,
                                            encoder_ffn_dim=64, decoder_ffn_dim=64)), wp),
    }
    dirs = {}
    for name, (model, tok) in models.items():
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def encoder_dirs(tmp_path_factory) -> dict[str, Path]:
    return make_encoder_dirs(tmp_path_factory.mktemp("encoders"))


def reference(path: Path, texts: list[str], pooling: str) -> np.ndarray:
    """Embeddings from the directory loaded in plain transformers, pooled by hand (float64)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    cls = getattr(transformers, config.architectures[0]) if config.model_type == "dpr" else AutoModel
    model, tok = cls.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    if pooling == "pooler":
        return out.pooler_output.double().numpy()
    states = out.last_hidden_state.double()
    if pooling == "cls":
        return states[:, 0].numpy()
    mask = enc["attention_mask"].unsqueeze(-1).double()
    return ((states * mask).sum(1) / mask.sum(1)).numpy()


@pytest.mark.parametrize("family,pooling", [("bert", "cls"), ("bert", "pooler"), ("bert", "mean"),
                                            ("distilbert", "mean"), ("distilbert", "cls"),
                                            ("roberta", "mean"), ("roberta", "pooler")])
def test_each_encoder_family_embeds_as_plain_transformers(encoder_dirs, family, pooling):
    path = encoder_dirs[family]
    model, tok = build_retriever(RetrieverConfig(encoder=EncoderConfig(source=str(path)), pooling=pooling))
    assert type(tok).__name__.lower().startswith(family)
    got = encode_queries(model, tok, TEXTS, 32)
    np.testing.assert_allclose(got, reference(path, TEXTS, pooling), rtol=1e-4, atol=1e-5)
    # The doc tower (what the refresh actors rebuild from the spec) starts from the same weights.
    tower = model.doc_tower_spec().build()
    assert set(tower.state_dict()) == set(model.doc_encoder.state_dict())


def test_a_dpr_pair_loads_each_tower_with_its_own_class(encoder_dirs):
    cfg = RetrieverConfig(encoder=EncoderConfig(source=str(encoder_dirs["dpr_question"])),
                          doc_encoder=str(encoder_dirs["dpr_context"]), pooling="pooler")
    model, tok = build_retriever(cfg)
    assert type(model.query_encoder.transformer).__name__ == "DPRQuestionEncoder"
    assert type(model.doc_encoder.transformer).__name__ == "DPRContextEncoder"
    assert type(model.doc_tower_spec().build().transformer).__name__ == "DPRContextEncoder"
    np.testing.assert_allclose(encode_queries(model, tok, TEXTS, 32),
                               reference(encoder_dirs["dpr_question"], TEXTS, "pooler"), rtol=1e-4, atol=1e-5)
    enc = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        docs = model.eval().encode_docs(dict(enc)).double().numpy()  # eval: the towers train with dropout
    np.testing.assert_allclose(docs, reference(encoder_dirs["dpr_context"], TEXTS, "pooler"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case,needle", [
    ("bart", "not an encoder"),
    ("empty", "not a Hugging Face model directory"),
    ("missing", "not 'tiny', 'minilm' or a local model directory"),
    ("dpr_mean", "set retriever.pooling: pooler"),
    ("distilbert_pooler", "has no pooler"),
    ("pair_other_vocab", "another vocabulary"),
    ("pair_shared", "shared: true"),
])
def test_an_unsupported_directory_gets_one_line(encoder_dirs, tmp_path, case, needle):
    (tmp_path / "empty").mkdir()
    d = {k: str(v) for k, v in encoder_dirs.items()}
    cfgs = {
        "bart": {"encoder": {"source": d["bart"]}},
        "empty": {"encoder": {"source": str(tmp_path / "empty")}},
        "missing": {"encoder": {"source": str(tmp_path / "nowhere")}},
        "dpr_mean": {"encoder": {"source": d["dpr_question"]}, "pooling": "mean"},
        "distilbert_pooler": {"encoder": {"source": d["distilbert"]}, "pooling": "pooler"},
        "pair_other_vocab": {"encoder": {"source": d["bert"]}, "doc_encoder": d["roberta"]},
        "pair_shared": {"encoder": {"source": d["bert"]}, "doc_encoder": d["bert"], "shared": True},
    }
    from openbook.config import from_dict

    with pytest.raises(ConfigError) as err:
        build_retriever(from_dict(RetrieverConfig, cfgs[case], "retriever"))
    msg = str(err.value)
    assert needle in msg and "\n" not in msg, msg


def test_prefixes_reach_the_questions_and_the_passages(tmp_path):
    from openbook.data import tokenize_corpus
    from openbook.data.qa import QAExample
    from openbook.trainer.batches import QACollator
    from openbook.trainer.train import build_parts
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, retriever={"query_prefix": "query: ", "passage_prefix": "passage: "})
    parts = build_parts(cfg)
    tok, corpus = parts.tokenizer, parts.data.corpus
    title, text = corpus.titles_texts(0, 1)
    want = tok("passage: " + title[0], text[0], truncation="longest_first", max_length=32)["input_ids"]
    assert list(parts.tokens.input_ids[0][:len(want)]) == want
    plain = tokenize_corpus(corpus, tok, 32, cfg.data.cache_dir)
    assert plain.path != parts.tokens.path  # the prefix is part of the cache key
    assert list(plain.input_ids[0][:3]) != list(parts.tokens.input_ids[0][:3])
    ex = QAExample(question="who wrote it", answers=["me"], gold_ids=[])
    batch = QACollator(tok, 32, 8, "query: ")([(ex, -1)])
    assert batch["query"]["input_ids"][0].tolist() == tok("query: who wrote it")["input_ids"]
    q = encode_queries(parts.model, tok, ["who wrote it"], 32)
    with torch.no_grad():
        direct = parts.model.eval().encode_queries(batch["query"]).numpy()
    np.testing.assert_allclose(q, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "dpr"])
def test_a_retriever_trains_with_each_encoder_family(encoder_dirs, tmp_path, ray_session, family):
    """A short run with the asynchronous refresh: the actors rebuild the family's doc tower from its
    directory, and the newest snapshot holds what the trained weights of its encoder step give."""
    from openbook.index import SnapshotStore
    from openbook.models.retriever import DocTowerSpec
    from openbook.refresher.encode import encode_rows
    from openbook.trainer.train import build_parts, make_trainer, train_loader
    from tests.helpers import tiny_recipe
    from tests.test_refresh_training import Recorder

    d = {k: str(v) for k, v in encoder_dirs.items()}
    retriever = ({"encoder": {"source": d["dpr_question"]}, "doc_encoder": d["dpr_context"], "pooling": "pooler"}
                 if family == "dpr" else {"encoder": {"source": d[family]}, "pooling": "mean"})
    cfg = tiny_recipe(tmp_path, retriever=retriever, train={"max_steps": 12},
                      refresh={"schedule": "4", "swap_lag": 2})
    parts = build_parts(cfg)
    rec = Recorder()
    trainer = make_trainer(cfg, [parts.callback, rec], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert np.isfinite(rec.losses).all() and len(rec.losses) == 12
    snap = SnapshotStore(cfg.snapshot_dir).latest()
    assert snap.encoder_step > 0 and parts.callback.stats.failures == 0
    tower = DocTowerSpec(cfg.retriever, len(parts.tokenizer)).build()
    assert type(tower.transformer) is type(parts.model.doc_encoder.transformer)
    tower.load_state_dict({k: torch.from_numpy(v) for k, v in rec.weights[snap.encoder_step].items()})
    direct = encode_rows(tower, parts.tokens, 0, len(parts.tokens), 64)
    np.testing.assert_allclose(np.asarray(snap.embeddings, np.float32), direct, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("family,retriever", [("roberta_mlm", "roberta"), ("distilbert_mlm", "tiny")])
def test_a_masked_lm_directory_as_the_realm_reader(encoder_dirs, family, retriever):
    """The REALM reader's encoder and MLM head are the directory's: the same logits as plain transformers."""
    from transformers import AutoModelForMaskedLM

    from openbook.models.realm import RealmConfig, build_mlm_reader
    from openbook.models.realm_reader import build_span_reader
    from openbook.models.retriever import load_tokenizer

    tok = load_tokenizer(EncoderConfig(source=str(encoder_dirs[retriever]) if retriever != "tiny" else "tiny"))
    cfg = RealmConfig(reader=str(encoder_dirs[family]))
    reader = build_mlm_reader(cfg, len(tok), 64, tok).eval()
    ids = tok(TEXTS, padding=True, return_tensors="pt")
    ref = AutoModelForMaskedLM.from_pretrained(encoder_dirs[family]).eval()
    with torch.no_grad():
        got = reader.cls(reader.bert(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state)
        want = ref(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    torch.testing.assert_close(got, want)
    span = build_span_reader(cfg, len(tok), 64, tok)
    assert set(span.bert.state_dict()) == set(reader.bert.state_dict())
    other = load_tokenizer(EncoderConfig(source="tiny" if retriever != "tiny" else str(encoder_dirs["roberta"])))
    with pytest.raises(ConfigError, match="another vocabulary than the retriever's") as err:
        build_mlm_reader(cfg, len(other), 64, other)
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_realm_pretraining_with_a_roberta_retriever_and_reader(encoder_dirs, tmp_path, ray_session):
    from openbook.trainer.train import run_train
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model="realm_pretrain", retriever={"encoder": {"source": str(encoder_dirs["roberta"])}},
                      realm={"reader": str(encoder_dirs["roberta_mlm"]), "salient_spans": "title_words"},
                      reader={"n_docs": 2, "max_context_length": 48}, train={"max_steps": 4, "batch_size": 4},
                      refresh={"schedule": "2", "swap_lag": 1})
    summary = run_train(cfg, progress=False)
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"]) and summary["refresh_failures"] == 0
