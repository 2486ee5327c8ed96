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
    from bench.study_runs import MODELS, Study
    from openbook.recipe import load_recipe

    study = Study()
    by_model = {m.name: dict((c.name, load_recipe(ROOT / j.config, j.overrides)) for c, j in study.jobs(m, tmp_path))
                for m in MODELS}
    rag = by_model["RAG-Token"]
    a, b = study.intervals
    assert list(rag) == ["closed book", "query_side", f"full @{a}", f"full @{b}", f"rolling @{a}", f"rolling @{b}",
                         f"rerank @{a}", f"rerank @{b}", "fresh every step"]
    assert "closed book" not in by_model["REALM open-QA"] and "closed book" not in by_model["dense retriever"]
    assert "frozen" in by_model["REALM open-QA"] and "frozen" not in by_model["dense retriever"]  # the start's figures
    assert "frozen" not in rag and rag["query_side"].train.validate_at_start  # RAG's reader is fixed: frozen = start
    assert not by_model["REALM open-QA"]["query_side"].train.validate_at_start
    assert rag["closed book"].train.closed_book and rag["closed book"].reader.n_docs == 1
    realm_frozen = by_model["REALM open-QA"]["frozen"]
    assert realm_frozen.train.freeze_retriever and not realm_frozen.refresh.enabled
    assert rag["query_side"].refresh.strategy == "query_side"
    for name, n in ((f"full @{a}", a), (f"rolling @{b}", b), (f"rerank @{a}", a)):
        cfg = rag[name]
        assert (cfg.refresh.mode, cfg.refresh.schedule, cfg.refresh.strategy) == ("async", str(n), name.split()[0])
        assert cfg.refresh.swap_lag == study.swap_lag  # the deterministic refresh, a fixed lag
    fresh = rag["fresh every step"]
    assert (fresh.refresh.mode, fresh.refresh.schedule, fresh.refresh.strategy) == ("sync", "1", "full")
    for cfgs in by_model.values():
        for cfg in cfgs.values():
            assert cfg.data.world.num_passages == study.passages and cfg.train.val_questions >= 500
            assert round(study.passages * cfg.data.world.dev_fraction) >= 500 and cfg.index.shards >= 4
    seeds = [j.seed for c, j in study.jobs(MODELS[2], tmp_path) if c.name == "frozen"]
    assert seeds == [0, 1, 2]


def test_encoding_cost_counts_refreshes_after_the_first_index_and_rerank_candidates():
    from bench.study_runs import encoded_per_step

    run = {"summary": {"steps": 100, "passages_encoded_by_refresh": 2000 * 11, "passages_encoded_initial": 2000,
                       "rerank_encoded": 100 * 32 * 20}}
    assert encoded_per_step(run) == (2000 * 10 + 64000) / 100
    assert encoded_per_step({"summary": {"steps": 100}}) == 0  # closed book / frozen: nothing after the first index
    logged = {"summary": {"steps": 10}, "scalars": {"retrieval/rerank_encoded": {"0": 640.0, "9": 6400.0}}}
    assert encoded_per_step(logged) == 640  # the cumulative count's last value


def test_frozen_is_the_start_where_nothing_trains_with_the_retriever_frozen():
    from bench.study_runs import frozen_from_start

    runs = [{"summary": {"steps": 150, "dev_recall@5_at_start": 0.7 + i / 100, "dev_em_at_start": 0.1, "dev_em": 0.4,
                         "dev_recall@5": 0.9}} for i in range(3)]
    got = frozen_from_start(runs)
    assert [g["summary"]["dev_recall@5"] for g in got] == [0.7, 0.71, 0.72]
    assert [g["summary"]["dev_em"] for g in got] == [0.1] * 3
    assert "dev_em" not in frozen_from_start([{"summary": {"steps": 9, "dev_recall@5_at_start": 0.5}}])[0]["summary"]


def test_intervals_and_the_share_of_a_gap_against_independent_arithmetic():
    from bench.study_stats import difference, share_of_gap, t_interval

    ci = t_interval([0.5, 0.6, 0.7])
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2) * s / sqrt(n)
    assert math.isclose(ci.mean, 0.6) and math.isclose(ci.hi - ci.mean, half, rel_tol=1e-4)
    stats = pytest.importorskip("scipy.stats")
    ci5 = t_interval([0.1, 0.4, 0.35, 0.2, 0.3])
    ref = stats.t.interval(0.95, 4, loc=np.mean([0.1, 0.4, 0.35, 0.2, 0.3]), scale=stats.sem([0.1, 0.4, 0.35, 0.2, 0.3]))
    assert np.allclose([ci5.lo, ci5.hi], ref, atol=1e-3)
    d = difference([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])
    assert math.isclose(d.mean, 0.1) and math.isclose(d.lo, 0.1) and d.contains(0.1) and not d.contains(0.0)
    point, lo, hi, per = share_of_gap([0.5, 0.6, 0.7], [0.9, 0.92, 0.95], [1.0, 1.0, 1.0])
    assert math.isclose(point, (np.mean([0.9, 0.92, 0.95]) - 0.6) / (1.0 - 0.6))
    assert lo <= point <= hi and np.allclose(per, [0.8, 0.8, 0.95 / 0.3 - 0.7 / 0.3])


def test_a_study_run_is_also_kept_in_bench_results(tmp_path, monkeypatch):
    import bench.seeds as seeds
    from bench.seeds import Job, run_job
    from openbook.trainer.train import config_yaml
    from tests.helpers import tiny_recipe

    monkeypatch.setattr(seeds, "KEPT", tmp_path / "kept")
    (tmp_path / "kept").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(config_yaml(tiny_recipe(tmp_path, cache=tmp_path / "cache", train={"max_steps": 2},
                                              refresh={"enabled": False})))
    job = Job("tiny", str(recipe), seed=0, root=tmp_path / "learning", keep=True)
    first = run_job(job)
    assert json.loads(job.kept.read_text()) == first and job.kept.name == "learning-tiny-s0.json"
    import shutil

    shutil.rmtree(job.run_dir)  # another checkout: only bench/results has it
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran again")))
    assert run_job(job)["summary"] == first["summary"]
