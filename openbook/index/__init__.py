"""FAISS wrappers, versioned atomic snapshots and the read-copy-update holder. No Ray here."""

from __future__ import annotations

from openbook.index.faiss_index import (
    DenseIndex,
    IndexConfig,
    build_faiss_index,
    gpu_available,
    to_device,
)
from openbook.index.holder import IndexHolder
from openbook.index.snapshot import CRASH_ENV, IndexSnapshot, Manifest, SnapshotStore

__all__ = [
    "CRASH_ENV",
    "DenseIndex",
    "IndexConfig",
    "IndexHolder",
    "IndexSnapshot",
    "Manifest",
    "SnapshotStore",
    "build_faiss_index",
    "gpu_available",
    "to_device",
]
