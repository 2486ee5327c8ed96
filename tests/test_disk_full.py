"""A full disk (issue 19): a snapshot that does not fit costs that write only.

The disks are real and small: a tmpfs mounted by a child process in user and mount namespaces of its own
(``unshare -Urm``, no root; tests/helpers.py ``on_small_disks``). Writes past its size fail with ENOSPC
as on a full volume, and deleting files frees room, which the snapshot store's retry relies on. The tmpfs
goes with the child, so each child reports what it saw (and copies out what the test checks later)."""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.helpers import mount_small_disk, on_small_disks, small_disks_work, tiny_recipe

needs_small_disks = pytest.mark.skipif(not small_disks_work(),
                                       reason="cannot mount a tmpfs in a user namespace here (unshare -Urm)")
PAGE = 4096


@contextmanager
def logged(name: str, level: int = logging.WARNING):
    """The messages logger ``name`` emits at ``level`` and above inside the block."""
    lines: list[str] = []
    handler = logging.Handler(level)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until the disk is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * PAGE)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)


def on_disk(path: Path) -> int:
    """Bytes the files under ``path`` take on a tmpfs (whole pages)."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------- snapshots

def _publish(store, seed: int, n: int = 300, protect=()):
    import numpy as np

    from openbook.index import IndexConfig

    x = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return store.publish(x, [f"doc-{seed}-{i}" for i in range(n)], encoder_step=seed, index_cfg=IndexConfig(),
                         protect=protect)


def publish_on_a_small_disk(tmp: str) -> dict:
    """(In the child.) Snapshots on a disk with room for three and a half of them, v1 protected."""
    from openbook.errors import SnapshotError
    from openbook.index import SnapshotStore

    tmp = Path(tmp)
    one = on_disk(_publish(SnapshotStore(tmp / "probe"), 0).path)
    root = tmp / "snaps"
    mount_small_disk(root, one * 7 // 2)
    store = SnapshotStore(root, keep=10)  # nothing pruned by count: only the lack of room deletes
    out = {"first": [_publish(store, s, protect=[1]).version for s in range(3)]}
    with logged("openbook.index.snapshot") as warnings:
        out["fourth"] = _publish(store, 3, protect=[1]).version  # fits once v2 is gone
        out["after_fourth"] = store.versions()
        try:
            _publish(store, 4, n=3000, protect=[1])  # ten times bigger: fits nowhere
        except SnapshotError as e:
            out["error"] = str(e)
    out["warnings"] = warnings
    out["after_big"] = store.versions()
    latest = store.latest()  # verified: every byte hashed
    out["latest"] = [latest.version, latest.encoder_step]
    out["hidden"] = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".highwater")
    return out


@needs_small_disks
def test_a_publish_out_of_room_deletes_old_snapshots_and_retries_once(tmp_path):
    out = on_small_disks("tests.test_disk_full:publish_on_a_small_disk", str(tmp_path))
    assert out["first"] == [1, 2, 3]
    # v4 did not fit: v2 went (v1 is protected, v3 the newest good one), and the retry published v4
    assert out["fourth"] == 4 and out["after_fourth"] == [1, 3, 4]
    assert out["warnings"][0].endswith("No space left on device; deleted v000002 to make room, trying once more")
    # the big one fails even after v3 (now neither protected nor the newest) is deleted: one line
    error = out["error"]
    assert error == (f"{tmp_path / 'snaps'}: cannot publish a snapshot: No space left on device, even after "
                     "deleting v000003"), error
    assert out["after_big"] == [1, 4] and out["latest"] == [4, 3]  # the previous snapshot still loads
    assert out["hidden"] == []  # no partial files left by either attempt


# ------------------------------------------------------------------------------- refreshes (Ray actors)

def refresh_on_a_small_disk(tmp: str) -> dict:
    """(In the child, with a Ray of its own: the actors must see the tmpfs.) Refreshes whose shards the
    actors write onto a disk with room for three and a half snapshots, then onto one other data filled."""
    import dataclasses

    import ray

    from openbook.data import tokenize_corpus
    from openbook.data.bundle import prepare_data
    from openbook.index import SnapshotStore
    from openbook.index.snapshot import write_error
    from openbook.models.retriever import build_retriever
    from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator, local_ray_options
    from openbook.refresher.encode import numpy_state

    tmp = Path(tmp)
    ray.init(num_cpus=1, object_store_memory=100 * 1024**2, log_to_driver=False, **local_ray_options())
    cfg = tiny_recipe(tmp, refresh={"num_workers": 1})
    data = prepare_data(cfg.data)
    model, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, tmp / "cache")
    state = numpy_state(model.doc_encoder)

    def coordinator(root: Path) -> RefreshCoordinator:
        target = IndexTarget(root, dataclasses.replace(cfg.index, shards=3), 10, {})
        return RefreshCoordinator(cfg.refresh, cfg.encode, model.doc_tower_spec(), tokens, data.corpus.ids, target)

    def refresh(coord, step: int, protect=(1,)):
        coord.submit(state, step, protect)
        return coord.wait(timeout=600)

    out = {}
    coord = coordinator(tmp / "probe").start()
    try:
        one = on_disk(Path(refresh(coord, 0).path))
        root = tmp / "snaps"
        mount_small_disk(root, one * 7 // 2)
        coord.target = dataclasses.replace(coord.target, root=root)
        out["first"] = [refresh(coord, s).version for s in (1, 2, 3)]
        with logged("openbook.index.snapshot") as warnings:
            out["fourth"] = refresh(coord, 4).version  # its shards do not fit until v2 is deleted
            out["after_fourth"] = SnapshotStore(root).versions()
            fill(root / "other-data")  # someone else's data fills the disk
            out["fifth"] = refresh(coord, 5, protect=(1, 3))  # and v3 is needed too: nothing may go
        out["warnings"] = warnings
        out["failures"], out["last_error"] = coord.failures, coord.last_error
        out["after_fifth"] = SnapshotStore(root).versions()
        out["latest"] = SnapshotStore(root).latest().encoder_step
        out["hidden"] = sorted(p.name for p in root.iterdir() if p.name.startswith(".") and p.name != ".highwater")
        # how an actor's full disk reaches the driver: a task error that is also an OSError, the actor's in `cause`
        staging = SnapshotStore(root).stage()
        try:
            ray.get(coord.actors[0].encode_shard.remote(99, ray.put(state), str(staging), 0, 0, 100, cfg.index,
                                                        None))
        except Exception as e:  # noqa: BLE001 - what it is, is the point
            out["task_error"] = [type(e).__name__, isinstance(e, OSError), write_error(e).errno]
    finally:
        coord.shutdown()
        ray.shutdown()
    return out


@pytest.mark.slow
@needs_small_disks
def test_a_refresh_out_of_room_deletes_old_snapshots_and_retries_once(tmp_path):
    out = on_small_disks("tests.test_disk_full:refresh_on_a_small_disk", str(tmp_path))
    assert out["first"] == [1, 2, 3]
    assert out["fourth"] == 4 and out["after_fourth"] == [1, 3, 4]
    assert out["warnings"][0].endswith("No space left on device; deleted v000002 to make room, trying once more")
    # the disk full of other data and nothing it may delete (v1, v3 protected, v4 the newest): the refresh
    # fails, counted, in one line, and v4 stays
    assert out["fifth"] is None and out["failures"] == 1
    assert out["last_error"] == (f"SnapshotError: {tmp_path / 'snaps'}: cannot publish a snapshot: No space left on "
                                 "device; no old snapshot to delete"), out["last_error"]
    assert out["after_fifth"] == [1, 3, 4] and out["latest"] == 4 and out["hidden"] == []
    assert out["task_error"] == ["RayTaskError(OSError)", True, errno.ENOSPC]

