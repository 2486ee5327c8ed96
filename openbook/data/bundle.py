"""A recipe's data: its corpus (a file, or one of the built-in ones) and its QA splits, loaded in one call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from openbook.config import opt
from openbook.data.corpus import Corpus, load_corpus
from openbook.data.qa import QAExample, load_qa
from openbook.data.world import WorldConfig, generate_world


@dataclass(kw_only=True)
class DataConfig:
    corpus: str | None = opt(None, "corpus file (JSONL/Parquet) or datasets Arrow dir; null = the built-in `source`")
    source: Literal["world", "pydoc"] = opt("world", "built-in corpus when corpus is null: the generated world "
                                            "(with QA) or Python's help topics (real text, no QA)")
    pydoc_words: int = opt(64, "source pydoc: longest passage, in words (longer paragraphs are cut)")
    qa_train: str | None = opt(None, "train QA JSONL (question, answers, gold_ids); defaults to the world's train split")
    qa_dev: str | None = opt(None, "dev QA JSONL for evaluation (defaults to the world's dev split)")
    world: WorldConfig = opt(WorldConfig(), "the generated demo world (used when corpus is null)")
    cache_dir: str = opt(".openbook_cache", "Arrow copies of corpora, token caches, generated worlds")

    def __post_init__(self) -> None:
        if self.pydoc_words < 8:
            raise ValueError(f"data.pydoc_words must be >= 8, got {self.pydoc_words}")


@dataclass
class DataBundle:
    corpus: Corpus
    train: list[QAExample]
    dev: list[QAExample]


def prepare_data(cfg: DataConfig) -> DataBundle:
    """Load the configured corpus, or generate (once, cached) the embedded world."""
    cache = Path(cfg.cache_dir)
    train_path, dev_path = cfg.qa_train, cfg.qa_dev
    if cfg.corpus is None and cfg.source == "pydoc":
        from openbook.data.pydoc_corpus import build_pydoc_corpus

        corpus_path = build_pydoc_corpus(cache, cfg.pydoc_words)
    elif cfg.corpus is None:
        w = cfg.world
        files = generate_world(w, cache / f"world-n{w.num_passages}-s{w.seed}")
        corpus_path, train_path, dev_path = files.corpus, train_path or files.train, dev_path or files.dev
    else:
        corpus_path = cfg.corpus
    corpus = load_corpus(corpus_path, cache_dir=cache)
    return DataBundle(corpus=corpus, train=load_qa(train_path) if train_path else [],
                      dev=load_qa(dev_path) if dev_path else [])
