"""The Inverse Cloze Task (Lee et al. 2019, ORQA), REALM's warm start for its embedder: a sentence of a
passage is the pseudo-query, the passage it came from (title plus the other sentences) its positive,
the other passages of the batch the negatives. The sentence is removed from its passage except with
probability ``keep_sentence_prob``, so the embedder learns what a passage is about (its title, its
neighbouring sentences) rather than exact word overlap alone.

Pure torch/regex: ``trainer/ict_module.py`` wires it to the corpus and a Lightning module.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from openbook.config import opt

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@dataclass(kw_only=True)
class IctConfig:
    keep_sentence_prob: float = opt(0.1, "probability that the query sentence stays in its positive passage "
                                    "(ORQA/REALM use 0.1)")
    max_query_length: int = opt(32, "tokens of the pseudo-query sentence")

    def __post_init__(self) -> None:
        if not 0.0 <= self.keep_sentence_prob <= 1.0:
            raise ValueError(f"ict.keep_sentence_prob must lie in [0, 1], got {self.keep_sentence_prob}")
        if self.max_query_length < 4:
            raise ValueError(f"ict.max_query_length must be >= 4, got {self.max_query_length}")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` (split after . ! ? followed by white space); never empty for non-empty text."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def ict_pair(text: str, rng: random.Random, keep_sentence_prob: float) -> tuple[str, str]:
    """(pseudo-query sentence, the passage text it is matched against): a random sentence, and the
    other sentences (all of them, the query's included, with probability ``keep_sentence_prob``)."""
    sentences = split_sentences(text)
    i = rng.randrange(len(sentences))
    if rng.random() < keep_sentence_prob:
        return sentences[i], " ".join(sentences)
    return sentences[i], " ".join(sentences[:i] + sentences[i + 1:])


def ict_loss(queries: torch.Tensor, docs: torch.Tensor, same_title: torch.Tensor,
             offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """In-batch softmax loss [B] of query i against doc ``offset + i``, and whether that doc scored highest [B].

    queries [B, d]; docs [N, d], N >= B: the batch's docs, or under data parallelism every rank's docs
    side by side, this rank's starting at ``offset``. ``same_title`` [B, N] bool marks the pairs that
    share a title: another passage about the same entity is not a negative (it is as right as the
    positive), so it is masked out of the softmax rather than pushed away."""
    scores = queries @ docs.T
    target = torch.arange(len(scores), device=scores.device) + offset
    positive = torch.zeros_like(same_title)
    positive[torch.arange(len(scores)), target] = True
    scores = scores.float().masked_fill(same_title & ~positive, float("-inf"))
    return F.cross_entropy(scores, target, reduction="none"), scores.argmax(1).eq(target)
