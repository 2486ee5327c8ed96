"""Dense-retrieval training with hard negatives from the (stale) index — the ANCE/REALM pattern.

Candidates come from the snapshot in use (the gold passage first, then the top non-gold ones as hard
negatives); their scores are recomputed with the *current* towers by the shared retrieval step, so
gradients reach both the query and the doc encoder and the index drifts out of date — which is what
the asynchronous refresh repairs. With ``refresh.strategy: rerank`` the hard negatives (and the logged
recall@k) come from the live doc encoder's best among the index's top ``refresh.rerank_candidates``.
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.nn import functional as F

from openbook.models.retriever import BiEncoder
from openbook.trainer.common import configure_adamw
from openbook.trainer.config import TrainConfig
from openbook.trainer.retrieval import RetrievalStep, gold_recall, rerank_metrics
from openbook.trainer.spec import ModelSpec, Shared, freeze, retrieval_step


def candidates(retrieved: np.ndarray, gold: np.ndarray, n: int, own: np.ndarray | None = None) -> np.ndarray:
    """[B, 1+n] rows: the gold passage first, then the question's own hard negatives (``own`` [B, H], -1 =
    none: DPR's hard_negative_ctxs), then the top retrieved non-gold passages (padded with more retrieved
    rows if the index returned too few)."""
    out = np.empty((len(gold), 1 + n), dtype=np.int64)
    for i, (row, g) in enumerate(zip(retrieved, gold)):
        first = [int(r) for r in (own[i] if own is not None else []) if r >= 0 and r != g]
        negs = (first + [r for r in row if r != g and r >= 0 and r not in first])[:n]
        while len(negs) < n:  # tiny corpora only: repeat rather than fail
            negs.append(negs[-1] if negs else (g + 1) % max(1, retrieved.max() + 1))
        out[i, 0], out[i, 1:] = g, negs
    return out


class DenseRetrievalModule(pl.LightningModule):
    def __init__(self, retriever: BiEncoder, retrieval: RetrievalStep, cfg: TrainConfig):
        super().__init__()
        self.retriever, self.cfg, self.retrieval = retriever, cfg, retrieval

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        q = self.retriever.encode_queries(batch["query"])
        snap = self.retrieval.snapshot(q.shape[-1])
        rows = self.retrieval.search(snap, q, max(self.cfg.negatives + 1, self.cfg.eval_k))
        gold = batch["gold_row"].cpu().numpy()
        own = batch["hard_rows"].cpu().numpy() if "hard_rows" in batch else None
        cand = candidates(rows, gold, self.cfg.negatives, own)
        scores, _ = self.retrieval.score(snap, q, cand)  # live: the doc tower trains (ANCE/REALM)
        loss = F.cross_entropy(scores, torch.zeros(len(gold), dtype=torch.long, device=self.device))
        self.log_dict({"train/loss": loss.detach(), f"train/recall@{self.cfg.eval_k}": gold_recall(rows, gold, self.cfg.eval_k),
                       **rerank_metrics(self.retrieval)},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=len(gold))
        return loss

    def configure_optimizers(self):
        return configure_adamw(self, self.cfg)


class DenseRetrievalSpec(ModelSpec):
    def build(self, s: Shared) -> DenseRetrievalModule:
        module = DenseRetrievalModule(s.model, retrieval_step(s, live=True), s.cfg.train)
        freeze(s.model, s.cfg)
        return module

    def needs_gold(self, cfg) -> bool:
        return True  # the gold passage is the positive
