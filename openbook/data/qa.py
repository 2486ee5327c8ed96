"""Open-domain QA examples and SQuAD-style answer scoring (EM / token F1).

Formats ``load_qa`` reads (``columns`` renames the source's fields onto question / answers / gold_ids):
- openbook JSONL: ``{"question": str, "answers": [str, ...] | str, "gold_ids": [str, ...]}``; ``gold_id``
  (one id) is accepted instead of ``gold_ids``, and both are optional (gold passages are only needed
  for retrieval metrics and supervised retriever training). Integer answers and ids become strings.
- FiD/Atlas JSONL: ``answers`` (or ``answer`` / ``target``) and ``ctxs``; gold ids are the ctxs marked
  ``has_answer`` (none marked: no gold).
- DPR retriever-training JSON (a JSON array): ``question``, ``answers``, ``positive_ctxs`` (gold ids),
  ``hard_negative_ctxs`` (kept as ``hard_negative_ids`` for the dense retriever); a context's id is its
  ``passage_id``, ``psg_id`` or ``id``.
- BEIR: a ``qrels/<split>.tsv`` file (query-id, corpus-id, score; header line), its questions from
  ``queries.jsonl`` two directories up; gold ids are the corpus ids with score > 0, no answers.
- a ``datasets.save_to_disk`` directory, or (Python API) an in-memory ``datasets.Dataset``.
Every example remembers where it came from (``source``: file and line or row) for error messages.
"""

from __future__ import annotations

import collections
import json
import os
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openbook.errors import CorpusError


@dataclass
class QAExample:
    question: str
    answers: list[str]
    gold_ids: list[str] = field(default_factory=list)
    hard_negative_ids: list[str] = field(default_factory=list)
    source: str = field(default="", compare=False, repr=False)  # "file:line" (or ":row"), for messages


QA_FIELDS = ("question", "answers", "gold_ids")


def _as_str(value: Any, what: str, where: str) -> str:
    """A non-empty string (ints converted), or a one-line CorpusError."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise CorpusError(f"{where}: {what} must be a string, got {kind}")
    if not value.strip():
        raise CorpusError(f"{where}: {what} is empty")
    return value


def _str_list(value: Any, name: str, where: str, allow_empty: bool) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items and not allow_empty:
        raise CorpusError(f"{where}: field '{name}' is an empty list")
    return [_as_str(v, f"field '{name}'", where) for v in items]


def _ctx_ids(ctxs: Any, name: str, where: str, keep=lambda c: True) -> list[str]:
    if not isinstance(ctxs, list):
        raise CorpusError(f"{where}: field '{name}' must be a list of passages")
    out = []
    for i, c in enumerate(ctxs):
        if not isinstance(c, dict):
            raise CorpusError(f"{where}: {name}[{i}] must be an object")
        key = next((k for k in ("passage_id", "psg_id", "id") if k in c), None)
        if key is None:
            raise CorpusError(f"{where}: {name}[{i}] has no passage_id, psg_id or id")
        if keep(c):
            out.append(_as_str(c[key], f"{name}[{i}].{key}", where))
    return out


def _example(row: Any, where: str, columns: dict[str, str] | None = None) -> QAExample:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    names = {f: (columns or {}).get(f, f) for f in QA_FIELDS}
    if names["answers"] not in row:  # FiD's "target", Atlas/EfficientQA's "answer"
        names["answers"] = next((k for k in ("answers", "answer", "target") if k in row), names["answers"])
    for f in ("question", "answers"):
        if names[f] not in row:
            raise CorpusError(f"{where}: missing field '{names[f]}'")
    question = _as_str(row[names["question"]], f"field '{names['question']}'", where)
    answers = _str_list(row[names["answers"]], names["answers"], where, allow_empty=False)
    negatives: list[str] = []
    if names["gold_ids"] in row:
        gold = _str_list(row[names["gold_ids"]], names["gold_ids"], where, allow_empty=True)
    elif "gold_id" in row:
        gold = _str_list(row["gold_id"], "gold_id", where, allow_empty=False)
    elif "positive_ctxs" in row:  # DPR retriever training
        gold = _ctx_ids(row["positive_ctxs"], "positive_ctxs", where)
        negatives = _ctx_ids(row.get("hard_negative_ctxs", []), "hard_negative_ctxs", where)
    elif "ctxs" in row:  # FiD/Atlas
        gold = _ctx_ids(row["ctxs"], "ctxs", where, keep=lambda c: bool(c.get("has_answer")))
    else:
        gold = []
    return QAExample(question=question, answers=answers, gold_ids=gold, hard_negative_ids=negatives, source=where)


def load_qa(path: str | os.PathLike | Any, columns: dict[str, str] | None = None) -> list[QAExample]:
    """All examples of a QA source (see the module doc for the formats); an example-less source is an error."""
    if hasattr(path, "_fingerprint") and hasattr(path, "data"):  # a datasets.Dataset, in memory
        return _nonempty([_example(r, f"<datasets.Dataset>: row {i}", columns) for i, r in enumerate(path)], "dataset")
    label = str(path)
    p = Path(path)
    if p.is_dir() and (p / "state.json").is_file():
        return _nonempty(_dataset_dir(p, columns), label)
    if not p.is_file():
        raise CorpusError(f"{label}: QA file not found")
    if p.suffix == ".tsv" and p.parent.name == "qrels":
        return _nonempty(_beir(p), label)
    if p.suffix == ".json" and _starts_with(p, b"["):
        return _nonempty(_dpr_json(p, columns), label)
    return _nonempty(list(_jsonl(p, columns)), label)


def _nonempty(examples: list[QAExample], label: str) -> list[QAExample]:
    if not examples:
        raise CorpusError(f"{label}: QA file has no examples")
    return examples


def _starts_with(p: Path, prefix: bytes) -> bool:
    with open(p, "rb") as f:
        return f.read(4096).lstrip().startswith(prefix)


def _jsonl(p: Path, columns: dict[str, str] | None):
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CorpusError(f"{p}:{lineno}: invalid JSON ({msg})") from None
            yield _example(row, f"{p}:{lineno}", columns)


def _dpr_json(p: Path, columns: dict[str, str] | None) -> list[QAExample]:
    try:
        rows = json.loads(p.read_bytes())
    except ValueError as e:
        raise CorpusError(f"{p}: invalid JSON ({(str(e).splitlines() or ['?'])[0]})") from None
    return [_example(r, f"{p}: entry {i}", columns) for i, r in enumerate(rows)]


def _dataset_dir(p: Path, columns: dict[str, str] | None) -> list[QAExample]:
    import datasets

    ds = datasets.load_from_disk(str(p))
    return [_example(r, f"{p}: row {i}", columns) for i, r in enumerate(ds)]


def _beir(qrels: Path) -> list[QAExample]:
    """BEIR: questions from ``queries.jsonl`` beside ``qrels/``, gold ids from the qrels (score > 0)."""
    queries_path = qrels.parent.parent / "queries.jsonl"
    if not queries_path.is_file():
        raise CorpusError(f"{qrels}: BEIR qrels without {queries_path}")
    gold: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    with open(qrels, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cells = line.rstrip("\n").split("\t")
            if lineno == 1 and not cells[-1].lstrip("-").isdigit():
                continue  # header: query-id, corpus-id, score
            if len(cells) != 3 or not cells[2].lstrip("-").isdigit():
                raise CorpusError(f"{qrels}:{lineno}: expected query-id, corpus-id and an integer score")
            if int(cells[2]) > 0:
                gold.setdefault(cells[0], []).append(cells[1])
                where.setdefault(cells[0], f"{qrels}:{lineno}")
    text: dict[str, str] = {}
    with open(queries_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                text[str(row["_id"])] = row["text"]
    missing = [q for q in gold if q not in text]
    if missing:
        raise CorpusError(f"{where[missing[0]]}: query id '{missing[0]}' is not in {queries_path}")
    return [QAExample(question=text[q], answers=[], gold_ids=ids, source=where[q]) for q, ids in gold.items()]


def save_qa(examples: list[QAExample], path: str | os.PathLike) -> None:
    """Write examples as JSONL (temp file + rename, so readers never see a partial file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for ex in examples:
                row = {"question": ex.question, "answers": list(ex.answers), "gold_ids": list(ex.gold_ids)}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- SQuAD metrics

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, answers: list[str] | str) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    golds = [answers] if isinstance(answers, str) else answers
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(a) for a in golds))


def _f1_one(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # SQuAD v2: both empty is a match
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1(pred: str, answers: list[str] | str) -> float:
    """Best token-level F1 between the normalised prediction and any gold answer (0.0 if none)."""
    golds = [answers] if isinstance(answers, str) else answers
    p = normalize_answer(pred).split()
    return max((_f1_one(p, normalize_answer(a).split()) for a in golds), default=0.0)
