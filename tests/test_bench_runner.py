"""``python -m bench``: argument handling; the scaling bench's measurements and projection arithmetic;
the learning study's conditions and how it reads a run back."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from bench.__main__ import NAMES, command, environment, parse_args
from bench.common import BENCHMARKS as BENCH_MD
from bench.common import OUT_ENV, QUICK, ROOT
from bench.projection import Assumptions, encoder_flops, project


def test_runner_runs_everything_in_order_by_default():
    args = parse_args([])
    assert args.names == list(NAMES) and not args.quick
    assert {"refresh", "rag_step", "knnlm", "fid_passages", "learning", "scaling", "sharded", "ingest", "seeds"} == set(NAMES)
    assert environment(False)[OUT_ENV] == str(BENCH_MD)


def test_runner_only_keeps_the_fixed_order_and_passes_quick():
    args = parse_args(["--quick", "--only", "scaling, learning"])
    assert args.names == ["learning", "scaling"]
    assert command("scaling", True) == [sys.executable, "-m", "bench.scaling", "--quick"]
    assert command("knnlm", False) == [sys.executable, "-m", "bench.knnlm"]
    assert environment(True)[OUT_ENV] == str(QUICK)  # a quick check never replaces the full results


def test_runner_refuses_an_unknown_benchmark(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--only", "learning,nope"])
    assert e.value.code == 2
    assert "unknown benchmark nope (known: refresh, rag_step" in capsys.readouterr().err


def test_runner_dry_run_prints_the_commands_and_writes_nothing():
    before = BENCH_MD.read_text()
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "knnlm,refresh", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["$ python -m bench.refresh --quick", "$ python -m bench.knnlm --quick"]
    assert BENCH_MD.read_text() == before


def test_encoder_flops_match_a_real_bert_parameter_count():
    """2 FLOPs per weight per token for the Linear layers, plus attention's 4hL per token and layer."""
    import torch
    from transformers import BertConfig, BertModel

    layers, hidden, tokens = 2, 128, 40
    model = BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                 intermediate_size=4 * hidden, vocab_size=100))
    weights = sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, torch.nn.Linear))
    assert encoder_flops(layers, hidden, tokens) == 2 * weights * tokens + layers * 4 * hidden * tokens**2


def test_projection_against_an_independent_recomputation():
    a = Assumptions()
    rate, link = 50.0, 9.0  # a measured MiniLM rate (6 x 384 at 30 tokens) and HNSW link bytes
    p = project(rate, 6, 384, 30.0, link, a)
    mini = 6 * 30 * (24 * 384**2 + 4 * 384 * 30)
    bert = 12 * 160 * (24 * 768**2 + 4 * 768 * 160)
    gpu = rate * mini / bert * 3000
    assert math.isclose(p.gpu_docs_per_s, gpu, rel_tol=1e-12)
    assert math.isclose(p.cpu_gflops, rate * mini / 1e9, rel_tol=1e-12)
    assert math.isclose(p.implied_tflops, gpu * bert / 1e12, rel_tol=1e-12)
    for row, gpus in zip(p.rows, (8, 16, 64)):
        hours = 21e6 / gpu / gpus / 3600
        assert math.isclose(row["hours per re-encode"], hours, rel_tol=1e-12)
        assert math.isclose(row["refresh interval at 0.5 s/step (steps)"], hours * 3600 / 0.5, rel_tol=1e-12)
        assert math.isclose(row["refresh interval at 1 s/step (steps)"], hours * 3600, rel_tol=1e-12)
    assert math.isclose(p.memory_gb["Flat fp32"], 21e6 * 768 * 4 / 1e9)
    assert math.isclose(p.memory_gb["HNSW32"], 21e6 * (768 * 4 + 32 * link) / 1e9)
    assert math.isclose(p.memory_gb["IVF-PQ64 (+8-byte ids)"], 21e6 * 72 / 1e9)


def test_index_build_reports_the_real_serialized_size():
    from bench.scaling_measure import factories, index_build, ivf_lists

    assert [ivf_lists(n) for n in (10_000, 100_000, 1_000_000)] == [512, 1024, 4096]
    emb = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    rows = {r["index"]: r for r in (index_build(emb, f) for f in factories(1000))}
    flat = rows["Flat"]
    assert 1000 * 16 * 4 <= flat["serialized MB"] * 1e6 < 1000 * 16 * 4 + 1000  # the vectors plus a header
    assert rows["HNSW32"]["bytes/vector"] > flat["bytes/vector"]  # links on top of the vectors
    assert rows["IVF128,PQ16"]["bytes/vector"] < flat["bytes/vector"]


@pytest.mark.slow
def test_reencode_rows_come_from_real_refreshes(tmp_path, ray_session):
    from bench.scaling import throughput

    rows, emb = throughput(tmp_path / "runs", 300, "tiny", cache=tmp_path / "cache")
    assert [r["actors"] for r in rows] == [1, 2] and emb.shape == (300, 64)
    assert all(r["docs/s"] > 0 and r["encode s"] <= r["refresh s (incl. Flat build, publish)"] for r in rows)
    assert math.isclose(rows[1]["speed-up vs 1 actor"], rows[1]["docs/s"] / rows[0]["docs/s"])


def test_study_conditions_are_the_recipes_with_a_few_overrides(tmp_path):
    from bench.study_runs import ASYNC, CLOSED, FROZEN, SYNC1, StudyConfig, recipe

    s = StudyConfig(passages=300, steps=12, val_every=4)
    closed = recipe("RAG-Token", CLOSED, s, tmp_path, 5)
    assert closed.train.closed_book and not closed.refresh.enabled and closed.reader.n_docs == 1
    assert recipe("REALM open-QA", CLOSED, s, tmp_path, 5) is None  # a span reader cannot answer closed book
    frozen = recipe("FiD", FROZEN, s, tmp_path, 5)
    assert frozen.train.freeze_doc_encoder and not frozen.refresh.enabled and frozen.train.max_steps == 12
    sync = recipe("RAG-Sequence", SYNC1, s, tmp_path, 5)
    assert (sync.refresh.mode, sync.refresh.schedule, sync.rag.variant) == ("sync", "1", "sequence")
    asy = recipe("REALM open-QA", ASYNC, s, tmp_path, 5)
    assert (asy.refresh.mode, asy.refresh.schedule, asy.data.world.num_passages) == ("async", "5", 300)


def test_mean_lag_and_validation_steps(tmp_path):
    from bench.study_runs import _by_step, mean_lag

    history = {"versions": [[1, 1], [2, 1], [3, 2], [4, 2]], "events": [{"version": 2, "submitted_step": 2}]}
    (tmp_path / "refresh_history_rank0.json").write_text(json.dumps(history))
    assert mean_lag(tmp_path) == (1 + 2 + 1 + 2) / 4
    assert _by_step([0, 19, 39, 40], [0.1, 0.2, 0.3, 0.4], 20) == {0: 0.1, 20: 0.2, 40: 0.4}
