"""Corpora and QA in the formats people have (issue 18): DPR TSV and JSON, BEIR, FiD/Atlas JSONL, datasets
(directory and in memory), column mapping, gold ids that are not in the corpus. Every file is written here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openbook.data import load_corpus, load_qa
from openbook.data.bundle import DataConfig, prepare_data
from openbook.errors import CorpusError

ROWS = [{"id": "1", "title": "Alpha", "text": 'He said "hi"\tthen left.'},
        {"id": "2", "title": "", "text": "An untitled passage."},
        {"id": "3", "title": "Gamma", "text": "Line one\nline two, café."}]


def rows_of(corpus) -> list[dict]:
    return [corpus[i] for i in range(len(corpus))]


def write_tsv(path: Path, rows: list[dict], header: bool = True, order=("id", "text", "title")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        if header:
            w.writerow(order)
        for r in rows:
            w.writerow([r[c] for c in order])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("header", [True, False])
def test_dpr_tsv_reads_like_the_same_rows_in_jsonl(tmp_path, header):
    tsv = load_corpus(write_tsv(tmp_path / "psgs_w100.tsv", ROWS, header), tmp_path / "cache")
    assert rows_of(tsv) == ROWS  # quoted tabs, quotes and newlines kept; DPR's column order without a header
    jsonl = load_corpus(write_jsonl(tmp_path / "c.jsonl", ROWS), tmp_path / "cache")
    assert rows_of(tsv) == rows_of(jsonl)


def test_tsv_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("id\ttext\ttitle\n1\tok\tT\n2\tonly two\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.tsv:3: 2 fields, expected 3 \(id, text, title\)$"):
        load_corpus(path, tmp_path / "cache")
    path.write_text("docid\tbody\n1\tx\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.tsv:1: 2 fields, expected 3 \(id, text, title; no header line "
                                          r"names id and text, so DPR's order\)$"):
        load_corpus(path, tmp_path / "cache")
    path.write_text("id\ttitle\n1\tx\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.tsv:1: 2 fields, expected 3"):
        load_corpus(path, tmp_path / "cache")


def test_columns_map_source_names_in_every_format(tmp_path):
    renamed = [{"docid": r["id"], "heading": r["title"], "body": r["text"]} for r in ROWS]
    columns = {"id": "docid", "title": "heading", "text": "body"}
    jsonl = write_jsonl(tmp_path / "r.jsonl", renamed)
    tsv = write_tsv(tmp_path / "r.tsv", renamed, order=("docid", "body", "heading"))
    parquet = tmp_path / "r.parquet"
    pq.write_table(pa.table({k: [r[k] for r in renamed] for k in renamed[0]}), parquet)
    for src in (jsonl, tsv, parquet):
        assert rows_of(load_corpus(src, tmp_path / "cache", columns)) == ROWS, src
    with pytest.raises(CorpusError, match=r"r.jsonl:1: missing field 'id'$"):
        load_corpus(jsonl, tmp_path / "cache2")  # without the mapping: named, one line
    with pytest.raises(CorpusError, match=r"missing field 'pid' \(mapped to id\)$"):
        load_corpus(jsonl, tmp_path / "cache3", {"id": "pid"})


def test_datasets_directory_and_in_memory_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"docid": r["id"], "title": r["title"], "text": r["text"]} for r in ROWS])
    ds.save_to_disk(str(tmp_path / "ds"))
    mem = load_corpus(ds, tmp_path / "cache", {"id": "docid"})
    disk = load_corpus(tmp_path / "ds", tmp_path / "cache", {"id": "docid"})
    assert rows_of(mem) == rows_of(disk) == ROWS
    assert len(mem.ids) == 3 and mem.row_of("3") == 2
    picked = load_corpus(ds.select([2, 0]), tmp_path / "cache", {"id": "docid"})  # an indices mapping
    assert rows_of(picked) == [ROWS[2], ROWS[0]]
    two_chunks = datasets.concatenate_datasets([ds, datasets.Dataset.from_list([{"docid": "9", "title": "", "text": " "}])])
    with pytest.raises(CorpusError, match=r"row 3: field 'text' is null or empty"):  # row numbers run across chunks
        load_corpus(two_chunks, tmp_path / "cache", {"id": "docid"})
    qa = datasets.Dataset.from_list([{"q": "who is alpha", "answers": ["Alpha"], "gold_ids": ["1"]}])
    assert [(e.question, e.gold_ids) for e in load_qa(qa, {"question": "q"})] == [("who is alpha", ["1"])]


def make_beir(root: Path) -> Path:
    root.mkdir()
    write_jsonl(root / "corpus.jsonl", [{"_id": r["id"], "title": r["title"], "text": r["text"]} for r in ROWS])
    write_jsonl(root / "queries.jsonl", [{"_id": "q1", "text": "first?"}, {"_id": "q2", "text": "second?"},
                                         {"_id": "q3", "text": "not judged?"}])
    (root / "qrels").mkdir()
    (root / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\t1\nq1\t3\t2\nq2\t2\t1\nq2\t3\t0\n")
    return root


def test_beir_corpus_queries_and_qrels(tmp_path):
    root = make_beir(tmp_path / "beir")
    data = prepare_data(DataConfig(corpus=str(root), qa_dev=str(root / "qrels" / "dev.tsv"),
                                   cache_dir=str(tmp_path / "cache")))
    assert rows_of(data.corpus) == ROWS  # BEIR's _id found without a mapping
    assert [(e.question, e.gold_ids, e.answers) for e in data.dev] == [("first?", ["1", "3"], []),
                                                                       ("second?", ["2"], [])]
    assert data.train == []


def test_dpr_json_and_fid_jsonl(tmp_path):
    dpr = [{"question": "q one", "answers": ["a"], "positive_ctxs": [{"passage_id": "1", "title": "", "text": ""}],
            "hard_negative_ctxs": [{"passage_id": "2"}, {"psg_id": 3}], "negative_ctxs": []},
           {"question": "q two", "answers": ["b", "c"], "positive_ctxs": [{"id": "3"}], "hard_negative_ctxs": []}]
    (tmp_path / "dpr.json").write_text(json.dumps(dpr))
    got = load_qa(tmp_path / "dpr.json")
    assert [(e.question, e.answers, e.gold_ids, e.hard_negative_ids) for e in got] == [
        ("q one", ["a"], ["1"], ["2", "3"]), ("q two", ["b", "c"], ["3"], [])]
    fid = [{"question": "q", "target": "t", "ctxs": [{"id": "2", "has_answer": False}, {"id": "3", "has_answer": True}]},
           {"question": "r", "answers": ["u"], "ctxs": [{"id": "1"}]}]
    got = load_qa(write_jsonl(tmp_path / "fid.jsonl", fid))
    assert [(e.answers, e.gold_ids) for e in got] == [(["t"], ["3"]), (["u"], [])]
    bad = [{"question": "q", "answers": ["a"], "positive_ctxs": [{"title": "no id"}]}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(CorpusError, match=r"bad.json: entry 0: positive_ctxs\[0\] has no passage_id, psg_id or id$"):
        load_qa(tmp_path / "bad.json")


def test_a_gold_id_not_in_the_corpus_stops_the_run_or_is_skipped(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ROWS)
    qa = write_jsonl(tmp_path / "dev.jsonl", [{"question": "q", "answers": ["a"], "gold_ids": ["1"]},
                                              {"question": "r", "answers": ["b"], "gold_ids": ["2", "9"]}])
    cfg = DataConfig(corpus=str(tmp_path / "c.jsonl"), qa_dev=str(qa), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CorpusError) as err:
        prepare_data(cfg)
    assert str(err.value).startswith(f"{qa}:2: gold id '9' is not in the corpus") and "\n" not in str(err.value)
    cfg.missing_gold = "skip"
    data = prepare_data(cfg)
    assert [e.gold_ids for e in data.dev] == [["1"], ["2"]] and data.dropped == {"dev": 1}


def test_own_hard_negatives_come_first_among_the_candidates():
    from openbook.trainer.retrieval_module import candidates

    retrieved = np.array([[5, 0, 7, 8, 9], [1, 2, 3, 4, 6]])
    got = candidates(retrieved, np.array([0, 3]), 3, own=np.array([[8, -1], [3, 4]]))
    assert got.tolist() == [[0, 8, 5, 7], [3, 4, 1, 2]]  # own first (never the gold), no repeats


@pytest.mark.slow
def test_a_dense_retriever_trains_from_dpr_json_with_its_hard_negatives(tmp_path, ray_session):
    """A world's train split rewritten as DPR JSON (each question's hard negative: another passage about the
    same person), passed through the Python API as a datasets.Dataset corpus: the run trains, and its
    batches carry the file's hard negatives to the candidates."""
    import datasets

    from openbook.trainer.train import build_parts, run_train
    from tests.helpers import tiny_recipe

    cfg = tiny_recipe(tmp_path, model="dense_retriever", train={"max_steps": 6, "data_negatives": 1})
    world = prepare_data(cfg.data)
    corpus = datasets.Dataset.from_list([world.corpus[i] for i in range(len(world.corpus))])
    by_title: dict[str, list[str]] = {}
    for row in corpus:
        by_title.setdefault(row["title"], []).append(row["id"])
    dpr = [{"question": e.question, "answers": e.answers, "positive_ctxs": [{"passage_id": e.gold_ids[0]}],
            "hard_negative_ctxs": [{"passage_id": i} for i in by_title[world.corpus[world.corpus.row_of(e.gold_ids[0])]
                                                                        ["title"]] if i != e.gold_ids[0]][:1]}
           for e in world.train]
    (tmp_path / "train.json").write_text(json.dumps(dpr))
    data = prepare_data(cfg.data, corpus=corpus, qa_train=str(tmp_path / "train.json"))
    assert sum(bool(e.hard_negative_ids) for e in data.train) == len(data.train)
    parts = build_parts(cfg, data)
    batch = next(iter(parts.spec.train_loader(parts)))
    hard = batch["hard_rows"][:, 0].tolist()
    assert all(data.corpus[r]["title"] == data.corpus[int(g)]["title"] for r, g in zip(hard, batch["gold_row"]))
    summary = run_train(cfg, progress=False, data=data)
    assert summary["steps"] == 6 and np.isfinite(summary["final_loss"])
