"""The RAG step benchmark runs on toy sizes: both sides train, and their first-step losses agree in kind."""

from __future__ import annotations

import math

from bench.rag_step import run


def test_rag_step_bench_runs_on_a_toy_world(tmp_path):
    rows, checks = run(tmp_path, passages=200, batch_size=4, n_docs=3, rounds=1, steps=2)
    assert [r["variant"] for r in rows] == ["RAG-Token", "RAG-Sequence"]
    for r in rows:
        for key in ("openbook ms/step", "HF ms/step", "ratio openbook/HF"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    for c in checks:
        ob, hf, same = (float(c[k]) for k in ("openbook loss", "HF loss", "HF loss on openbook's contexts"))
        assert all(math.isfinite(x) and x > 0 for x in (ob, hf, same)), c
        assert c["same top-k docs"] == 1.0 and c["max doc score diff"] < 1e-4, c
        assert abs(same - ob) < 1e-3 * ob, c  # given openbook's contexts, HF computes openbook's loss
    assert not (tmp_path / "BENCHMARKS.md").exists()
