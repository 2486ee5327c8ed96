"""The one retrieval step every module takes: search the snapshot in use, leave out what must not be
retrieved (a query's own passage), and score the candidates with the live encoders.

Candidates come from the (stale) index; their scores are recomputed with the *current* towers, so
gradients reach the query and the doc encoder alike (REALM, RAG end to end, ANCE-style negatives). With
a frozen doc tower the snapshot's own embeddings give the scores (original RAG), and only the query
tower gets gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from openbook.data.tokcache import TokenizedCorpus
from openbook.errors import SnapshotError
from openbook.index import IndexHolder, IndexSnapshot
from openbook.models.retriever import BiEncoder


@dataclass
class Retrieved:
    rows: np.ndarray  # [B, K] corpus rows, best first (a null document, if asked for, is not among them)
    scores: torch.Tensor  # [B, K'] query-passage scores, K' = K (+1 with a null document, first)
    docs: dict[str, torch.Tensor]  # their token batch [B*K', L], in the scores' order


def gold_recall(rows: np.ndarray, gold: np.ndarray, k: int) -> float:
    """Fraction of questions (with a known gold row, >= 0) whose gold passage is in the top-k."""
    known = gold >= 0
    if not known.any():
        return float("nan")
    return float(np.mean([g in r[:k] for g, r in zip(gold[known], rows[known])]))


def exclude(rows: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` rows per query without the query's own passage (REALM's trivial retrieval: a masked
    sentence would otherwise retrieve its own document). ``rows`` needs >= k+1 columns."""
    out = np.empty((len(rows), k), dtype=np.int64)
    for i, (row, src) in enumerate(zip(rows, own)):
        kept = [r for r in row if r != src and r >= 0][:k]
        if len(kept) < k:
            raise ValueError(f"only {len(kept)} candidates left for query {i} after excluding its own passage")
        out[i] = kept
    return out


class RetrievalStep:
    """``live``: score candidates with the current doc tower (it trains); else with the snapshot's embeddings."""

    def __init__(self, retriever: BiEncoder, tokens: TokenizedCorpus, holder: IndexHolder, live: bool):
        self.retriever, self.tokens, self.holder, self.live = retriever, tokens, holder, live

    def snapshot(self, dim: int) -> IndexSnapshot:
        """The snapshot in use: one reference for the whole step, even if a swap happens meanwhile."""
        snap = self.holder.get()
        if snap.dim != dim:
            raise SnapshotError(f"{snap.path}: snapshot dim {snap.dim} does not match the query encoder's {dim} "
                                "(built by another retriever config?)")
        return snap

    def search(self, snap: IndexSnapshot, q: torch.Tensor, k: int, own: np.ndarray | None = None) -> np.ndarray:
        """Top-k corpus rows [B, k] (a CPU index search, outside autograd), ``own[b]`` left out."""
        rows, _ = snap.search(q.detach().float().cpu().numpy(), k if own is None else k + 1)
        return rows if own is None else exclude(rows, own, k)

    def score(self, snap: IndexSnapshot, q: torch.Tensor, rows: np.ndarray,
              docs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores [B, K] of the passages ``rows`` (or of the token batch ``docs``, K per query) for queries ``q``."""
        docs = docs if docs is not None else self.tokens.batch(rows.reshape(-1))
        if self.live:
            d = self.retriever.encode_docs({key: v.to(q.device) for key, v in docs.items()})
            return self.retriever.score(q, d.view(len(q), -1, d.shape[-1])), docs
        if docs["input_ids"].shape[0] != rows.size:
            raise ValueError("scores from the snapshot exist for retrieved passages only (no null document)")
        emb = torch.from_numpy(snap.vectors(rows.reshape(-1)))
        return torch.einsum("bd,bkd->bk", q, emb.to(q.device).view(*rows.shape, -1)), docs

    def __call__(self, q: torch.Tensor, k: int, own: np.ndarray | None = None,
                 null_doc: dict[str, torch.Tensor] | None = None) -> Retrieved:
        """Search, leave ``own`` out, score. ``null_doc`` (one passage's tokens) goes first for every query."""
        snap = self.snapshot(q.shape[-1])
        rows = self.search(snap, q, k, own)
        docs = self.tokens.batch(rows.reshape(-1))
        if null_doc is not None:
            docs = prepend(null_doc, docs, len(rows))
        scores, docs = self.score(snap, q, rows, docs)
        return Retrieved(rows, scores, docs)


def prepend(first: dict[str, torch.Tensor], docs: dict[str, torch.Tensor], queries: int) -> dict[str, torch.Tensor]:
    """``first`` (one passage, [1, L0]) ahead of each query's K passages in a [B*K, L] token batch."""
    width = max(docs["input_ids"].shape[1], first["input_ids"].shape[1])
    out = {}
    for key in ("input_ids", "attention_mask"):
        d = torch.nn.functional.pad(docs[key], (0, width - docs[key].shape[1]), value=0).view(queries, -1, width)
        f = torch.nn.functional.pad(first[key], (0, width - first[key].shape[1]), value=0)[None].expand(queries, 1, width)
        out[key] = torch.cat([f, d], 1).reshape(-1, width)
    return out
