"""The index interface (FAISS behind it), versioned atomic snapshots and the read-copy-update holder. No Ray."""

from __future__ import annotations

from openbook.index.faiss_index import FaissIndex, IndexConfig, gpu_available, to_device
from openbook.index.holder import IndexHolder
from openbook.index.snapshot import CRASH_ENV, IndexSnapshot, Manifest, SnapshotStore
from openbook.index.vector_index import VectorIndex, build_index, load_index

__all__ = [
    "CRASH_ENV",
    "FaissIndex",
    "IndexConfig",
    "IndexHolder",
    "IndexSnapshot",
    "Manifest",
    "SnapshotStore",
    "VectorIndex",
    "build_index",
    "gpu_available",
    "load_index",
    "to_device",
]
