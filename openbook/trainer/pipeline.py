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
    if cfg.corpus is None:
        w = cfg.world
        files = generate_world(w, cache / f"world-n{w.num_passages}-s{w.seed}")
        corpus_path, train_path, dev_path = files.corpus, train_path or files.train, dev_path or files.dev
    else:
        corpus_path = cfg.corpus
    corpus = load_corpus(corpus_path, cache_dir=cache)
    return DataBundle(corpus=corpus, train=load_qa(train_path) if train_path else [],
                      dev=load_qa(dev_path) if dev_path else [])


def doc_batches(tokens: TokenizedCorpus, batch_size: int, start: int = 0, end: int | None = None):
    end = len(tokens) if end is None else end
    for lo in range(start, end, batch_size):
        yield tokens.batch(slice(lo, min(lo + batch_size, end)))


def encode_corpus(model: BiEncoder, tokens: TokenizedCorpus, batch_size: int, progress: bool = True) -> np.ndarray:
    """All doc embeddings [N, d] float32 with the current doc encoder, with a progress bar."""
    n = len(tokens)
    bar = tqdm(total=n, desc="encode", unit="doc", disable=not progress, mininterval=1.0)
    chunks = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        chunks.append(encode_batches(model.doc_encoder, [tokens.batch(slice(lo, hi))]))
        bar.update(hi - lo)
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros((0, model.dim), np.float32)


def encode_queries(model: BiEncoder, tokenizer, questions: list[str], max_length: int,
                   batch_size: int = 256) -> np.ndarray:
    batches = (
        tokenizer(questions[i:i + batch_size], truncation=True, max_length=max_length,
                  padding=True, return_tensors="pt")
        for i in range(0, len(questions), batch_size)
    )
    return encode_batches(model.query_encoder, batches)


def recall_at_k(snapshot, query_emb: np.ndarray, gold: list[list[str]], k: int) -> float:
    """Fraction of questions with a gold passage id among the top-k retrieved."""
    if not gold:
        return float("nan")
    rows, _ = snapshot.search(query_emb, k)
    ids = snapshot.doc_ids
    hits = [bool(set(g) & {str(ids[r]) for r in row if r >= 0}) for row, g in zip(rows, gold)]
    return float(np.mean(hits))


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def build_and_publish(cfg: RecipeConfig, model: BiEncoder, tokenizer, data: DataBundle,
                      encoder_step: int = 0, progress: bool = True):
    """Encode the corpus with ``model``'s doc encoder and publish a snapshot; returns (snapshot, stats)."""
    from openbook.index import SnapshotStore

    set_threads(cfg.encode.threads)
    tokens = tokenize_corpus(data.corpus, tokenizer, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir))
    weights_time = time.time()
    t0 = time.perf_counter()
    emb = encode_corpus(model, tokens, cfg.encode.batch_size, progress)
    encode_s = time.perf_counter() - t0
    store = SnapshotStore(cfg.snapshot_dir, keep=cfg.snapshots.keep)
    t1 = time.perf_counter()
    snap = store.publish(emb, data.corpus.ids, encoder_step=encoder_step, index_cfg=cfg.index,
                         weights_time=weights_time,
                         meta={"corpus": data.corpus.fingerprint, "encoder": cfg.retriever.encoder.source})
    stats = {"docs": len(tokens), "encode_seconds": encode_s, "docs_per_second": len(tokens) / max(encode_s, 1e-9),
             "publish_seconds": time.perf_counter() - t1}
    return snap, stats
