"""Test helpers: small recipes in temporary directories."""

from __future__ import annotations

import os
import time
from pathlib import Path

from openbook.config import from_dict
from openbook.recipe import RecipeConfig


def tiny_recipe(tmp: Path, cache: Path | None = None, **sections) -> RecipeConfig:
    """The embedded default, shrunk, writing into ``tmp``. ``sections`` override per section."""
    data = {
        "name": "test",
        "run_dir": str(tmp / "run"),
        "data": {"world": {"num_passages": 600, "seed": 0}, "cache_dir": str(cache or tmp / "cache")},
        "retriever": {"encoder": {"source": "tiny", "hidden_size": 32, "num_layers": 1, "num_heads": 2,
                                  "intermediate_size": 64}, "pooling": "mean", "doc_max_length": 32},
        "train": {"max_steps": 30, "batch_size": 8, "lr": 1e-3, "negatives": 4, "num_threads": 1},
        # a loaded CI machine can take minutes to start an actor (or a replacement): fail on that only after
        # 10 minutes
        "encode": {"batch_size": 64},
        "refresh": {"schedule": "5", "start_timeout_seconds": 600, "replace_timeout_seconds": 600},
        "index": {"shards": 3},  # format-2 snapshots of several shards on every test path
    }
    for name, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(name, {}).update(value)
        else:
            data[name] = value
    return from_dict(RecipeConfig, data)


def wait_gone(pids, timeout: float = 20.0) -> set[int]:
    """Poll until the processes have exited; returns those still alive after ``timeout``."""
    deadline, alive = time.time() + timeout, set(pids)
    while alive and time.time() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.2)
    return alive
