"""Readers with their own tokenizers (issue 18): a tiny BART with a byte-level BPE and a tiny T5 with a
Unigram vocabulary, saved here with save_pretrained, as the RAG-Token and FiD generators beside a MiniLM
(WordPiece) retriever. Contexts are built in the generator's tokenizer from its own passage cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from openbook.trainer.train import build_parts, run_train
from tests import tokenizers_here
from tests.helpers import tiny_recipe

pytestmark = pytest.mark.slow


def save_reader(kind: str, root: Path) -> Path:
    import transformers as tf

    path = root / kind
    if kind == "bart":
        tok = tokenizers_here.bpe("bart", vocab_size=700)
        model = tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.bos_token_id))
    else:
        tok = tokenizers_here.unigram_t5(vocab_size=600)
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def readers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("readers")
    return {kind: save_reader(kind, root) for kind in ("bart", "t5")}


def recipe(tmp, model: str, reader: Path, **sections):
    return tiny_recipe(tmp, model=model, generator={"source": str(reader)},
                       retriever={"encoder": {"source": "minilm"}, "pooling": "mean", "normalize": True,
                                  "doc_max_length": 32},
                       reader={"n_docs": 2, "max_context_length": 48, "max_answer_length": 8},
                       train={"max_steps": 6, "batch_size": 4, "lr": 1e-4, "val_questions": 8},
                       refresh={"schedule": "3", "swap_lag": 1}, **sections)


@pytest.mark.parametrize("kind,model", [("bart", "rag"), ("t5", "fid")])
def test_a_reader_with_its_own_tokenizer_reads_and_writes_its_own_ids(readers, tmp_path, ray_session, kind, model):
    from transformers import AutoTokenizer

    cfg = recipe(tmp_path, model, readers[kind], **({"rag": {"variant": "token"}} if model == "rag" else {}))
    parts = build_parts(cfg)
    reader = parts.module.seq2seq
    tok = AutoTokenizer.from_pretrained(readers[kind])
    assert reader.tokenizer.get_vocab() == tok.get_vocab() != parts.tokenizer.get_vocab()
    assert reader.own_tokens is not None and reader.vocab is None

    batch = next(iter(parts.spec.train_loader(parts)))
    rows = np.array([[0, 1]] * len(batch["questions"]))
    ctx, mask = reader.context(batch, parts.tokens.batch(rows.reshape(-1)), rows, 2, "cpu")
    title, text = parts.data.corpus.titles_texts(1, 2)
    passage = tok(title[0], text[0], truncation="longest_first", max_length=48)["input_ids"]
    question = tok(batch["questions"][0])["input_ids"]
    want = (question + passage[1:] if kind == "bart" else question + passage)[:48]  # BART's <s> is dropped once
    assert ctx[1, : int(mask[1].sum())].tolist() == want
    labels = reader.labels(batch, "cpu")
    answer = tok(batch["answers"][0][0], add_special_tokens=False)["input_ids"][:8 - 2]  # max_answer_length 8
    assert labels[0, : len(answer) + 2].tolist() == [reader.ids.bos, *answer, reader.ids.eos]
    assert reader.ids.bos == (tok.bos_token_id if kind == "bart" else tok.pad_token_id)  # T5 starts from <pad>

    summary = run_train(cfg, progress=False)
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"]) and "dev_em" in summary
    saved = Path(cfg.run_dir) / "generator"
    assert (saved / "config.json").is_file() and not (saved / "vocab.json").exists()


def test_the_retrievers_tokenizer_stays_for_a_compact_or_tokenizerless_generator(tmp_path, readers):
    from openbook.models.generator import GeneratorConfig, generator_tokenizer
    from openbook.models.retriever import EncoderConfig, load_tokenizer

    wordpiece = load_tokenizer(EncoderConfig(source="minilm"))
    assert generator_tokenizer(GeneratorConfig(source="tiny-bart"), wordpiece) is None
    assert generator_tokenizer(GeneratorConfig(source=str(readers["bart"]), tokenizer="retriever"), wordpiece) is None
    assert generator_tokenizer(GeneratorConfig(source=str(readers["bart"])), wordpiece) is not None
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((readers["t5"] / "config.json").read_text())
    assert generator_tokenizer(GeneratorConfig(source=str(bare)), wordpiece) is None  # a run's generator dir
