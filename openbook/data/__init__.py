"""Corpora, QA datasets, tokenisation caches and the generated demo world (no model code)."""

from __future__ import annotations

from openbook.data.corpus import Corpus, load_corpus
from openbook.data.qa import QAExample, exact_match, f1, load_qa, normalize_answer, save_qa
from openbook.data.tokcache import TokenizedCorpus, tokenize_corpus
from openbook.data.world import WorldConfig, WorldFiles, generate_world, pydoc_text

__all__ = [
    "Corpus",
    "QAExample",
    "TokenizedCorpus",
    "WorldConfig",
    "WorldFiles",
    "exact_match",
    "f1",
    "generate_world",
    "load_corpus",
    "load_qa",
    "normalize_answer",
    "pydoc_text",
    "save_qa",
    "tokenize_corpus",
]
