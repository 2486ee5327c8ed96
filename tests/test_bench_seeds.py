"""``python -m bench.seeds``: figures read back from a run, the seed summary, and its run cache."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import seed_groups as sg
from bench.seeds import Job, group_text, run_job, spread
from openbook.trainer.train import config_yaml
from tests.helpers import tiny_recipe


def _result(**scalars) -> dict:
    return {"summary": {"dev_recall@5": 0.8, "dev_recall@5_at_start": 0.1, "seconds": 60.0},
            "scalars": {tag: {str(k): v for k, v in series.items()} for tag, series in scalars.items()}}


def test_figures_read_validation_steps_windows_and_the_summary():
    r = _result(**{"val/recall@5": {99: 0.3, 199: 0.5}, "train/retrieval_utility": {0: 1.0, 1: 3.0, 2: 10.0}})
    assert sg.val_at("val/recall@5", 100)(r) == 0.3  # Lightning logs "after 100" at step 99
    assert sg.val_at("val/recall@5", 200)(r) == 0.5
    assert sg.val_at("val/recall@5", 300)(r) != sg.val_at("val/recall@5", 300)(r)  # NaN: not there
    assert sg.window("train/retrieval_utility", 0, 2)(r) == 2.0
    labels = [label for label, _ in sg.curve("val/recall@5", (100, 200, 600), "recall", "dev_recall@5_at_start",
                                             "dev_recall@5")]
    assert labels == ["recall at start", "recall at 100", "recall at 200", "recall at 600"]
    assert [fn(r) for _, fn in sg.curve("val/recall@5", (100, 600), "r", "dev_recall@5_at_start",
                                        "dev_recall@5")] == [0.1, 0.3, 0.8]


def test_spread_and_the_goal_line():
    assert spread([0.5, 0.9, 0.1, float("nan")]) == "0.50 [0.10–0.90]"
    group = sg.Group("g", "G", "configs/default.yaml", [("recall", sg.final_recall)],
                     goal=("recall", sg.final_recall, 0.7))
    results = [{"summary": {"dev_recall@5": v, "seconds": 60.0}, "scalars": {}} for v in (0.9, 0.6, 0.75)]
    text = group_text(group, results)
    assert "| recall | 0.75 [0.60–0.90] | 0.90 / 0.60 / 0.75 |" in text
    assert "in **2 of 3** seeds" in text


def test_every_group_names_a_recipe_that_loads():
    from bench.common import ROOT
    from openbook.recipe import load_recipe

    for g in [*sg.GROUPS]:
        load_recipe(ROOT / g.config, [*g.sets, *g.quick_sets])
    assert set(sg.LAG_SWEEP.lags) == {1, 5, 10, 25, 50}


@pytest.mark.slow
def test_a_run_is_cached_under_its_resolved_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe.yaml"
    cfg = tiny_recipe(tmp_path, cache=tmp_path / "cache", train={"max_steps": 4}, refresh={"enabled": False})
    recipe.write_text(config_yaml(cfg))
    job = Job("tiny", str(recipe), seed=1, root=tmp_path / "seeds")
    first = run_job(job)
    assert first["summary"]["steps"] == 4 and first["summary"]["index_version"] == 1  # refresh off: one index
    assert (job.run_dir / "config.yaml").read_text() == first["key"]  # the recipe the run itself saved

    def no_run(*a, **k):
        raise AssertionError("ran again")

    monkeypatch.setattr(subprocess, "run", no_run)
    assert run_job(job) == first  # same resolved recipe: the cached result
    done = job.run_dir / "bench_result.json"  # a figure tag added since the run: read from its log again
    done.write_text(json.dumps({**first, "scalars": {}}))
    assert first["scalars"] and run_job(job)["scalars"] == first["scalars"]
    with pytest.raises(AssertionError, match="ran again"):
        run_job(Job("tiny", str(recipe), seed=1, sets=["train.max_steps=5"], root=tmp_path / "seeds"))


def test_knnlm_rows_over_seeds_keep_each_seeds_tuning():
    from bench.knnlm import _row, over_seeds

    def res(lm, tuned, k):
        return {"rows": [_row("LM alone", "-", "-", "-", 0.0, lm, lm / 2),
                         _row("kNN-LM, tuned on valid", "exact", k, 10.0, 0.4, tuned, tuned / 2)]}

    rows = over_seeds([res(70.0, 60.0, 1024), res(80.0, 64.0, 256), res(75.0, 62.0, 1024)])
    assert rows[0]["valid ppl"] == "75.00 [70.00–80.00]" and rows[0]["test ppl"] == "37.50 [35.00–40.00]"
    assert rows[1]["k, T, λ"] == "1024, 10.0, 0.4 / 256, 10.0, 0.4 / 1024, 10.0, 0.4"
    assert rows[1]["valid ppl"] == "62.00 [60.00–64.00]"


def test_a_cached_run_survives_a_new_setting_but_not_a_changed_value(tmp_path):
    """bench.stages.same_recipe: a key written before a field existed (it resolves to the field's default)
    is the same recipe; a key with another value is not."""
    import yaml

    from bench.stages import same_recipe

    key = config_yaml(tiny_recipe(tmp_path))
    older = yaml.safe_load(key)
    del older["data"]["missing_gold"], older["retriever"]["query_prefix"]  # fields added since
    assert same_recipe(yaml.safe_dump(older, sort_keys=False), key)
    changed = yaml.safe_load(key)
    changed["train"]["lr"] = 0.5
    assert not same_recipe(yaml.safe_dump(changed, sort_keys=False), key)
    assert not same_recipe("not: [a recipe", key)
