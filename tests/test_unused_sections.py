"""Up-front checks: a recipe that sets another model's sections (``fid:`` on the dense retriever, ``--set
fid.distill=true``) is warned, in one line, that they are ignored; sections at their defaults (a run's full
``config.yaml``, which resume reloads) and the sections a model reads are not."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from openbook.config import to_dict
from openbook.recipe import load_recipe

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
RECIPES = [p for p in CONFIGS if not p.name.startswith("knnlm_")]  # kNN-LM recipes have their own schema
SMALL = "name: t\nrun_dir: runs/t\n"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "openbook.recipe" and r.levelno == logging.WARNING]


def load(caplog: pytest.LogCaptureFixture, path: Path, overrides: list[str] | None = None) -> list[str]:
    """The warnings of one ``load_recipe``."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openbook.recipe"):
        load_recipe(path, overrides)
    return warnings(caplog)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.timeout(60)
def test_a_fid_section_on_the_dense_retriever_warns_naming_it(tmp_path, caplog):
    path = write(tmp_path, SMALL + "model: dense_retriever\nfid:\n  distill: true\n  num_beams: 2\n")
    got = load(caplog, path)
    assert len(got) == 1, got
    assert got[0] == (f"recipe {path}: model dense_retriever does not use the section fid (set in the file: fid); "
                      "it is ignored")


@pytest.mark.timeout(60)
def test_several_unused_sections_are_one_line(tmp_path, caplog):
    path = write(tmp_path, SMALL + "reader:\n  n_docs: 7\ngenerator:\n  layers: 1\n")  # no model: dense_retriever
    (line,) = load(caplog, path, ["fid.distill=true"])
    assert line == (f"recipe {path}: model dense_retriever does not use the sections reader, generator, fid "
                    "(set in the file: reader, generator; by --set fid.distill=true); they are ignored")


@pytest.mark.timeout(60)
def test_a_set_override_on_the_dense_retriever_warns(tmp_path, caplog):
    path = write(tmp_path, SMALL)
    (line,) = load(caplog, path, ["fid.distill=true"])
    assert "model dense_retriever" in line and "section fid " in line and "by --set fid.distill=true" in line
    assert "set in the file" not in line
    assert load(caplog, path, ["fid.distill=false"]) == []  # the default: nothing is lost


@pytest.mark.timeout(60)
def test_a_rag_recipe_with_its_generator_section_does_not_warn(tmp_path, caplog):
    path = write(tmp_path, SMALL + "model: rag\ngenerator:\n  layers: 1\nreader:\n  n_docs: 3\nrag:\n  num_beams: 2\n")
    assert load(caplog, path) == []
    (line,) = load(caplog, path, ["fid.distill=true"])  # another model's section is still named, and only it
    assert "model rag does not use the section fid (by --set fid.distill=true)" in line


@pytest.mark.timeout(60)
def test_a_section_set_to_its_defaults_does_not_warn(tmp_path, caplog):
    """A shared base YAML may carry a section for another model at its defaults: nothing of it is lost."""
    path = write(tmp_path, SMALL + "fid:\n  distill: false\nict: {}\n")
    assert load(caplog, path) == []
    assert len(load(caplog, path, ["fid.num_beams=3"])) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_without_the_warning(path, caplog):
    model = load_recipe(path).model
    assert load(caplog, path) == []
    other, key = ("rag", "rag.num_beams=2") if model == "fid" else ("fid", "fid.num_beams=2")
    (line,) = load(caplog, path, [key])  # the same recipe with a section its model ignores is warned
    assert f"model {model} does not use the section {other} (by --set {key})" in line


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_a_full_dump_reloads_without_the_warning(path, tmp_path, caplog):
    """A run's config.yaml (``to_dict`` of the whole recipe, every section) is what resume and export reload."""
    cfg = load_recipe(path)
    dump = to_dict(cfg)
    saved = write(tmp_path, yaml.safe_dump(dump, sort_keys=False), "config.yaml")
    assert load(caplog, saved) == []
    other = "rag" if cfg.model == "fid" else "fid"
    dump[other]["num_beams"] = 3  # a dump whose ignored section was changed is still warned
    changed = write(tmp_path, yaml.safe_dump(dump, sort_keys=False), "changed.yaml")
    (line,) = load(caplog, changed)
    assert f"section {other} (set in the file: {other})" in line


@pytest.mark.timeout(60)
def test_resume_reloads_the_checkpoint_config_without_the_warning(tmp_path, caplog):
    from openbook.trainer.resume import resume_recipe

    run = tmp_path / "run"
    step = run / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    (step / "model.ckpt").write_bytes(b"")
    cfg = load_recipe(CONFIGS[0], [f"run_dir={run}"])
    (step / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="openbook.recipe"):
        assert resume_recipe(None, [f"run_dir={run}"], "last").model == cfg.model
        assert warnings(caplog) == []
        resume_recipe(None, [f"run_dir={run}", "generator.layers=1"], "last")
    (line,) = warnings(caplog)
    assert "section generator (by --set generator.layers=1)" in line


@pytest.mark.timeout(60)
def test_the_model_sections_are_recipe_sections_and_each_model_names_its_own():
    import dataclasses

    from openbook.recipe import RecipeConfig
    from openbook.registry import MODEL_SECTIONS, MODELS

    assert set(MODEL_SECTIONS) <= {f.name for f in dataclasses.fields(RecipeConfig)}
    assert MODELS["dense_retriever"].unused_sections() == MODEL_SECTIONS
    assert MODELS["fid"].unused_sections() == ("rag", "realm", "ict")
