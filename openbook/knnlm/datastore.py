"""The kNN-LM datastore on disk: ``keys.npy`` (float16/32 [N, d]), ``values.npy`` (int32 [N]: the next
token), ``index.faiss`` (L2) and ``manifest.json`` (shapes, sizes, sha256, how it was built).

Everything is written into a hidden temp dir beside the target, fsynced, and renamed into place, the
manifest last: a datastore dir is complete or absent, and loading checks the manifest against the files.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np

from openbook.errors import SnapshotError
from openbook.index import IndexConfig, VectorIndex, build_index, load_index
from openbook.index.atomic import file_entry, fsync_path, replace_dir, rmtree, sha256_file, write_json

FORMAT = 1
MANIFEST, KEYS, VALUES, INDEX = "manifest.json", "keys.npy", "values.npy", "index.faiss"


class DatastoreWriter:
    """Fill keys/values by row range (shards may arrive in any order), then ``commit`` atomically."""

    def __init__(self, path: str | Path, count: int, dim: int, keys_dtype: str = "float16"):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".tmp-{self.path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.count, self.dim = count, dim
        self.keys = np.lib.format.open_memmap(self.tmp / KEYS, "w+", np.dtype(keys_dtype), (count, dim))
        self.values = np.lib.format.open_memmap(self.tmp / VALUES, "w+", np.int32, (count,))
        self.filled = np.zeros(count, dtype=bool)

    def write(self, start: int, keys: np.ndarray, values: np.ndarray) -> None:
        end = start + len(keys)
        if keys.shape[1:] != (self.dim,) or len(values) != len(keys) or end > self.count:
            raise SnapshotError(f"datastore: shard [{start}, {end}) of {keys.shape} does not fit {self.count} "
                                f"rows of dim {self.dim}")
        with np.errstate(over="ignore"):
            self.keys[start:end] = keys
        if not np.isfinite(self.keys[start:end]).all():
            raise SnapshotError(f"datastore: keys [{start}, {end}) contain NaN/inf after {self.keys.dtype} "
                                "conversion")
        self.values[start:end] = values
        self.filled[start:end] = True

    def commit(self, index_cfg: IndexConfig, meta: dict | None = None) -> Datastore:
        """Index the keys (L2), write the manifest last, and rename the whole directory into place."""
        if not self.filled.all():
            raise SnapshotError(f"datastore: rows {np.flatnonzero(~self.filled)[:3].tolist()}... never written")
        self.keys.flush()
        self.values.flush()
        build_index(self.keys, index_cfg, metric="l2").save(self.tmp / INDEX)
        for name in (KEYS, VALUES):
            fsync_path(self.tmp / name)
        files = {name: file_entry(self.tmp / name) for name in (KEYS, VALUES, INDEX)}
        body = {"format": FORMAT, "count": self.count, "dim": self.dim, "keys_dtype": str(self.keys.dtype),
                "factory": index_cfg.factory, "files": files, "meta": dict(meta or {})}
        write_json(self.tmp / MANIFEST, body)
        fsync_path(self.tmp)
        del self.keys, self.values  # close the maps before the rename
        replace_dir(self.tmp, self.path, self.path.parent / f".trash-{self.path.name}-{uuid.uuid4().hex[:8]}")
        return Datastore.load(self.path, index_cfg, verify=False)

    def abort(self) -> None:
        rmtree(self.tmp)


class Datastore:
    """A loaded datastore: memory-mapped keys and values, and the searchable index."""

    def __init__(self, path: Path, manifest: dict, keys: np.ndarray, values: np.ndarray, index: VectorIndex):
        self.path, self.manifest, self.keys, self.values, self.index = path, manifest, keys, values, index

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def load(cls, path: str | Path, index_cfg: IndexConfig | None = None, verify: bool = True) -> Datastore:
        """Check every file against the manifest (sizes; sha256 too when ``verify``) and map it;
        ``index_cfg`` gives the search parameters (nprobe), by default those of a Flat index."""
        path = Path(path)
        if not (path / MANIFEST).is_file():
            why = "not found" if not path.exists() else "has no manifest.json (half-written or not a datastore)"
            raise SnapshotError(f"{path}: datastore {why}")
        m = _read_manifest(path / MANIFEST)
        for name, want in m["files"].items():
            p = path / name
            if not p.is_file():
                raise SnapshotError(f"{p}: datastore file missing")
            if p.stat().st_size != want["size"]:
                raise SnapshotError(f"{p}: size {p.stat().st_size} != manifest {want['size']} (truncated or corrupt)")
            if verify and sha256_file(p) != want["sha256"]:
                raise SnapshotError(f"{p}: checksum mismatch (datastore file corrupt)")
        keys, values = _load_npy(path / KEYS), _load_npy(path / VALUES)
        if keys.shape != (m["count"], m["dim"]) or str(keys.dtype) != m["keys_dtype"] or values.shape != (m["count"],):
            raise SnapshotError(f"{path}: keys {keys.dtype} {keys.shape} / values {values.shape} do not match "
                                f"the manifest ({m['keys_dtype']} [{m['count']}, {m['dim']}])")
        index = load_index(path / INDEX, index_cfg or IndexConfig(factory=m["factory"]), metric="l2")
        if index.ntotal != m["count"] or index.dim != m["dim"]:
            raise SnapshotError(f"{path / INDEX}: {index.ntotal} vectors of dim {index.dim} != manifest")
        return cls(path, m, keys, values, index)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(squared L2 distances float32 [Q, k] as the index computes them, ids int64 [Q, k]; -1 = none)."""
        ids, dists = self.index.search(queries, min(k, len(self)))
        return dists, ids


def _read_manifest(p: Path) -> dict:
    try:
        m = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError(f"{p}: manifest is not valid JSON (datastore corrupt)") from None
    need = {"format": int, "count": int, "dim": int, "keys_dtype": str, "factory": str, "files": dict, "meta": dict}
    bad = [k for k, t in need.items() if not isinstance(m, dict) or not isinstance(m.get(k), t)]
    if bad:
        raise SnapshotError(f"{p}: manifest key '{bad[0]}' missing or of the wrong type (datastore corrupt)")
    if sorted(m["files"]) != sorted((KEYS, VALUES, INDEX)):
        raise SnapshotError(f"{p}: manifest lists files {sorted(m['files'])}, expected {[INDEX, KEYS, VALUES]}")
    return m


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise SnapshotError(f"{p}: unreadable .npy (datastore corrupt)") from None
