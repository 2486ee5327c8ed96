"""The benchmark code runs (on toy sizes) and its report writer keeps other sections intact."""

from __future__ import annotations

from bench.common import OUT_ENV, write_section
from bench.refresh import bench_throughput


def test_write_section_replaces_only_its_own_block(tmp_path):
    md = tmp_path / "B.md"
    write_section("a", "first A", md)
    write_section("b", "only B", md)
    write_section("a", "second A", md)
    text = md.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.index("second A") < text.index("only B")


def test_write_section_goes_where_the_environment_says(tmp_path, monkeypatch):
    out = tmp_path / "Q.md"
    monkeypatch.setenv(OUT_ENV, str(out))
    write_section("q", "quick figures")
    assert "quick figures" in out.read_text()


def test_throughput_bench_runs_on_a_toy_corpus(tmp_path, ray_session):
    row = bench_throughput(tmp_path, 300, "tiny", repeats=1)
    assert row["passages"] == 300
    assert row["plain loop docs/s"] > 0 and row["pool (1 actor) docs/s"] > 0
    assert abs(row["ratio pool/plain"] - row["pool (1 actor) docs/s"] / row["plain loop docs/s"]) < 1e-9


def test_sharded_bench_runs_on_toy_sizes(tmp_path, ray_session):
    """bench/sharded.py's parts on toy sizes: the numbers they report are consistent with what they measured."""
    from bench.sharded import placement, refresh

    ab = placement(tmp_path / "p", 4000, reps=2)
    assert ab["passages"] == 4000 and ab["sharded MB/rank"] > 0 and ab["replicated MB/rank"] > 0
    assert abs(ab["search ratio"] - ab["sharded search ms"] / ab["replicated search ms"]) < 1e-9
    c = refresh(tmp_path / "r", 3000, workers=1, shards=3)
    assert c["passages"] == 3000 and 0 < c["commit s"] < c["refresh s"]
    assert abs(c["commit share"] - c["commit s"] / c["refresh s"]) < 1e-9


def test_shard_shares_attributes_the_run_index_top_5_to_its_shards(tmp_path, ray_session):
    """bench/shard_shares.py on a real tiny run (its index built by the Ray pool in 3 shards): its per-shard rows and encoder steps are the
    manifest's, and its top-5 shares are those of the snapshot's own sharded FAISS search (merged per-shard
    top-k), attributed by each shard's row range."""
    import numpy as np

    from bench.shard_shares import shares
    from openbook.data.bundle import prepare_data
    from openbook.index import SnapshotStore
    from openbook.models.retriever import build_retriever
    from openbook.trainer.pipeline import encode_queries
    from openbook.trainer.train import run_train
    from openbook.trainer.weights import latest_weights, load_into
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, train={"max_steps": 4})
    run_train(cfg, progress=False)
    run = tmp_path / "run"
    got = shares(run, questions=40)
    snap = SnapshotStore(run / "snapshots").latest()
    shards = snap.manifest.shards
    assert len(shards) == 3
    assert [r["encoder_step"] for r in got] == [s["encoder_step"] for s in shards]
    assert [r["rows"] for r in got] == [round((s["hi"] - s["lo"]) / snap.count, 3) for s in shards]
    model, tokenizer = build_retriever(cfg.retriever)
    load_into(model, latest_weights(str(run)))
    dev = prepare_data(cfg.data).dev[:40]
    q = np.asarray(encode_queries(model, tokenizer, [e.question for e in dev], cfg.retriever.query_max_length),
                   dtype=np.float32)
    rows, _ = snap.search(q, 5)
    shard_of = np.searchsorted([s["hi"] for s in shards], rows.ravel(), side="right")
    want = np.bincount(shard_of, minlength=len(shards)) / rows.size
    # FAISS and numpy sum float32 dot products in different orders: a near-tie at rank 5 may flip one pick
    assert max(abs(r["top-5 share"] - w) for r, w in zip(got, want)) <= 2 / rows.size, (got, want)
    assert abs(sum(r["top-5 share"] for r in got) - 1) < 1e-2 and len(got) == len(shards)
