"""The Ray actor pool: encodes like a direct loop, retries dead actors, counts failures, shuts down clean."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from openbook.data import tokenize_corpus
from openbook.data.bundle import prepare_data
from openbook.index import SnapshotStore
from openbook.models.retriever import DocTowerSpec, build_retriever
from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator
from openbook.refresher.encode import encode_rows, numpy_state
from openbook.refresher.publish import publish_in_process
from tests.helpers import tiny_recipe, wait_gone


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session):
    tmp = tmp_path_factory.mktemp("refresher")
    cfg = tiny_recipe(tmp, data={"world": {"num_passages": 1500, "seed": 2}})
    data = prepare_data(cfg.data)
    model, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, tmp / "cache")
    return cfg, data, model, tok, tokens


def _coordinator(setup, root, batch_size: int = 64, shards: int = 0, **refresh):
    cfg, data, model, tok, tokens = setup
    rcfg = type(cfg.refresh)(**{**vars(cfg.refresh), **refresh})
    target = IndexTarget(root, dataclasses.replace(cfg.index, shards=shards), 3, {"test": True})
    encode = type(cfg.encode)(batch_size=batch_size)
    return RefreshCoordinator(rcfg, encode, model.doc_tower_spec(), tokens, data.corpus.ids, target).start()


def _assert_encoded_with(setup, root, version: int, state) -> None:
    """Snapshot ``version`` under ``root`` holds what a direct encode with ``state`` gives."""
    snap = SnapshotStore(root).load(version)
    np.testing.assert_allclose(np.asarray(snap.embeddings, np.float32),
                               _direct(setup, state).astype(np.float32), rtol=2e-3, atol=2e-3)


def _direct(setup, state):
    cfg, _, _, tok, tokens = setup
    tower = DocTowerSpec(cfg.retriever, len(tok)).build()
    tower.load_state_dict({k: __import__("torch").from_numpy(v) for k, v in state.items()})
    return encode_rows(tower, tokens, 0, len(tokens), 64)


def _perturbed_state(model, seed):
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.02, v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v
            for k, v in numpy_state(model.doc_encoder).items()}


def test_pool_encodes_like_a_direct_loop(setup, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="openbook.refresher.coordinator")
    coord = _coordinator(setup, tmp_path / "snaps", num_workers=2)
    try:
        state = _perturbed_state(setup[2], 1)
        assert coord.submit(state, encoder_step=7)
        res = coord.wait(timeout=120)
        assert res is not None, coord.last_error
        ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refresh for step 7: shards 2/2,")]
        assert len(ends) == 1 and ends[0].endswith(" passages/s"), ends  # the progress line of its last shard
        snap = SnapshotStore(tmp_path / "snaps").load(res.version)
        assert snap.encoder_step == 7 and snap.count == len(setup[4])
        np.testing.assert_array_equal(snap.doc_ids, setup[1].corpus.ids)
        direct = _direct(setup, state)
        np.testing.assert_allclose(np.asarray(snap.embeddings, np.float32), direct.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)
    finally:
        coord.shutdown()


def test_trigger_while_busy_is_skipped_not_queued(setup, tmp_path):
    coord = _coordinator(setup, tmp_path / "snaps", num_workers=1, shards=12, batch_size=16)
    try:
        state = numpy_state(setup[2].doc_encoder)
        assert coord.submit(state, 1)
        assert not coord.submit(state, 2)
        assert not coord.submit(state, 3)
        res = coord.wait(timeout=120)
        assert coord.skipped == 2 and res.encoder_step == 1
        assert SnapshotStore(tmp_path / "snaps").versions() == [res.version]
    finally:
        coord.shutdown()


def test_actor_killed_mid_refresh_is_replaced_and_its_shard_retried(setup, tmp_path):
    import ray

    # a delay per shard keeps the refresh running past the kill however fast the machine is
    coord = _coordinator(setup, tmp_path / "snaps", num_workers=2, shards=60, batch_size=8, inject_delay_seconds=0.1)
    try:
        state = _perturbed_state(setup[2], 3)
        pids = ray.get([a.pid.remote() for a in coord.actors])
        assert coord.submit(state, 5)
        while coord.shards_done < 2 and coord.busy:  # kill mid-refresh, once shards are flowing
            time.sleep(0.005)
        assert coord.busy, "refresh finished before the kill: make it longer"
        os.kill(pids[0], signal.SIGKILL)
        res = coord.wait(timeout=180)
        assert res is not None, coord.last_error
        assert res.retried_shards >= 1 and coord.failures == 0
        _assert_encoded_with(setup, tmp_path / "snaps", res.version, state)
    finally:
        coord.shutdown()


def test_failed_refresh_is_counted_and_the_last_good_snapshot_stays(setup, tmp_path):
    coord = _coordinator(setup, tmp_path / "snaps")
    try:
        good = coord.submit(numpy_state(setup[2].doc_encoder), 1) and coord.wait(timeout=120)
        assert good
        broken = {k: v[..., :1] for k, v in numpy_state(setup[2].doc_encoder).items()}  # wrong shapes
        assert coord.submit(broken, 2)
        assert coord.wait(timeout=120) is None
        assert coord.failures == 1 and "size mismatch" in coord.last_error
        store = SnapshotStore(tmp_path / "snaps")
        assert store.versions() == [good.version] and store.latest().encoder_step == 1
    finally:
        coord.shutdown()


def test_shutdown_cancels_in_flight_work_and_leaves_no_orphans(setup, tmp_path):
    import ray

    coord = _coordinator(setup, tmp_path / "snaps", num_workers=2, shards=150, batch_size=4, inject_delay_seconds=0.05)
    pids = ray.get([a.pid.remote() for a in coord.actors])
    assert coord.submit(numpy_state(setup[2].doc_encoder), 1)
    while coord.shards_done < 2 and coord.busy:
        time.sleep(0.005)
    assert coord.busy
    t0 = time.time()
    coord.shutdown()
    assert time.time() - t0 < 30 and not coord.busy
    alive = wait_gone(pids)
    assert not alive, f"actor processes still alive: {alive}"
    assert SnapshotStore(tmp_path / "snaps").versions() == []


def test_shard_loop_retries_a_shard_whose_actor_died(ray_session, tmp_path):
    """The pool loop shared by refreshes and kNN-LM datastores: an actor that dies on a shard (its process
    exits, once, as a killed worker would) is replaced and the shard redone; every result arrives once."""
    import ray

    from openbook.refresher.pool import ActorPool, ShardFailed, run_shards

    @ray.remote(max_restarts=0, max_task_retries=0, num_cpus=0.1)
    class Squarer:
        def run(self, x: int, die_once: str) -> int:
            marker = tmp_path / f"died-{x}"
            if die_once and str(x) == die_once and not marker.exists():
                marker.touch()
                os._exit(1)
            return x * x

    pool = ActorPool(lambda _slot: Squarer.remote(), 2)
    try:
        got: dict[int, int] = {}
        retried = run_shards(pool, list(range(10)), lambda a, x: a.run.remote(x, "7"),
                             lambda i, ref: got.__setitem__(i, ray.get(ref)), max_retries=2)
        assert got == {i: i * i for i in range(10)} and retried >= 1
        assert (tmp_path / "died-7").exists()
        with pytest.raises(ShardFailed, match="shard 0 of 1 failed 1 times"):  # no retries allowed
            run_shards(pool, [3], lambda a, x: a.run.remote(x, "3"), lambda i, ref: None, max_retries=0)
    finally:
        pool.kill()


def test_length_bucketed_batches_equal_one_passage_at_a_time(setup):
    """encode_rows sorts each range by token length (each batch pads to its own longest): the embeddings
    come back in row order and equal encoding every passage alone (no padding at all)."""
    _, _, model, _, tokens = setup
    lengths = np.asarray(tokens.lengths[100:180])
    assert len(set(lengths.tolist())) > 3 and (np.diff(lengths) < 0).any()  # varied, not already sorted
    got = encode_rows(model.doc_encoder, tokens, 100, 180, 16)
    alone = np.concatenate([encode_rows(model.doc_encoder, tokens, i, i + 1, 1) for i in range(100, 180)])
    np.testing.assert_allclose(got.astype(np.float32), alone.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_an_actor_killed_while_writing_its_shard_is_redone_and_the_snapshot_publishes_complete(setup, tmp_path):
    """refresh.inject_kill_shard: the actor writing shard 2 is SIGKILLed after writing its files, before the
    rename that makes the shard visible. The shard is redone on a replacement actor; the published snapshot
    is complete (every row, equal to a direct encode) and no half-written part is left in it."""
    coord = _coordinator(setup, tmp_path / "snaps", num_workers=2, shards=4, inject_kill_shard=2)
    try:
        state = _perturbed_state(setup[2], 4)
        assert coord.submit(state, 9)
        res = coord.wait(timeout=300)
        assert res is not None, coord.last_error
        assert res.retried_shards in (1, 2) and coord.failures == 0  # the killed actor's other queued shard too
        snap = SnapshotStore(tmp_path / "snaps").load(res.version)  # verifies every shard's sha256
        assert snap.count == len(setup[4]) and len(snap.manifest.shards) == 4
        np.testing.assert_allclose(np.asarray(snap.embeddings, np.float32),
                                   _direct(setup, state).astype(np.float32), rtol=2e-3, atol=2e-3)
        assert not list(snap.path.glob(".part-*")) and not list(snap.path.glob(".trash-*"))
    finally:
        coord.shutdown()


def test_encoder_actors_run_at_the_trainers_priority(setup, tmp_path):
    """Ray's default worker niceness (15) starves the refresh on a busy machine; a local Ray that openbook
    starts (local_ray_options, as this session's) runs its actors at niceness 0, like the trainer."""
    import ray

    coord = _coordinator(setup, tmp_path / "snaps", num_workers=1)
    try:
        pid = ray.get(coord.actors[0].pid.remote())
        assert os.getpriority(os.PRIO_PROCESS, pid) == 0 == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        coord.shutdown()


def test_a_second_job_on_the_machine_starts_its_own_ray(ray_session):
    """ray.init() alone joins the newest Ray running on the machine (another training job's, or this test
    session's): its shutdown would then kill our actors. ensure_ray starts one of its own."""
    import subprocess
    import sys

    code = ("import ray; from openbook.refresher.cluster import ensure_ray; "
            "from openbook.refresher.config import RefreshConfig; assert ensure_ray(RefreshConfig()); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = proc.stdout.split("GCS ")[1].strip()
    assert theirs != ray_session.get_runtime_context().gcs_address


def _wait_until_shards_flow(coord) -> None:
    """Until the first shard is in: the refresh is running and every actor holds queued shards."""
    while coord.shards_done < 1 and coord.busy:
        time.sleep(0.005)
    assert coord.busy, "refresh finished before the kill: make it longer"


def test_a_spare_takes_a_killed_actors_slot_at_once_and_a_new_spare_starts(setup, tmp_path):
    """refresh.spare_workers=1: an actor killed mid-refresh (ray.kill) is replaced by the idle spare, the
    refresh publishes a complete snapshot, and a new spare is started so the pool is whole again."""
    import ray

    # the delay makes the refresh last >= 2 s (8 shards, 0.5 s each, 2 actors): the kill lands mid-refresh
    coord = _coordinator(setup, tmp_path / "snaps", num_workers=2, cpus_per_worker=0.5, spare_workers=1, shards=8,
                         batch_size=16, inject_delay_seconds=0.5)
    try:
        assert coord.healthy and len(coord.pool.spares) == 1
        spare, victim = coord.pool.spares[0], coord.actors[0]
        state = _perturbed_state(setup[2], 5)
        ticket = coord.submit(state, 5)
        _wait_until_shards_flow(coord)
        ray.kill(victim, no_restart=True)
        res = coord.wait_for(ticket, timeout=300)
        assert not isinstance(res, str) and res is not None, res
        assert res.retried_shards >= 1 and coord.failures == 0
        assert coord.actors[0] == spare and victim not in coord.actors  # the spare took the slot
        assert len(coord.actors) == 2 and len(coord.pool.spares) == 1 and coord.pool.spares[0] != spare
        ray.get(coord.pool.spares[0].pid.remote(), timeout=300)  # the new spare comes up ...
        assert coord.healthy  # ... and the pool is whole again
        _assert_encoded_with(setup, tmp_path / "snaps", res.version, state)
    finally:
        coord.shutdown()


def test_a_replacement_that_cannot_start_fails_the_refresh_in_one_line(setup, tmp_path):
    """The node an actor was pinned to is gone (its custom resource is offered nowhere now): the dead actor's
    replacement can never be placed. The refresh fails once refresh.replace_timeout_seconds have passed,
    in one counted line, instead of waiting for it; the pool reports itself unhealthy."""
    import ray

    coord = _coordinator(setup, tmp_path / "snaps", num_workers=2, cpus_per_worker=0.5, shards=8, batch_size=16,
                         inject_delay_seconds=0.5, replace_timeout_seconds=3)
    try:
        assert coord.healthy
        coord.cfg.worker_resources = [{"openbook_test_node_gone": 1}]  # what replacements now ask for
        ticket = coord.submit(_perturbed_state(setup[2], 6), 5)
        _wait_until_shards_flow(coord)
        ray.kill(coord.actors[0], no_restart=True)
        out = coord.wait_for(ticket, timeout=300)
        assert isinstance(out, str) and "\n" not in out, out
        assert "encoder actor 0's replacement did not start within 3s" in out
        assert coord.failures == 1 and coord.counted_failure(ticket) and coord.last_error == out
        assert not coord.healthy
        assert SnapshotStore(tmp_path / "snaps").versions() == []
    finally:
        coord.shutdown()


def test_refresh_progress_is_logged_at_most_every_interval_and_at_the_end(caplog):
    from openbook.refresher.coordinator import Progress

    caplog.set_level(logging.INFO, logger="openbook.refresher.coordinator")
    slow = Progress(encoder_step=7, shards=5, every=3600.0)
    for _ in range(5):
        slow.shard_done(rows=100)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("refresh for step 7: shards 5/5, ") and "passages/s" in lines[0]
    caplog.clear()
    every = Progress(encoder_step=8, shards=3, every=0.0)
    for _ in range(3):
        every.shard_done(rows=10)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        f"refresh for step 8: shards {k}/3" for k in (1, 2, 3)]


def test_rolling_refreshes_reencode_one_part_each_and_carry_the_rest_over(setup, tmp_path, caplog):
    """refresh.strategy rolling, 6 shards, R=3: after the initial full build (part -1), each refresh re-encodes
    the next 2 shards (parts 0, 1, 2) with its own weights and hard-links the other 4 from the snapshot before.
    Every shard then holds a direct encode of its rows with the weights of the step its manifest entry names."""
    caplog.set_level(logging.INFO, logger="openbook.refresher.coordinator")
    root = tmp_path / "snaps"
    coord = _coordinator(setup, root, num_workers=2, shards=6, strategy="rolling", rolling_parts=3)
    n = len(setup[4])
    steps = [0, 10, 20, 30]
    states = {step: _perturbed_state(setup[2], 40 + i) for i, step in enumerate(steps)}
    try:
        store, results = SnapshotStore(root), []
        want_steps = [[0] * 6, [10, 10, 0, 0, 0, 0], [10, 10, 20, 20, 0, 0], [10, 10, 20, 20, 30, 30]]
        for i, step in enumerate(steps):
            res = coord.wait_for(coord.submit(states[step], step), timeout=300)
            assert not isinstance(res, str) and res is not None, res
            results.append(res)
            m = store.load(res.version).manifest  # verifies every shard's sha256, the carried ones' too
            assert m.rotation == {"parts": 3, "part": i - 1} == {"parts": 3, "part": res.part}
            assert m.encoder_step == step and [s["encoder_step"] for s in m.shards] == want_steps[i]
            assert res.oldest_step == min(want_steps[i]) == m.oldest_step
            assert res.mean_step == pytest.approx(m.mean_step)
            rows = sum(s["hi"] - s["lo"] for k, s in enumerate(m.shards) if k * 3 // 6 == res.part or not i)
            assert res.docs == rows and (rows == n) == (i == 0), (i, rows)  # 1/3 of the rows, all at first
            if i:  # carried shards are the base's files (same inode), re-encoded ones are new
                base = Path(results[i - 1].path)
                for k, shard in enumerate(m.shards):
                    same = os.stat(base / shard["name"] / "embeddings.npy").st_ino == os.stat(
                        Path(res.path) / shard["name"] / "embeddings.npy").st_ino
                    assert same == (k * 3 // 6 != res.part), (i, k)
        snap = store.load(results[-1].version)
        direct = {step: _direct(setup, states[step]).astype(np.float32) for step in steps}
        emb = np.asarray(snap.embeddings, np.float32)
        for shard in snap.manifest.shards:
            lo, hi = shard["lo"], shard["hi"]
            np.testing.assert_allclose(emb[lo:hi], direct[shard["encoder_step"]][lo:hi], rtol=2e-3, atol=2e-3)
            other = steps[(steps.index(shard["encoder_step"]) + 1) % 4]  # ... and not another step's weights
            assert np.abs(emb[lo:hi] - direct[other][lo:hi]).max() > 1e-2
        # a base that does not match (other shard ranges now): a full re-encode, said in one line
        caplog.clear()
        coord.target = dataclasses.replace(coord.target, index=dataclasses.replace(coord.target.index, shards=4))
        res = coord.wait_for(coord.submit(states[0], 40), timeout=300)
        assert not isinstance(res, str) and res is not None, res
        assert (res.part, res.docs, res.oldest_step) == (-1, n, 40)
        (line,) = [r.getMessage() for r in caplog.records if "re-encoding every shard" in r.getMessage()]
        assert "other shard ranges" in line
        m = store.load(res.version).manifest
        assert [s["encoder_step"] for s in m.shards] == [40] * 4 and m.rotation == {"parts": 3, "part": -1}
    finally:
        coord.shutdown()


def test_an_in_process_first_index_is_a_rolling_base(setup, tmp_path):
    """Under rolling, the first index built in this process (the evaluation before training) is written in the
    shards the pool writes, so the first rolling refresh re-encodes part 0 only, instead of everything, and the
    sharded search returns what one exact search over all rows returns."""
    import faiss

    cfg, data, model, _, tokens = setup
    root = tmp_path / "snaps"
    coord = _coordinator(setup, root, num_workers=1, shards=6, strategy="rolling", rolling_parts=3)
    try:
        snap, _ = publish_in_process(coord.target, model.doc_encoder, tokens, data.corpus.ids, 0, 64, sharded=True)
        assert snap.manifest.format == 2 and [(s["lo"], s["hi"]) for s in snap.manifest.shards] == [
            (lo, hi) for _, lo, hi in coord.shard_ranges()]
        emb = np.asarray(snap.embeddings, np.float32)
        flat = faiss.IndexFlatIP(emb.shape[1])
        flat.add(emb)
        q = emb[:7] + 0.01
        np.testing.assert_array_equal(snap.search(q, 5)[0], flat.search(q, 5)[1])
        coord.set_base(str(snap.path))
        res = coord.wait_for(coord.submit(_perturbed_state(model, 7), 10), timeout=300)
        assert not isinstance(res, str) and res is not None, res
        assert res.part == 0 and res.docs == sum(hi - lo for s, lo, hi in coord.shard_ranges() if s * 3 // 6 == 0)
    finally:
        coord.shutdown()
