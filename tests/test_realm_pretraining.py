"""REALM pretraining data and a real run: the pydoc corpus builder, title-word masking, and what
the logged retrieval metrics mean, recomputed here from the retrieved passages' text."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from openbook.config import from_dict
from openbook.data.bundle import prepare_data
from openbook.data.pydoc_corpus import build_pydoc_corpus, chunk_words
from openbook.errors import ConfigError
from openbook.models.realm import IGNORE, TitleWordFinder, mask_salient_span
from openbook.models.retriever import EncoderConfig, load_tokenizer
from openbook.recipe import RecipeConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_chunks_keep_every_word_once():
    text = "One two three. Four five six seven eight nine ten eleven twelve. Thirteen? " + "w " * 25
    for words in (8, 10, 64):
        chunks = chunk_words(text, words)
        assert all(len(c.split()) <= words for c in chunks)
        assert " ".join(chunks).split() == text.split()  # no word lost, none repeated (no overlap)
    assert chunk_words(text, 10)[0] == "One two three."  # cut at a sentence end when one is near


def test_pydoc_corpus_is_built_once_and_loads(tmp_path):
    path = build_pydoc_corpus(tmp_path, words=64)
    mtime = path.stat().st_mtime_ns
    assert build_pydoc_corpus(tmp_path, words=64) == path and path.stat().st_mtime_ns == mtime  # cached
    cfg = from_dict(RecipeConfig, {"data": {"source": "pydoc", "cache_dir": str(tmp_path)}})
    data = prepare_data(cfg.data)
    assert len(data.corpus) > 1500 and not data.train and not data.dev
    titles = {data.corpus[i]["title"] for i in range(len(data.corpus))}
    assert {"try", "attribute-access", "identifiers"} <= titles
    assert len(set(data.corpus.ids)) == len(data.corpus)
    assert max(len(data.corpus[i]["text"].split()) for i in range(len(data.corpus))) <= 64
    with pytest.raises(ConfigError, match="pydoc_words must be >= 8"):
        from_dict(RecipeConfig, {"data": {"source": "pydoc", "pydoc_words": 4}})


def test_title_word_masking_masks_a_name():
    tok = load_tokenizer(EncoderConfig())
    text = "Brurbrei Thirzendis plays the harp. Friends describe Brurbrei as shy."
    finder = TitleWordFinder("Brurbrei Thirzendis")
    assert [text[s:e] for s, e in finder(text)] == ["Brurbrei", "Thirzendis", "Brurbrei"]
    seen = set()
    for seed in range(12):
        masked, labels = mask_salient_span(tok, text, finder, random.Random(seed), 32)
        seen.add(tok.decode([y for y in labels if y != IGNORE]))
    assert seen == {"brurbrei", "thirzendis"}
    assert TitleWordFinder("Al")("Al plays.") == []  # words under 3 letters are not masked


def test_realm_pretraining_on_names_logs_what_retrieval_found(tmp_path, ray_session):
    """A real run with title-word masking: every masked span is a word of the passage's title, the
    source passage is never retrieved, and ``span_in_docs`` is "the masked tokens occur in a retrieved
    passage as the reader sees it", recomputed here by tokenising the corpus text."""
    import pytorch_lightning as pl

    from openbook.trainer.train import build_parts, make_trainer, train_loader
    from tests.helpers import tiny_recipe

    class Check(pl.Callback):
        def __init__(self):
            self.utility, self.found = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.utility.append(float(trainer.callback_metrics["train/retrieval_utility"]))
            rows, source = outputs["rows"], batch["source_row"].numpy()
            assert not (rows == source[:, None]).any()
            corpus, tok, found = parts.data.corpus, parts.tokenizer, []
            for b, src in enumerate(source):
                span = [y for y in batch["labels"][b].tolist() if y != IGNORE]
                assert tok.decode(span) in corpus[int(src)]["title"].lower().split()
                docs = [tok(corpus[int(r)]["title"], corpus[int(r)]["text"], truncation=True,
                            max_length=cfg.retriever.doc_max_length)["input_ids"] for r in rows[b]]
                found.append([any(d[i: i + len(span)] == span for i in range(len(d))) for d in docs])
            np.testing.assert_array_equal(outputs["span_found"].numpy(), found)
            self.found.append(float(trainer.callback_metrics["train/span_in_docs"]))
            in_top = [found[b][int(t)] for b, t in enumerate(outputs["top"])]  # the live-scored top passage
            assert float(trainer.callback_metrics["train/span_in_top"]) == pytest.approx(np.mean(in_top))

    cfg = tiny_recipe(tmp_path, model="realm_pretrain", data={"world": {"num_passages": 100, "seed": 0}},
                      retriever={"doc_max_length": 48},
                      reader={"n_docs": 6, "max_context_length": 64},
                      realm={"salient_spans": "title_words", "reader_hidden": 32, "reader_ffn": 64},
                      train={"max_steps": 16, "batch_size": 8}, refresh={"schedule": "5", "mode": "sync"})
    parts = build_parts(cfg)
    check = Check()
    trainer = make_trainer(cfg, [parts.callback, check], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert len(check.utility) == 16 and np.isfinite(check.utility).all()
    assert 0.0 < np.mean(check.found) < 1.0  # 6 of 99 passages: the name's other passages are sometimes hit
    assert parts.holder.version >= 2


@pytest.mark.slow
def test_retrieval_utility_rises_above_zero(tmp_path, ray_session):
    """The shipped recipes, shortened: configs/ict_tiny.yaml warm-starts the embedder (as REALM does),
    then configs/realm_pretrain_tiny.yaml pretrains with the asynchronous refresh. REALM's utility of the
    top retrieved passage (its gain over the null document) starts at 0, the random reader reading
    nothing, and must end clearly above 0: the reader learned to take the masked name from the
    passages the retriever brings. The utilities are recomputed here from the logged per-query values."""
    import pytorch_lightning as pl

    from openbook.recipe import load_recipe
    from openbook.trainer.train import build_parts, make_trainer, run_train, train_loader

    cache, ict_dir = tmp_path / "cache", tmp_path / "ict"
    ict = load_recipe(CONFIGS / "ict_tiny.yaml", [f"run_dir={ict_dir}", f"data.cache_dir={cache}",
                                                "train.max_steps=150"])
    assert run_train(ict, progress=False)["dev_recall@5_fresh_encode"] > 0.5

    class Record(pl.Callback):
        def __init__(self):
            self.utility, self.top_found = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            u = outputs["utility"].cpu().numpy()
            assert float(trainer.callback_metrics["train/retrieval_utility"]) == pytest.approx(u.mean(), abs=1e-5)
            self.utility.append(u)
            top = outputs["top"].numpy()
            self.top_found.append(outputs["span_found"].numpy()[np.arange(len(top)), top])

    steps = 300
    cfg = load_recipe(CONFIGS / "realm_pretrain_tiny.yaml", [
        f"run_dir={tmp_path / 'realm'}", f"data.cache_dir={cache}", f"retriever.init_from={ict_dir}",
        f"train.max_steps={steps}", "refresh.start_timeout_seconds=600"])  # a loaded CI machine starts actors slowly
    parts, rec = build_parts(cfg), Record()
    trainer = make_trainer(cfg, [parts.callback, rec], logger=False, enable_progress_bar=False)
    trainer.fit(parts.module, train_loader(parts))
    assert len(rec.utility) == steps and parts.holder.version >= 3  # refreshed snapshots were swapped in
    early, late = np.concatenate(rec.utility[:30]), np.concatenate(rec.utility[-100:])
    late_se = late.std() / np.sqrt(len(late))
    assert abs(early.mean()) < 0.02, early.mean()  # the random reader gains nothing from any passage
    assert late.mean() - 3 * late_se > 0.02, (late.mean(), late_se)
    assert np.concatenate(rec.top_found[-100:]).mean() > 0.5  # the top passage mostly holds the masked name


def test_reader_lr_scale_gives_the_reader_its_own_rate(tmp_path):
    from openbook.trainer.train import build_parts
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model="realm_pretrain", realm={"reader_hidden": 32, "reader_ffn": 64},
                      reader={"lr_scale": 30.0},
                      train={"lr": 3e-5}, refresh={"enabled": False})
    module = build_parts(cfg).module
    opt = module.configure_optimizers()["optimizer"]
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert [rate[id(p)] for p in module.reader.parameters()] == pytest.approx([9e-4] * len(list(module.reader.parameters())))
    assert [rate[id(p)] for p in module.retriever.parameters()] == pytest.approx([3e-5] * len(list(module.retriever.parameters())))
    with pytest.raises(ConfigError, match="reader.warmup_steps and reader.lr_scale must be >= 0"):
        from_dict(RecipeConfig, {"reader": {"lr_scale": -1}})
