"""The Inverse Cloze Task warm start: pair making, the in-batch loss against a float64 loop, and a real
run that teaches a random tiny retriever to find the generated world's passages by name."""

from __future__ import annotations

import math
import random

import pytest
import torch

from openbook.errors import ConfigError
from openbook.models.ict import ict_loss, ict_pair, split_sentences

TEXT = "Brurbrei Thirzendis plays the harp. Friends describe Brurbrei as shy! Nobody knows why."


def test_split_sentences_keeps_every_word():
    parts = split_sentences(TEXT)
    assert parts == ["Brurbrei Thirzendis plays the harp.", "Friends describe Brurbrei as shy!", "Nobody knows why."]
    assert " ".join(parts).split() == TEXT.split()
    assert split_sentences("no full stop at all") == ["no full stop at all"]


def test_ict_pair_removes_the_query_sentence_unless_kept():
    rng = random.Random(0)
    queries = set()
    for _ in range(60):
        q, rest = ict_pair(TEXT, rng, keep_sentence_prob=0.0)
        queries.add(q)
        assert q in split_sentences(TEXT) and q not in rest
        assert len(split_sentences(rest)) == 2
    assert len(queries) == 3  # every sentence serves as a query
    q, rest = ict_pair(TEXT, rng, keep_sentence_prob=1.0)
    assert rest == TEXT and q in rest
    kept = sum(q in rest for q, rest in (ict_pair(TEXT, rng, 0.1) for _ in range(2000)))
    assert 140 < kept < 260  # ~10% of 2000 (binomial sd ~13)
    assert ict_pair("One sentence only.", rng, 0.0) == ("One sentence only.", "")


def test_ict_loss_matches_a_float64_loop():
    torch.manual_seed(0)
    q, d = torch.randn(5, 8), torch.randn(5, 8)
    titles = ["a", "b", "a", "c", "b"]
    same = torch.tensor([[x == y for y in titles] for x in titles])
    loss, hit = ict_loss(q, d, same)
    qd, dd = q.double(), d.double()
    for i in range(5):
        allowed = [j for j in range(5) if j == i or titles[j] != titles[i]]  # same-title negatives are out
        scores = {j: float(qd[i] @ dd[j]) for j in allowed}
        expect = -scores[i] + math.log(sum(math.exp(s) for s in scores.values()))
        assert loss[i].item() == pytest.approx(expect, rel=1e-5, abs=1e-6)
        assert bool(hit[i]) == (max(scores, key=scores.get) == i)


def test_ict_loss_over_gathered_ranks_is_the_full_batch_loss():
    """Two ranks' halves, each scoring all 6 docs with its own offset, give the 6-query batch's loss."""
    torch.manual_seed(1)
    q, d = torch.randn(6, 8), torch.randn(6, 8)
    titles = torch.tensor([0, 1, 0, 2, 1, 3])
    same = titles[:, None] == titles[None, :]
    full, full_hit = ict_loss(q, d, same)
    for rank in (0, 1):
        part = slice(3 * rank, 3 * rank + 3)
        loss, hit = ict_loss(q[part], d, same[part], offset=3 * rank)
        assert torch.allclose(loss, full[part]) and torch.equal(hit, full_hit[part])
    half, _ = ict_loss(q[:3], d[:3], same[:3, :3])
    assert not torch.allclose(half, full[:3])  # the other rank's docs do enter the softmax


def test_ict_run_teaches_a_random_retriever_to_find_passages_by_name(tmp_path):
    """Real ``openbook train`` run with ``model: ict`` (no Ray: refresh off): the dev questions were never
    seen, yet recall@5 on them goes from chance to most, because ICT teaches name-to-title matching."""
    from openbook.trainer.train import run_train
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model="ict", retriever={"doc_max_length": 48},
                      train={"max_steps": 120, "batch_size": 32, "lr": 1e-3, "warmup_steps": 10},
                      refresh={"enabled": False})
    summary = run_train(cfg, progress=False)
    assert summary[f"dev_recall@{cfg.train.eval_k}_at_start"] < 0.15
    assert summary[f"dev_recall@{cfg.train.eval_k}_fresh_encode"] > 0.5
    assert (tmp_path / "run" / "retriever.pt").is_file()


def test_ict_config_errors_name_the_field():
    from openbook.config import from_dict
    from openbook.recipe import RecipeConfig

    with pytest.raises(ConfigError, match="keep_sentence_prob"):
        from_dict(RecipeConfig, {"model": "ict", "ict": {"keep_sentence_prob": 1.5}})


@pytest.mark.parametrize("model", ["ict", "realm_pretrain"])
def test_a_batch_larger_than_the_corpus_is_refused(tmp_path, model):
    """These loaders drop the last partial batch: without the check the run would train 0 steps and
    report success."""
    from openbook.trainer.train import build_parts, train_loader
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model=model, data={"world": {"num_passages": 100, "seed": 0}},
                      realm={"salient_spans": "title_words"}, train={"batch_size": 101}, refresh={"enabled": False})
    parts = build_parts(cfg)
    with pytest.raises(ConfigError, match="batch_size=101 but the corpus has only 100 passages"):
        train_loader(parts)


def test_a_run_on_text_without_questions_reports_no_recall(tmp_path):
    """pydoc text has no gold passages: the summary leaves recall out instead of printing NaN."""
    import json

    from openbook.trainer.train import run_train
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model="ict", data={"source": "pydoc", "pydoc_words": 64},
                      train={"max_steps": 2, "batch_size": 8}, refresh={"enabled": False})
    summary = run_train(cfg, progress=False)
    assert summary["steps"] == 2 and not any("recall" in key for key in summary)
    json.dumps(summary, allow_nan=False)  # no NaN anywhere: valid JSON for dashboards and scripts
