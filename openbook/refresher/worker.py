"""``EncoderWorker``: a Ray actor that encodes corpus shards with the weights it is handed."""

from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from openbook.data.tokcache import TokenizedCorpus
from openbook.refresher.encode import EncoderSpec, encode_rows, load_numpy_state
from openbook.refresher.publish import IndexTarget, publish_shards


@ray.remote(max_restarts=0, max_task_retries=0)
class EncoderWorker:
    """Holds one encoder (built from the model's spec) and the memory-mapped token cache; reloads
    weights only when their tag changes."""

    def __init__(self, spec: EncoderSpec, tokens: TokenizedCorpus, threads: int, batch_size: int,
                 delay: float = 0.0):
        torch.set_num_threads(max(1, threads))
        self.delay = delay  # fault injection (refresh.inject_delay_seconds): a slow or loaded pool
        self.device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        self.encoder = spec.build().to(self.device)
        self.tokens = tokens
        self.batch_size = batch_size
        self.weights_tag: int | None = None

    def pid(self) -> int:
        return os.getpid()

    def encode(self, tag: int, state: dict[str, np.ndarray], start: int, end: int) -> np.ndarray:
        # ``state`` arrives from the object store (zero-copy numpy); load it once per refresh.
        if self.delay:
            time.sleep(self.delay)
        if tag != self.weights_tag:
            load_numpy_state(self.encoder, state)
            self.weights_tag = tag
        return encode_rows(self.encoder, self.tokens, start, end, self.batch_size, self.device)

    def publish(self, target: IndexTarget, encoder_step: int, weights_time: float, protect: tuple,
                doc_ids: np.ndarray, *shards: np.ndarray) -> dict:
        """Build the index from the gathered shards and publish it (shards arrive zero-copy)."""
        return publish_shards(target, encoder_step, weights_time, protect, doc_ids, list(shards))
