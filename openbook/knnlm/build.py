"""Build the datastore from a token stream: shards of windows encoded by a pool of Ray actors (or in
this process, shard by shard, the same way), written into a memory-mapped :class:`DatastoreWriter`.

Datastore row i is the prediction made at stream position i: key = the LM's pre-FFN state after
tokens[..i], value = tokens[i + 1]. Shards are ranges of windows, so rows never depend on sharding.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import ray
import torch
from torch import nn

from openbook.knnlm.config import DatastoreConfig, LMConfig
from openbook.knnlm.datastore import Datastore, DatastoreWriter
from openbook.knnlm.model import build_lm, encode, key_dim, windows
from openbook.progress import Progress
from openbook.refresher.cluster import ensure_ray
from openbook.refresher.config import RefreshConfig
from openbook.refresher.encode import load_numpy_state, numpy_state
from openbook.refresher.pool import ActorPool, run_shards

log = logging.getLogger(__name__)


def encode_shard(model: nn.Module, tokens: np.ndarray, wins: np.ndarray, batch_size: int) -> tuple:
    """(first row, keys [P, d], values int32 [P]) for a contiguous range of windows."""
    keys, _ = encode(model, tokens, wins, batch_size)
    lo, hi = int(wins[0, 1]), int(wins[-1, 2])
    return lo, keys, np.asarray(tokens[lo + 1:hi + 1], dtype=np.int32)


@ray.remote(max_restarts=0, max_task_retries=0)
class DatastoreWorker:
    """Holds one copy of the LM; loads the weights it is handed once, then encodes shards of windows."""

    def __init__(self, lm_cfg: LMConfig, vocab_size: int, threads: int):
        torch.set_num_threads(max(1, threads))
        self.model = build_lm(lm_cfg, vocab_size).eval()
        self.loaded = False

    def encode(self, state: dict, tokens: np.ndarray, wins: np.ndarray, batch_size: int) -> tuple:
        if not self.loaded:  # ``state`` and ``tokens`` arrive zero-copy from the object store
            load_numpy_state(self.model, state)
            self.loaded = True
        return encode_shard(self.model, tokens, wins, batch_size)


def _shards(wins: np.ndarray, size: int) -> list[np.ndarray]:
    return [wins[a:a + size] for a in range(0, len(wins), size)]


def _writer(path: Path, model: nn.Module, tokens: np.ndarray, cfg: DatastoreConfig) -> DatastoreWriter:
    return DatastoreWriter(path, len(tokens) - 1, key_dim(model), cfg.keys_dtype)


def _progress(shards: list[np.ndarray], bar: bool) -> Progress:
    """Shards done of all, and tokens (datastore rows) per second."""
    return Progress(log, "datastore", len(shards), "shard", rate_unit="token", bar=bar)


def _write(writer: DatastoreWriter, prog: Progress, shard: tuple) -> None:
    writer.write(*shard)
    prog.update(1, len(shard[2]))


def _commit(writer: DatastoreWriter, cfg: DatastoreConfig, meta: dict, t0: float) -> Datastore:
    meta = {**meta, "encode_seconds": time.perf_counter() - t0}
    log.info("datastore: indexing %d keys (%s)", writer.count, cfg.factory)  # IVF/PQ training can take a while
    store = writer.commit(cfg.index_config(), meta)
    log.info("datastore %s: %d keys in %.1fs", store.path, len(store), time.perf_counter() - t0)
    return store


def build_local(path: str | Path, model: nn.Module, tokens: np.ndarray, lm_cfg: LMConfig,
                cfg: DatastoreConfig, meta: dict | None = None, progress: bool = False) -> Datastore:
    """The single-process build: the same shards, encoded one after another here (progress logged; a bar
    too with ``progress``)."""
    t0 = time.perf_counter()
    writer = _writer(Path(path), model, tokens, cfg)
    try:
        shards = _shards(windows(len(tokens), lm_cfg.block_size, cfg.stride), cfg.shard_windows)
        with _progress(shards, progress) as prog:
            for shard in shards:
                _write(writer, prog, encode_shard(model, tokens, shard, cfg.batch_size))
        return _commit(writer, cfg, {**(meta or {}), "workers": 0}, t0)
    except BaseException:
        writer.abort()
        raise


def build_sharded(path: str | Path, model: nn.Module, tokens: np.ndarray, lm_cfg: LMConfig,
                  cfg: DatastoreConfig, meta: dict | None = None, progress: bool = False) -> Datastore:
    """Encode shards on ``cfg.num_workers`` Ray actors (the refresher's pool loop: two shards queued per
    actor, a dead actor's shard retried on a live one), write them as they come back, then index and
    commit. Starts a local Ray (or joins ``cfg.address``) if needed. Progress as in ``build_local``."""
    t0 = time.perf_counter()
    started = ensure_ray(RefreshConfig(address=cfg.address))
    vocab = int(model.config.vocab_size)
    pool = ActorPool(lambda _slot: DatastoreWorker.options(num_cpus=cfg.threads_per_worker).remote(
        lm_cfg, vocab, cfg.threads_per_worker), cfg.num_workers)
    writer = _writer(Path(path), model, tokens, cfg)
    try:
        state, toks = ray.put(numpy_state(model)), ray.put(np.asarray(tokens, dtype=np.int64))
        shards = _shards(windows(len(tokens), lm_cfg.block_size, cfg.stride), cfg.shard_windows)
        with _progress(shards, progress) as prog:
            run_shards(pool, shards, lambda actor, wins: actor.encode.remote(state, toks, wins, cfg.batch_size),
                       lambda _, ref: _write(writer, prog, ray.get(ref)), cfg.max_shard_retries)
        return _commit(writer, cfg, {**(meta or {}), "workers": cfg.num_workers}, t0)
    except BaseException:
        writer.abort()
        raise
    finally:
        pool.kill()
        if started:
            ray.shutdown()
