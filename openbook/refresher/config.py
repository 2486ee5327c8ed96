"""Refresher settings (no Ray import: the recipe loads this without starting anything)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from openbook.config import opt
from openbook.refresher.schedule import RefreshSchedule


@dataclass(kw_only=True)
class RefreshConfig:
    enabled: bool = opt(True, "re-encode the corpus during training (off: the initial index is used throughout)")
    schedule: str = opt("50", "every N steps ('50') or piecewise like '0-100:10,100-:500' (atlas syntax)")
    mode: Literal["async", "sync"] = opt("async", "async: training never waits; sync: block until each refresh is in")
    num_workers: int = opt(1, "EncoderWorker actors in the pool")
    cpus_per_worker: float = opt(1.0, "Ray CPUs reserved per actor")
    gpus_per_worker: float = opt(0.0, "Ray GPUs per actor (encoding runs on cuda when > 0)")
    threads_per_worker: int = opt(1, "torch intra-op threads inside each actor")
    shard_size: int = opt(1000, "passages per task; a dead actor's shard is retried elsewhere")
    batch_size: int = opt(128, "passages per forward pass inside an actor")
    max_shard_retries: int = opt(3, "attempts per shard before the refresh is declared failed")
    timeout_seconds: float = opt(3600.0, "a refresh running longer is cancelled and counted as failed")
    start_timeout_seconds: float = opt(120.0, "the pool must be up by then (else: not enough cluster resources)")
    address: str | None = opt(None, "Ray address: null starts a local Ray; 'auto' joins the running cluster")
    object_store_memory: int | None = opt(None, "bytes for a local Ray's object store (null: Ray's default)")
    check_every_n_steps: int = opt(1, "how often ranks look for (and agree on) a newer snapshot")

    def __post_init__(self) -> None:
        RefreshSchedule(self.schedule)  # raises ValueError with the bad piece named
        if self.num_workers < 1 or self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("num_workers, shard_size and batch_size must be >= 1")
        if self.check_every_n_steps < 1:
            raise ValueError("check_every_n_steps must be >= 1")
