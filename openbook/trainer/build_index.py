"""``openbook build-index``: encode a corpus with the run's latest retriever weights (or the recipe's own) and
publish a snapshot stamped with their step."""

from __future__ import annotations

import torch

from openbook.data.bundle import prepare_data
from openbook.models.retriever import build_retriever
from openbook.recipe import RecipeConfig
from openbook.trainer.pipeline import build_and_publish, encode_queries, recall_at_k
from openbook.trainer.weights import INIT, latest_weights, load_into

WEIGHTS = ("latest", "init")


def run_build_index(cfg: RecipeConfig, progress: bool = True, k: int = 10, weights: str = "latest") -> dict:
    """``weights``: ``latest``, the newest of the run's final weights and step checkpoints (the recipe's own if
    it has none), or ``init``, the recipe's own (its seeded init, or ``retriever.init_from``). Returns a
    summary dict (also printed by the CLI) naming the weights used."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    torch.manual_seed(0)
    data = prepare_data(cfg.data, progress=progress)
    model, tokenizer = build_retriever(cfg.retriever)
    used = latest_weights(cfg.run_dir) if weights == "latest" else INIT
    load_into(model, used)
    snap, stats = build_and_publish(cfg, model, tokenizer, data, encoder_step=used.step, progress=progress)
    summary = {"snapshot": str(snap.path), "version": snap.version, "dim": snap.dim,
               "encoder_step": snap.encoder_step, **used.describe(), **stats}
    if data.dev:
        q = encode_queries(model, tokenizer, [e.question for e in data.dev], cfg.retriever.query_max_length)
        summary[f"dev_recall@{k}"] = recall_at_k(snap.index, snap.doc_ids, q, [e.gold_ids for e in data.dev], k)
        summary["dev_questions"] = len(data.dev)
    return summary
