"""Question batches for every recipe: tokenised questions, gold rows, answer labels."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from openbook.data import Corpus, QAExample
from openbook.errors import OpenbookError

log = logging.getLogger(__name__)


@dataclass
class QACollator:
    """Questions longer than ``query_max_length`` are truncated, with one warning per collator."""

    tokenizer: object
    query_max_length: int
    answer_max_length: int
    query_prefix: str = ""  # retriever.query_prefix, before each question the retriever reads
    row_of: Callable[[str], int] | None = None  # corpus id -> row, for the examples' own hard negatives
    hard_negatives: int = 0  # how many of them go in "hard_rows" [B, hard_negatives] (-1 = none)
    warned: bool = field(default=False)

    def __call__(self, batch: list[tuple]) -> dict:
        """``batch``: (example, gold row) pairs, or (example, gold row, dev index) for evaluation ("index")."""
        questions = [self.query_prefix + e.question for e, *_ in batch]
        self._warn_if_truncated(questions)
        query = self.tokenizer(questions, truncation=True, max_length=self.query_max_length, padding=True,
                               return_tensors="pt")
        answers = [e.answers[0] if e.answers else "" for e, *_ in batch]
        labels = self.tokenizer(answers, truncation=True, max_length=self.answer_max_length, padding=True,
                                return_tensors="pt")["input_ids"]
        out = {"query": dict(query), "gold_row": torch.tensor([t[1] for t in batch], dtype=torch.long),
               "labels": labels, "answers": [t[0].answers for t in batch], "questions": [t[0].question for t in batch]}
        if len(batch[0]) > 2:
            out["index"] = torch.tensor([t[2] for t in batch], dtype=torch.long)
        if self.hard_negatives and self.row_of is not None:
            n = self.hard_negatives
            rows = [[self.row_of(i) for i in e.hard_negative_ids[:n]] for e, *_ in batch]
            out["hard_rows"] = torch.tensor([r + [-1] * (n - len(r)) for r in rows], dtype=torch.long)
        return out

    def _warn_if_truncated(self, questions: list[str]) -> None:
        if self.warned:
            return
        lengths = [len(ids) for ids in self.tokenizer(questions)["input_ids"]]
        if max(lengths) > self.query_max_length:
            self.warned = True
            log.warning("questions longer than retriever.query_max_length=%d tokens are truncated (e.g. one of "
                        "%d tokens); this warning is shown once", self.query_max_length, max(lengths))


def with_gold_rows(examples: list[QAExample], corpus: Corpus, require: bool) -> list[tuple[QAExample, int]]:
    """Pair each example with its gold passage's corpus row (-1 if it has none)."""
    out = []
    for e in examples:
        row = corpus.row_of(e.gold_ids[0]) if e.gold_ids else -1
        if row >= 0 or not require:
            out.append((e, row))
    if not out:
        raise OpenbookError("no usable questions" + (" with gold_ids" if require else ""))
    return out
