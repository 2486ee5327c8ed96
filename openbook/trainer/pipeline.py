"""Glue shared by the CLI verbs: resolve the corpus, encode it, evaluate retrieval."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from openbook.data import Corpus, QAExample, generate_world, load_corpus, load_qa, tokenize_corpus
from openbook.data.tokcache import TokenizedCorpus
from openbook.models.retriever import BiEncoder, encode_batches
from openbook.recipe import DataConfig, RecipeConfig
from openbook.refresher.encode import encode_rows

log = logging.getLogger(__name__)


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


def encode_corpus(encoder, tokens: TokenizedCorpus, batch_size: int, progress: bool = True) -> np.ndarray:
    """All doc embeddings [N, d] (float16, the snapshot dtype) with ``encoder``, with a progress bar.
    Uses the refresher's own loop, so in-process and Ray-built snapshots hold the same numbers."""
    n = len(tokens)
    chunk = batch_size * 16
    bar = tqdm(total=n, desc="encode", unit="doc", disable=not progress, mininterval=1.0)
    parts = []
    for lo in range(0, n, chunk):
        parts.append(encode_rows(encoder, tokens, lo, min(lo + chunk, n), batch_size))
        bar.update(parts[-1].shape[0])
    bar.close()
    return np.concatenate(parts) if parts else np.zeros((0, encoder.dim), np.float16)


def encode_queries(model: BiEncoder, tokenizer, questions: list[str], max_length: int,
                   batch_size: int = 256) -> np.ndarray:
    batches = (
        tokenizer(questions[i:i + batch_size], truncation=True, max_length=max_length,
                  padding=True, return_tensors="pt")
        for i in range(0, len(questions), batch_size)
    )
    return encode_batches(model.query_encoder, batches)


def recall_at_k(index, doc_ids, query_emb: np.ndarray, gold: list[list[str]], k: int) -> float:
    """Fraction of questions with a gold passage id among the top-k that ``index`` returns (row i = doc_ids[i])."""
    if not gold:
        return float("nan")
    rows, _ = index.search(query_emb, k)
    hits = [bool(set(g) & {str(doc_ids[r]) for r in row if r >= 0}) for row, g in zip(rows, gold)]
    return float(np.mean(hits))


def dev_recall(parts, snapshot=None) -> float:
    """Dev gold-passage recall@k (k = train.eval_k) of ``parts``' retriever against ``snapshot``, or against a
    fresh in-process encode of the corpus with the current doc encoder (the index a synchronous trainer
    would have)."""
    from openbook.index import IndexConfig, build_index

    dev = [e for e in parts.data.dev if e.gold_ids]
    if not dev:
        return float("nan")
    cfg = parts.cfg
    q = encode_queries(parts.model, parts.tokenizer, [e.question for e in dev], cfg.retriever.query_max_length)
    if snapshot is None:
        emb = encode_rows(parts.model.doc_encoder, parts.tokens, 0, len(parts.tokens), cfg.encode.batch_size)
        return recall_at_k(build_index(emb, IndexConfig()), parts.data.corpus.ids, q, [e.gold_ids for e in dev],
                           cfg.train.eval_k)
    return recall_at_k(snapshot.index, snapshot.doc_ids, q, [e.gold_ids for e in dev], cfg.train.eval_k)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def snapshot_meta(cfg: RecipeConfig, corpus: Corpus) -> dict:
    return {"corpus": corpus.fingerprint, "encoder": cfg.retriever.encoder.source, "recipe": cfg.name}


def encode_and_publish(cfg: RecipeConfig, encoder, tokens: TokenizedCorpus, corpus: Corpus, encoder_step: int,
                       progress: bool = False):
    """Encode every passage in-process and publish a snapshot; returns (snapshot, stats)."""
    from openbook.index import SnapshotStore

    weights_time = time.time()
    t0 = time.perf_counter()
    emb = encode_corpus(encoder, tokens, cfg.encode.batch_size, progress)
    encode_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    snap = SnapshotStore(cfg.snapshot_dir, keep=cfg.snapshots.keep).publish(
        emb, corpus.ids, encoder_step=encoder_step, index_cfg=cfg.index, weights_time=weights_time,
        meta=snapshot_meta(cfg, corpus))
    stats = {"docs": len(tokens), "encode_seconds": encode_s, "docs_per_second": len(tokens) / max(encode_s, 1e-9),
             "publish_seconds": time.perf_counter() - t1}
    return snap, stats


def build_and_publish(cfg: RecipeConfig, model: BiEncoder, tokenizer, data: DataBundle,
                      encoder_step: int = 0, progress: bool = True):
    """Tokenise (cached), encode the corpus with ``model``'s doc encoder and publish a snapshot."""
    set_threads(cfg.encode.threads)
    tokens = tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir))
    return encode_and_publish(cfg, model.doc_encoder, tokens, data.corpus, encoder_step, progress)
