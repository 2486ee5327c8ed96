"""Versioned index snapshots, published atomically and verified on load.

Layout under a store root::

    <root>/v000001/manifest.json   format, version, encoder_step, times, dim, count, factory, files, checksum,
                                   manifest_sha256 (a seal over every other key: a hand edit fails the load)
    <root>/v000001/index.faiss     CPU faiss index; label i <-> row i
    <root>/v000001/embeddings.npy  float16 [N, d] (the exact values the index was built from)
    <root>/v000001/doc_ids.npy     numpy unicode [N]: corpus string id of row i
    <root>/.tmp-<host>-<pid>-<rand>/    a publish in progress (or left by a killed writer)
    <root>/.trash-v000001-<rand>/       a pruned snapshot being deleted
    <root>/.bad-v000001-<rand>/         a snapshot found bad (truncated, corrupt, edited), moved aside by prune and
                                        kept for inspection; deleted only when space runs out (free_space)
    <root>/.highwater              the highest version ever claimed here: numbers are never reused,
                                   even after the newest vNNNNNN dirs were deleted by hand

Publishing writes everything into a hidden ``.tmp-*`` dir, fsyncs each file and the dir, then claims
the next version with one ``os.rename`` — so a ``vNNNNNN`` dir is complete or absent, whatever
moment a writer is killed at. Readers only ever look at ``vNNNNNN`` dirs holding a manifest.

Pruning keeps the newest ``keep`` *whole* snapshots: one whose manifest does not read, validate or match its seal,
whose files lack their recorded sizes, or that this store failed to load (a sha256 mismatch) counts for nothing,
so a bad newest snapshot can never cost the good older ones; it is moved aside to ``.bad-*`` with one warning.

A publish that fails writing (a full disk, a quota: an OSError) removes its partial files, deletes every
old snapshot not protected and not the newest good one, and every ``.bad-*`` dir (:meth:`SnapshotStore.free_space`),
and tries once more; if that fails too it is a one-line :class:`SnapshotError`, and the snapshots kept still load.

Crash hook (tests only): with ``OPENBOOK_TEST_CRASH_PUBLISH=<stage>`` in the environment, ``publish``
calls ``os._exit(137)`` (no cleanup, like SIGKILL) when it reaches ``<stage>``, one of
``after_embeddings``, ``after_index``, ``before_rename``. ``<stage>:hang`` instead prints
``openbook-crash-point <stage>`` to stderr and sleeps, so a test can deliver a real SIGKILL.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from openbook.errors import SnapshotError
from openbook.index.atomic import (
    check_file,
    file_entry,
    fsync_path,
    rmtree,
    save_npy,
    write_json,
)
from openbook.index.faiss_index import IndexConfig, one_line
from openbook.index.placement import DistributedShardSet, Part
from openbook.index.shards import (
    Rows,
    ShardEntry,
    ShardSet,
    check_rows,
    check_shards,
    load_shard,
    read_shard_entry,
)
from openbook.index.vector_index import VectorIndex, build_index, load_index

log = logging.getLogger(__name__)

FORMAT = 1  # what publish() writes: one index over all rows
FORMAT_SHARDED = 2  # what publish_shards() writes: S shard dirs under one manifest (openbook/index/shards.py)
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
DOC_IDS_FILE = "doc_ids.npy"
PAYLOAD = (EMBEDDINGS_FILE, DOC_IDS_FILE, INDEX_FILE)
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"
BAD_PREFIX = ".bad-"
SEAL = "manifest_sha256"
HIGHWATER = ".highwater"
CRASH_ENV = "OPENBOOK_TEST_CRASH_PUBLISH"
CRASH_STAGES = ("after_embeddings", "after_index", "before_rename")

T = TypeVar("T")
_VERSION_DIR = re.compile(r"^v(\d{6,})$")
_TMP_DIR = re.compile(r"^\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_BAD_DIR = re.compile(r"^\.bad-v(\d{6,})-[0-9a-f]{8}$")


class NewerFormat(SnapshotError):
    """A manifest of a format newer than this code reads: a newer openbook's snapshot, not a corrupt one."""


def version_dir_name(version: int) -> str:
    return f"v{version:06d}"


# ----------------------------------------------------------------------------------------- manifest

_MANIFEST_TYPES: dict[str, tuple[type, ...]] = {
    "format": (int,), "version": (int,), "encoder_step": (int,), "created_at": (int, float),
    "weights_time": (int, float), "dim": (int,), "count": (int,), "factory": (str,), "files": (dict,),
    "checksum": (str,), "meta": (dict,), "index_config": (dict,),
}
# shards, rotation: format 2 only; manifest_sha256: absent from manifests written before the seal
_OPTIONAL: dict[str, tuple[type, ...]] = {"shards": (list,), "rotation": (dict,), SEAL: (str,)}


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``. ``files`` maps name -> {"size": int, "sha256": hex}."""

    format: int
    version: int
    encoder_step: int
    created_at: float
    weights_time: float
    dim: int
    count: int
    factory: str
    files: dict[str, dict[str, Any]]
    checksum: str
    meta: dict[str, Any]
    index_config: dict[str, Any]  # the IndexConfig used to build (search params default to it)
    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # format 2: ShardEntry dicts
    # refresh.strategy rolling: {"parts": R, "part": g}, the block of shards this refresh re-encoded (-1: all)
    rotation: dict[str, Any] = dataclasses.field(default_factory=dict)
    manifest_sha256: str = ""  # the seal (manifest_seal) it was read with; "" for a manifest older than seals

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """Validate types so a hand-edited or damaged manifest fails here, with the key's name."""
        if not isinstance(data, dict):
            raise SnapshotError(f"{where}: manifest must be a JSON object")
        for key, types in _MANIFEST_TYPES.items():
            if key not in data:
                raise SnapshotError(f"{where}: missing key '{key}'")
            if not isinstance(data[key], types) or isinstance(data[key], bool):
                raise SnapshotError(f"{where}: key '{key}' has the wrong type ({type(data[key]).__name__})")
        if data["format"] > FORMAT_SHARDED:
            raise NewerFormat(f"{where}: format {data['format']} is newer than supported ({FORMAT_SHARDED})")
        for key, types in _OPTIONAL.items():
            if key in data and not isinstance(data[key], types):
                raise SnapshotError(f"{where}: key '{key}' has the wrong type ({type(data[key]).__name__})")
        if data["format"] == FORMAT_SHARDED and not data.get("shards"):
            raise SnapshotError(f"{where}: format 2 without a shards list")
        for name, entry in data["files"].items():
            if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("sha256"), str)):
                raise SnapshotError(f"{where}: files['{name}'] needs an int 'size' and a str 'sha256'")
        return cls(**{k: data[k] for k in (*_MANIFEST_TYPES, *_OPTIONAL) if k in data})

    def shard_entries(self, where: str) -> list[ShardEntry]:
        entries = [ShardEntry.from_json(s, where) for s in self.shards]
        check_shards(entries, self.count, where)
        return entries

    def row_steps(self) -> list[tuple[int, int]]:
        """(rows, encoder step) of each shard (format 1: one part); a shard without its own step (a manifest
        older than rolling refreshes) was encoded at the manifest's ``encoder_step``."""
        if self.format != FORMAT_SHARDED:
            return [(self.count, self.encoder_step)]
        return [(s["hi"] - s["lo"], self.encoder_step if s.get("encoder_step") is None else s["encoder_step"])
                for s in self.shards]

    @property
    def oldest_step(self) -> int:
        """The encoder step of the stalest shard."""
        return min(step for _, step in self.row_steps())

    @property
    def mean_step(self) -> float:
        """The row-weighted mean encoder step over the shards."""
        parts = self.row_steps()
        return sum(n * step for n, step in parts) / max(1, sum(n for n, _ in parts))


def files_checksum(files: dict[str, dict[str, Any]]) -> str:
    """sha256 over the files' sha256 hex digests concatenated in file-name order."""
    return hashlib.sha256("".join(files[n]["sha256"] for n in sorted(files)).encode()).hexdigest()


def manifest_seal(body: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of every key but the seal itself: ``files``/``shards`` checksums cover only
    the payload, so without it a hand-edited ``encoder_step`` (or count, meta...) would load as the truth.

    The body goes through a JSON round trip first, so the writer seals exactly what a reader parses back
    (tuples become lists, int dict keys strings)."""
    rest = json.loads(json.dumps({k: v for k, v in body.items() if k != SEAL}))
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def shards_checksum(shards: list[dict[str, Any]]) -> str:
    """Format 2: sha256 over each shard's name, row range and files checksum (and its encoder step, if the
    manifest records one), in shard order."""
    parts = [f"{s['name']}:{s['lo']}:{s['hi']}:{files_checksum(s['files'])}"
             + (f":{s['encoder_step']}" if s.get("encoder_step") is not None else "") for s in shards]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


# -------------------------------------------------------------------------------------- file helpers

def _crash_point(stage: str) -> None:
    """Test hook: die (or hang, to be SIGKILLed) at ``stage`` if OPENBOOK_TEST_CRASH_PUBLISH asks to."""
    want = os.environ.get(CRASH_ENV, "")
    name, _, mode = want.partition(":")
    if name != stage:
        return
    if mode == "hang":
        print(f"openbook-crash-point {stage}", file=sys.stderr, flush=True)
        time.sleep(3600)
    os._exit(137)


# -------------------------------------------------------------------------------------- the snapshot

def _read_manifest(path: Path) -> Manifest:
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise SnapshotError(f"{mpath}: manifest missing (not a complete snapshot)")
    try:
        data = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise SnapshotError(f"{mpath}: invalid JSON ({one_line(e)})") from None
    # A manifest without the seal was written before seals existed: it still loads (backward compatible).
    if isinstance(data, dict) and SEAL in data and data[SEAL] != manifest_seal(data):
        raise SnapshotError(f"{mpath}: {SEAL} does not match its contents (edited or corrupt)")
    return Manifest.from_json(data, str(mpath))


def read_manifest(path: str | Path) -> Manifest:
    """The parsed manifest of the snapshot dir ``path`` (nothing else is read or checked)."""
    return _read_manifest(Path(path))


def _check_version(path: Path, m: Manifest) -> None:
    """A ``vNNNNNN`` dir must hold the manifest of that version (a manifest copied in from elsewhere does not)."""
    named = _VERSION_DIR.match(path.name)
    if named and int(named.group(1)) != m.version:
        raise SnapshotError(f"{path / MANIFEST}: version {m.version} does not match directory {path.name}")


def check_whole(path: Path) -> Manifest:
    """Everything a load checks short of reading the data (cheap: no hashing): the manifest reads, validates and
    matches its seal and directory, and every file it lists (each shard's too) has its recorded size. Pruning
    counts only snapshots that pass toward ``keep``."""
    m = _read_manifest(path)
    _check_version(path, m)
    _check_files(path, m, verify=False)
    for e in m.shard_entries(str(path / MANIFEST)) if m.format == FORMAT_SHARDED else ():
        for name, want in e.files.items():
            check_file(path / e.name / name, want, False)
    return m


def _check_files(path: Path, m: Manifest, verify: bool) -> None:
    """Sizes always (cheap; catches truncation); sha256 of every byte only when ``verify``."""
    if m.format == FORMAT_SHARDED:
        if shards_checksum(m.shards) != m.checksum:
            raise SnapshotError(f"{path / MANIFEST}: checksum does not match its shards list (manifest corrupt)")
        return  # each shard's files are checked as it loads
    if sorted(m.files) != sorted(PAYLOAD):
        raise SnapshotError(f"{path / MANIFEST}: lists files {sorted(m.files)}, expected {sorted(PAYLOAD)}")
    if files_checksum(m.files) != m.checksum:
        raise SnapshotError(f"{path / MANIFEST}: checksum does not match its files list (manifest corrupt)")
    for name in PAYLOAD:
        check_file(path / name, m.files[name], verify)


def shard_dim(shard_dir: Path) -> int:
    emb = _load_npy(shard_dir / EMBEDDINGS_FILE)
    if emb.ndim != 2:
        raise SnapshotError(f"{shard_dir / EMBEDDINGS_FILE}: expected [n, d], got shape {emb.shape}")
    return int(emb.shape[1])


def _load_npy(p: Path) -> np.ndarray:
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise SnapshotError(f"{p}: unreadable .npy ({one_line(e)})") from None


def _index_cfg_from(m: Manifest) -> IndexConfig:
    known = {f.name for f in dataclasses.fields(IndexConfig)}
    try:
        return IndexConfig(**{k: v for k, v in m.index_config.items() if k in known})
    except (TypeError, ValueError):
        return IndexConfig(factory=m.factory)


class IndexSnapshot:
    """One published snapshot, loaded: memory-mapped embeddings/doc ids and a searchable index."""

    def __init__(self, path: Path, manifest: Manifest, embeddings: np.ndarray, doc_ids: np.ndarray,
                 index: VectorIndex):
        self.path = path
        self.manifest = manifest
        self.embeddings = embeddings
        self.doc_ids = doc_ids
        self.index = index

    @classmethod
    def load(cls, path: str | Path, verify: bool = True, index_cfg: IndexConfig | None = None,
             part: Part | None = None, cpu: bool = False) -> IndexSnapshot:
        """Load and check a snapshot dir; ``verify`` hashes every file (cost ~ its size).

        ``index_cfg`` sets search params/device; by default the config it was built with; ``cpu``: kept on CPU
        whatever the config says (a publisher's own check: only searchers copy indexes to their GPU). ``part``: this
        rank's part of a sharded placement (format 2, world > 1): only its shards' indexes and embeddings
        are loaded (and verified); searches are then collectives over the ranks. A format-1 snapshot is one
        index: every rank loads it whole.
        """
        path = Path(path)
        if not path.is_dir():
            raise SnapshotError(f"{path}: snapshot directory not found")
        m = _read_manifest(path)
        _check_version(path, m)
        _check_files(path, m, verify)
        index_cfg = index_cfg or _index_cfg_from(m)
        index_cfg = index_cfg.on_cpu() if cpu else index_cfg
        if m.format == FORMAT_SHARDED:
            return cls._load_shards(path, m, verify, index_cfg, part)
        emb, ids = _load_npy(path / EMBEDDINGS_FILE), _load_npy(path / DOC_IDS_FILE)
        if emb.dtype != np.float16 or emb.shape != (m.count, m.dim):
            raise SnapshotError(f"{path / EMBEDDINGS_FILE}: {emb.dtype} {emb.shape} != manifest float16 "
                                f"{(m.count, m.dim)}")
        if ids.dtype.kind != "U" or ids.shape != (m.count,):
            raise SnapshotError(f"{path / DOC_IDS_FILE}: {ids.dtype} {ids.shape} != manifest unicode ({m.count},)")
        index = load_index(path / INDEX_FILE, index_cfg)
        if index.ntotal != m.count or index.dim != m.dim:
            raise SnapshotError(f"{path / INDEX_FILE}: index has {index.ntotal} vectors of dim {index.dim}, "
                                f"manifest {m.count} of dim {m.dim}")
        return cls(path, m, emb, ids, index)

    @classmethod
    def _load_shards(cls, path: Path, m: Manifest, verify: bool, index_cfg: IndexConfig,
                     part: Part | None) -> IndexSnapshot:
        """Format 2: every shard (replicated) or this rank's (sharded; the doc ids of all, memory-mapped)."""
        entries = m.shard_entries(str(path / MANIFEST))
        mine = [part is None or part.world == 1 or part.owns(i) for i in range(len(entries))]
        shards = [load_shard(path / e.name, e, m.dim, verify, index_cfg if own else None)
                  for e, own in zip(entries, mine)]
        starts = [s.lo for s in shards]
        ids = Rows([s.doc_ids for s in shards], starts)
        if all(mine):
            return cls(path, m, Rows([s.embeddings for s in shards], starts), ids, ShardSet(shards, m.dim))
        local = [s for s, own in zip(shards, mine) if own]
        return cls(path, m, None, ids, DistributedShardSet(local, part.exchange, m.count, m.dim))

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def encoder_step(self) -> int:
        return self.manifest.encoder_step

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def created_at(self) -> float:
        return self.manifest.created_at

    @property
    def weights_time(self) -> float:
        return self.manifest.weights_time

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows int64 [Q, k], scores float32 [Q, k]); rows index ``doc_ids``/``embeddings``, -1 = none."""
        return self.index.search(queries, k)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of ``rows`` (any shape); under a sharded placement a collective that fetches
        them from the ranks holding them (``embeddings`` is then None)."""
        if isinstance(self.index, DistributedShardSet):
            return self.index.vectors(rows)
        return np.asarray(self.embeddings[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    @property
    def sharded(self) -> bool:
        """True when this process holds only its part of the snapshot (searches are collectives)."""
        return isinstance(self.index, DistributedShardSet)

    def ids(self, rows: np.ndarray) -> np.ndarray:
        """Doc id strings for ``rows`` (same shape); "" where a row is -1 (publish refuses empty ids)."""
        r = np.asarray(rows, dtype=np.int64)
        out = self.doc_ids[np.where(r >= 0, r, 0)]
        return np.where(r >= 0, out, "")

    def __repr__(self) -> str:
        return f"IndexSnapshot(v{self.version}, step={self.encoder_step}, count={self.count}, path={self.path})"


# ------------------------------------------------------------------------------------------ the store

class SnapshotStore:
    """The ``vNNNNNN`` snapshots under ``root``: publish, list, load the newest good one, prune, clean up.

    Safe with several writers (version claims retry) and readers in other processes (a reader that
    memory-mapped a pruned snapshot keeps its data: deletion only unlinks the files).
    """

    def __init__(self, root: str | Path, keep: int = 3, index_cfg: IndexConfig | None = None,
                 stale_seconds: float = 3600.0):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.index_cfg = index_cfg  # search params for loads; None = each snapshot's own
        self.stale_seconds = stale_seconds
        self._last_good: int | None = None  # newest version this store wrote or verified; never pruned
        self._bad: dict[int, str] = {}  # version -> why it failed to load here (a sha256 mismatch prune cannot see)

    def path(self, version: int) -> Path:
        return self.root / version_dir_name(version)

    def versions(self) -> list[int]:
        """Published versions, ascending: ``vNNNNNN`` dirs holding a manifest (not necessarily valid)."""
        return sorted(v for v, p in self._version_dirs() if (p / MANIFEST).is_file())

    def _version_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        return [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _VERSION_DIR.match(p.name))]

    def load(self, version: int, verify: bool = True, cpu: bool = False) -> IndexSnapshot:
        path = self.path(version)
        if not path.is_dir():
            raise SnapshotError(f"{path}: snapshot v{version} not found")
        try:
            snap = IndexSnapshot.load(path, verify=verify, index_cfg=self.index_cfg, cpu=cpu)
        except SnapshotError as e:
            if not isinstance(e, NewerFormat):
                self._bad[version] = one_line(e)  # the next prune moves it aside (versions are never reused)
            raise
        if verify:
            self._last_good = max(version, self._last_good or 0)
            self._bad.pop(version, None)
        return snap

    def find(self, encoder_step: int, weights_time: float) -> int | None:
        """The newest version built from the weights of ``encoder_step`` taken at ``weights_time`` (a resumed
        run looks for a refresh the previous process published after its checkpoint); None if absent."""
        for v in reversed(self.versions()):
            try:
                m = _read_manifest(self.path(v))
            except SnapshotError:
                continue
            if m.encoder_step == encoder_step and m.weights_time == weights_time:
                return v
        return None

    def latest(self, verify: bool = True) -> IndexSnapshot | None:
        """The newest snapshot that loads (and verifies); broken newer ones are skipped with a warning."""
        for v in reversed(self.versions()):
            try:
                return self.load(v, verify=verify)
            except SnapshotError as e:
                log.warning("skipping snapshot %s: %s", self.path(v), e)
        return None

    def publish(self, embeddings: np.ndarray, doc_ids: Sequence[str] | np.ndarray, *, encoder_step: int,
                index_cfg: IndexConfig, weights_time: float | None = None, meta: dict | None = None,
                index: VectorIndex | None = None, protect: Iterable[int] = ()) -> IndexSnapshot:
        """Write a new snapshot atomically and return it (loaded); then prune and clean up. Out of space, it
        frees what it may and tries once more (:meth:`with_space`).

        The index is built from the float16-rounded embeddings, so index scores and stored embeddings
        agree exactly. A passed ``index`` must hold row i = embeddings[i].
        """
        emb16, ids = check_rows(embeddings, doc_ids)
        if index is None:
            index = build_index(emb16, index_cfg)
        if index.ntotal != emb16.shape[0] or index.dim != emb16.shape[1]:
            raise SnapshotError(f"publish: index has {index.ntotal} vectors of dim {index.d}, embeddings "
                                f"{emb16.shape}")
        head = {"format": FORMAT, "encoder_step": int(encoder_step), "weights_time": weights_time,
                "dim": int(emb16.shape[1]), "count": int(emb16.shape[0]), "factory": index_cfg.factory,
                "meta": dict(meta or {}), "index_config": dataclasses.asdict(index_cfg)}
        protect = tuple(protect)
        version, body = self.with_space(lambda: self._write(emb16, ids, index, head), protect)
        self._last_good = version
        log.info("published snapshot %s (%d docs, encoder_step %d)", self.path(version), body["count"],
                 encoder_step)
        self.prune(protect)
        self.cleanup()
        return self.load(version, verify=False, cpu=True)

    def _write(self, emb16: np.ndarray, ids: np.ndarray, index: VectorIndex, head: dict) -> tuple[int, dict]:
        """One attempt at a format-1 snapshot: its version and manifest."""
        tmp = self.stage()
        try:
            files = self._write_payload(tmp, emb16, ids, index)
            created = time.time()
            wt = head["weights_time"]
            body = {**head, "version": 0, "created_at": created, "weights_time": float(created if wt is None else wt),
                    "files": files, "checksum": files_checksum(files)}
            return self._claim(tmp, body), body
        except BaseException:
            rmtree(tmp)  # a clean failure leaves nothing; only a killed writer leaves .tmp-* for cleanup()
            raise

    def with_space(self, write: Callable[[], T], protect: Iterable[int] = ()) -> T:
        """``write()``; if it fails for lack of space (:func:`write_error`), :meth:`free_space` and call it once
        more. A failure then, or with nothing to free, is a one-line :class:`SnapshotError`. ``write`` must
        remove its own partial files (every writer here does)."""
        protect = tuple(protect)
        try:
            return write()
        except Exception as e:
            first = write_error(e)
            if first is None:
                raise
        freed = self.free_space(protect)
        if not freed:
            raise SnapshotError(f"{self.root}: cannot publish a snapshot: {_why(first)}; no old snapshot to "
                                "delete") from None
        log.warning("publishing under %s failed: %s; deleted %s to make room, trying once more", self.root,
                    _why(first), ", ".join(freed))
        try:
            return write()
        except Exception as e:
            again = write_error(e)
            if again is None:
                raise
        raise SnapshotError(f"{self.root}: cannot publish a snapshot: {_why(again)}, even after deleting "
                            f"{', '.join(freed)}") from None

    def free_space(self, protect: Iterable[int] = ()) -> list[str]:
        """Delete every snapshot except the ``protect``-ed ones and the newest good one, the ``.bad-*`` dirs
        (kept for inspection until space matters more) and the leftovers of dead writers (a publish failed for
        lack of space); the names of what went."""
        keep = set(protect) | {v for v in (self._last_good, self._newest_whole()) if v is not None}
        gone = [version_dir_name(v) for v in self._remove([v for v in self.versions() if v not in keep])]
        bad = sorted(p for p in self.root.iterdir() if p.name.startswith(BAD_PREFIX)) if self.root.is_dir() else []
        for p in bad:
            rmtree(p)
        return gone + [p.name for p in bad] + [p.name for p in self.cleanup()]

    def _newest_whole(self) -> int | None:
        """The newest version that is whole (:func:`check_whole`: no hashing) and did not fail to load here."""
        return next((v for v in reversed(self.versions()) if self._why_bad(v) is None), None)

    def _why_bad(self, version: int) -> str | None:
        """Why ``version`` is not a whole snapshot (one line), or None if it is: it failed to load in this store,
        or fails :func:`check_whole`. An OSError (it vanished under a concurrent pruner) counts as bad too: moving
        it aside then finds nothing and skips it."""
        if version in self._bad:
            return self._bad[version]
        try:
            check_whole(self.path(version))
        except NewerFormat:
            return None  # a newer openbook's, sharing the store: not ours to judge (or move)
        except (SnapshotError, OSError) as e:
            return one_line(e)
        return None

    def stage(self) -> Path:
        """A new hidden staging dir: :meth:`publish` writes into one; for a format-2 snapshot shard writers
        (:func:`write_shard`) fill it and :meth:`publish_shards` makes it a version. A writer killed meanwhile
        leaves it for :meth:`cleanup`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        return tmp

    def publish_shards(self, staging: Path, *, encoder_step: int, index_cfg: IndexConfig, count: int | None = None,
                       weights_time: float | None = None, meta: dict | None = None,
                       protect: Iterable[int] = (), shard_steps: dict[str, int] | None = None,
                       rotation: dict[str, int] | None = None) -> int:
        """Publish the shards written into ``staging`` as one format-2 snapshot and return its version: check
        that they tile the rows (``count`` of them, if given) and that their files are whole, write the
        manifest, claim the version. Shard contents are not re-hashed here (their writers recorded the
        sha256; a full load verifies), and nothing is loaded: the committing process may hold no shard.

        Each shard entry records its ``encoder_step``: ``shard_steps[name]`` for a shard carried over from an
        older snapshot (a rolling refresh), else ``encoder_step``. ``rotation``: recorded as is."""
        try:
            for p in staging.iterdir():  # a shard writer killed mid-write left its hidden part dir
                if p.name.startswith((".part-", ".trash-")):
                    rmtree(p)
            entries = sorted((read_shard_entry(d) for d in staging.iterdir() if d.name.startswith("shard-")),
                             key=lambda e: e.lo)
            if not entries:
                raise SnapshotError(f"{staging}: no shards written")
            check_shards(entries, entries[-1].hi if count is None else count, str(staging))
            dims = {shard_dim(staging / e.name) for e in entries}
            if len(dims) != 1:
                raise SnapshotError(f"{staging}: shards have different dims {sorted(dims)}")
            steps = shard_steps or {}
            entries = [dataclasses.replace(e, encoder_step=int(steps.get(e.name, encoder_step))) for e in entries]
            shards = [e.to_json() for e in entries]
            created = time.time()
            body = {"format": FORMAT_SHARDED, "version": 0, "encoder_step": int(encoder_step), "created_at": created,
                    "weights_time": float(created if weights_time is None else weights_time), "dim": dims.pop(),
                    "count": entries[-1].hi, "factory": index_cfg.factory, "files": {},
                    "checksum": shards_checksum(shards), "meta": dict(meta or {}),
                    "index_config": dataclasses.asdict(index_cfg), "shards": shards}
            if rotation is not None:
                body["rotation"] = dict(rotation)
            for e in entries:  # sizes only: a truncated shard file fails here, before the version exists
                for name, want in e.files.items():
                    if not (staging / e.name / name).is_file():
                        raise SnapshotError(f"{staging / e.name / name}: file missing")
                    size = (staging / e.name / name).stat().st_size
                    if size != want["size"]:
                        raise SnapshotError(f"{staging / e.name / name}: size {size} != shard.json {want['size']}")
            version = self._claim(staging, body)
        except BaseException:
            rmtree(staging)
            raise
        self._last_good = version
        log.info("published sharded snapshot %s (%d docs in %d shards, encoder_step %d)", self.path(version),
                 body["count"], len(entries), encoder_step)
        self.prune(protect)
        self.cleanup()
        return version

    @staticmethod
    def _write_payload(tmp: Path, emb16: np.ndarray, ids: np.ndarray, index: VectorIndex) -> dict:
        save_npy(tmp / EMBEDDINGS_FILE, emb16)
        _crash_point("after_embeddings")
        save_npy(tmp / DOC_IDS_FILE, ids)
        index.save(tmp / INDEX_FILE)
        _crash_point("after_index")
        return {n: file_entry(tmp / n) for n in PAYLOAD}

    def _next_version(self) -> int:
        """One past the highest version claimed: the dirs (moved-aside ``.bad-*`` ones too) and ``.highwater``."""
        names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        claimed = [int(m.group(1)) for n in names if (m := _VERSION_DIR.match(n) or _BAD_DIR.match(n))]
        return max([*claimed, self._highwater()]) + 1

    def _highwater(self) -> int:
        try:
            return int((self.root / HIGHWATER).read_text().strip())
        except (FileNotFoundError, ValueError):
            return 0  # none yet (or unreadable): the version dirs alone decide

    def _raise_highwater(self, version: int) -> None:
        """Record ``version`` as claimed (write-then-rename: the file is whole or the old one)."""
        if version <= self._highwater():
            return
        tmp = self.root / f"{HIGHWATER}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.write_text(f"{version}\n")
            os.replace(tmp, self.root / HIGHWATER)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _claim(self, tmp: Path, body: dict) -> int:
        """Rename ``tmp`` to the next free ``vNNNNNN``; a name taken by a concurrent writer -> try the next."""
        version = self._next_version()
        for _ in range(1000):
            body["version"] = version  # the manifest names its own version: rewrite it (and the seal) per attempt
            body[SEAL] = manifest_seal(body)
            write_json(tmp / MANIFEST, body)
            fsync_path(tmp)
            _crash_point("before_rename")
            try:
                os.rename(tmp, self.path(version))  # fails (ENOTEMPTY/EEXIST) if another writer won
            except OSError as e:
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                version = max(version + 1, self._next_version())
                continue
            try:
                self._raise_highwater(version)
            except OSError as e:  # the version is published: only the guard against reuse is behind
                log.warning("%s: could not record version %d in %s: %s", self.root, version, HIGHWATER, _why(e))
            fsync_path(self.root)
            return version
        raise SnapshotError(f"{self.root}: could not claim a version after 1000 attempts")

    def prune(self, protect: Iterable[int] = ()) -> list[int]:
        """Keep the newest ``keep`` whole versions, ``protect``-ed ones and the last known-good one; delete the
        other whole ones and move every other bad one aside (:meth:`_move_aside`). Returns the versions gone.

        Only whole snapshots (:meth:`_why_bad`) count toward ``keep``: a corrupt newest one must never push the
        good ones out while it stays. Each deleted one is renamed to ``.trash-*`` first (one atomic step out of
        sight), then removed.
        """
        versions = self.versions()
        why = {v: w for v in versions if (w := self._why_bad(v)) is not None}
        good = [v for v in versions if v not in why]
        keep = set(good[-self.keep:]) | set(protect)
        if self._last_good is not None:
            keep.add(self._last_good)  # the one this store wrote or verified last stays, whatever
        moved = self._move_aside({v: w for v, w in why.items() if v not in keep})
        return sorted(moved + self._remove([v for v in good if v not in keep]))

    def _move_aside(self, bad: dict[int, str]) -> list[int]:
        """Rename each bad version to ``.bad-vNNNNNN-<rand>`` (atomic; readers never look at hidden dirs; kept for
        inspection), with one warning line each; one renamed away by another process meanwhile is skipped."""
        if not bad:
            return []
        try:
            self._raise_highwater(max(bad))  # its number must stay claimed even once the .bad dir is deleted
        except OSError as e:
            log.warning("%s: could not record version %d in %s: %s", self.root, max(bad), HIGHWATER, _why(e))
        moved = []
        for v, why in sorted(bad.items()):
            dest = self.root / f"{BAD_PREFIX}{version_dir_name(v)}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.path(v), dest)
            except FileNotFoundError:
                continue  # another process pruned or moved it first
            except OSError as e:  # the publish that pruned has succeeded: it must not fail over this
                log.warning("snapshot %s is bad (%s); could not move it aside: %s", self.path(v), why, _why(e))
                continue
            log.warning("snapshot %s is bad (%s); moved aside to %s", self.path(v), why, dest)
            self._bad.pop(v, None)
            moved.append(v)
        if moved:
            fsync_path(self.root)
        return moved

    def _remove(self, versions: list[int]) -> list[int]:
        removed = []
        for v in versions:
            trash = self.root / f"{TRASH_PREFIX}{version_dir_name(v)}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.path(v), trash)
            except FileNotFoundError:
                continue  # another process pruned it first
            rmtree(trash)
            removed.append(v)
        if removed:
            fsync_path(self.root)
            log.info("pruned snapshots %s under %s", removed, self.root)
        return removed

    def cleanup(self) -> list[Path]:
        """Remove leftovers of killed writers/pruners; returns what was removed.

        ``.trash-*`` dirs always go (already out of sight); ``.bad-*`` ones stay, for inspection (only
        :meth:`free_space` deletes them). A ``.tmp-<host>-<pid>-*`` dir goes if its writer is on this host and
        that pid is dead, or if nothing in it changed for ``stale_seconds`` (writers on other hosts of a shared
        filesystem, or a reused pid).
        """
        if not self.root.is_dir():
            return []
        removed = []
        for p in self.root.iterdir():
            if p.name.startswith(TRASH_PREFIX) or (p.name.startswith(TMP_PREFIX) and self._tmp_is_stale(p)):
                rmtree(p)
                removed.append(p)
        return removed

    def _tmp_is_stale(self, p: Path) -> bool:
        m = _TMP_DIR.match(p.name)
        if m and m.group("host") == socket.gethostname() and not _pid_alive(int(m.group("pid"))):
            return True
        try:
            newest = max([p.stat().st_mtime] + [c.stat().st_mtime for c in p.iterdir()])
        except FileNotFoundError:
            return False  # renamed/removed under us: its owner is active
        return time.time() - newest > self.stale_seconds


def write_error(e: BaseException) -> OSError | None:
    """The OSError of a failed write (ENOSPC, EDQUOT, EFBIG...) behind ``e``, which may be a Ray task error
    re-raising what an actor's write raised (its ``cause``); None for anything else, timeouts and lost
    connections included (OSErrors too, but no write failed)."""
    cause = getattr(e, "cause", None)
    err = cause if isinstance(cause, OSError) else e
    if isinstance(err, OSError) and not isinstance(err, (TimeoutError, ConnectionError)):
        return err
    return None


def _why(e: OSError) -> str:
    return e.strerror or one_line(e)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
