"""``EncoderWorker``: a Ray actor that encodes corpus rows with the weights it is handed and writes them as
index shards of the snapshot being staged (format 2), or trains the index quantizer on a sample."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import ray
import torch

from openbook.data.tokcache import TokenizedCorpus
from openbook.index import IndexConfig
from openbook.index.shards import write_shard
from openbook.index.vector_index import index_from_bytes, index_to_bytes, needs_training, train_index
from openbook.refresher.encode import EncoderSpec, encode_row_ids, encode_rows, load_numpy_state


@ray.remote(max_restarts=0, max_task_retries=0)
class EncoderWorker:
    """Holds one encoder (built from the model's spec) and the memory-mapped token cache; reloads
    weights only when their tag changes."""

    def __init__(self, spec: EncoderSpec, tokens: TokenizedCorpus, threads: int, batch_size: int,
                 delay: float = 0.0, kill_shard: int = -1):
        torch.set_num_threads(max(1, threads))
        self.delay = delay  # fault injection (refresh.inject_delay_seconds): a slow or loaded pool
        self.kill_shard = kill_shard  # fault drill (refresh.inject_kill_shard): die while writing that shard
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.encoder = spec.build().to(self.device)
        self.tokens = tokens
        self.batch_size = batch_size
        self.weights_tag: int | None = None

    def pid(self) -> int:
        return os.getpid()

    def _weights(self, tag: int, state: dict[str, np.ndarray]) -> None:
        # ``state`` arrives from the object store (zero-copy numpy); load it once per refresh.
        if self.delay:
            time.sleep(self.delay)
        if tag != self.weights_tag:
            load_numpy_state(self.encoder, state)
            self.weights_tag = tag

    def train_quantizer(self, tag: int, state: dict[str, np.ndarray], rows: np.ndarray,
                        cfg: IndexConfig) -> np.ndarray | None:
        """An empty index trained on the given rows' new embeddings (serialised), or None for a factory
        that needs no training (Flat, HNSW): every shard then adds its rows to a copy of it."""
        if not needs_training(cfg.factory, self.encoder.dim):
            return None
        self._weights(tag, state)
        sample = encode_row_ids(self.encoder, self.tokens, rows, self.batch_size, self.device)
        return index_to_bytes(train_index(sample, cfg))

    def encode_shard(self, tag: int, state: dict[str, np.ndarray], staging: str, shard: int, start: int, end: int,
                     cfg: IndexConfig, trained: np.ndarray | None) -> dict:
        """Encode rows [start, end) and write them as shard ``shard`` straight into ``staging`` (format 2):
        only the shard's small entry comes back, never its embeddings."""
        self._weights(tag, state)
        emb = encode_rows(self.encoder, self.tokens, start, end, self.batch_size, self.device)
        base = None if trained is None else index_from_bytes(trained, IndexConfig(factory=cfg.factory, device="cpu"))
        entry = write_shard(Path(staging), shard, start, emb, self.tokens.doc_ids[start:end], cfg, base,
                            writer={"node": ray.get_runtime_context().get_node_id(),
                                    "node_ip": ray.util.get_node_ip_address()},
                            before_commit=_die_on_first_attempt if shard == self.kill_shard else None)
        return entry.to_json()


def _die_on_first_attempt(part: Path) -> None:
    """The kill drill: a first attempt dies with its files written but not renamed (its half-written part dir
    stays behind); a redo finds that leftover and goes on."""
    shard = "-".join(part.name.split("-")[1:3])  # .part-shard-00002-<pid>-<uuid>
    if not [p for p in part.parent.glob(f".part-{shard}-*") if p != part]:
        os.kill(os.getpid(), signal.SIGKILL)
