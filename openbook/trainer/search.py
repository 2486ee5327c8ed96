"""``openbook search``: ask the newest valid snapshot of a recipe a question."""

from __future__ import annotations

from pathlib import Path

import torch

from openbook.data.bundle import prepare_data
from openbook.errors import SnapshotError
from openbook.models.retriever import build_retriever
from openbook.recipe import load_recipe
from openbook.trainer.pipeline import encode_queries


def run_search(config: str, overrides: list[str], query: str, k: int) -> list[str]:
    from openbook.index import SnapshotStore

    cfg = load_recipe(config, overrides)
    snap = SnapshotStore(cfg.snapshot_dir, keep=cfg.snapshots.keep, index_cfg=cfg.index).latest()  # the recipe's nprobe etc.
    if snap is None:
        raise SnapshotError(f"{cfg.snapshot_dir}: no valid snapshot; run `openbook build-index --config {config}`")
    model, tokenizer = build_retriever(cfg.retriever)
    weights = Path(cfg.run_dir) / "retriever.pt"  # written by `openbook train`
    if weights.is_file():
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    # else: the seeded init reproduces the encoder that built a `build-index` snapshot
    corpus = prepare_data(cfg.data).corpus
    q = encode_queries(model, tokenizer, [query], cfg.retriever.query_max_length)
    rows, scores = snap.search(q, k)
    lines = [f"snapshot v{snap.version} (encoder_step {snap.encoder_step}, {snap.count} docs)"]
    for r, s in zip(rows[0], scores[0]):
        if r < 0:
            continue
        doc = corpus[int(r)]
        lines.append(f"{s:9.3f}  {doc['id']}  {doc['title']}: {doc['text']}")
    return lines
