"""Question batches for every recipe: tokenised questions, gold rows, answer labels."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, RandomSampler

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

    def __call__(self, batch: list[tuple[QAExample, int]]) -> dict:
        questions = [self.query_prefix + e.question for e, _ in batch]
        self._warn_if_truncated(questions)
        query = self.tokenizer(questions, truncation=True, max_length=self.query_max_length, padding=True,
                               return_tensors="pt")
        answers = [e.answers[0] if e.answers else "" for e, _ in batch]
        labels = self.tokenizer(answers, truncation=True, max_length=self.answer_max_length, padding=True,
                                return_tensors="pt")["input_ids"]
        out = {"query": dict(query), "gold_row": torch.tensor([r for _, r in batch], dtype=torch.long),
               "labels": labels, "answers": [e.answers for e, _ in batch], "questions": [e.question for e, _ in batch]}
        if self.hard_negatives and self.row_of is not None:
            n = self.hard_negatives
            rows = [[self.row_of(i) for i in e.hard_negative_ids[:n]] for e, _ in batch]
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


def make_loader(items, batch_size: int, collate: Callable, shuffle: bool, seed: int) -> DataLoader:
    """``items``: a list or a map-style dataset. Shuffled loaders resume mid-epoch (``ResumableLoader``)."""
    gen = torch.Generator().manual_seed(seed)
    if not shuffle:
        return DataLoader(items, batch_size=batch_size, shuffle=False, collate_fn=collate, generator=gen)
    return ResumableLoader(items, batch_size=batch_size, sampler=ResumableSampler(items, generator=gen),
                           collate_fn=collate, generator=gen, drop_last=True)


class ResumableSampler(RandomSampler):
    """``RandomSampler`` (the same draws from the same generator, so the same order) that counts the
    indices it handed out this epoch and can skip the first ``skip`` of them (resume mid-epoch)."""

    def __init__(self, data_source, generator: torch.Generator):
        super().__init__(data_source, generator=generator)
        self.consumed = self.skip = 0
        self.epoch_state: torch.Tensor | None = None  # the generator's state when this epoch began

    def __iter__(self):
        skip, self.skip, self.consumed = self.skip, 0, self.skip
        return self._take(skip)

    def _take(self, skip: int):
        for i, idx in enumerate(super().__iter__()):
            if i >= skip:
                self.consumed = i + 1
                yield idx


class ResumableLoader(DataLoader):
    """A training loader Lightning can resume mid-epoch (it saves ``state_dict()`` in checkpoints and calls
    ``load_state_dict`` before iterating): the generator's state at the start of the epoch and how many
    samples were taken, so the resumed epoch replays the same permutation from the next batch. Needs
    ``num_workers=0`` (Lightning does not prefetch a loader with a length, so taken = trained on)."""

    def __iter__(self):
        if isinstance(self.sampler, ResumableSampler) and self.generator is not None:
            self.sampler.epoch_state = self.generator.get_state()
            self.sampler.consumed = self.sampler.skip  # the sampler itself starts at the first next()
        return super().__iter__()

    def state_dict(self) -> dict:
        s = self.sampler
        if not isinstance(s, ResumableSampler) or s.epoch_state is None:
            return {}  # e.g. Lightning swapped in a DistributedSampler
        return {"generator": s.epoch_state, "consumed": s.consumed, "calls": self._counters()}

    def load_state_dict(self, state: dict) -> None:
        if state and isinstance(self.sampler, ResumableSampler) and self.generator is not None:
            self.generator.set_state(state["generator"])
            self.sampler.skip = int(state["consumed"])
            for name, calls in state.get("calls", {}).items():
                getattr(self, name).calls = int(calls)

    def _counters(self) -> dict[str, int]:
        """Call counters of a dataset or collate function that seed their own draws (REALM's masking,
        ICT's sentence choice): restored on resume so the resumed run draws what the uninterrupted one would."""
        return {name: getattr(self, name).calls for name in ("dataset", "collate_fn")
                if isinstance(getattr(getattr(self, name), "calls", None), int)}
