"""``openbook build-index``: encode a corpus with the configured retriever and publish a snapshot."""

from __future__ import annotations

import torch

from openbook.data.bundle import prepare_data
from openbook.models.retriever import build_retriever
from openbook.recipe import RecipeConfig
from openbook.trainer.pipeline import build_and_publish, encode_queries, recall_at_k


def run_build_index(cfg: RecipeConfig, progress: bool = True, k: int = 10) -> dict:
    """Returns a summary dict (also printed by the CLI)."""
    torch.manual_seed(0)
    data = prepare_data(cfg.data, progress=progress)
    model, tokenizer = build_retriever(cfg.retriever)
    snap, stats = build_and_publish(cfg, model, tokenizer, data, encoder_step=0, progress=progress)
    summary = {"snapshot": str(snap.path), "version": snap.version, "dim": snap.dim, **stats}
    if data.dev:
        q = encode_queries(model, tokenizer, [e.question for e in data.dev], cfg.retriever.query_max_length)
        summary[f"dev_recall@{k}"] = recall_at_k(snap.index, snap.doc_ids, q, [e.gold_ids for e in data.dev], k)
        summary["dev_questions"] = len(data.dev)
    return summary
