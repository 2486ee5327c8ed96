"""Snapshot format 2 (issue 17): S shards under one manifest, so no process ever holds all N embeddings.

Layout of a published format-2 snapshot::

    <root>/v000007/manifest.json          format 2; lists the shards (name, row range, files) and is written last
    <root>/v000007/shard-00000/shard.json  this shard's row range [lo, hi) and its files' sizes and sha256
    <root>/v000007/shard-00000/index.faiss rows lo..hi-1 of the corpus, labelled 0..hi-lo-1
    <root>/v000007/shard-00000/embeddings.npy, doc_ids.npy

Whoever encodes rows [lo, hi) writes their shard straight into the staging dir of the snapshot being
built (:func:`write_shard`): into a hidden ``.part-*`` dir first, made visible by one rename, so a shard
dir is complete or absent, and a redone shard replaces a half-written one whole. The store then checks
every shard, writes the manifest and claims the version with one rename as for format 1
(:meth:`~openbook.index.snapshot.SnapshotStore.publish_shards`).

Searching: :class:`ShardSet` searches each shard's index and merges the per-shard top-k (global row =
the shard's ``lo`` + local row; best score first, ties to the lower global row), which for a Flat
factory equals one search over all rows.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from openbook.errors import SnapshotError
from openbook.index.atomic import (
    check_file,
    file_entry,
    fsync_path,
    replace_dir,
    save_npy,
    write_json,
)
from openbook.index.faiss_index import IndexConfig, Metric
from openbook.index.vector_index import VectorIndex, build_index, load_index

SHARD_PREFIX = "shard-"
SHARD_MANIFEST = "shard.json"
EMBEDDINGS_FILE, DOC_IDS_FILE, INDEX_FILE = "embeddings.npy", "doc_ids.npy", "index.faiss"
SHARD_FILES = (EMBEDDINGS_FILE, DOC_IDS_FILE, INDEX_FILE)
_SHARD_DIR = re.compile(r"^shard-(\d{5,})$")


def row_ranges(n: int, count: int) -> list[tuple[int, int, int]]:
    """(shard, first row, end row) of ``count`` near-equal shards over ``n`` rows (at most ``n`` shards): the
    one split the actor pool and an in-process build both use, so a rolling refresh can build on either."""
    count = max(1, min(count, n))
    bounds = np.linspace(0, n, count + 1).round().astype(int)
    return [(s, int(lo), int(hi)) for s, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def shard_name(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:05d}"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifests record it: rows [lo, hi) of the corpus and its files."""

    name: str
    lo: int
    hi: int
    files: dict[str, dict[str, Any]]
    writer: dict[str, Any] = dataclasses.field(default_factory=dict)  # host, pid (and Ray node) that wrote it
    # the step of the weights that encoded it, as the snapshot manifest records it (a rolling refresh carries
    # older shards over); None in shard.json and in older manifests: the manifest's encoder_step
    encoder_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.encoder_step is None:
            del out["encoder_step"]  # shard.json, and manifests of older versions, have none
        return out

    @classmethod
    def from_json(cls, data: Any, where: str) -> ShardEntry:
        if not isinstance(data, dict) or not {"name", "lo", "hi", "files"} <= set(data) <= {
                "name", "lo", "hi", "files", "writer", "encoder_step"}:
            raise SnapshotError(f"{where}: a shard entry needs exactly name, lo, hi, files (and optionally writer, "
                                "encoder_step)")
        ok = (isinstance(data["name"], str) and _SHARD_DIR.match(data["name"]) and isinstance(data["lo"], int)
              and isinstance(data["hi"], int) and 0 <= data["lo"] < data["hi"] and isinstance(data["files"], dict)
              and sorted(data["files"]) == sorted(SHARD_FILES))
        if not ok:
            raise SnapshotError(f"{where}: malformed shard entry {str(data)[:200]}")
        for name, entry in data["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise SnapshotError(f"{where}: files['{name}'] needs an int 'size' and a str 'sha256'")
        writer, step = data.get("writer", {}), data.get("encoder_step")
        if not isinstance(writer, dict):
            raise SnapshotError(f"{where}: 'writer' must be an object")
        if step is not None and (not isinstance(step, int) or isinstance(step, bool)):
            raise SnapshotError(f"{where}: a shard's 'encoder_step' must be an int")
        return cls(data["name"], data["lo"], data["hi"], data["files"], writer, step)


def check_rows(embeddings: np.ndarray, doc_ids: Sequence[str] | np.ndarray,
               what: str = "publish") -> tuple[np.ndarray, np.ndarray]:
    """fp16 C-contiguous embeddings and a unicode id array, or a one-line SnapshotError."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise SnapshotError(f"{what}: embeddings must be a non-empty [N, d] array, got shape {emb.shape}")
    with np.errstate(over="ignore"):  # overflow becomes inf, reported just below
        emb16 = np.ascontiguousarray(emb, dtype=np.float16)
    if not np.isfinite(emb16).all():
        raise SnapshotError(f"{what}: embeddings contain NaN/inf (after float16 conversion; |x| > 65504?)")
    ids = np.asarray(doc_ids)
    ids = ids if ids.dtype.kind == "U" else ids.astype(str)  # object/bytes/int ids -> numpy unicode
    if ids.shape != (emb.shape[0],):
        raise SnapshotError(f"{what}: doc ids of shape {ids.shape} for {emb.shape[0]} embeddings")
    if (np.char.str_len(ids) == 0).any():
        raise SnapshotError(f"{what}: empty doc id (ids must be non-empty strings)")
    return emb16, ids


def write_shard(staging: Path, shard: int, lo: int, embeddings: np.ndarray, doc_ids: Sequence[str] | np.ndarray,
                index_cfg: IndexConfig, trained: VectorIndex | None = None,
                writer: dict[str, Any] | None = None, before_commit: Callable[[Path], None] | None = None
                ) -> ShardEntry:
    """Write rows [lo, lo + N) as shard ``shard`` of the snapshot being staged in ``staging``.

    ``trained``: an empty index whose quantizer was trained once for the whole snapshot (IVF/PQ), so every
    shard searches alike; each shard adds its rows to a copy. Without it the shard builds its own index.
    ``before_commit(part dir)`` runs once the files are written, before the rename that makes the shard
    visible (fault drills kill the writer there).
    """
    emb16, ids = check_rows(embeddings, doc_ids, f"shard {shard}")
    index = build_index(emb16, index_cfg.on_cpu()) if trained is None else trained.empty_copy()  # written, not searched
    if trained is not None:
        index.add(emb16)
    name = shard_name(shard)
    part = Path(staging) / f".part-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    part.mkdir(parents=True)
    save_npy(part / EMBEDDINGS_FILE, emb16)
    save_npy(part / DOC_IDS_FILE, ids)
    index.save(part / INDEX_FILE)
    who = {"host": socket.gethostname(), "pid": os.getpid(), **(writer or {})}
    entry = ShardEntry(name, int(lo), int(lo) + len(ids), {n: file_entry(part / n) for n in SHARD_FILES}, who)
    write_json(part / SHARD_MANIFEST, entry.to_json())  # last: a shard dir with shard.json is whole
    fsync_path(part)
    if before_commit is not None:
        before_commit(part)
    replace_dir(part, Path(staging) / name, Path(staging) / f".trash-{name}-{uuid.uuid4().hex[:8]}")
    return entry


def read_shard_entry(path: Path) -> ShardEntry:
    """The ``shard.json`` of a written shard dir (what its writer recorded)."""
    import json

    mpath = Path(path) / SHARD_MANIFEST
    if not mpath.is_file():
        raise SnapshotError(f"{mpath}: missing (shard not complete)")
    try:
        return ShardEntry.from_json(json.loads(mpath.read_bytes()), str(mpath))
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{mpath}: invalid JSON ({' '.join(str(e).split())[:200]})") from None


def check_shards(entries: Sequence[ShardEntry], count: int, where: str) -> None:
    """The shards tile rows [0, count) in order, with no gap or overlap."""
    at = 0
    for e in entries:
        if e.lo != at:
            raise SnapshotError(f"{where}: shard {e.name} starts at row {e.lo}, expected {at} (gap or overlap)")
        at = e.hi
    if at != count:
        raise SnapshotError(f"{where}: shards cover rows [0, {at}), the snapshot has {count}")


@dataclass
class Shard:
    """One loaded shard: rows [lo, hi) of the snapshot."""

    entry: ShardEntry
    embeddings: np.ndarray | None  # None: held by another rank (sharded placement)
    doc_ids: np.ndarray
    index: VectorIndex | None

    @property
    def lo(self) -> int:
        return self.entry.lo


def load_shard(path: Path, entry: ShardEntry, dim: int, verify: bool, index_cfg: IndexConfig | None) -> Shard:
    """Load one shard dir and check it against the snapshot manifest's ``entry`` (sizes always, sha256 when
    ``verify``); any problem is a one-line SnapshotError naming the shard's file. ``index_cfg`` None: only
    the doc ids are read (memory-mapped; a shard another rank searches), its index and embeddings are not."""
    for name in SHARD_FILES if index_cfg is not None else (DOC_IDS_FILE,):
        check_file(path / name, entry.files[name], verify)
    n = entry.hi - entry.lo
    ids = _load_npy(path / DOC_IDS_FILE)
    if ids.dtype.kind != "U" or ids.shape != (n,):
        raise SnapshotError(f"{path / DOC_IDS_FILE}: {ids.dtype} {ids.shape} != manifest unicode ({n},)")
    if index_cfg is None:
        return Shard(entry, None, ids, None)
    emb = _load_npy(path / EMBEDDINGS_FILE)
    if emb.dtype != np.float16 or emb.shape != (n, dim):
        raise SnapshotError(f"{path / EMBEDDINGS_FILE}: {emb.dtype} {emb.shape} != manifest float16 {(n, dim)}")
    index = load_index(path / INDEX_FILE, index_cfg)
    if index.ntotal != n or index.dim != dim:
        raise SnapshotError(f"{path / INDEX_FILE}: index has {index.ntotal} vectors of dim {index.dim}, "
                            f"manifest {n} of dim {dim}")
    return Shard(entry, emb, ids, index)


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SnapshotError(f"{p}: unreadable .npy ({' '.join(str(e).split())[:200]})") from None


def merge_topk(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int, metric: Metric = "ip"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (global rows [Q, k_i], scores [Q, k_i]) into the top ``k``: best score first (highest
    inner product, or smallest L2 distance), ties to the lower global row; -1 rows (nothing found) last."""
    rows = np.concatenate([r for r, _ in parts], axis=1)
    scores = np.concatenate([s for _, s in parts], axis=1).astype(np.float32, copy=False)
    key = -scores if metric == "ip" else scores.copy()
    key[rows < 0] = np.inf
    order = np.lexsort((rows, key), axis=1)[:, :k]  # primary: key; secondary: row
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


class ShardSet:
    """Several shards searched as one index (rows are global: the shard's ``lo`` + its local row)."""

    metric: str = "ip"

    def __init__(self, shards: Sequence[Shard], dim: int):
        self.shards, self._dim = list(shards), dim

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ntotal(self) -> int:
        return sum(s.index.ntotal for s in self.shards)

    @property
    def search_params(self) -> dict[str, int]:
        return dict(getattr(self.shards[0].index, "search_params", {})) if self.shards else {}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [(np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), np.nan, np.float32))]
        for s in self.shards:
            rows, scores = s.index.search(queries, k)
            parts.append((np.where(rows >= 0, rows + s.lo, -1), scores))
        return merge_topk(parts, k, self.metric)

    def with_config(self, cfg: IndexConfig) -> ShardSet:
        return ShardSet([dataclasses.replace(s, index=s.index.with_config(cfg)) for s in self.shards], self._dim)

    def add(self, x: np.ndarray) -> None:
        raise SnapshotError("a published sharded snapshot is read-only")

    def save(self, path: Path) -> None:
        raise SnapshotError("a sharded snapshot is saved shard by shard (write_shard)")


class Rows:
    """The rows of several shards read as one array: ``rows[int array]`` gathers across shards, and
    ``np.asarray(rows)`` concatenates (only for what fits in memory)."""

    def __init__(self, parts: Sequence[np.ndarray], starts: Sequence[int]):
        self.parts, self.starts = list(parts), np.asarray(starts, dtype=np.int64)
        self.shape = (int(sum(len(p) for p in parts)), *parts[0].shape[1:])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray | int) -> np.ndarray:
        r = np.asarray(rows, dtype=np.int64)
        flat = r.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"row out of range [0, {len(self)})")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty((flat.size, *self.shape[1:]), dtype=self.dtype)
        for i in np.unique(which):
            sel = which == i
            out[sel] = self.parts[i][flat[sel] - self.starts[i]]
        return out.reshape(r.shape + tuple(self.shape[1:]))[()]  # an int row gives one element, as numpy does

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)
