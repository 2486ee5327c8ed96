"""Every recipe in configs/ loads; bad configs give one-line errors with the key's path."""

from __future__ import annotations

from pathlib import Path

import pytest

from openbook.config import describe, from_dict
from openbook.errors import ConfigError
from openbook.knnlm.config import KnnLMConfig, load_knnlm_config
from openbook.recipe import RecipeConfig, load_recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "default.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    if path.name.startswith("knnlm_"):  # kNN-LM recipes have their own schema (`openbook knnlm`)
        cfg = load_knnlm_config(path)
        assert isinstance(cfg, KnnLMConfig)
    else:
        cfg = load_recipe(path)
        assert isinstance(cfg, RecipeConfig)
    assert cfg.name == path.stem


def test_unknown_key_names_its_path(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("retriever:\n  poolin: mean\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.retriever: unknown key 'poolin'"):
        load_recipe(p)


def test_wrong_type_and_literal(tmp_path):
    with pytest.raises(ConfigError, match=r"index.nprobe: expected int"):
        from_dict(RecipeConfig, {"index": {"nprobe": "many"}})
    with pytest.raises(ConfigError, match=r"retriever.pooling: 'max' is not one of"):
        from_dict(RecipeConfig, {"retriever": {"pooling": "max"}})


def test_invalid_combination_is_refused():
    with pytest.raises(ConfigError, match="not divisible"):
        from_dict(RecipeConfig, {"retriever": {"encoder": {"hidden_size": 65, "num_heads": 2}}})


def test_overrides_and_missing_file(tmp_path):
    cfg = load_recipe(CONFIGS[0], ["index.factory=HNSW32", "snapshots.keep=5"])
    assert cfg.index.factory == "HNSW32" and cfg.snapshots.keep == 5
    with pytest.raises(ConfigError, match="config file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_bad_index_factory_is_refused_before_anything_starts():
    """A typo or a PQ that does not divide the embedding width: one line naming the factory and the width, at load
    time (it used to fail in the first refresh, after Ray started, with FAISS's C++ internals). Checked against
    FAISS itself, with the recipe's width (the projection's when there is one)."""
    with pytest.raises(ConfigError, match=r"index.factory 'Flatt' is not a faiss index for 64-dim vectors: could not "
                                          r"parse index string Flatt$"):
        load_recipe(CONFIGS[0], ["index.factory=Flatt", "retriever.encoder.hidden_size=64"])
    with pytest.raises(ConfigError, match=r"'IVF16,PQ7' is not a faiss index for 64-dim vectors: The dimension"):
        load_recipe(CONFIGS[0], ["index.factory=IVF16,PQ7", "retriever.encoder.hidden_size=64"])
    with pytest.raises(ConfigError, match="for 128-dim vectors"):  # REALM-style projection: its width counts
        load_recipe(CONFIGS[0], ["index.factory=IVF16,PQ7", "retriever.projection_dim=128"])
    for good in ("IVF16,PQ8", "HNSW32", "OPQ8,IVF16,PQ8", "IVF64,PQ16x8"):
        assert load_recipe(CONFIGS[0], [f"index.factory={good}", "retriever.encoder.hidden_size=64"]).index.factory == good


def test_a_yaml_syntax_error_names_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: dense_retriever\ntrain:\n  max_steps: 4\n  batch_size: [1, 2\nindex:\n  factory: Flat\n")
    with pytest.raises(ConfigError) as e:
        load_recipe(bad)
    msg = str(e.value)
    assert "\n" not in msg and "invalid YAML at line 5, column 6" in msg and "begun at line 4" in msg, msg
    (tmp_path / "indent.yaml").write_text("train:\n  max_steps: 4\n   batch_size: 2\n")
    with pytest.raises(ConfigError, match="invalid YAML at line 3"):
        load_recipe(tmp_path / "indent.yaml")


def test_every_field_has_help():
    lines = describe(RecipeConfig)
    assert len(lines) > 20
    assert all(not line.endswith("# ") for line in lines), [line for line in lines if line.endswith("# ")]


def test_exponent_floats_without_a_dot_are_accepted():
    assert from_dict(RecipeConfig, {"train": {"lr": "3e-3"}}).train.lr == 0.003
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        from_dict(RecipeConfig, {"train": {"lr": "fast"}})


def test_keep_one_snapshot_with_refresh_is_refused():
    with pytest.raises(ConfigError, match="snapshots.keep must be >= 2 with refresh on"):
        from_dict(RecipeConfig, {"snapshots": {"keep": 1}})
    assert from_dict(RecipeConfig, {"snapshots": {"keep": 1}, "refresh": {"enabled": False}}).snapshots.keep == 1


def test_moved_keys_fail_with_one_line_naming_the_new_key(tmp_path):
    for old, value, new in (("rag.n_docs", 3, "reader.n_docs"), ("fid.max_answer_length", 8, "reader.max_answer_length"),
                            ("realm.reader_lr_scale", 30, "reader.lr_scale"), ("refresh.batch_size", 64,
                                                                              "encode.batch_size")):
        with pytest.raises(ConfigError) as e:
            load_recipe(CONFIGS[0], [f"{old}={value}"])
        assert f"{old} is now {new}" in str(e.value) and f"set {new}: {value}" in str(e.value)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"refresh.shard_size was removed \(a refresh task is now one index shard: "
                                          r"set index.shards"):
        load_recipe(CONFIGS[0], ["refresh.shard_size=500"])
    with pytest.raises(ConfigError, match="model 'colbert' is not one of dense_retriever, ict"):
        load_recipe(CONFIGS[0], ["model=colbert"])


RECIPES = [p for p in CONFIGS if not p.name.startswith("knnlm_")]
SMALL = ["data.world.num_passages=300", "train.val_questions=8", "train.val_every_n_steps=0"]


def stand_ins(cfg: RecipeConfig, tmp: Path, small: list[str]) -> list[str]:
    """Overrides pointing the recipe's earlier stages (``runs/...``) at stand-ins built here by the stage
    recipes themselves (their spec's build and save, untrained, on the small world)."""
    from openbook.trainer.train import build_parts, save_final

    sets = []
    for key in ("generator.source", "retriever.init_from", "realm.init_from"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not value or not value.startswith("runs/"):
            continue
        stage_path = next(p for p in RECIPES if value.startswith(load_recipe(p).run_dir))
        run_dir = tmp / stage_path.stem
        if not (run_dir / "config.yaml").exists():
            stage = load_recipe(stage_path, [*small, f"run_dir={run_dir}"])
            stage = load_recipe(stage_path, [*small, f"run_dir={run_dir}", *stand_ins(stage, tmp, small)])
            save_final(build_parts(stage))
        sets.append(f"{key}={run_dir / Path(value).relative_to(load_recipe(stage_path).run_dir)}")
    return sets


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_builds_through_openbook_train(path, tmp_path, monkeypatch):
    """``openbook train`` on each recipe in configs/ with only ``fit`` replaced (as litgpt's config hub test
    does): the model's spec builds its module and loaders, the first index is built, the start and end
    evaluations and the saved weights run for real, on a 300-passage world. Earlier stages a recipe loads
    are stand-ins built by their own recipes. A recipe that no longer builds fails here."""
    import openbook.trainer.train as train
    from openbook.cli import main

    seen = {}

    def fit_without_training(trainer, parts, loader, ckpt_path=None, **kwargs):
        seen["batch"] = next(iter(loader))
        parts.callback.preinstall(parts.callback.build_initial(parts.module, 0))

    monkeypatch.setattr(train, "fit", fit_without_training)
    small = [*SMALL, f"data.cache_dir={tmp_path / 'cache'}"]
    run = tmp_path / "run"
    sets = [*small, f"run_dir={run}", *stand_ins(load_recipe(path), tmp_path, small)]
    assert main(["train", "--config", str(path), "--quiet", *[a for s in sets for a in ("--set", s)]]) == 0
    assert seen["batch"] and (run / "config.yaml").is_file() and (run / "model.pt").is_file()
    assert load_recipe(run / "config.yaml").model == load_recipe(path).model


def test_a_recipe_resolves_by_name_from_any_directory(tmp_path, monkeypatch):
    from openbook.recipe import load_recipe

    monkeypatch.chdir(tmp_path)  # no configs/ here
    by_name = load_recipe("default")
    assert by_name == load_recipe("configs/default.yaml") == load_recipe("default.yaml")
    assert by_name.name == "default"
    from openbook.knnlm.config import load_knnlm_config

    assert load_knnlm_config("knnlm_pydoc").name == "knnlm_pydoc"
    with pytest.raises(ConfigError, match=r"config file not found \(a path, or a shipped recipe: .*default") as err:
        load_recipe("no_such_recipe")
    assert "\n" not in str(err.value)


def test_rolling_refresh_needs_refresh_on_and_at_least_r_shards():
    rolling = {"strategy": "rolling", "rolling_parts": 4}
    with pytest.raises(ConfigError, match="needs at least refresh.rolling_parts=4 index shards, got 3"):
        from_dict(RecipeConfig, {"refresh": rolling, "index": {"shards": 3}})
    with pytest.raises(ConfigError, match="got 2 .index.shards, or refresh.num_workers when it is 0"):
        from_dict(RecipeConfig, {"refresh": {**rolling, "num_workers": 2}, "index": {"shards": 0}})
    with pytest.raises(ConfigError, match="refresh.enabled is false"):
        from_dict(RecipeConfig, {"refresh": {**rolling, "enabled": False}, "index": {"shards": 4}})
    cfg = from_dict(RecipeConfig, {"refresh": {**rolling, "num_workers": 4}, "index": {"shards": 0}})
    assert cfg.refresh.strategy == "rolling"
