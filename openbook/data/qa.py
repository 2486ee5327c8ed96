"""Open-domain QA examples (JSONL) and SQuAD-style answer scoring (EM / token F1).

A QA line is ``{"question": str, "answers": [str, ...] | str, "gold_ids": [str, ...]}``; ``gold_id``
(one id) is accepted instead of ``gold_ids``, and both are optional (gold passages are only needed
for retrieval metrics and supervised retriever warm-up). Integer answers and ids become strings.
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


def _example(row: Any, where: str) -> QAExample:
    if not isinstance(row, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for name in ("question", "answers"):
        if name not in row:
            raise CorpusError(f"{where}: missing field '{name}'")
    question = _as_str(row["question"], "field 'question'", where)
    answers = _str_list(row["answers"], "answers", where, allow_empty=False)
    if "gold_ids" in row:
        gold = _str_list(row["gold_ids"], "gold_ids", where, allow_empty=True)
    elif "gold_id" in row:
        gold = _str_list(row["gold_id"], "gold_id", where, allow_empty=False)
    else:
        gold = []
    return QAExample(question=question, answers=answers, gold_ids=gold)


def load_qa(path: str | os.PathLike) -> list[QAExample]:
    """All examples of a QA JSONL file; blank lines are skipped; an example-less file is an error."""
    label = str(path)
    p = Path(path)
    if not p.is_file():
        raise CorpusError(f"{label}: QA file not found")
    examples = []
    with open(p, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except ValueError as e:
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise CorpusError(f"{label}:{lineno}: invalid JSON ({msg})") from None
            examples.append(_example(row, f"{label}:{lineno}"))
    if not examples:
        raise CorpusError(f"{label}: QA file has no examples")
    return examples


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
