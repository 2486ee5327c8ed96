"""Snapshots: bit-exact round trip, atomic publish under SIGKILL, corrupt snapshots skipped, pruning, RCU."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from openbook.errors import SnapshotError
from openbook.index import (
    CRASH_ENV,
    IndexConfig,
    IndexHolder,
    SnapshotStore,
    build_index,
)
from openbook.index.snapshot import CRASH_STAGES, HIGHWATER, SEAL, manifest_seal

REPO = Path(__file__).resolve().parents[1]


def make_data(n: int = 2000, d: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x, [f"doc-{seed}-{i}" for i in range(n)]


def publish(store: SnapshotStore, seed: int = 0, step: int = 0, **kw):
    x, ids = make_data(n=300, d=16, seed=seed)
    return store.publish(x, ids, encoder_step=step, index_cfg=IndexConfig(), **kw)


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != HIGHWATER)


def test_round_trip_is_bit_exact(tmp_path):
    x, ids = make_data()
    cfg = IndexConfig(factory="IVF16,Flat", nprobe=4)
    store = SnapshotStore(tmp_path, keep=3)
    snap = store.publish(x, ids, encoder_step=7, index_cfg=cfg, weights_time=123.5, meta={"encoder": "tiny"})
    again = SnapshotStore(tmp_path).load(1)  # a fresh store, verified from disk

    x16 = x.astype(np.float16)
    assert again.embeddings.dtype == np.float16 and again.embeddings.tobytes() == x16.tobytes()
    assert again.doc_ids.tolist() == ids
    # The index is built from the fp16 values, so an in-memory build of those is the reference.
    ref = build_index(x16, cfg)
    q = np.random.default_rng(9).standard_normal((50, 32)).astype(np.float32)
    for got, want in zip(again.search(q, 10), ref.search(q, 10)):
        np.testing.assert_array_equal(got, want)
    assert again.index.search_params == {"nprobe": 4}  # search params travel in the manifest

    m = again.manifest
    assert (m.format, m.version, m.encoder_step, m.dim, m.count, m.factory) == (1, 1, 7, 32, 2000, "IVF16,Flat")
    assert m.weights_time == 123.5 and abs(m.created_at - time.time()) < 60 and m.meta == {"encoder": "tiny"}
    for name, entry in m.files.items():
        data = (again.path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert m.checksum == hashlib.sha256("".join(m.files[n]["sha256"] for n in sorted(m.files)).encode()).hexdigest()
    assert sorted(p.name for p in again.path.iterdir()) == ["doc_ids.npy", "embeddings.npy", "index.faiss",
                                                           "manifest.json"]
    assert leftovers(tmp_path) == [] and snap.version == 1 and again.path == tmp_path / "v000001"

    rows, _ = again.search(q[:2], 3)
    assert again.ids(rows).tolist() == [[ids[r] for r in row] for row in rows]
    assert again.ids(np.array([-1, 0])).tolist() == ["", ids[0]]


def test_weights_time_defaults_to_created_at(tmp_path):
    m = publish(SnapshotStore(tmp_path)).manifest
    assert m.weights_time == m.created_at


def test_publish_rejects_bad_inputs(tmp_path):
    store = SnapshotStore(tmp_path)
    x, ids = make_data(n=10, d=4)
    with pytest.raises(SnapshotError, match="doc ids of shape"):
        store.publish(x, ids[:9], encoder_step=0, index_cfg=IndexConfig())
    with pytest.raises(SnapshotError, match="non-empty"):
        store.publish(x[:0], [], encoder_step=0, index_cfg=IndexConfig())
    with pytest.raises(SnapshotError, match="NaN/inf"):
        store.publish(x * 1e6, ids, encoder_step=0, index_cfg=IndexConfig())  # overflows float16
    assert store.versions() == [] and leftovers(tmp_path) == []


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from openbook.index import IndexConfig, SnapshotStore
    x = np.random.default_rng(1).standard_normal((3000, 16)).astype(np.float32)
    SnapshotStore(sys.argv[1]).publish(x, [str(i) for i in range(3000)], encoder_step=5,
                                       index_cfg=IndexConfig())
""")


def run_child(root: Path, crash: str) -> subprocess.Popen:
    env = {**os.environ, CRASH_ENV: crash, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root)], env=env, stderr=subprocess.PIPE, text=True)


def assert_invisible_then_cleaned(root: Path, store: SnapshotStore) -> None:
    assert store.versions() == [1]
    assert store.latest().version == 1
    assert [n.startswith(".tmp-") for n in leftovers(root)] == [True]  # the dead writer's partial dir
    removed = store.cleanup()  # its pid is dead -> stale at once
    assert len(removed) == 1 and leftovers(root) == []
    assert publish(store, seed=3).version == 2  # and the store carries on


@pytest.mark.parametrize("stage", CRASH_STAGES)
def test_writer_dying_mid_publish_leaves_no_visible_snapshot(tmp_path, stage):
    store = SnapshotStore(tmp_path)
    publish(store)
    child = run_child(tmp_path, stage)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 137, err
    assert_invisible_then_cleaned(tmp_path, store)


def test_sigkill_during_publish_leaves_no_visible_snapshot(tmp_path):
    store = SnapshotStore(tmp_path)
    publish(store)
    child = run_child(tmp_path, "after_index:hang")
    for line in child.stderr:  # wait until the writer is mid-publish (index written, not renamed)
        if "openbook-crash-point after_index" in line:
            break
    else:
        pytest.fail(f"child exited early with {child.wait()}")
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    assert_invisible_then_cleaned(tmp_path, store)


def test_cleanup_spares_a_live_fresh_writer(tmp_path):
    store = SnapshotStore(tmp_path)
    live = tmp_path / f".tmp-{socket.gethostname()}-{os.getpid()}-0123abcd"
    live.mkdir()
    (tmp_path / ".trash-v000001-0123abcd").mkdir()
    assert store.cleanup() == [tmp_path / ".trash-v000001-0123abcd"]  # trash always goes
    assert live.is_dir()  # our own pid: alive, and fresh
    assert SnapshotStore(tmp_path, stale_seconds=0.0).cleanup() == [live]  # old enough counts as dead


def damage(path: Path, how: str) -> str:
    """Damage snapshot dir ``path``; returns the regex the load error must match."""
    if how == "flip":
        p = path / "index.faiss"
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p.write_bytes(bytes(data))
        return rf"^{re.escape(str(path))}/index.faiss: checksum mismatch \(file corrupt\)$"
    if how == "truncate":
        p = path / "embeddings.npy"
        size = p.stat().st_size
        with open(p, "r+b") as f:
            f.truncate(100)
        return rf"^{re.escape(str(path))}/embeddings.npy: size 100 != manifest {size} \(truncated\)$"
    if how == "missing_file":
        (path / "doc_ids.npy").unlink()
        return rf"^{re.escape(str(path))}/doc_ids.npy: file missing$"
    if how == "bad_json":
        (path / "manifest.json").write_text("{not json")
        return rf"^{re.escape(str(path))}/manifest.json: invalid JSON"
    if how == "wrong_count":  # a manifest that disagrees with its files (re-sealed: the seal alone would catch it)
        m = json.loads((path / "manifest.json").read_text())
        m["count"] += 1
        m[SEAL] = manifest_seal(m)
        (path / "manifest.json").write_text(json.dumps(m))
        return rf"^{re.escape(str(path))}/embeddings.npy: float16 \(300, 16\) != manifest"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["flip", "truncate", "missing_file", "bad_json", "wrong_count"])
def test_corrupt_newest_snapshot_is_skipped(tmp_path, caplog, how):
    store = SnapshotStore(tmp_path, keep=1)
    publish(store, seed=0)
    publish(store, seed=1, protect=[1])
    pattern = damage(tmp_path / "v000002", how)

    fresh = SnapshotStore(tmp_path, keep=1)  # no memory of what was published
    with caplog.at_level(logging.WARNING, logger="openbook.index.snapshot"):
        good = fresh.latest()
    assert good is not None and good.version == 1
    assert "v000002" in caplog.text
    with pytest.raises(SnapshotError, match=pattern) as e:
        fresh.load(2)
    assert "\n" not in str(e.value)
    # keep=1 would keep only v2 (corrupt); the last good one that latest() found must survive, and the
    # corrupt one is moved aside (kept for inspection, out of the readers' sight).
    fresh.prune()
    assert fresh.versions() == [1] and fresh.latest().version == 1
    assert [p.name.startswith(".bad-v000002-") for p in tmp_path.iterdir() if p.name.startswith(".bad-")] == [True]


def test_missing_manifest_is_not_a_version(tmp_path):
    store = SnapshotStore(tmp_path)
    publish(store, seed=0)
    publish(store, seed=1)
    (tmp_path / "v000002" / "manifest.json").unlink()
    assert store.versions() == [1] and store.latest().version == 1
    with pytest.raises(SnapshotError, match=rf"^{re.escape(str(tmp_path))}/v000002/manifest.json: manifest missing"):
        store.load(2)
    with pytest.raises(SnapshotError, match=r"v000009: snapshot v9 not found"):
        store.load(9)
    assert SnapshotStore(tmp_path / "empty").latest() is None


def test_versions_increase_and_prune_keeps_newest_and_protected(tmp_path):
    store = SnapshotStore(tmp_path, keep=2)
    got = [publish(store, seed=s, step=10 * s, protect=[1]).version for s in range(5)]
    assert got == [1, 2, 3, 4, 5]
    assert store.versions() == [1, 4, 5]  # newest 2 + protected v1
    assert store.prune(protect=[4]) == [1]
    assert store.versions() == [4, 5] and leftovers(tmp_path) == []
    assert [store.load(v).encoder_step for v in store.versions()] == [30, 40]


def test_a_version_number_is_never_reused(tmp_path):
    store = SnapshotStore(tmp_path, keep=5)
    assert [publish(store, seed=s, step=s).version for s in range(3)] == [1, 2, 3]
    shutil.rmtree(store.path(3))  # the newest deleted by hand (or lost)
    shutil.rmtree(store.path(2))
    assert publish(store, seed=7, step=7).version == 4  # not 2: a checkpoint that named v2/v3 meant another index
    assert (tmp_path / HIGHWATER).read_text().strip() == "4" and leftovers(tmp_path) == []
    (tmp_path / HIGHWATER).write_text("garbage")  # unreadable: the version dirs alone decide
    assert publish(store, seed=8, step=8).version == 5


def test_version_claim_retries_when_name_was_taken(tmp_path, monkeypatch):
    store = SnapshotStore(tmp_path)
    publish(store)
    # Simulate a concurrent writer that claimed v1 between our listing and our rename.
    real = SnapshotStore._next_version
    calls = iter([1])
    monkeypatch.setattr(SnapshotStore, "_next_version", lambda self: next(calls, None) or real(self))
    snap = publish(store, seed=1)
    assert snap.version == 2 and snap.manifest.version == 2
    assert store.load(1).doc_ids[0] == "doc-0-0" and store.load(2).doc_ids[0] == "doc-1-0"


def test_snapshot_query_dim_error_names_snapshot(tmp_path):
    snap = publish(SnapshotStore(tmp_path))
    with pytest.raises(SnapshotError, match=rf"^query dim 8 does not match index dim 16 \({re.escape(str(tmp_path))}/v000001/index.faiss\)$"):
        snap.search(np.zeros(8, np.float32), 3)


def test_holder_swaps_forward_only(tmp_path):
    store = SnapshotStore(tmp_path)
    v1, v2 = publish(store, seed=0), publish(store, seed=1)
    holder = IndexHolder()
    assert holder.version is None and holder.get() is None
    assert holder.swap(v1) is None
    reader = holder.get()  # a reader mid-step keeps this object across the swap
    assert holder.swap(v2) is v1 and holder.version == 2
    with pytest.raises(SnapshotError, match="refusing to swap to snapshot v1, older than v2"):
        holder.swap(v1)
    assert holder.get() is v2
    assert reader is v1 and reader.search(np.ones(16, np.float32), 3)[0].shape == (1, 3)
    assert holder.swap(v1, force=True) is v2 and holder.version == 1
