"""Snapshot format 2 (issue 17): shards written where they are encoded, one manifest, searched as one index."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from openbook.errors import SnapshotError
from openbook.index.faiss_index import IndexConfig
from openbook.index.shards import Rows, merge_topk, shard_name, write_shard
from openbook.index.snapshot import FORMAT_SHARDED, SEAL, SnapshotStore, manifest_seal, shards_checksum
from openbook.index.vector_index import train_index

FLAT = IndexConfig(factory="Flat", device="cpu")


def _data(n: int = 300, d: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Small integer vectors: exact in float16 and float32, and full of tied scores."""
    x = np.random.default_rng(seed).integers(-3, 4, size=(n, d)).astype(np.float16)
    return x, np.array([f"doc-{i}" for i in range(n)])


def _exact(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k in float64: highest inner product first, ties to the lower row."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.lexsort((np.broadcast_to(np.arange(x.shape[0]), s.shape), -s), axis=1)[:, :k]
    return order, np.take_along_axis(s, order, 1)


def _publish(store: SnapshotStore, x: np.ndarray, ids: np.ndarray, bounds: list[int], cfg: IndexConfig = FLAT,
             trained=None, step: int = 0):
    staging = store.stage()
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        write_shard(staging, i, lo, x[lo:hi], ids[lo:hi], cfg, trained)
    return store.load(store.publish_shards(staging, encoder_step=step, index_cfg=cfg, count=len(x)), verify=False)


def test_sharded_flat_search_equals_exact_search_with_ties(tmp_path):
    x, ids = _data()
    store = SnapshotStore(tmp_path / "snaps")
    snap = _publish(store, x, ids, [0, 70, 180, 300])
    assert snap.manifest.format == FORMAT_SHARDED and [s["name"] for s in snap.manifest.shards] == [
        shard_name(0), shard_name(1), shard_name(2)]
    again = store.load(snap.version)  # a full load verifies every shard's sha256
    q = np.random.default_rng(1).integers(-3, 4, size=(40, 8)).astype(np.float32)
    rows, scores = again.search(q, 10)
    want_rows, want_scores = _exact(x, q, 10)
    np.testing.assert_array_equal(rows, want_rows)  # ties included: the lower global row first
    np.testing.assert_array_equal(scores, want_scores.astype(np.float32))
    assert (np.diff(want_scores, axis=1) == 0).any()  # the data really has ties inside the top 10
    np.testing.assert_array_equal(again.ids(rows), ids[rows])
    np.testing.assert_array_equal(again.embeddings[rows], x[rows])  # rows gathered across shards
    np.testing.assert_array_equal(np.asarray(again.embeddings), x)


def test_ivf_shards_share_one_trained_quantizer(tmp_path):
    x, ids = _data(600, 8, seed=3)
    x = x + np.random.default_rng(4).normal(0, 0.1, x.shape).astype(np.float16)  # fewer ties, for IVF
    cfg = IndexConfig(factory="IVF8,Flat", nprobe=8, device="cpu")  # all lists probed: exact
    trained = train_index(x[np.random.default_rng(5).choice(600, 200, replace=False)], cfg)
    snap = _publish(SnapshotStore(tmp_path / "snaps"), x, ids, [0, 250, 600], cfg, trained)
    q = np.random.default_rng(6).normal(size=(20, 8)).astype(np.float32)
    rows, _ = snap.search(q, 5)
    np.testing.assert_array_equal(rows, _exact(x, q, 5)[0])
    assert snap.index.search_params == {"nprobe": 8}
    assert trained.ntotal == 0  # each shard added to a copy


def test_a_truncated_shard_makes_the_whole_snapshot_unusable(tmp_path, caplog):
    x, ids = _data()
    store = SnapshotStore(tmp_path / "snaps")
    good = _publish(store, x, ids, [0, 150, 300], step=1)
    bad = _publish(store, x, ids, [0, 150, 300], step=2)
    victim = bad.path / shard_name(1) / "index.faiss"
    victim.write_bytes(victim.read_bytes()[:-7])
    with caplog.at_level(logging.WARNING, logger="openbook.index.snapshot"):
        latest = store.latest()
    assert latest.version == good.version  # the last good one stays in use
    assert any(str(victim) in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records)
    with pytest.raises(SnapshotError, match="shard-00001/index.faiss"):
        store.load(bad.version, verify=False)  # sizes are checked even without hashing


def test_publish_refuses_a_missing_shard_and_claims_nothing(tmp_path):
    x, ids = _data()
    store = SnapshotStore(tmp_path / "snaps")
    staging = store.stage()
    write_shard(staging, 0, 0, x[:100], ids[:100], FLAT)
    write_shard(staging, 2, 200, x[200:], ids[200:], FLAT)  # shard 1 never came
    with pytest.raises(SnapshotError, match="shard-00002 starts at row 200, expected 100"):
        store.publish_shards(staging, encoder_step=0, index_cfg=FLAT, count=300)
    assert store.versions() == [] and not staging.exists()


def test_a_redone_shard_replaces_the_first_attempt_whole(tmp_path):
    x, ids = _data()
    store = SnapshotStore(tmp_path / "snaps")
    staging = store.stage()
    write_shard(staging, 0, 0, np.zeros_like(x[:150]), ids[:150], FLAT)  # a first attempt, then redone
    write_shard(staging, 0, 0, x[:150], ids[:150], FLAT)
    write_shard(staging, 1, 150, x[150:], ids[150:], FLAT)
    assert sorted(p.name for p in staging.iterdir()) == [shard_name(0), shard_name(1)]  # no .part/.trash left
    (staging / ".part-shard-00001-1-deadbeef").mkdir()  # left by a writer killed mid-shard
    version = store.publish_shards(staging, encoder_step=0, index_cfg=FLAT, count=300)
    assert sorted(p.name for p in store.path(version).iterdir()) == ["manifest.json", shard_name(0), shard_name(1)]
    np.testing.assert_array_equal(np.asarray(store.load(version).embeddings), x)


def test_a_tampered_shard_list_fails_the_manifest_checksum(tmp_path):
    x, ids = _data()
    store = SnapshotStore(tmp_path / "snaps")
    snap = _publish(store, x, ids, [0, 150, 300])
    m = json.loads((snap.path / "manifest.json").read_text())
    m["shards"][1]["hi"] = 299
    (snap.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="manifest_sha256 does not match its contents"):
        store.load(snap.version)
    m[SEAL] = manifest_seal(m)  # re-sealed by hand: the shards checksum still catches it
    (snap.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="checksum does not match its shards list"):
        store.load(snap.version)


def test_merge_topk_orders_by_metric_then_row_and_puts_missing_last():
    a = (np.array([[0, 2, -1]]), np.array([[0.5, 0.9, 0.0]], np.float32))
    b = (np.array([[7, 5]]), np.array([[0.9, 0.1]], np.float32))
    rows, scores = merge_topk([a, b], 4, "ip")
    assert rows.tolist() == [[2, 7, 0, 5]] and scores.tolist()[0][:2] == pytest.approx([0.9, 0.9])
    rows, _ = merge_topk([a, b], 5, "l2")  # smallest distance first; the -1 (nothing found) last
    assert rows.tolist() == [[5, 0, 2, 7, -1]]


def test_rows_gather_across_parts_in_the_requested_shape():
    parts = [np.arange(6).reshape(3, 2), np.arange(6, 10).reshape(2, 2)]
    r = Rows(parts, [0, 3])
    assert r.shape == (5, 2) and r[np.array([[4, 0], [3, 2]])].tolist() == [[[8, 9], [0, 1]], [[6, 7], [4, 5]]]
    with pytest.raises(IndexError):
        r[np.array([5])]


def test_shard_steps_are_recorded_and_a_manifest_without_them_still_loads(tmp_path):
    """publish_shards records each shard's encoder_step (carried shards: their own) and the rotation; a manifest
    written before rolling refreshes (no per-shard step) loads, its shards taking the manifest's step."""
    x, ids = _data()
    store = SnapshotStore(tmp_path)
    staging = store.stage()
    for i, (lo, hi) in enumerate([(0, 100), (100, 300)]):
        write_shard(staging, i, lo, x[lo:hi], ids[lo:hi], FLAT)
    v = store.publish_shards(staging, encoder_step=9, index_cfg=FLAT, count=300, shard_steps={shard_name(0): 3},
                             rotation={"parts": 2, "part": 1})
    m = store.load(v).manifest
    assert [s["encoder_step"] for s in m.shards] == [3, 9] and m.rotation == {"parts": 2, "part": 1}
    assert (m.oldest_step, m.mean_step) == (3, (100 * 3 + 200 * 9) / 300)
    path = store.path(v) / "manifest.json"
    old = json.loads(path.read_text())
    del old[SEAL]  # such a manifest predates the seal too
    for s in old["shards"]:
        del s["encoder_step"]
    del old["rotation"]
    old["checksum"] = shards_checksum(old["shards"])
    path.write_text(json.dumps(old))
    m = store.load(v).manifest  # verifies
    assert m.rotation == {} and (m.oldest_step, m.mean_step) == (9, 9.0)
    old["shards"][0]["encoder_step"] = 1  # a step edited in by hand fails the checksum
    path.write_text(json.dumps(old))
    with pytest.raises(SnapshotError, match="checksum"):
        store.load(v)
