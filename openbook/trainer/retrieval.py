"""The one retrieval step every module takes: search the snapshot in use, leave out what must not be
retrieved (a query's own passage), and score the candidates with the live encoders.

Candidates come from the (stale) index; their scores are recomputed with the *current* towers, so
gradients reach the query and the doc encoder alike (REALM, RAG end to end, ANCE-style negatives). With
a frozen doc tower the snapshot's own embeddings give the scores (original RAG), and only the query
tower gets gradients.

Which k passages a query gets is, by default, the stale index's choice (its top k). With ``rerank`` = K'
(``refresh.strategy: rerank``) the index gives K' > k candidates, the live doc encoder encodes them (no
gradient, eval mode) and the k best by live score (float64 inner products, ties to the index's order)
are kept and scored with gradient as before: the live encoder chooses, at K' extra doc-encoder passes per
query. Validation goes through the same step, so dev recall@k of a rerank run is that of the reranked list.
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


def recall_each(rows: np.ndarray, gold: np.ndarray, k: int) -> np.ndarray:
    """Per question: 1.0 if its gold row is in its top-k, 0.0 if not, NaN without a known gold row (< 0)."""
    return np.array([float(g in r[:k]) if g >= 0 else np.nan for g, r in zip(gold, rows)])


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


def candidates_left(rows: np.ndarray, own: np.ndarray | None) -> list[list[int]]:
    """Each query's candidate rows in index order, without padding (-1) and without its ``own`` passage."""
    return [[int(r) for r in row if r >= 0 and (own is None or r != own[i])] for i, row in enumerate(rows)]


class RetrievalStep:
    """``live``: score candidates with the current doc tower (it trains); else with the snapshot's embeddings.
    ``rerank`` = K' > 0: choose the k among the index's top K' by live score (module docstring).
    ``rerank_encoded``: passages encoded for reranking in training steps (the retriever in train mode), since
    the start of this process; ``rerank_encoded_all`` counts validation's too."""

    def __init__(self, retriever: BiEncoder, tokens: TokenizedCorpus, holder: IndexHolder, live: bool,
                 rerank: int = 0, chunk: int = 256):
        self.retriever, self.tokens, self.holder, self.live = retriever, tokens, holder, live
        self.rerank, self.chunk = rerank, chunk
        self.rerank_encoded = self.rerank_encoded_all = 0

    def snapshot(self, dim: int) -> IndexSnapshot:
        """The snapshot in use: one reference for the whole step, even if a swap happens meanwhile."""
        snap = self.holder.get()
        if snap.dim != dim:
            raise SnapshotError(f"{snap.path}: snapshot dim {snap.dim} does not match the query encoder's {dim} "
                                "(built by another retriever config?)")
        return snap

    def search(self, snap: IndexSnapshot, q: torch.Tensor, k: int, own: np.ndarray | None = None) -> np.ndarray:
        """Top-k corpus rows [B, k] (a CPU index search, outside autograd), ``own[b]`` left out; with ``rerank``
        the k best by live score among the index's top K' (``own`` left out of those)."""
        if self.rerank:
            rows, _ = snap.search(q.detach().float().cpu().numpy(), self.rerank if own is None else self.rerank + 1)
            return self.rerank_rows(q, [c[: self.rerank] for c in candidates_left(rows, own)], k)
        rows, _ = snap.search(q.detach().float().cpu().numpy(), k if own is None else k + 1)
        return rows if own is None else exclude(rows, own, k)

    @torch.no_grad()
    def rerank_rows(self, q: torch.Tensor, cands: list[list[int]], k: int, training: bool | None = None) -> np.ndarray:
        """[B, k]: per query the ``k`` of ``cands`` (rows in index order) with the highest live score: the doc
        encoder in eval mode, no gradient, float64 inner products; ties keep the index's order. ``training``
        (default: the retriever's mode) says whether the passages count in ``rerank_encoded``."""
        if any(len(c) < k for c in cands):
            raise ValueError(f"rerank: only {min(map(len, cands))} candidates for a query, {k} are read")
        flat = np.array([r for c in cands for r in c], dtype=np.int64)
        enc = self.retriever.doc_encoder
        device, was = next(enc.parameters()).device, enc.training
        enc.eval()
        try:
            parts = []
            for lo in range(0, len(flat), self.chunk):
                docs = self.tokens.batch(flat[lo: lo + self.chunk])
                parts.append(self.retriever.encode_docs({key: v.to(device) for key, v in docs.items()}).double())
        finally:
            enc.train(was)
        d = torch.cat(parts).cpu().numpy()
        qs = q.detach().double().cpu().numpy()
        out, at = np.empty((len(cands), k), dtype=np.int64), 0
        for i, c in enumerate(cands):
            live = d[at: at + len(c)] @ qs[i]
            out[i] = np.asarray(c)[np.argsort(-live, kind="stable")[:k]]
            at += len(c)
        self.rerank_encoded_all += len(flat)
        if self.retriever.training if training is None else training:
            self.rerank_encoded += len(flat)
        return out

    def score(self, snap: IndexSnapshot, q: torch.Tensor, rows: np.ndarray,
              docs: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores [B, K] of the passages ``rows`` (or of the token batch ``docs``, K per query) for queries ``q``."""
        docs = docs if docs is not None else self.tokens.batch(rows.reshape(-1))
        if self.live:
            d = self.retriever.encode_docs({key: v.to(q.device) for key, v in docs.items()})
            return self.retriever.score(q, d.view(len(q), -1, d.shape[-1])), docs
        if docs["input_ids"].shape[0] != rows.size:
            raise ValueError("scores from the snapshot exist for retrieved passages only (no null document)")
        emb = torch.from_numpy(snap.vectors(rows.reshape(-1))).to(q.device, q.dtype)  # bf16-true: the towers' dtype
        return torch.einsum("bd,bkd->bk", q, emb.view(*rows.shape, -1)), docs

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


def rerank_metrics(step: RetrievalStep) -> dict[str, float]:
    """``retrieval/rerank_encoded``: passages encoded live for reranking in training steps so far (cumulative, this
    rank; per step it is batch x K'); nothing without rerank."""
    return {"retrieval/rerank_encoded": float(step.rerank_encoded)} if step.rerank else {}


def prepend(first: dict[str, torch.Tensor], docs: dict[str, torch.Tensor], queries: int) -> dict[str, torch.Tensor]:
    """``first`` (one passage, [1, L0]) ahead of each query's K passages in a [B*K, L] token batch."""
    width = max(docs["input_ids"].shape[1], first["input_ids"].shape[1])
    out = {}
    for key in ("input_ids", "attention_mask"):
        d = torch.nn.functional.pad(docs[key], (0, width - docs[key].shape[1]), value=0).view(queries, -1, width)
        f = torch.nn.functional.pad(first[key], (0, width - first[key].shape[1]), value=0)[None].expand(queries, 1, width)
        out[key] = torch.cat([f, d], 1).reshape(-1, width)
    return out
