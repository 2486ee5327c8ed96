"""Where a format-2 snapshot's shards live across the trainer's ranks (``index.placement``).

- ``replicated``: every rank loads every shard and searches them as one index (:class:`ShardSet`).
- ``sharded``: rank r of W holds shards r, r+W, r+2W, ... (:class:`Part`); a search is a collective
  (:class:`DistributedShardSet`): the ranks' queries are all-gathered, each rank searches its own shards
  for every rank's queries, the per-rank top-k (scores, global rows) are all-gathered and each rank merges
  its own queries' top-k with :func:`merge_topk`. A Flat factory gives exactly the replicated result: each
  rank's query block is searched as its own batch (the floats a replicated search computes) and the merge
  breaks ties by the lower global row, as :class:`ShardSet` does.

The assignment is a function of (shard number, rank, world size) alone, recomputed at every load: a run
resumed with another world size re-assigns the shards. Collectives need every rank to search the same
number of times, which training steps (and DDP's evenly padded validation) do. The exchange itself (torch
distributed) is the trainer's: this package only sees the :class:`Exchange` protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from openbook.index.faiss_index import Metric
from openbook.index.shards import Shard, ShardSet, merge_topk


class Exchange(Protocol):
    """Collectives over the trainer's ranks (every rank calls each one, in the same order)."""

    rank: int
    world: int

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        """Every rank's ``x`` (first dimension may differ between ranks), in rank order."""

    def all_reduce_sum(self, x: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's ``x`` (same shape everywhere)."""


@dataclass(frozen=True)
class Part:
    """This rank's part of a sharded snapshot (rank r of W holds shards r, r+W, ...) and the exchange its
    searches go through (None only for a world of one)."""

    rank: int
    world: int
    exchange: Exchange | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    def owns(self, shard_number: int) -> bool:
        return shard_number % self.world == self.rank


def owned_shards(count: int, rank: int, world: int) -> list[int]:
    """Shard numbers rank ``rank`` of ``world`` holds: r, r+W, ... (every shard held by exactly one rank)."""
    return [s for s in range(count) if Part(rank, world).owns(s)]


class DistributedShardSet:
    """This rank's shards, searched together with every other rank's (each call is a collective)."""

    def __init__(self, local: Sequence[Shard], exchange: Exchange, ntotal: int, dim: int, metric: Metric = "ip"):
        self.local, self.exchange = ShardSet(local, dim), exchange
        self._ntotal, self._dim, self.metric = ntotal, dim, metric
        self.local.metric = metric

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def local_ntotal(self) -> int:
        return self.local.ntotal

    @property
    def search_params(self) -> dict[str, int]:
        return self.local.search_params

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32).reshape(-1, self._dim)
        blocks = self.exchange.all_gather(q)
        found = [self.local.search(b, k) for b in blocks]  # block by block: the batches a replicated search sees
        rows = self.exchange.all_gather(np.concatenate([r for r, _ in found]) if found else np.empty((0, k), np.int64))
        scores = self.exchange.all_gather(np.concatenate([s for _, s in found]) if found else
                                          np.empty((0, k), np.float32))
        me = self.exchange.rank
        lo = sum(len(b) for b in blocks[:me])
        hi = lo + len(blocks[me])
        return merge_topk([(r[lo:hi], s[lo:hi]) for r, s in zip(rows, scores)], k, self.metric)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of global ``rows`` (any shape, -1 gives zeros), from the ranks that hold them."""
        r = np.asarray(rows, dtype=np.int64)
        wanted = self.exchange.all_gather(r.reshape(-1))
        flat = np.concatenate(wanted)
        out = np.zeros((len(flat), self._dim), dtype=np.float32)
        for shard in self.local.shards:
            sel = (flat >= shard.entry.lo) & (flat < shard.entry.hi)
            if sel.any():
                out[sel] = np.asarray(shard.embeddings[flat[sel] - shard.entry.lo], dtype=np.float32)
        out = self.exchange.all_reduce_sum(out)
        lo = sum(len(w) for w in wanted[: self.exchange.rank])
        return out[lo: lo + r.size].reshape(*r.shape, self._dim)

    def with_config(self, cfg) -> DistributedShardSet:
        return DistributedShardSet([s for s in self.local.with_config(cfg).shards], self.exchange, self._ntotal,
                                   self._dim, self.metric)
