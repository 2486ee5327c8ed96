"""Glue shared by the CLI verbs: encode questions, evaluate retrieval, publish an index in-process."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from openbook.data import Corpus, tokenize_corpus
from openbook.data.bundle import DataBundle
from openbook.index import FaissIndex, IndexConfig
from openbook.index.placement import Part
from openbook.index.shards import merge_topk
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


QUESTION_BLOCK = 256  # dev questions encoded and searched together: the unit the ranks share out


def dev_recall(parts, snapshot=None, part: Part | None = None) -> float:
    """Dev gold-passage recall@k (k = train.eval_k) of ``parts``' retriever against ``snapshot``, or against a
    fresh encode of the corpus with the current doc encoder, searched exactly (the index a synchronous trainer
    would have, without approximate search). With ``part`` (every rank calls; every rank gets the figure) the
    work is shared out: the fresh encode's corpus blocks, or the questions' blocks of a replicated snapshot (a
    sharded one searches every block together). Questions go in blocks of ``QUESTION_BLOCK`` in one order, so
    one process and W ranks find the same. With ``refresh.strategy: rerank`` the recall against ``snapshot`` is
    that of the list the model reads: the k best by live score among the snapshot's top
    ``refresh.rerank_candidates``."""
    dev = [e for e in parts.data.dev if e.gold_ids]
    if not dev:
        return float("nan")
    cfg = parts.cfg
    if snapshot is None:
        q = encode_queries(parts.model, parts.tokenizer, [e.question for e in dev], cfg.retriever.query_max_length)
        rows = fresh_topk(parts.model.doc_encoder, parts.tokens, q, cfg.train.eval_k, cfg.encode.batch_size, part)
        return _hits(rows, dev, parts.data.corpus.ids) / len(dev)
    world, rank = (part.world, part.rank) if part is not None and not snapshot.sharded else (1, 0)
    hits = 0
    for lo in range(rank * QUESTION_BLOCK, len(dev), world * QUESTION_BLOCK):
        block = dev[lo: lo + QUESTION_BLOCK]
        q = encode_queries(parts.model, parts.tokenizer, [e.question for e in block], cfg.retriever.query_max_length)
        hits += _hits(_search(parts, snapshot, q), block, snapshot.doc_ids)
    if world > 1:
        hits = int(part.exchange.all_reduce_sum(np.array([hits], dtype=np.int64))[0])
    return hits / len(dev)


def _search(parts, snapshot, q: np.ndarray) -> np.ndarray:
    """Top-k rows (k = train.eval_k) of ``snapshot`` for ``q``: the model's own list under rerank."""
    k = parts.cfg.train.eval_k
    step = getattr(parts.module, "retrieval", None)
    if step is not None and step.rerank:
        found, _ = snapshot.index.search(q, max(step.rerank, k))
        return step.rerank_rows(torch.from_numpy(q), [[int(r) for r in row if r >= 0] for row in found], k,
                                training=False)
    return snapshot.index.search(q, k)[0]


def _hits(rows: np.ndarray, dev: list, ids) -> int:
    """Questions with a gold passage among their ``rows``."""
    return sum(bool(set(e.gold_ids) & {str(ids[r]) for r in row if r >= 0}) for row, e in zip(rows, dev))


def fresh_topk(encoder, tokens, q: np.ndarray, k: int, batch_size: int, part: Part | None = None) -> np.ndarray:
    """Exact top-k corpus rows [Q, k] of queries ``q`` over the corpus encoded now with ``encoder`` (on its
    device), block by block: no corpus-sized array is ever held. Blocks of ``16 x batch_size`` rows go to the
    ranks of ``part`` in turn (block b to rank b mod W), and the ranks' top-k are gathered and merged: every block
    is encoded as in one process, so one process and W ranks find the same rows."""
    n, block = len(tokens), 16 * batch_size
    world, rank = (part.world, part.rank) if part is not None else (1, 0)
    found = [(np.full((len(q), 0), -1, np.int64), np.zeros((len(q), 0), np.float32))]
    for lo in range(rank * block, n, world * block):
        emb = encode_rows(encoder, tokens, lo, min(lo + block, n), batch_size)
        rows, scores = FaissIndex.build(emb, IndexConfig(device="cpu")).search(q, k)
        found = [merge_topk([*found, (np.where(rows >= 0, rows + lo, -1), scores)], k)]
    rows, scores = found[0]
    if rows.shape[1] < k:  # fewer rows than k here (a rank with no block): pad, so every rank gathers [Q, k]
        pad = k - rows.shape[1]
        rows = np.pad(rows, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    if world > 1:
        rows = np.concatenate(part.exchange.all_gather(np.ascontiguousarray(rows)), axis=1)
        scores = np.concatenate(part.exchange.all_gather(np.ascontiguousarray(scores)), axis=1)
        rows, _ = merge_topk([(rows, scores)], k)
    return rows


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
