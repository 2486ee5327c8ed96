"""A recipe's data: its corpus (a file, or one of the built-in ones) and its QA splits, loaded in one call.

Gold passage ids (and DPR hard negatives) are checked against the corpus here, once: an id that is not
in it stops the run with one line naming the file, line and id, or (``data.missing_gold: skip``) is
dropped, counted and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from openbook.config import opt
from openbook.data.corpus import Corpus, load_corpus
from openbook.data.qa import QAExample, load_qa
from openbook.data.world import WorldConfig, generate_world
from openbook.errors import CorpusError

log = logging.getLogger(__name__)
COLUMN_FIELDS = ("id", "title", "text", "question", "answers", "gold_ids")


@dataclass(kw_only=True)
class DataConfig:
    corpus: str | None = opt(None, "corpus: JSONL (BEIR's corpus.jsonl too), DPR TSV (psgs_w100.tsv), Parquet, a "
                                   "datasets directory or a BEIR directory; null = the built-in `source`")
    source: Literal["world", "pydoc"] = opt("world", "built-in corpus when corpus is null: the generated world "
                                            "(with QA) or Python's help topics (real text, no QA)")
    pydoc_words: int = opt(64, "source pydoc: longest passage, in words (longer paragraphs are cut)")
    qa_train: str | None = opt(None, "train QA: JSONL (question, answers, gold_ids; FiD/Atlas), DPR JSON, a BEIR "
                                     "qrels/<split>.tsv or a datasets directory; defaults to the world's train split")
    qa_dev: str | None = opt(None, "dev QA for evaluation, any format of qa_train (defaults to the world's dev split)")
    columns: dict[str, str] = opt({}, "source column names for id, title, text, question, answers, gold_ids "
                                      "(e.g. {id: docid})")
    missing_gold: Literal["error", "skip"] = opt("error", "a gold (or hard negative) id not in the corpus: stop "
                                                          "with its file and line, or drop it and report the count")
    world: WorldConfig = opt(WorldConfig(), "the generated demo world (used when corpus is null)")
    cache_dir: str = opt(".openbook_cache", "Arrow copies of corpora, token caches, generated worlds")

    def __post_init__(self) -> None:
        if self.pydoc_words < 8:
            raise ValueError(f"data.pydoc_words must be >= 8, got {self.pydoc_words}")
        unknown = sorted(set(self.columns) - set(COLUMN_FIELDS))
        if unknown:
            raise ValueError(f"data.columns: unknown field '{unknown[0]}' (known: {', '.join(COLUMN_FIELDS)})")


@dataclass
class DataBundle:
    corpus: Corpus
    train: list[QAExample]
    dev: list[QAExample]
    dropped: dict[str, int] = field(default_factory=dict)  # ids not in the corpus, per split (missing_gold: skip)


def prepare_data(cfg: DataConfig, corpus: Any = None, qa_train: Any = None, qa_dev: Any = None,
                 progress: bool = False) -> DataBundle:
    """Load the configured corpus, or generate (once, cached) the embedded world (logging its progress; a
    bar too with ``progress``). The Python API may pass the corpus and QA splits directly
    (``datasets.Dataset`` objects or paths) instead of configuring them."""
    cache = Path(cfg.cache_dir)
    train_path, dev_path = qa_train or cfg.qa_train, qa_dev or cfg.qa_dev
    if corpus is not None:
        corpus_path = corpus
    elif cfg.corpus is None and cfg.source == "pydoc":
        from openbook.data.pydoc_corpus import build_pydoc_corpus

        corpus_path = build_pydoc_corpus(cache, cfg.pydoc_words)
    elif cfg.corpus is None:
        w = cfg.world
        files = generate_world(w, cache / f"world-n{w.num_passages}-s{w.seed}", progress)
        corpus_path, train_path, dev_path = files.corpus, train_path or files.train, dev_path or files.dev
    else:
        corpus_path = cfg.corpus
    loaded = load_corpus(corpus_path, cache_dir=cache, columns=cfg.columns)
    bundle = DataBundle(corpus=loaded, train=load_qa(train_path, cfg.columns) if train_path else [],
                        dev=load_qa(dev_path, cfg.columns) if dev_path else [])
    for split in ("train", "dev"):
        examples, dropped = check_ids(getattr(bundle, split), loaded, cfg.missing_gold)
        setattr(bundle, split, examples)
        if dropped:
            bundle.dropped[split] = dropped
            log.warning("data.missing_gold skip: %d %s id(s) not in the corpus were dropped", dropped, split)
    return bundle


def check_ids(examples: list[QAExample], corpus: Corpus, mode: str) -> tuple[list[QAExample], int]:
    """Gold and hard-negative ids that are not in ``corpus``: a CorpusError naming the first (mode "error"),
    or the examples without them and how many were dropped (mode "skip")."""
    known = set(corpus.ids.tolist())
    dropped, out = 0, []
    for e in examples:
        bad = [i for i in (*e.gold_ids, *e.hard_negative_ids) if i not in known]
        if bad and mode == "error":
            what = "gold" if bad[0] in e.gold_ids else "hard negative"
            raise CorpusError(f"{e.source or 'QA'}: {what} id '{bad[0]}' is not in the corpus {corpus.path} "
                              "(data.missing_gold: skip drops such ids)")
        if bad:
            dropped += len(bad)
            e = QAExample(e.question, e.answers, [i for i in e.gold_ids if i in known],
                          [i for i in e.hard_negative_ids if i in known], e.source)
        out.append(e)
    return out, dropped
