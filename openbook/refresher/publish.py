"""In-process encoding and publishing, for runs without the actor pool (refresh off, ``openbook build-index``):
the same encoding loop as the actors, so both produce the same numbers. (A refresh writes its shards from
the actors: ``EncoderWorker.encode_shard``.)
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openbook.data.tokcache import TokenizedCorpus
from openbook.index import IndexConfig, IndexSnapshot, SnapshotStore
from openbook.index.atomic import rmtree
from openbook.index.shards import row_ranges, write_shard
from openbook.progress import Progress
from openbook.refresher.encode import encode_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IndexTarget:
    """Where and how snapshots are published."""

    root: Path
    index: IndexConfig
    keep: int
    meta: dict


def encode_corpus(encoder, tokens: TokenizedCorpus, batch_size: int, progress: bool = True) -> np.ndarray:
    """All doc embeddings [N, d] (float16, the snapshot dtype) with ``encoder``; passages done and passages
    per second logged (INFO), and shown on a bar with ``progress``. Uses the actors' own loop, so
    in-process and Ray-built snapshots hold the same numbers."""
    n = len(tokens)
    chunk = batch_size * 16
    parts = []
    with Progress(log, "encode", n, "passage", bar=progress) as prog:
        for lo in range(0, n, chunk):
            parts.append(encode_rows(encoder, tokens, lo, min(lo + chunk, n), batch_size))
            prog.update(parts[-1].shape[0])
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float16)


def publish_in_process(target: IndexTarget, encoder, tokens: TokenizedCorpus, doc_ids: np.ndarray,
                       encoder_step: int, batch_size: int, progress: bool = False,
                       sharded: bool = False) -> tuple[IndexSnapshot, dict]:
    """Encode every passage here (no actor pool) and publish a snapshot; returns (snapshot, stats).
    ``sharded`` (and ``index.shards`` > 1): in the shards the pool's refreshes write, so a rolling refresh
    can build on it; else one index over all rows (format 1)."""
    weights_time = time.time()
    t0 = time.perf_counter()
    emb = encode_corpus(encoder, tokens, batch_size, progress)
    encode_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    store = SnapshotStore(target.root, keep=target.keep)
    if sharded and target.index.shards > 1:
        snap = publish_sharded(store, target, emb, doc_ids, encoder_step, weights_time)
    else:
        snap = store.publish(emb, doc_ids, encoder_step=encoder_step, index_cfg=target.index,
                             weights_time=weights_time, meta=target.meta)
    stats = {"docs": len(tokens), "encode_seconds": encode_s, "docs_per_second": len(tokens) / max(encode_s, 1e-9),
             "publish_seconds": time.perf_counter() - t1}
    return snap, stats


def publish_sharded(store: SnapshotStore, target: IndexTarget, emb: np.ndarray, doc_ids: np.ndarray,
                    encoder_step: int, weights_time: float) -> IndexSnapshot:
    """``index.shards`` shards written here, in the rows the actor pool would give them, as one format-2
    snapshot (out of space: old snapshots pruned and one more try, as for the pool's)."""
    def attempt() -> int:
        staging = store.stage()
        try:
            for s, lo, hi in row_ranges(len(emb), target.index.shards):
                write_shard(staging, s, lo, emb[lo:hi], np.asarray(doc_ids)[lo:hi], target.index)
            return store.publish_shards(staging, encoder_step=encoder_step, index_cfg=target.index, count=len(emb),
                                        weights_time=weights_time, meta=target.meta)
        except BaseException:
            rmtree(staging)
            raise

    return store.load(store.with_space(attempt), verify=False, cpu=True)
