"""The kNN-LM demo end to end: train the LM on the training text, build the datastore from that text
with the Ray pool, and compare held-out perplexity of the LM alone and of the kNN-LM."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from openbook.knnlm.build import build_sharded
from openbook.knnlm.config import KnnLMConfig, LMConfig
from openbook.knnlm.datastore import Datastore
from openbook.knnlm.model import build_lm, encode, windows
from openbook.knnlm.scoring import Scored, neighbours, perplexity
from openbook.knnlm.text import TextData, load_text
from openbook.knnlm.train import train_lm
from openbook.progress import Progress

log = logging.getLogger(__name__)
CHUNK_BATCHES = 16  # forward batches between progress updates while evaluating


@dataclass
class Demo:
    cfg: KnnLMConfig
    text: TextData
    model: nn.Module
    store: Datastore
    lm_train: dict  # steps, seconds, final_loss
    build_seconds: float


def train_and_build(cfg: KnnLMConfig, paragraphs: tuple[list[str], list[str], list[str]] | None = None,
                    progress: bool = False) -> Demo:
    """``paragraphs``: the Python API's own (train, valid, test) texts instead of ``cfg.text``'s source;
    ``progress``: a bar for the datastore build (its progress is logged regardless)."""
    text = load_text(cfg.text, lm_tokenizer(cfg.lm), compact=cfg.lm.source == "tiny", paragraphs=paragraphs)
    log.info("%s text: %d train / %d valid / %d test tokens, vocab %d", cfg.text.source, len(text.train),
             len(text.valid), len(text.test), text.vocab_size)
    model = build_lm(cfg.lm, text.vocab_size)
    lm_train = (train_lm(model, text.train, cfg.lm, cfg.train) if cfg.train.steps > 0
                else {"steps": 0, "seconds": 0.0, "final_loss": float("nan")})
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), Path(cfg.run_dir) / "lm.pt")
    t0 = time.perf_counter()
    meta = {"lm": asdict(cfg.lm), "stride": cfg.datastore.stride, "vocab_size": text.vocab_size}
    store = build_sharded(cfg.datastore_dir, model, text.train, cfg.lm, cfg.datastore, meta, progress)
    return Demo(cfg, text, model, store, lm_train, time.perf_counter() - t0)


def score_stream(model: nn.Module, tokens: np.ndarray, store: Datastore, cfg: KnnLMConfig,
                 k: int | None = None, recompute: bool | None = None, progress: bool = False,
                 what: str = "evaluate") -> Scored:
    """LM log-probs and the k nearest neighbours of every prediction in ``tokens`` (same windows as
    the datastore: block_size and stride from ``cfg``). Windows encoded and tokens searched are logged
    as ``what`` (a bar too with ``progress``)."""
    wins = windows(len(tokens), cfg.lm.block_size, cfg.datastore.stride)
    keys, lm_logp = encode_windows(model, tokens, wins, cfg.datastore.batch_size, what, progress)
    recompute = cfg.knn.recompute_distances if recompute is None else recompute
    with Progress(log, f"{what}: search", len(keys), "token", bar=progress) as prog:
        dists, vals = neighbours(store, keys, k or cfg.knn.k, recompute, cfg.knn.batch_size, prog)
    return Scored(lm_logp, np.asarray(tokens[1:], dtype=np.int64), dists, vals)


def encode_windows(model: nn.Module, tokens: np.ndarray, wins: np.ndarray, batch_size: int, what: str,
                   bar: bool) -> tuple[np.ndarray, np.ndarray]:
    """``encode`` in chunks of whole batches (the same forward batches, so the same numbers), counting
    windows done and tokens per second."""
    step = batch_size * CHUNK_BATCHES
    chunks = [wins[lo:lo + step] for lo in range(0, len(wins), step)] or [wins]
    keys, logps = [], []
    with Progress(log, f"{what}: encode", len(wins), "window", rate_unit="token", bar=bar) as prog:
        for chunk in chunks:
            k, lp = encode(model, tokens, chunk, batch_size)
            keys.append(k)
            logps.append(lp)
            prog.update(len(chunk), len(lp))
    return np.concatenate(keys), np.concatenate(logps)


def lm_tokenizer(cfg: LMConfig):
    """The tiny LM's MiniLM WordPiece (compacted later), or the LM directory's own tokenizer."""
    if cfg.source == "tiny":
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.source)


def run_knnlm(cfg: KnnLMConfig, paragraphs: tuple[list[str], list[str], list[str]] | None = None,
              progress: bool = False) -> dict:
    """The demo's JSON summary (also written to <run_dir>/knnlm_summary.json); ``progress``: bars for the
    datastore build and the evaluation (their progress is logged regardless)."""
    demo = train_and_build(cfg, paragraphs, progress)
    kn = cfg.knn
    summary: dict = {"train_tokens": len(demo.text.train), "vocab_size": demo.text.vocab_size,
                     "datastore_size": len(demo.store), "datastore_factory": cfg.datastore.factory,
                     "k": kn.k, "lambda": kn.lmbda, "temperature": kn.temperature,
                     "recompute_distances": kn.recompute_distances, "lm_train_seconds": demo.lm_train["seconds"],
                     "datastore_build_seconds": demo.build_seconds}
    for split in ("valid", "test"):
        scored = score_stream(demo.model, getattr(demo.text, split), demo.store, cfg, progress=progress,
                              what=f"evaluate {split}")
        summary[f"{split}_tokens"] = len(scored.targets)
        summary[f"{split}_ppl_lm"] = perplexity(scored.lm_logp)
        summary[f"{split}_ppl_knnlm"] = scored.ppl(kn.k, kn.temperature, kn.lmbda)
    (Path(cfg.run_dir) / "knnlm_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
