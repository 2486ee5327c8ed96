"""FiD LightningModule in a real Trainer (refresh on, compact generator vocabulary); FiD-KD reaches the
retriever, plain FiD leaves it alone; the compact vocabulary round-trips the corpus."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from openbook.data.bundle import prepare_data
from openbook.data.tokcache import tokenize_corpus
from openbook.models.retriever import EncoderConfig, load_tokenizer
from openbook.models.vocab import VocabMap, corpus_vocab
from openbook.trainer.train import build_parts, dev_loader, make_trainer, train_loader
from tests.helpers import tiny_recipe
from tests.test_rag_training import Losses


def fid_recipe(tmp, distill: bool):
    return tiny_recipe(tmp, model="fid", generator={"source": "tiny-t5", "vocab": "corpus", "d_model": 32,
                                                    "ffn": 64, "dropout": 0.0},
                       reader={"n_docs": 3, "max_context_length": 48}, fid={"distill": distill},
                       train={"max_steps": 16, "batch_size": 8, "lr": 3e-3, "val_questions": 8},
                       refresh={"schedule": "8", "mode": "sync", "enabled": distill})


def retriever_state(parts):
    return {k: v.clone() for k, v in parts.model.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("distill", [True, False])
def test_fid_trains_and_only_fid_kd_moves_the_retriever(tmp_path, ray_session, distill):
    cfg = fid_recipe(tmp_path, distill)
    parts = build_parts(cfg)
    before = retriever_state(parts)
    rec = Losses()
    trainer = make_trainer(cfg, [parts.callback, rec], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert len(rec.losses) == 16 and all(np.isfinite(rec.losses))
    assert np.mean(rec.losses[-4:]) < np.mean(rec.losses[:4])
    moved = any(not torch.equal(before[k], v) for k, v in parts.model.state_dict().items())
    assert moved == distill
    if distill:
        assert parts.holder.version >= 2  # the refreshed index followed the distilled doc encoder
        assert "train/distill_kl" in trainer.logged_metrics
    assert parts.module.generator.config.vocab_size == len(parts.module.seq2seq.vocab) < len(parts.tokenizer) // 4
    metrics = trainer.validate(parts.module, dev_loader(parts), verbose=False)[0]
    assert {"val/em", "val/f1", "val/recall@3"} <= set(metrics)


def test_compact_vocab_round_trips_the_corpus(tmp_path):
    cfg = tiny_recipe(tmp_path)
    data = prepare_data(cfg.data)
    tok = load_tokenizer(EncoderConfig())
    tokens = tokenize_corpus(data.corpus, tok, 32, tmp_path / "cache")
    vocab = corpus_vocab(tokens, tok, [e.question for e in data.train])
    ids = torch.from_numpy(np.asarray(tokens.input_ids[:50], dtype=np.int64))
    back = torch.tensor(vocab.decode(vocab.encode(ids).tolist()))
    assert torch.equal(back, ids)  # every corpus token survives
    assert int(vocab.encode(ids).max()) < len(vocab) < 5000
    kept = set(vocab.to_orig.tolist())
    unseen = next(i for i in range(2000, len(tok)) if i not in kept)
    assert vocab.decode([[int(vocab.encode(torch.tensor([unseen])))]]) == [[tok.unk_token_id]]
    with pytest.raises(ValueError, match="include \\[UNK\\]"):
        VocabMap([5, 6], len(tok), tok.unk_token_id)


def test_a_saved_generator_loads_as_generator_source(tmp_path):
    from openbook.errors import ConfigError
    from openbook.models.generator import GeneratorConfig, build_generator
    from openbook.trainer.rag_module import save_generator

    tok = load_tokenizer(EncoderConfig())
    gen = build_generator(GeneratorConfig(source="tiny-t5", d_model=32, ffn=64, seed=7), tok)
    save_generator(gen, tmp_path / "generator")
    save_generator(gen, tmp_path / "generator")  # replacing an existing one is fine too
    loaded = build_generator(GeneratorConfig(source=str(tmp_path / "generator")), tok)
    for (name, a), (_, b) in zip(gen.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generator"]  # no temp dirs left behind
    vocab = VocabMap([*range(1000, 3997, 3), tok.unk_token_id], len(tok), tok.unk_token_id)
    compact = build_generator(GeneratorConfig(source="tiny-t5", vocab="corpus", d_model=32, ffn=64), tok, vocab)
    save_generator(compact, tmp_path / "compact", vocab)
    again = VocabMap.load(tmp_path / "compact" / "vocab.json")
    assert torch.equal(again.to_orig, vocab.to_orig) and torch.equal(again.to_compact, vocab.to_compact)
    with pytest.raises(ConfigError, match="has 1000 output tokens"):  # loaded without its vocabulary
        build_generator(GeneratorConfig(source=str(tmp_path / "compact")), tok)
    with pytest.raises(ConfigError, match="reader pretraining run writes one"):
        build_generator(GeneratorConfig(source=str(tmp_path / "missing")), tok)


def test_fid_score_prior_reaches_the_loss_and_the_decoder(tmp_path):
    """A prior so strong that only the top passage counts makes K-passage FiD the 1-passage model on
    that passage: the same training loss and the same answers (same weights, same snapshot)."""
    cfg = tiny_recipe(tmp_path, model="fid", generator={"source": "tiny-t5", "d_model": 32, "ffn": 64, "dropout": 0.0},
                      reader={"n_docs": 3, "max_context_length": 48}, fid={"score_prior": 1e4},
                      train={"batch_size": 6, "val_questions": 6}, refresh={"enabled": False})
    parts = build_parts(cfg)
    parts.callback.preinstall(parts.callback.build_initial(parts.module, 0))
    module = parts.module.eval()
    batch = next(iter(train_loader(parts)))
    dev = next(iter(dev_loader(parts)))
    with torch.no_grad():
        strong = (module.training_step(batch, 0), module.generate(dev))
        module.reader_cfg, module.fid = dataclasses.replace(cfg.reader, n_docs=1), dataclasses.replace(cfg.fid, score_prior=0.0)
        one = (module.training_step(batch, 0), module.generate(dev))
        module.reader_cfg = cfg.reader
        plain = (module.training_step(batch, 0), module.generate(dev))
    assert torch.allclose(strong[0], one[0], atol=1e-4) and not torch.allclose(strong[0], plain[0], atol=1e-3)
    assert strong[1][0] == one[1][0] and np.array_equal(strong[1][1][:, :1], one[1][1])
    assert plain[1][0] != one[1][0]  # without the prior the 3-passage answers differ: the check can fail


def test_reader_max_answer_length_reaches_fids_labels(tmp_path):
    """FiD's answer labels are cut at reader.max_answer_length (before, at rag.max_answer_length whatever
    FiD's own max_answer_length said)."""
    cfg = tiny_recipe(tmp_path, model="fid", generator={"source": "tiny-t5", "d_model": 32, "ffn": 64},
                      reader={"n_docs": 2, "max_context_length": 48, "max_answer_length": 4},
                      train={"batch_size": 16}, refresh={"enabled": False})
    parts = build_parts(cfg)
    full = [len(parts.tokenizer(e.answers[0])["input_ids"]) for e in parts.data.train[:200]]
    assert max(full) > 4  # some answers are longer: the cut is visible
    assert {next(iter(train_loader(parts)))["labels"].shape[1] for _ in range(3)} == {4}
