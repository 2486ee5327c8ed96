"""The index interface the rest of openbook sees: build from embeddings, add, search, save, load.

FAISS is the one backend today (:class:`~openbook.index.faiss_index.FaissIndex`); another ANN library
would be a second class with these methods and a branch in :func:`build_index` / :func:`load_index`.
Nothing outside ``openbook/index/`` imports faiss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from openbook.index.faiss_index import FaissIndex, IndexConfig, Metric


class VectorIndex(Protocol):
    """Rows labelled 0..n-1 in the order they were added; ``metric`` "ip" (inner product, best first)
    or "l2" (squared distance, nearest first)."""

    metric: str

    @property
    def dim(self) -> int: ...

    @property
    def ntotal(self) -> int: ...

    def add(self, x: np.ndarray) -> None: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 [Q, k'], scores float32 [Q, k']), -1 where nothing was found."""
        ...

    def save(self, path: Path) -> None: ...

    def with_config(self, cfg: IndexConfig) -> VectorIndex:
        """The same index with other search parameters (nprobe, efSearch) or device."""
        ...

    def empty_copy(self) -> VectorIndex:
        """The same training (quantizer, codebooks) without any vectors."""
        ...


def build_index(x: np.ndarray, cfg: IndexConfig, metric: Metric = "ip") -> VectorIndex:
    """A trained index of ``cfg.factory`` holding the rows of ``x``."""
    return FaissIndex.build(x, cfg, metric)


def load_index(path: Path, cfg: IndexConfig, metric: Metric = "ip") -> VectorIndex:
    """An index saved with ``save``; ``cfg`` sets its search parameters and device."""
    return FaissIndex.load(path, cfg, metric)


def train_index(sample: np.ndarray, cfg: IndexConfig, metric: Metric = "ip") -> VectorIndex:
    """An empty index of ``cfg.factory`` trained (IVF/PQ) on ``sample``, for shards to add their rows to."""
    return FaissIndex.trained(sample, cfg, metric)


def needs_training(factory: str, dim: int) -> bool:
    """Whether ``factory`` (IVF, PQ, ...) must be trained on a sample before vectors are added."""
    return FaissIndex.needs_training(factory, dim)


def index_to_bytes(index: VectorIndex) -> np.ndarray:
    return index.to_bytes()


def index_from_bytes(data: np.ndarray, cfg: IndexConfig, metric: Metric = "ip") -> VectorIndex:
    return FaissIndex.from_bytes(data, cfg, metric)
