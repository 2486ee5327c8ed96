"""FAISS over kNN-LM keys with the L2 metric (``openbook.index`` builds inner-product indexes only):
squared L2 distances are what p_kNN = softmax(-d / T) is defined on."""

from __future__ import annotations

import faiss
import numpy as np

from openbook.errors import ConfigError, SnapshotError
from openbook.index.faiss_index import _clamp_ivf_lists, _layers, one_line


def build_l2_index(keys: np.ndarray, factory: str, train_size: int, seed: int = 0,
                   chunk: int = 65_536) -> faiss.Index:
    """A trained, filled CPU index (label i = row i); IVF/PQ train on a seeded sample of <= train_size rows."""
    n, d = keys.shape
    if n == 0:
        raise SnapshotError("datastore: no keys to index")
    spec = _clamp_ivf_lists(factory, min(n, train_size))
    try:
        index = faiss.index_factory(d, spec, faiss.METRIC_L2)
    except RuntimeError as e:
        raise ConfigError(f"datastore.factory {factory!r} is invalid for dim {d}: {one_line(e)}") from None
    for layer in _layers(index):  # polysemous training (PQ's default) costs ~10x and is never used
        if hasattr(layer, "do_polysemous_training"):
            layer.do_polysemous_training = False
    if not index.is_trained:
        rows = np.arange(n) if n <= train_size else np.sort(
            np.random.default_rng(seed).choice(n, size=train_size, replace=False))
        try:
            index.train(np.ascontiguousarray(keys[rows], dtype=np.float32))
        except RuntimeError as e:
            raise SnapshotError(f"datastore index {spec!r}: training failed: {one_line(e)}") from None
    for lo in range(0, n, chunk):
        index.add(np.ascontiguousarray(keys[lo:lo + chunk], dtype=np.float32))
    return index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set nprobe where the index has IVF lists (a no-op for Flat/HNSW)."""
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:
        pass


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
