"""Glue shared by the CLI verbs: encode questions, evaluate retrieval, publish an index in-process."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from openbook.data import Corpus, tokenize_corpus
from openbook.data.bundle import DataBundle
from openbook.models.retriever import BiEncoder, with_prefix
from openbook.recipe import RecipeConfig
from openbook.refresher.encode import encode_rows, encode_texts

log = logging.getLogger(__name__)


def encode_queries(model: BiEncoder, tokenizer, questions: list[str], max_length: int) -> np.ndarray:
    """Question embeddings (retriever.query_prefix put before each)."""
    return encode_texts(model.query_encoder, tokenizer, with_prefix(model.cfg.query_prefix, questions), max_length)


def recall_at_k(index, doc_ids, query_emb: np.ndarray, gold: list[list[str]], k: int) -> float:
    """Fraction of questions with a gold passage id among the top-k that ``index`` returns (row i = doc_ids[i])."""
    rows, _ = index.search(query_emb, k)
    return float(np.mean([bool(set(g) & {str(doc_ids[r]) for r in row if r >= 0}) for row, g in zip(rows, gold)]))


def dev_recall(parts, snapshot=None) -> float:
    """Dev gold-passage recall@k (k = train.eval_k) of ``parts``' retriever against ``snapshot``, or against a
    fresh in-process encode of the corpus with the current doc encoder (the index a synchronous trainer
    would have). With ``refresh.strategy: rerank`` the recall against ``snapshot`` is that of the list the model
    reads: the k best by live score among the snapshot's top ``refresh.rerank_candidates``."""
    from openbook.index import IndexConfig, build_index

    dev = [e for e in parts.data.dev if e.gold_ids]
    if not dev:
        return float("nan")
    cfg = parts.cfg
    q = encode_queries(parts.model, parts.tokenizer, [e.question for e in dev], cfg.retriever.query_max_length)
    if snapshot is None:
        emb = encode_rows(parts.model.doc_encoder, parts.tokens, 0, len(parts.tokens), cfg.encode.batch_size)
        index, ids = build_index(emb, IndexConfig()), parts.data.corpus.ids
    else:
        index, ids = snapshot.index, snapshot.doc_ids
    step = getattr(parts.module, "retrieval", None) if snapshot is not None else None
    if step is not None and step.rerank:
        found, _ = index.search(q, max(step.rerank, cfg.train.eval_k))
        rows = step.rerank_rows(torch.from_numpy(q), [[int(r) for r in row if r >= 0] for row in found],
                                cfg.train.eval_k, training=False)
    else:
        rows, _ = index.search(q, cfg.train.eval_k)
    return float(np.mean([bool(set(e.gold_ids) & {str(ids[r]) for r in row if r >= 0}) for row, e in zip(rows, dev)]))


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def snapshot_meta(cfg: RecipeConfig, corpus: Corpus) -> dict:
    return {"corpus": corpus.fingerprint, "encoder": cfg.retriever.encoder.source, "recipe": cfg.name}


def index_target(cfg: RecipeConfig, corpus: Corpus):
    """Where and how the recipe's snapshots are published."""
    from openbook.refresher.publish import IndexTarget

    return IndexTarget(cfg.snapshot_dir, cfg.index, cfg.snapshots.keep, snapshot_meta(cfg, corpus))


def build_and_publish(cfg: RecipeConfig, model: BiEncoder, tokenizer, data: DataBundle,
                      encoder_step: int = 0, progress: bool = True):
    """Tokenise (cached), encode the corpus with ``model``'s doc encoder and publish a snapshot."""
    from openbook.refresher.publish import publish_in_process

    set_threads(cfg.encode.threads)
    tokens = tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir),
                             prefix=cfg.retriever.passage_prefix)
    return publish_in_process(index_target(cfg, data.corpus), model.doc_encoder, tokens, data.corpus.ids,
                              encoder_step, cfg.encode.batch_size, progress)
