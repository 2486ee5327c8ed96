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
