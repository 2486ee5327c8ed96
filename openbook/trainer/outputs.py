"""What a run leaves in its run_dir: the resolved recipe, the model's weights, the refresh history."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from openbook.config import to_dict
from openbook.recipe import RecipeConfig


def config_yaml(cfg: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_final(parts) -> None:
    """The resolved recipe and the weights the model's spec saves (``openbook search`` and later stages load them)."""
    run = Path(parts.cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(config_yaml(parts.cfg))
    parts.spec.save(parts.module, run)


def save_history(parts, rank: int) -> Path:
    """Per rank: the index version in use after every step and each refresh's timeline (JSON)."""
    stats = parts.callback.stats
    path = Path(parts.cfg.run_dir) / f"refresh_history_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"versions": stats.versions, "events": [dataclasses.asdict(e) for e in stats.events],
                                "skipped": stats.skipped, "failures": stats.failures, "waits": stats.waits}))
    return path
