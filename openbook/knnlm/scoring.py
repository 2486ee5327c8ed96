"""kNN-LM scoring (Khandelwal et al. 2020), in log space and float64:

    p_kNN(w) = sum over neighbours j with value w of softmax(-d_j / T)
    log p(w) = logaddexp(log(1 - λ) + log p_LM(w), log λ + log p_kNN(w))

d_j is the squared L2 distance from the query key to neighbour j's key: recomputed exactly from the
stored keys, or the index's own (approximate for PQ). A neighbour slot the index could not fill
(id -1) has d = inf and weight 0; no neighbour with value w gives log p_kNN(w) = -inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from openbook.knnlm.datastore import Datastore
from openbook.progress import Progress


def _weights(dists: np.ndarray, temperature: float) -> torch.Tensor:
    """log softmax(-d / T) over the neighbours, float64 [Q, k]."""
    return torch.log_softmax(-torch.as_tensor(dists, dtype=torch.float64) / temperature, dim=-1)


def knn_log_prob(dists: np.ndarray, values: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """log p_kNN(target) per query: dists/values [Q, k], targets [Q] -> float64 [Q]."""
    logw = _weights(dists, temperature)
    hit = torch.as_tensor(values, dtype=torch.int64) == torch.as_tensor(targets, dtype=torch.int64)[:, None]
    return torch.logsumexp(logw.masked_fill(~hit, -math.inf), dim=-1).numpy()


def knn_distribution(dists: np.ndarray, values: np.ndarray, vocab_size: int, temperature: float = 1.0) -> np.ndarray:
    """The whole p_kNN over the vocabulary, float64 [Q, V] (rows sum to 1)."""
    w = _weights(dists, temperature).exp()
    v = torch.as_tensor(values, dtype=torch.int64).clamp(min=0)  # -1 slots carry weight 0
    return torch.zeros(w.shape[0], vocab_size, dtype=torch.float64).scatter_add_(1, v, w).numpy()


def interpolate(lm_logp: np.ndarray, knn_logp: np.ndarray, lmbda: float) -> np.ndarray:
    """log((1 - λ) p_LM + λ p_kNN); with λ = 0 this is exactly lm_logp (logaddexp(x, -inf) = x)."""
    with np.errstate(divide="ignore"):  # log(0) = -inf is meant
        return np.logaddexp(np.log1p(-lmbda) + lm_logp, np.log(lmbda) + knn_logp)


def perplexity(logp: np.ndarray) -> float:
    return float(np.exp(-np.mean(logp)))


def neighbours(store: Datastore, queries: np.ndarray, k: int, recompute: bool, batch_size: int = 4096,
               progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(distances float64 [Q, k] sorted ascending, neighbour values int64 [Q, k]; -1 = no neighbour);
    ``progress`` counts the queries searched."""
    dists, vals = [], []
    for lo in range(0, len(queries), batch_size):
        q = queries[lo:lo + batch_size]
        d, ids = store.search(q, k)
        d = exact_sq_l2(q, store.keys, ids) if recompute else np.where(ids >= 0, d.astype(np.float64), np.inf)
        order = np.argsort(d, axis=1, kind="stable")
        d, ids = np.take_along_axis(d, order, 1), np.take_along_axis(ids, order, 1)
        dists.append(d)
        vals.append(np.where(ids >= 0, np.asarray(store.values)[np.where(ids >= 0, ids, 0)], -1).astype(np.int64))
        if progress is not None:
            progress.update(len(q))
    return np.concatenate(dists), np.concatenate(vals)


@dataclass(frozen=True)
class Scored:
    """What evaluating a stream yields; any (k' <= k, T, λ) is then cheap to score."""

    lm_logp: np.ndarray  # float64 [P]
    targets: np.ndarray  # int64 [P]
    dists: np.ndarray  # float64 [P, k]
    values: np.ndarray  # int64 [P, k]

    def knnlm_logp(self, k: int, temperature: float, lmbda: float) -> np.ndarray:
        knn = knn_log_prob(self.dists[:, :k], self.values[:, :k], self.targets, temperature)
        return interpolate(self.lm_logp, knn, lmbda)

    def ppl(self, k: int, temperature: float, lmbda: float) -> float:
        return perplexity(self.knnlm_logp(k, temperature, lmbda))


def exact_sq_l2(queries: np.ndarray, keys: np.ndarray, ids: np.ndarray, budget: int = 1 << 22) -> np.ndarray:
    """Squared L2 from each query [Q, d] to its neighbours' stored keys (ids [Q, k]), float64 [Q, k].
    Gathered in chunks of <= ``budget`` values (32 MB), whatever k and Q are."""
    out = np.empty(ids.shape, dtype=np.float64)
    step = max(1, budget // max(1, ids.shape[1] * keys.shape[1]))
    for lo in range(0, len(ids), step):
        rows = ids[lo:lo + step]
        neigh = np.asarray(keys[np.where(rows >= 0, rows, 0).ravel()], dtype=np.float64).reshape(*rows.shape, -1)
        q = np.asarray(queries[lo:lo + step], dtype=np.float64)[:, None, :]
        out[lo:lo + step] = np.where(rows >= 0, ((neigh - q) ** 2).sum(-1), np.inf)
    return out
