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
