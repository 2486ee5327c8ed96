"""The FAISS backend: :class:`FaissIndex` builds an index from an ``index_factory`` string (inner product or
L2), adds, searches, saves and loads, and picks CPU or GPU. The only module of openbook that imports faiss.

Indexes are always *built and stored* on CPU; with ``device`` auto/gpu a copy on the process's own GPU
(``gpu_device``) does the searching. Only searchers copy: shard writers, publishers and their checks stay on CPU. Retrieval scores are dot products (normalise embeddings upstream for cosine); kNN-LM keys
use squared L2 distances.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from openbook.errors import OpenbookError

try:
    import faiss
except ImportError:  # neither extra installed (both wheels provide `faiss`, so neither is required by default)
    raise OpenbookError("FAISS is not installed: pip install 'openbook[cpu]' (faiss-cpu), or 'openbook[gpu]' "
                        "(faiss-gpu) on a CUDA machine") from None

from openbook.config import opt
from openbook.errors import ConfigError, SnapshotError

log = logging.getLogger(__name__)

_IVF_LISTS = re.compile(r"IVF(\d+)")
_MAIN_HNSW = re.compile(r"(^|,)\s*HNSW")  # HNSW as the index itself (IVFn_HNSWm, an HNSW quantizer, is not)
Metric = Literal["ip", "l2"]
_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(kw_only=True)
class IndexConfig:
    factory: str = opt("Flat", "faiss index_factory string, e.g. Flat, IVF256,Flat, HNSW32, IVF64,PQ16x8 "
                               "(retrieval scores are inner products)")
    nprobe: int = opt(32, "IVF lists probed per query (clamped by faiss to the number of lists)")
    ef_search: int = opt(128, "HNSW search-time beam width (efSearch)")
    device: Literal["auto", "cpu", "gpu"] = opt("auto", "where to search: gpu if faiss has GPU support and a "
                                                        "GPU is visible (auto), or force cpu/gpu")
    train_size: int = opt(100_000, "max vectors sampled (deterministically) to train IVF/PQ indexes")
    seed: int = opt(0, "seed of the training sample")
    shards: int = opt(0, "index shards per refresh snapshot, each written by the actor that encodes it "
                         "(0: one per encoder actor)")
    gpu_device: int = opt(-1, "the GPU that searches (an index of CUDA_VISIBLE_DEVICES): -1 = the process's own: "
                              "a trainer's device (each DDP rank its own), GPU 0 elsewhere; never the GPUs of others")
    gpu_float16: bool = opt(False, "store the GPU copy of the index in float16 (half the GPU memory; scores "
                                   "change by ~1e-3 relative)")
    placement: Literal["replicated", "sharded"] = opt(
        "replicated", "across the trainer's ranks: replicated = every rank loads every shard; sharded = rank r "
                      "holds shards r, r+W, ... and searches are all-gathered and merged (each rank holds ~1/W; "
                      "exact for Flat; use index.shards a multiple of the world size)")

    def __post_init__(self) -> None:
        if not self.factory.strip():
            raise ValueError("index.factory must be a non-empty faiss index_factory string")
        if self.shards < 0:
            raise ValueError(f"index.shards must be >= 0 (0: one per encoder actor), got {self.shards}")
        for name in ("nprobe", "ef_search", "train_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"index.{name} must be >= 1, got {getattr(self, name)}")
        if self.placement not in ("replicated", "sharded"):
            raise ValueError(f"index.placement must be replicated or sharded, got {self.placement!r}")
        if self.device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"index.device must be one of auto/cpu/gpu, got {self.device!r}")
        if self.device == "gpu" and _MAIN_HNSW.search(self.factory):
            raise ValueError(f"index.device gpu: {self.factory!r} is an HNSW index, which faiss cannot search on a GPU; "
                             "use index.device auto or cpu (HNSW then searches on CPU), or a Flat/IVF factory")
        if self.gpu_device < -1:
            raise ValueError(f"index.gpu_device must be >= -1 (-1: the process's own GPU), got {self.gpu_device}")

    def on_cpu(self) -> IndexConfig:
        """The same index and search parameters, searched on CPU (writers, publishers, their checks)."""
        return dataclasses.replace(self, device="cpu")


def factory_problem(factory: str, dim: int) -> str | None:
    """Why ``index_factory(dim, factory)`` fails (a typo, ``PQ7`` on 64-dim vectors), before anything starts: a
    bad factory used to fail only in the first refresh, after Ray started, with FAISS's C++ internals."""
    try:
        faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        text = one_line(e)  # "Error in <C++ function> at <file>.cpp:<line>: [Error: '<check>' failed: ]<reason>"
        reason = re.split(r"\.cpp:\d+: ", text)[-1].split("' failed: ")[-1]
        return f"index.factory {factory!r} is not a faiss index for {dim}-dim vectors: {reason[:160]}"
    return None


def one_line(err: BaseException | None, limit: int = 300) -> str:
    """faiss errors span several lines (C++ location + message): squash them for one-line messages."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def as_float32_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """faiss wants C-contiguous float32 [n, d]; fp16 embeddings are upcast here."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise SnapshotError(f"{what}: expected a 2-D array [n, d], got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise SnapshotError(f"{what}: expected a float array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _layers(index: faiss.Index) -> Iterator[faiss.Index]:
    """The index and every index it wraps (PreTransform, Refine, IDMap), downcast to concrete types."""
    seen = 0
    while index is not None and seen < 16:  # bounded: wrappers never nest this deep
        index = faiss.downcast_index(index)
        yield index
        seen += 1
        inner = getattr(index, "base_index", None) or getattr(index, "index", None)
        index = inner if isinstance(inner, faiss.Index) else None


def _clamp_ivf_lists(factory: str, n_train: int) -> str:
    """k-means cannot make more IVF lists than training points: clamp (with a warning) rather than fail."""
    def fix(m: re.Match) -> str:
        nlist = int(m.group(1))
        if nlist <= n_train:
            return m.group(0)
        log.warning("index factory %r: %d IVF lists but only %d training vectors; using IVF%d",
                    factory, nlist, n_train, n_train)
        return f"IVF{n_train}"

    return _IVF_LISTS.sub(fix, factory)


def _f32_rows(x: np.ndarray, rows: slice | np.ndarray) -> np.ndarray:
    """Rows of ``x`` as contiguous float32, converted per block so an fp16 memmap is never copied whole."""
    block = np.ascontiguousarray(x[rows], dtype=np.float32)
    if not np.isfinite(block).all():
        raise SnapshotError("index build: embeddings contain NaN or inf")
    return block


def _training_sample(x: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    """A seeded subsample (sorted rows, so reads are sequential on memmaps) of at most train_size rows."""
    n = x.shape[0]
    if n <= cfg.train_size:
        return _f32_rows(x, slice(None))
    return _f32_rows(x, np.sort(np.random.default_rng(cfg.seed).choice(n, size=cfg.train_size, replace=False)))


def _new_index(x: np.ndarray, cfg: IndexConfig, metric: Metric) -> faiss.Index:
    """An index of ``cfg.factory`` for ``x``'s dimension, trained on a sample of ``x`` if it needs it."""
    n, d = x.shape
    factory = _clamp_ivf_lists(cfg.factory, min(n, cfg.train_size))
    try:
        index = faiss.index_factory(d, factory, _METRICS[metric])
    except RuntimeError as e:
        raise ConfigError(f"index.factory {cfg.factory!r} is invalid for dim {d}: {one_line(e)}") from None
    for layer in _layers(index):
        # Polysemous training (on by default for PQ) costs ~10x the PQ training itself and only
        # helps Hamming-threshold search, which we never enable.
        if hasattr(layer, "do_polysemous_training"):
            layer.do_polysemous_training = False
    if not index.is_trained:
        sample = _training_sample(x, cfg)
        try:
            index.train(sample)
        except RuntimeError as e:
            raise SnapshotError(f"index {factory!r}: training on {len(sample)} vectors failed: "
                                f"{one_line(e)}") from None
    return index


def gpu_available() -> bool:
    """True if this faiss build has GPU support and at least one GPU is visible."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def use_gpu(cfg: IndexConfig) -> bool:
    if cfg.device == "cpu":
        return False
    if cfg.device == "gpu" and not gpu_available():
        raise ConfigError("index.device is 'gpu' but faiss has no GPU support or no GPU is visible "
                          "(install faiss-gpu, check CUDA_VISIBLE_DEVICES, or use device: auto)")
    return gpu_available()


def to_device(index: faiss.Index, cfg: IndexConfig) -> faiss.Index:
    """The index to search with: ``index`` itself on CPU, or a copy on one GPU: ``cfg.gpu_device`` (-1: GPU 0 of
    this process's visible devices; a trainer sets its own device). Never every GPU: on a node other processes
    (DDP ranks, refresh actors) own the others.

    HNSW has no GPU implementation in faiss: with ``device: auto`` it stays on CPU (``device: gpu`` is refused by
    the config). Runs on GPU machines only (bench/gpu_smoke.py, tests/test_gpu.py).
    """
    if not use_gpu(cfg):
        return index
    if any(isinstance(layer, faiss.IndexHNSW) for layer in _layers(index)):
        log.info("HNSW indexes have no faiss GPU implementation; searching on CPU")
        return index
    try:
        co = faiss.GpuClonerOptions()
        co.useFloat16 = cfg.gpu_float16
        return faiss.index_cpu_to_gpu(gpu_resources(), max(cfg.gpu_device, 0), index, co)
    except RuntimeError as e:
        if cfg.device == "gpu":
            raise ConfigError(f"index {cfg.factory!r}: cannot copy to GPU {max(cfg.gpu_device, 0)}: "
                              f"{one_line(e)}") from None
        log.warning("index %r: cannot copy to GPU (%s); searching on CPU", cfg.factory, one_line(e))
        return index


_THREAD = threading.local()


def gpu_resources(make: Callable[[], object] | None = None):
    """FAISS GPU resources (scratch memory, streams) of the calling thread, made on its first use.

    faiss's ``StandardGpuResources`` is not thread-safe: one per CPU thread that uses GPU indexes. The trainer
    loads the next snapshot on a background thread while its training thread searches the one in use; each
    copy to the GPU takes its thread's resources and keeps them (a thread that ends leaves them to the index
    it made, which from then on only the thread searching it uses). ``make``: the factory (tests)."""
    res = getattr(_THREAD, "gpu_resources", None)
    if res is None:
        res = _THREAD.gpu_resources = (make or faiss.StandardGpuResources)()
    return res


def _is_gpu_index(index: faiss.Index) -> bool:
    """Whether any layer is a GPU index: a PCA/OPQ-prefixed IVF copied to a GPU is a CPU IndexPreTransform
    around a GpuIndexIVF, whose nprobe only GpuParameterSpace can set."""
    return any("Gpu" in type(layer).__name__ or "Replicas" in type(layer).__name__ for layer in _layers(index))


def _has_ivf(index: faiss.Index) -> bool:
    return any(isinstance(layer, faiss.IndexIVF) or "IndexIVF" in type(layer).__name__ for layer in _layers(index))


def _read(path: Path) -> faiss.Index:
    """Memory-map where this faiss supports it (IFC: flat codes, 1.10+; MMAP: IVF lists), else read."""
    flags = [getattr(faiss, n) for n in ("IO_FLAG_MMAP_IFC", "IO_FLAG_MMAP") if hasattr(faiss, n)] + [0]
    err: Exception | None = None
    for flag in flags:
        try:
            return faiss.read_index(str(path), flag)
        except RuntimeError as e:
            err = e
    raise SnapshotError(f"{path}: unreadable faiss index ({one_line(err)})")


class FaissIndex:
    """A :class:`~openbook.index.vector_index.VectorIndex` over faiss: rows are labelled 0..n-1 in the order
    they were added; ``search`` is safe to call from many threads.

    Search parameters (nprobe, efSearch) are set once, when the index is wrapped, never per search, so
    concurrent readers never race on them. They live *in the faiss object*: two wrappers of the same raw
    index (see :meth:`with_config`) share the last one's settings.
    """

    def __init__(self, cpu_index: faiss.Index, cfg: IndexConfig | None = None, metric: Metric = "ip",
                 where: str = "in-memory index"):
        self.cpu, self.cfg, self.metric, self.where = cpu_index, cfg or IndexConfig(), metric, where
        self.index = to_device(cpu_index, self.cfg)
        self._apply_search_params()

    @classmethod
    def build(cls, x: np.ndarray, cfg: IndexConfig, metric: Metric = "ip", chunk: int = 65_536) -> FaissIndex:
        """A trained CPU index holding ``x`` (fp16/fp32 [n, d]; row i gets label i), added in chunks, with ``cfg``'s
        search parameters (``with_config(cfg)`` copies it to a GPU)."""
        arr = np.asarray(x)
        if arr.ndim != 2 or arr.dtype.kind not in "fiu":
            raise SnapshotError(f"index build: expected a 2-D float array [n, d], got {arr.dtype} {arr.shape}")
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise SnapshotError(f"index build: no embeddings to index (shape {arr.shape})")
        index = cls(_new_index(arr, cfg, metric), IndexConfig(factory=cfg.factory, device="cpu"), metric)
        index.add(arr, chunk)
        return index.with_config(cfg.on_cpu())  # built to be saved: a searcher loads it onto its own GPU

    @classmethod
    def trained(cls, sample: np.ndarray, cfg: IndexConfig, metric: Metric = "ip") -> FaissIndex:
        """An empty index of ``cfg.factory`` whose quantizer (IVF/PQ) is trained on ``sample``: shards add
        their rows to copies of it (:meth:`empty_copy`), so every shard quantizes alike."""
        arr = np.asarray(sample)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.dtype.kind not in "fiu":
            raise SnapshotError(f"index training: expected a non-empty 2-D float sample, got {arr.dtype} {arr.shape}")
        return cls(_new_index(arr, cfg, metric), IndexConfig(factory=cfg.factory, device="cpu"), metric)

    @staticmethod
    def needs_training(factory: str, dim: int) -> bool:
        try:
            return not faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained
        except RuntimeError as e:
            raise ConfigError(f"index.factory {factory!r} is invalid for dim {dim}: {one_line(e)}") from None

    def to_bytes(self) -> np.ndarray:
        """The CPU index serialised (uint8), to ship a trained quantizer to the shard writers."""
        return faiss.serialize_index(self.cpu)

    @classmethod
    def from_bytes(cls, data: np.ndarray, cfg: IndexConfig, metric: Metric = "ip") -> FaissIndex:
        return cls(faiss.deserialize_index(np.asarray(data, dtype=np.uint8)), cfg, metric)

    def empty_copy(self) -> FaissIndex:
        """A copy with the same training (quantizer, codebooks) and no vectors."""
        clone = faiss.clone_index(self.cpu)
        clone.reset()
        return FaissIndex(clone, self.cfg, self.metric)

    @classmethod
    def load(cls, path: Path, cfg: IndexConfig, metric: Metric = "ip") -> FaissIndex:
        """An index saved by :meth:`save` (memory-mapped where faiss can); ``cfg`` sets search params and device."""
        return cls(_read(Path(path)), cfg, metric, where=str(path))

    def with_config(self, cfg: IndexConfig) -> FaissIndex:
        """The same index with other search parameters or device."""
        return FaissIndex(self.cpu, cfg, self.metric, self.where)

    def add(self, x: np.ndarray, chunk: int = 65_536) -> None:
        """Append rows (labels continue from ``ntotal``)."""
        id_map = isinstance(faiss.downcast_index(self.cpu), faiss.IndexIDMap)
        for lo in range(0, x.shape[0], chunk):
            block = _f32_rows(x, slice(lo, lo + chunk))
            if id_map:  # IDMap refuses add(); keep label = row
                start = self.cpu.ntotal
                self.cpu.add_with_ids(block, np.arange(start, start + len(block), dtype=np.int64))
            else:
                self.cpu.add(block)
        if self.index is not self.cpu:  # a GPU replica does not see CPU adds: copy again
            self.index = to_device(self.cpu, self.cfg)
            self._apply_search_params()

    def save(self, path: Path) -> None:
        """Write the CPU index to ``path`` and fsync it. The bytes pass through a Python file, so a full disk
        raises OSError (ENOSPC), as every other snapshot write does, not faiss's RuntimeError."""
        with open(path, "wb") as f:
            faiss.write_index(self.cpu, faiss.PyCallbackIOWriter(f.write))
            f.flush()
            os.fsync(f.fileno())

    def _apply_search_params(self) -> None:
        # ParameterSpace reaches through wrappers (PreTransform, Refine, IDMap) and raises for a
        # parameter the index does not have; its initialize() misses some wrappers (IDMap), so we
        # just try each one.
        gpu_ps = getattr(faiss, "GpuParameterSpace", None)
        ps = gpu_ps() if gpu_ps is not None and _is_gpu_index(self.index) else faiss.ParameterSpace()
        wanted = {"nprobe": self.cfg.nprobe, "efSearch": self.cfg.ef_search,
                  "quantizer_efSearch": self.cfg.ef_search}
        self.search_params: dict[str, int] = {}
        for name, value in wanted.items():
            try:
                ps.set_index_parameter(self.index, name, value)
            except RuntimeError:
                continue  # not applicable to this index type
            self.search_params[name] = value
        if "nprobe" not in self.search_params and _has_ivf(self.index):
            log.warning("%s (%s): index.nprobe=%d could not be set; faiss searches with the index's own nprobe",
                        self.where, self.cfg.factory, self.cfg.nprobe)

    @property
    def dim(self) -> int:
        return int(self.cpu.d)

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    @property
    def code_size(self) -> int | None:
        """Bytes per stored vector where the index keeps codes (Flat, PQ), else None."""
        return getattr(faiss.downcast_index(self.cpu), "code_size", None)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (int64 [Q, k'], -1 where nothing was found) and scores (float32 [Q, k']): inner
        products, best first, or squared L2 distances, nearest first. ``k' = min(k, ntotal)``."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise SnapshotError(f"queries must be 1-D or 2-D, got shape {q.shape} ({self.where})")
        if q.shape[1] != self.dim:
            raise SnapshotError(f"query dim {q.shape[1]} does not match index dim {self.dim} ({self.where})")
        q = as_float32_matrix(q, f"queries ({self.where})")
        kk = min(k, self.ntotal)
        if kk == 0 or q.shape[0] == 0:
            return np.zeros((q.shape[0], kk), np.int64), np.zeros((q.shape[0], kk), np.float32)
        scores, rows = self.index.search(q, kk)
        return rows.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return (f"FaissIndex({self.cfg.factory!r}, {self.metric}, dim={self.dim}, ntotal={self.ntotal}, "
                f"where={self.where!r})")
