"""Long work says how far it is: world generation, the first encode, kNN-LM datastore builds and
evaluation log their counts (and draw a bar when asked); the training bar counts optimizer steps."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from openbook.progress import Progress
from tests.helpers import tiny_recipe


def messages(caplog, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name and r.levelno == logging.INFO]


def test_progress_logs_counts_and_the_rate_unit(caplog):
    log = logging.getLogger("tests.progress")
    caplog.set_level(logging.INFO, logger="tests.progress")
    with Progress(log, "job", 3, "shard", rate_unit="token", every=0.0) as prog:  # every=0: a line per update
        for _ in range(3):
            prog.update(1, 10)
    lines = messages(caplog, "tests.progress")
    assert lines[0] == "job: 3 shards to do"
    assert [line.split(" (")[0] for line in lines[1:4]] == [f"job: {i}/3 shards, {10 * i} tokens" for i in (1, 2, 3)]
    assert lines[4].startswith("job: 3/3 shards, 30 tokens in ") and lines[4].endswith(" tokens/s)")
    caplog.clear()
    with pytest.raises(RuntimeError), Progress(log, "job", 2, "shard", every=1e9) as prog:
        prog.update(1)
        raise RuntimeError("boom")
    assert messages(caplog, "tests.progress") == ["job: 2 shards to do"]  # no "done" line for a failed job


def test_world_generation_logs_its_counts_and_draws_a_bar(tmp_path, caplog, capsys):
    from openbook.data.world import WorldConfig, generate_world

    caplog.set_level(logging.INFO, logger="openbook.data.world")
    generate_world(WorldConfig(num_passages=300, seed=0), tmp_path / "w", progress=True)
    lines = messages(caplog, "openbook.data.world")
    assert lines[0] == "world: passages and questions: 300 passages to do"
    assert any(line.startswith("world: passages and questions: 300/300 passages in ") for line in lines)
    assert lines[-1].startswith(f"world: wrote 300 passages and 240/30/30 train/dev/test questions to {tmp_path / 'w'}")
    assert "300/300" in capsys.readouterr().err  # tqdm writes to stderr
    caplog.clear()
    generate_world(WorldConfig(num_passages=300, seed=0), tmp_path / "w")
    assert messages(caplog, "openbook.data.world") == [f"world: reusing {tmp_path / 'w'} (300 passages, seed 0)"]
    assert capsys.readouterr().err == ""  # no bar unless asked


def test_the_first_in_process_encode_shows_passages_per_second(tmp_path, caplog, capsys):
    """build_parts(progress=True): the refresh-off initial index is encoded with a bar and logged."""
    from openbook.trainer.train import build_parts

    cfg = tiny_recipe(tmp_path, data={"world": {"num_passages": 100, "seed": 0}}, refresh={"enabled": False})
    parts = build_parts(cfg, progress=True)
    caplog.set_level(logging.INFO)
    capsys.readouterr()
    parts.callback.build_initial(parts.module, 0)
    encode = messages(caplog, "openbook.refresher.publish")
    assert encode[0] == "encode: 100 passages to do" and encode[-1].startswith("encode: 100/100 passages in ")
    built = messages(caplog, "openbook.trainer.train")
    assert len(built) == 1 and built[0].startswith("index v1 built in this process from the step-0 weights: "
                                                   "100 passages, ") and "passages/s" in built[0]
    assert "100/100" in capsys.readouterr().err


def test_an_initial_index_from_the_actor_pool_is_logged_with_its_rate(tmp_path, caplog, ray_session):
    """Refresh on: the first index comes from the Ray pool; a line when it starts, one with passages/s."""
    from openbook.trainer.train import build_parts, make_trainer, train_loader

    cfg = tiny_recipe(tmp_path, data={"world": {"num_passages": 100, "seed": 0}}, train={"max_steps": 1})
    parts = build_parts(cfg)
    caplog.set_level(logging.INFO, logger="openbook.trainer.refresh_callback")
    make_trainer(cfg, [parts.callback], logger=False, enable_progress_bar=False).fit(parts.module,
                                                                                     train_loader(parts))
    lines = messages(caplog, "openbook.trainer.refresh_callback")
    assert lines[0] == "index: the actor pool encodes the corpus with the step-0 weights"
    assert lines[1].startswith("index v1 built by the actor pool: 100 passages in ") and lines[1].endswith(
        " passages/s")

def test_the_training_bar_counts_steps_to_max_steps_across_epochs(tmp_path, capsys):
    """80 training questions in batches of 8: 10 steps an epoch, so 25 steps cross two epoch boundaries;
    Lightning's own bars restart each epoch ("Epoch 2", 5/10) or read "Epoch 2/-2" (Rich)."""
    from openbook.trainer.progress_bar import StepProgressBar
    from openbook.trainer.train import build_parts, make_trainer, train_loader

    cfg = tiny_recipe(tmp_path, data={"world": {"num_passages": 100, "seed": 0}},
                      train={"max_steps": 25, "batch_size": 8}, refresh={"enabled": False})
    parts = build_parts(cfg)
    trainer = make_trainer(cfg, [parts.callback], logger=False)
    bar = trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    trainer.fit(parts.module, train_loader(parts))
    assert trainer.num_training_batches == 10 and trainer.global_step == 25  # two epoch boundaries crossed
    text = str(bar.train_progress_bar)
    assert text.startswith("step: 100%") and "25/25" in text and "-2" not in text and "Epoch" not in text
    assert "25/25" in capsys.readouterr().out  # Lightning's bars draw on stdout
    quiet = make_trainer(cfg, [parts.callback], logger=False, enable_progress_bar=False)
    assert quiet.progress_bar_callback is None


# ------------------------------------------------------------------------------ kNN-LM

@pytest.fixture
def lm():
    from openbook.knnlm.config import DatastoreConfig, KnnLMConfig, LMConfig, TextConfig
    from openbook.knnlm.model import build_lm
    from openbook.knnlm.text import load_text

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny forwards: one thread is faster on a shared machine
    text = load_text(TextConfig(max_paragraphs=40))
    torch.manual_seed(0)
    lm_cfg = LMConfig(n_embd=32, n_layer=1, n_head=2, block_size=16, dropout=0.0)
    ds = DatastoreConfig(stride=8, keys_dtype="float32", num_workers=2, shard_windows=5, batch_size=4)
    yield text, build_lm(lm_cfg, text.vocab_size).eval(), KnnLMConfig(lm=lm_cfg, datastore=ds)
    torch.set_num_threads(threads)


def test_knnlm_datastore_builds_log_shards_and_tokens(tmp_path, caplog, capsys, ray_session, lm):
    """In process and on Ray's actors: shards done of all, tokens per second, then the indexing."""
    from openbook.knnlm.build import build_local, build_sharded

    text, model, cfg = lm
    tokens = text.train[:801]  # 800 predictions = 100 windows of 8 = 20 shards of 5 windows
    caplog.set_level(logging.INFO, logger="openbook.knnlm.build")
    for build, name in ((build_local, "local"), (build_sharded, "sharded")):
        caplog.clear()
        store = build(tmp_path / name, model, tokens, cfg.lm, cfg.datastore, progress=True)
        lines = messages(caplog, "openbook.knnlm.build")
        assert lines[0] == "datastore: 20 shards to do", name
        assert any(line.startswith("datastore: 20/20 shards, 800 tokens in ") and "tokens/s" in line for line in lines)
        assert "datastore: indexing 800 keys (Flat)" in lines and len(store) == 800
        assert "20/20" in capsys.readouterr().err


def test_knnlm_evaluation_logs_windows_and_tokens_and_scores_as_before(tmp_path, caplog, lm):
    """Evaluation encodes in chunks for its progress: the numbers equal one ``encode`` over all windows."""
    from openbook.knnlm.build import build_local
    from openbook.knnlm.model import encode, windows
    from openbook.knnlm.pipeline import CHUNK_BATCHES, score_stream

    text, model, cfg = lm
    store = build_local(tmp_path / "ds", model, text.train[:401], cfg.lm, cfg.datastore)
    chunk_tokens = cfg.datastore.stride * cfg.datastore.batch_size * CHUNK_BATCHES
    tokens = text.train[401: 401 + 2 * chunk_tokens + 50]  # two whole chunks of windows and a partial one
    wins = windows(len(tokens), cfg.lm.block_size, cfg.datastore.stride)
    caplog.set_level(logging.INFO, logger="openbook.knnlm.pipeline")
    scored = score_stream(model, tokens, store, cfg, k=4, what="evaluate test")
    lines = messages(caplog, "openbook.knnlm.pipeline")
    n, p = len(wins), len(tokens) - 1
    assert lines[0] == f"evaluate test: encode: {n} windows to do" and n > 2 * cfg.datastore.batch_size * CHUNK_BATCHES
    assert any(line.startswith(f"evaluate test: encode: {n}/{n} windows, {p} tokens in ") for line in lines)
    assert f"evaluate test: search: {p} tokens to do" in lines
    assert any(line.startswith(f"evaluate test: search: {p}/{p} tokens in ") for line in lines)
    _, lm_logp = encode(model, tokens, wins, cfg.datastore.batch_size)
    assert np.array_equal(scored.lm_logp, lm_logp)
