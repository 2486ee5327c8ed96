"""Prerequisite stages of a recipe (a pretrained reader, a trained retriever): found and trained once.

A recipe names earlier runs by path (``generator.source``, ``retriever.init_from``, ``realm.init_from``
under ``runs/``). The stage that makes such a path is the recipe in ``configs/`` whose ``run_dir`` holds
it; a missing one is trained first (recursively), in place, so later benchmarks reuse it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from bench.common import ROOT
from openbook.recipe import RecipeConfig, load_recipe

log = logging.getLogger(__name__)


def prerequisites(cfg: RecipeConfig) -> list[Path]:
    """Run outputs the recipe loads (absolute paths), whether or not they exist yet."""
    paths = [cfg.generator.source, cfg.retriever.init_from, cfg.realm.init_from]
    return [ROOT / p for p in paths if p and p.startswith("runs/")]


def stage_for(path: Path, configs: Path = ROOT / "configs") -> Path | None:
    """The recipe whose run_dir contains ``path``."""
    for config in sorted(configs.glob("*.yaml")):
        try:
            run_dir = ROOT / load_recipe(config).run_dir
        except Exception:  # noqa: BLE001 - a recipe being edited elsewhere must not stop the bench
            continue
        if path == run_dir or run_dir in path.parents:
            return config
    return None


def ensure_stages(cfg: RecipeConfig) -> list[dict]:
    """Train every missing prerequisite of ``cfg``; returns what was trained and how long it took."""
    from openbook.trainer.train import run_train

    trained = []
    for path in prerequisites(cfg):
        if path.exists():
            continue
        config = stage_for(path)
        if config is None:
            raise FileNotFoundError(f"{path} is missing and no recipe in configs/ has it under its run_dir")
        stage = load_recipe(config)
        trained += ensure_stages(stage)
        t0 = time.perf_counter()
        log.warning("training prerequisite stage %s (not counted in the benchmark)", config.name)
        run_train(load_recipe(config, [f"run_dir={ROOT / stage.run_dir}"]), progress=False, overwrite=True)
        trained.append({"stage": config.name, "seconds": time.perf_counter() - t0})
    return trained


def ensure_warm_start(config: Path, run_dir: Path, steps: int) -> list[dict]:
    """``config`` trained for ``steps`` steps into ``run_dir`` (a retriever to start from), unless it is there."""
    from openbook.trainer.train import run_train

    if (run_dir / "retriever.pt").exists():
        return []
    base = load_recipe(config)
    t0 = time.perf_counter()
    over = [f"train.max_steps={steps}", "train.val_every_n_steps=0", f"run_dir={run_dir}"]
    over += [f"generator.source={ROOT / base.generator.source}"] if base.generator.source.startswith("runs/") else []
    run_train(load_recipe(config, over), progress=False, overwrite=True)  # an interrupted stage left a part
    return [{"stage": f"{config.name} for {steps} steps", "seconds": time.perf_counter() - t0}]


def same_recipe(cached_key: str, key: str) -> bool:
    """Whether a cached run's resolved recipe (``cached_key``, a YAML dump) is the recipe ``key`` resolves:
    equal, or equal once read by today's schema (fields added since get their defaults, which keep the
    old behaviour), so adding a setting does not throw away hours of cached runs while changing a value does."""
    if cached_key == key:
        return True
    import yaml

    from openbook.config import from_dict
    from openbook.recipe import RecipeConfig
    from openbook.trainer.train import config_yaml

    try:
        return config_yaml(from_dict(RecipeConfig, yaml.safe_load(cached_key), "cached")) == key
    except Exception:  # noqa: BLE001 - a key today's schema cannot read is simply not the same recipe
        return False

