"""Shared fixtures: one local Ray per test session (ray.init costs ~8 s), small generated worlds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster shared by the whole session (no dashboard, a small object store)."""
    import ray

    if not ray.is_initialized():
        from openbook.refresher.cluster import local_ray_options

        ray.init(num_cpus=2, object_store_memory=200 * 1024**2, log_to_driver=False, **local_ray_options())
    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is visible (they are written for the GPU machines)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
