"""The index-build step: concatenate shards, build FAISS, publish the snapshot atomically.

Runs inside an EncoderWorker (idle once encoding is done), so a refresh needs no resources
beyond the pool's own: a separate task would wait forever on a cluster the pool fills.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openbook.index import IndexConfig, SnapshotStore


@dataclass(frozen=True)
class IndexTarget:
    """Where and how snapshots are published."""

    root: Path
    index: IndexConfig
    keep: int
    meta: dict


def publish_shards(target: IndexTarget, encoder_step: int, weights_time: float, protect: tuple,
                   doc_ids: np.ndarray, shards: list[np.ndarray]) -> dict:
    embeddings = np.concatenate(shards)
    store = SnapshotStore(target.root, keep=target.keep)
    snap = store.publish(embeddings, doc_ids, encoder_step=encoder_step, index_cfg=target.index,
                         weights_time=weights_time, meta=target.meta, protect=protect)
    return {"version": snap.version, "path": str(snap.path)}
