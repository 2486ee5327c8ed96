"""Pieces shared by the LightningModules: retrieval from the snapshot in use, optimiser, checks."""

from __future__ import annotations

import numpy as np
import torch

from openbook.errors import SnapshotError
from openbook.index import IndexSnapshot
from openbook.trainer.config import TrainConfig


def check_dim(snapshot: IndexSnapshot, query_dim: int) -> None:
    if snapshot.dim != query_dim:
        raise SnapshotError(f"{snapshot.path}: snapshot dim {snapshot.dim} does not match the query encoder's "
                            f"{query_dim} (built by another retriever config?)")


def retrieve(snapshot: IndexSnapshot, q: torch.Tensor, k: int) -> np.ndarray:
    """Top-k corpus rows [B, k] for query embeddings (a CPU FAISS search, outside autograd)."""
    check_dim(snapshot, q.shape[-1])
    rows, _ = snapshot.search(q.detach().float().cpu().numpy(), k)
    return rows


def snapshot_doc_scores(snapshot: IndexSnapshot, q: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Scores against the snapshot's stored (frozen) doc embeddings: gradients reach the query tower only."""
    emb = torch.from_numpy(np.asarray(snapshot.embeddings[rows.reshape(-1)], dtype=np.float32))
    return torch.einsum("bd,bkd->bk", q, emb.to(q.device).view(*rows.shape, -1))


def gold_recall(rows: np.ndarray, gold: np.ndarray, k: int) -> float:
    """Fraction of questions (with a known gold row, >= 0) whose gold passage is in the top-k."""
    known = gold >= 0
    if not known.any():
        return float("nan")
    return float(np.mean([g in r[:k] for g, r in zip(gold[known], rows[known])]))


def configure_adamw(module: torch.nn.Module, cfg: TrainConfig, lr_scale: dict[str, float] | None = None):
    """AdamW with linear warm-up; ``lr_scale`` maps a parameter-name prefix to a learning-rate multiplier."""
    groups: dict[float, list] = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = next((v for k, v in (lr_scale or {}).items() if name.startswith(k)), 1.0)
            groups.setdefault(scale, []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "lr": cfg.lr * s} for s, ps in groups.items()], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
