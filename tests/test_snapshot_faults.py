"""Bad snapshots and pruning (issue: a truncated newest snapshot cost the good older ones), and the manifest seal.

Pruning counts only whole snapshots toward ``keep`` and moves a bad one aside to ``.bad-*`` with one warning
line; every manifest field is covered by ``manifest_sha256``, so a hand-edited ``encoder_step`` fails the load.
Real files and real FAISS indexes throughout (small ones, Flat)."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from openbook.errors import SnapshotError
from openbook.index import IndexConfig, SnapshotStore
from openbook.index.shards import write_shard
from openbook.index.snapshot import HIGHWATER, SEAL, read_manifest

LOGGER = "openbook.index.snapshot"
FLAT = IndexConfig()


def publish(store: SnapshotStore, seed: int, step: int | None = None) -> int:
    """A small random format-1 snapshot (300 x 16, Flat); its version."""
    x = np.random.default_rng(seed).standard_normal((300, 16)).astype(np.float32)
    ids = [f"doc-{seed}-{i}" for i in range(300)]
    return store.publish(x, ids, encoder_step=seed if step is None else step, index_cfg=FLAT).version


def publish_sharded(store: SnapshotStore, seed: int, step: int) -> int:
    """A small random format-2 snapshot (two shards); its version."""
    x = np.random.default_rng(seed).standard_normal((300, 16)).astype(np.float32)
    ids = [f"doc-{seed}-{i}" for i in range(300)]
    staging = store.stage()
    for shard, (lo, hi) in enumerate([(0, 120), (120, 300)]):
        write_shard(staging, shard, lo, x[lo:hi], ids[lo:hi], FLAT)
    return store.publish_shards(staging, encoder_step=step, index_cfg=FLAT, count=300)


def three_with_bad_newest(root: Path, how: str = "truncate") -> None:
    """v1, v2 good; v3 with its index.faiss truncated (``truncate``) or same-size with bytes flipped (``flip``)."""
    writer = SnapshotStore(root, keep=5)
    assert [publish(writer, s) for s in range(3)] == [1, 2, 3]
    index = root / "v000003" / "index.faiss"
    data = bytearray(index.read_bytes())
    if how == "truncate":
        index.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        index.write_bytes(bytes(data))


def bad_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".bad-"))


def warnings_about(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


@pytest.mark.timeout(120)
def test_a_truncated_newest_snapshot_is_moved_aside_and_the_good_ones_kept(tmp_path, caplog):
    three_with_bad_newest(tmp_path)
    store = SnapshotStore(tmp_path, keep=2)  # a new process: no memory of what was published or loaded
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert publish(store, 4) == 4
    # the newest 2 *good* ones: v1 goes (beyond keep), v3 (bad) must not be kept in place of v2
    assert store.versions() == [2, 4]
    (moved,) = bad_dirs(tmp_path)
    assert re.fullmatch(r"\.bad-v000003-[0-9a-f]{8}", moved)
    assert sorted(p.name for p in (tmp_path / moved).iterdir()) == [
        "doc_ids.npy", "embeddings.npy", "index.faiss", "manifest.json"]  # kept whole, for inspection
    (line,) = warnings_about(caplog, "v000003")
    assert "\n" not in line and "index.faiss: size" in line and "(truncated)" in line
    assert str(tmp_path / "v000003") in line and str(tmp_path / moved) in line
    assert store.latest().version == 4 and SnapshotStore(tmp_path).latest().version == 4
    assert store.cleanup() == [] and bad_dirs(tmp_path) == [moved]  # cleanup leaves .bad-* alone
    assert publish(store, 5) == 5  # no reuse of any number


@pytest.mark.timeout(120)
def test_a_checksum_mismatch_found_by_a_verified_load_counts_as_bad_when_pruning(tmp_path, caplog):
    three_with_bad_newest(tmp_path, how="flip")  # same size: only hashing finds it
    store = SnapshotStore(tmp_path, keep=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.latest(verify=True).version == 2
        caplog.clear()
        store.prune()
    assert store.versions() == [1, 2]  # v3 no longer counts toward keep=2: v1 stays
    assert [n.startswith(".bad-v000003-") for n in bad_dirs(tmp_path)] == [True]
    (line,) = warnings_about(caplog, "v000003")
    assert "checksum mismatch (file corrupt)" in line and ".bad-v000003-" in line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sharded", [False, True], ids=["format1", "format2"])
def test_an_encoder_step_edited_by_hand_fails_the_seal(tmp_path, caplog, sharded):
    writer = SnapshotStore(tmp_path, keep=5)
    make = publish_sharded if sharded else publish
    assert [make(writer, seed, step) for seed, step in ((0, 10), (1, 20))] == [1, 2]
    manifest = tmp_path / "v000002" / "manifest.json"
    text = manifest.read_text()
    assert '"encoder_step": 20,' in text
    # as with an editor; the first one is the manifest's own (format 2: its shard entries record theirs after it)
    manifest.write_text(text.replace('"encoder_step": 20,', '"encoder_step": 99,', 1))

    store = SnapshotStore(tmp_path, keep=1)
    want = rf"^{re.escape(str(manifest))}: {SEAL} does not match its contents \(edited or corrupt\)$"
    with pytest.raises(SnapshotError, match=want):
        store.load(2)
    with pytest.raises(SnapshotError, match=want):
        read_manifest(tmp_path / "v000002")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        snap = store.latest()
    assert (snap.version, snap.encoder_step) == (1, 10) and warnings_about(caplog, "v000002")
    assert store.find(99, json.loads(manifest.read_text())["weights_time"]) is None  # skipped by find too
    store.prune()  # keep=1: the edited v2 is not the one kept
    assert store.versions() == [1] and [n.startswith(".bad-v000002-") for n in bad_dirs(tmp_path)] == [True]


@pytest.mark.timeout(120)
def test_a_manifest_written_before_the_seal_still_loads(tmp_path):
    store = SnapshotStore(tmp_path, keep=1)
    assert publish(store, 0, step=7) == 1
    manifest = tmp_path / "v000001" / "manifest.json"
    body = json.loads(manifest.read_text())
    assert isinstance(body.pop(SEAL), str)  # a publish seals it...
    manifest.write_text(json.dumps(body, indent=1, sort_keys=True))  # ...an older openbook did not

    fresh = SnapshotStore(tmp_path, keep=1)
    snap = fresh.load(1, verify=True)
    assert (snap.encoder_step, snap.manifest.manifest_sha256) == (7, "")
    assert fresh.latest().version == 1 and fresh.prune() == [] and fresh.versions() == [1]
    assert bad_dirs(tmp_path) == []
    assert publish(fresh, 1) == 2 and fresh.versions() == [2]  # pruned as a good one, not moved aside
    assert bad_dirs(tmp_path) == []


@pytest.mark.timeout(120)
def test_free_space_deletes_moved_aside_snapshots(tmp_path):
    three_with_bad_newest(tmp_path)
    store = SnapshotStore(tmp_path, keep=2)
    assert store.prune() == [3] and store.versions() == [1, 2]
    (moved,) = bad_dirs(tmp_path)
    assert store.cleanup() == [] and bad_dirs(tmp_path) == [moved]
    freed = store.free_space(protect=[1])  # the out-of-space path: disk space matters more than inspection
    assert moved in freed and bad_dirs(tmp_path) == [] and store.versions() == [1, 2]
    assert store.latest().version == 2


@pytest.mark.timeout(120)
def test_a_moved_aside_version_number_is_never_reused(tmp_path):
    three_with_bad_newest(tmp_path)
    store = SnapshotStore(tmp_path, keep=5)
    assert store.prune() == [3] and store.versions() == [1, 2]
    assert [n.startswith(".bad-v000003-") for n in bad_dirs(tmp_path)] == [True]
    (tmp_path / HIGHWATER).unlink()  # lost: the .bad-v000003 dir alone still says 3 was claimed
    assert publish(store, 4) == 4


@pytest.mark.timeout(120)
def test_a_bad_snapshot_moved_away_by_another_process_meanwhile_is_skipped(tmp_path, caplog, monkeypatch):
    three_with_bad_newest(tmp_path)
    store = SnapshotStore(tmp_path, keep=2)
    real = SnapshotStore._why_bad

    def racing(self: SnapshotStore, version: int) -> str | None:
        why = real(self, version)
        if version == 3:  # another process's prune renamed it between our check and our rename
            shutil.move(self.path(3), tmp_path / ".bad-v000003-0123abcd")
        return why

    monkeypatch.setattr(SnapshotStore, "_why_bad", racing)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert store.prune() == []
    assert store.versions() == [1, 2] and warnings_about(caplog, "v000003") == []


@pytest.mark.timeout(120)
def test_a_newer_openbooks_snapshot_is_not_moved_aside(tmp_path, caplog):
    """A store shared with a newer openbook (a format this code cannot read) is not this code's to judge: its
    snapshot is skipped by loads but neither moved aside nor counted as bad by pruning."""
    store = SnapshotStore(tmp_path / "snaps", keep=2)
    for seed in (1, 2):
        publish(store, seed)
    manifest = store.path(2) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format"] = 99
    data.pop("manifest_sha256", None)
    manifest.write_text(json.dumps(data))
    assert store.latest().version == 1  # skipped: unreadable here
    with caplog.at_level(logging.WARNING, logger="openbook.index.snapshot"):
        SnapshotStore(tmp_path / "snaps", keep=2).prune()
    assert store.versions() == [1, 2] and not list((tmp_path / "snaps").glob(".bad-*"))
    assert not [r for r in caplog.records if "moved aside" in r.getMessage()]
