"""index.placement sharded (issue 17): each of 2 gloo processes holds its shards only; searches are all-gathered
and merged, and equal the replicated search over every shard exactly (Flat, integer data full of ties)."""

from __future__ import annotations

import numpy as np
import torch.distributed as dist
import torch.multiprocessing as mp

from openbook.index.faiss_index import IndexConfig
from openbook.index.placement import Part, owned_shards
from openbook.index.snapshot import IndexSnapshot, SnapshotStore
from tests.test_shards import _data, _exact, _publish

BOUNDS = [0, 40, 110, 111, 200, 300]  # 5 shards over 2 ranks: rank 0 holds 3, rank 1 holds 2 (one of a single row)
QUERIES = {0: 7, 1: 4}  # each rank asks its own number of questions


def _queries(rank: int) -> np.ndarray:
    return np.random.default_rng(10 + rank).integers(-3, 4, size=(QUERIES[rank], 8)).astype(np.float32)


def _rank(rank: int, path: str, rendezvous: str, out: str) -> None:
    from openbook.trainer.exchange import TorchExchange

    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        snap = IndexSnapshot.load(path, index_cfg=IndexConfig(factory="Flat", device="cpu"),
                                  part=Part(rank, 2, TorchExchange()))
        rows, scores = snap.search(_queries(rank), 12)
        rows_small, _ = snap.search(_queries(rank)[:0], 12)  # a rank with no questions still takes part
        vectors = snap.vectors(rows)
        np.savez(f"{out}-{rank}.npz", rows=rows, scores=scores, vectors=vectors, ids=snap.ids(rows),
                 local=snap.index.local_ntotal, total=snap.index.ntotal, sharded=snap.sharded,
                 empty=rows_small.shape[0])
    finally:
        dist.destroy_process_group()


def test_sharded_search_equals_replicated_search_exactly(tmp_path):
    x, ids = _data()
    pub = _publish(SnapshotStore(tmp_path / "snaps"), x, ids, BOUNDS)
    mp.start_processes(_rank, args=(str(pub.path), str(tmp_path / "rdv"), str(tmp_path / "out")), nprocs=2,
                       start_method="spawn")
    replicated = IndexSnapshot.load(pub.path)
    assert not replicated.sharded
    held = 0
    for rank in (0, 1):
        got = np.load(tmp_path / f"out-{rank}.npz")
        want_rows, want_scores = replicated.search(_queries(rank), 12)
        np.testing.assert_array_equal(got["rows"], want_rows)
        np.testing.assert_array_equal(got["scores"], want_scores)
        np.testing.assert_array_equal(got["rows"], _exact(x, _queries(rank), 12)[0])  # and the float64 reference
        np.testing.assert_array_equal(got["vectors"], x[want_rows].astype(np.float32))  # fetched from the owners
        np.testing.assert_array_equal(got["ids"], ids[want_rows])
        assert got["sharded"] and got["total"] == 300 and got["empty"] == 0
        held += int(got["local"])
        own = owned_shards(5, rank, 2)
        assert int(got["local"]) == sum(BOUNDS[i + 1] - BOUNDS[i] for i in own) < 300
    assert held == 300  # every row held by exactly one rank


def test_shards_are_reassigned_for_any_world_size():
    for world in (1, 2, 3, 4, 7):
        owned = [owned_shards(6, r, world) for r in range(world)]
        assert sorted(s for o in owned for s in o) == list(range(6))
        assert max(map(len, owned)) - min(map(len, owned)) <= 1
        assert all(Part(r, world).owns(s) for r in range(world) for s in owned[r])
