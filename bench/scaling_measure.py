"""Measurements of the scaling benchmark: re-encodes through the real refresher, FAISS builds."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import ROOT
from openbook.config import from_dict
from openbook.recipe import RecipeConfig

CACHE = ROOT / ".openbook_cache"  # generated worlds and token caches are reused across runs


def recipe(tmp: Path, passages: int, encoder: str, workers: int, cache: Path = CACHE) -> RecipeConfig:
    return from_dict(RecipeConfig, {
        "name": "scaling", "run_dir": str(tmp / f"{encoder}-{passages}-{workers}"),
        "data": {"world": {"num_passages": passages, "seed": 0}, "cache_dir": str(cache)},
        "retriever": {"encoder": {"source": encoder}, "pooling": "mean", "doc_max_length": 48},
        "snapshots": {"keep": 2},
        "encode": {"batch_size": 256, "threads": 1},
        "refresh": {"num_workers": workers, "cpus_per_worker": 1},
        "index": {"shards": 0}})


@dataclass
class Corpus:
    cfg: RecipeConfig
    model: object
    tokenizer: object
    tokens: object
    doc_ids: np.ndarray
    prepare_seconds: float


def prepare(cfg: RecipeConfig) -> Corpus:
    """The world and its token cache (generated once, then read from the cache) and an untrained encoder."""
    from openbook.data import tokenize_corpus
    from openbook.data.bundle import prepare_data
    from openbook.models.retriever import build_retriever

    t0 = time.perf_counter()
    data = prepare_data(cfg.data)
    model, tok = build_retriever(cfg.retriever)
    tokens = tokenize_corpus(data.corpus, tok, cfg.retriever.doc_max_length, Path(cfg.data.cache_dir))
    return Corpus(cfg, model, tok, tokens, data.corpus.ids, time.perf_counter() - t0)


def reencode(c: Corpus, warmup: bool) -> dict:
    """One full refresh through the actor pool: encode rate, and submit → published (index build included)."""
    from openbook.refresher.coordinator import IndexTarget, RefreshCoordinator
    from openbook.refresher.encode import numpy_state

    cfg = c.cfg
    target = IndexTarget(cfg.snapshot_dir, cfg.index, cfg.snapshots.keep, {})
    coord = RefreshCoordinator(cfg.refresh, cfg.encode, c.model.doc_tower_spec(), c.tokens, c.doc_ids, target).start()
    try:
        state = numpy_state(c.model.doc_encoder)
        if warmup:  # the actors build the encoder and map the token cache once
            coord.submit(state, 0)
            coord.wait()
        coord.submit(state, 1)
        res = coord.wait()
    finally:
        coord.shutdown()
    return {"docs/s": res.docs_per_second, "encode s": res.encode_seconds, "refresh s": res.duration,
            "snapshot": res.path}


def ivf_lists(n: int) -> int:
    """About 4 sqrt(n) inverted lists, a power of two (the usual rule of thumb)."""
    return 2 ** max(4, round(math.log2(4 * math.sqrt(n))))


def factories(n: int) -> list[str]:
    nlist = ivf_lists(n)
    return ["Flat", f"IVF{nlist},Flat", "HNSW32", f"IVF{nlist},PQ16"]


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def index_build(emb: np.ndarray, factory: str) -> dict:
    """Build time, serialized size and resident-memory growth of one index over ``emb``."""
    import faiss

    from openbook.index import IndexConfig, build_index

    before = rss_bytes()
    t0 = time.perf_counter()
    index = build_index(emb, IndexConfig(factory=factory)).cpu
    seconds = time.perf_counter() - t0
    grown = rss_bytes() - before
    size = int(faiss.serialize_index(index).size)
    del index
    return {"index": factory, "passages": len(emb), "build s": seconds, "serialized MB": size / 1e6,
            "bytes/vector": size / len(emb), "RSS growth MB": grown / 1e6}


def load_embeddings(snapshot: str) -> np.ndarray:
    """All rows of a published snapshot (format 1 or its shards, in row order) as float32."""
    from openbook.index import IndexSnapshot

    return np.asarray(IndexSnapshot.load(snapshot, verify=False).embeddings, dtype=np.float32)


def encoder_shape(model) -> tuple[int, int]:
    conf = model.doc_encoder.transformer.config
    return conf.num_hidden_layers, conf.hidden_size
