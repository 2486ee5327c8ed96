"""Passage corpora: validated once, converted to a cached Arrow file, then memory-mapped.

A corpus is a set of rows ``{id, title, text}``. The source (JSONL such as BEIR's ``corpus.jsonl``, DPR's
``psgs_w100.tsv``, Parquet, a directory written by ``datasets.Dataset.save_to_disk``, or an in-memory
``datasets.Dataset``) is read in a streaming way, checked, and written once to
``cache_dir/<stem>-<fingerprint>.arrow`` (Arrow IPC file format). Later loads of the same unchanged
source (same path, size and mtime) open that file memory-mapped, so a 1M-passage corpus costs no RAM
and loads in milliseconds, and every process (trainer ranks, Ray encoder actors) shares the pages.

Source columns are mapped onto ``id``, ``title``, ``text`` by ``columns`` (``{"id": "docid"}``); BEIR's
``_id`` is found without one. Error positions: JSONL/TSV problems name the 1-based *line* (as an
editor shows it); Parquet/Arrow problems name the 0-based *row* (as ``corpus[i]`` and pandas show it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from openbook.errors import CorpusError

# Bump when the cached Arrow layout or the validation rules change, so old caches are not reused.
CACHE_VERSION = 1
BATCH_ROWS = 50_000
FIELDS = ("id", "title", "text")
SCHEMA = pa.schema([(f, pa.string()) for f in FIELDS])
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")
TSV_SUFFIXES = (".tsv",)
DPR_TSV_ORDER = ("id", "text", "title")  # psgs_w100.tsv's columns, for a TSV without a header line
ALIASES = {"id": ("_id",)}  # BEIR's corpus.jsonl


def source_names(columns: Mapping[str, str] | None, names: list[str] | None = None) -> dict[str, str]:
    """Our field -> the source's column name: ``columns`` first, then known aliases present in ``names``."""
    out = {f: (columns or {}).get(f, f) for f in FIELDS}
    for f, aliases in ALIASES.items():
        if names is not None and f not in (columns or {}) and f not in names:
            out[f] = next((a for a in aliases if a in names), f)
    return out


def _first_line(e: BaseException) -> str:
    """Library error text can span lines; our messages must stay on one."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def source_fingerprint(path: Path) -> str:
    """Hash of (resolved path, size, mtime) of the file or of every file in the directory.

    Cheap (no content read) and changes whenever the source is rewritten.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        files = [path]
    parts: list[Any] = [CACHE_VERSION, str(path.resolve())]
    for f in files:
        st = f.stat()
        parts.append([f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------- JSONL


def _jsonl_value(row: dict, field: str, where: str, name: str | None = None) -> str:
    """One field of one JSONL row (read from source column ``name``) as a str, or a one-line CorpusError."""
    name = name or field
    if name not in row:
        if field == "title" and name == "title":
            return ""  # a corpus without titles (BEIR's can be empty, some have none)
        raise CorpusError(f"{where}: missing field '{name}'" + (f" (mapped to {field})" if name != field else ""))
    value = row[name]
    if type(value) is str:
        if field != "title" and not value.strip():
            raise CorpusError(f"{where}: field '{field}' is empty")
        return value
    if field == "id" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # numeric ids are common (e.g. DPR's psgs_w100); store as str
    if field == "title" and value is None:
        return ""
    kind = "null" if value is None else type(value).__name__
    raise CorpusError(f"{where}: field '{field}' must be a string, got {kind}")


def _not_an_object(where: str, lineno: int, raw: bytes, row: Any) -> CorpusError:
    """The error for a line that is not a JSON object (``row`` is the parse error if it failed)."""
    if lineno == 1 and raw.lstrip().startswith(b"["):  # a whole JSON array file: say so
        return CorpusError(f"{where}: expected JSON lines (one object per line), found a JSON array")
    if isinstance(row, ValueError):
        return CorpusError(f"{where}: invalid JSON ({_first_line(row)})")
    return CorpusError(f"{where}: expected a JSON object, got {type(row).__name__}")


def _jsonl_batches(path: Path, label: str, line_of_row: list[int],
                   columns: Mapping[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    """Parse JSONL line by line, yielding record batches of BATCH_ROWS rows.

    Only one batch of Python strings is alive at a time; ``line_of_row`` collects the line number
    of every row (4 bytes each) so a duplicate id found later can be reported by line.
    """
    cols: tuple[list[str], list[str], list[str]] = ([], [], [])
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue  # tolerate blank lines (e.g. a trailing newline pair)
            where = f"{label}:{lineno}"
            try:
                row = json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                row = e
            if not isinstance(row, dict):
                raise _not_an_object(where, lineno, raw, row)
            names = source_names(columns, list(row))
            for col, field in zip(cols, FIELDS):
                col.append(_jsonl_value(row, field, where, names[field]))
            line_of_row.append(lineno)
            if len(cols[0]) >= BATCH_ROWS:
                yield pa.record_batch(list(cols), schema=SCHEMA)
                cols = ([], [], [])
    if cols[0]:
        yield pa.record_batch(list(cols), schema=SCHEMA)


# ----------------------------------------------------------------------------- TSV (DPR)


def _tsv_batches(path: Path, label: str, line_of_row: list[int],
                 columns: Mapping[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    """DPR's ``psgs_w100.tsv`` layout, streamed: a header line names the columns (else id, text, title)."""
    csv.field_size_limit(1 << 30)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        try:
            first = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as e:
            raise CorpusError(f"{label}:1: unreadable TSV ({_first_line(e)})") from None
        names = source_names(columns, first)
        header = names["id"] in first and names["text"] in first
        order = first if header else list(DPR_TSV_ORDER)
        missing = [names[f] for f in FIELDS if names[f] not in order and f != "title"]
        if missing:
            raise CorpusError(f"{label}:1: missing column '{missing[0]}' (columns: {', '.join(order)})")
        at = {f: order.index(names[f]) if names[f] in order else None for f in FIELDS}
        cols: tuple[list[str], list[str], list[str]] = ([], [], [])
        rows = reader if header else _chain_first(first, reader)
        try:
            for cells in rows:
                lineno = reader.line_num  # the row's last line (a quoted field may span lines)
                if not cells or cells == [""]:
                    continue
                if len(cells) != len(order):
                    how = "" if header else f"; no header line names {names['id']} and {names['text']}, so DPR's order"
                    raise CorpusError(f"{label}:{lineno}: {len(cells)} fields, expected {len(order)} "
                                      f"({', '.join(order)}{how})")
                row = {f: (cells[i] if i is not None else "") for f, i in at.items()}
                for col, field in zip(cols, FIELDS):
                    col.append(_jsonl_value(row, field, f"{label}:{lineno}"))
                line_of_row.append(lineno)
                if len(cols[0]) >= BATCH_ROWS:
                    yield pa.record_batch(list(cols), schema=SCHEMA)
                    cols = ([], [], [])
        except (csv.Error, UnicodeDecodeError) as e:
            raise CorpusError(f"{label}:{reader.line_num}: unreadable TSV ({_first_line(e)})") from None
    if cols[0]:
        yield pa.record_batch(list(cols), schema=SCHEMA)


def _chain_first(first: list[str], rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    yield from rest


# ----------------------------------------------------------------------------- Parquet / Arrow


def _table_batch(batch: pa.RecordBatch, label: str, offset: int,
                 names: Mapping[str, str] | None = None) -> pa.RecordBatch:
    """Check and normalise one batch of a columnar source (rows numbered from ``offset``); ``names`` maps
    our fields to the source's columns (a missing title column reads as empty titles)."""
    names = names or {f: f for f in FIELDS}
    out = []
    for field in FIELDS:
        at = batch.schema.get_field_index(names[field])
        if at < 0:  # only a title can be missing: _require_columns checked the others
            out.append(pa.array([""] * batch.num_rows, pa.string()))
            continue
        col = batch.column(at)
        t = col.type
        if field == "id" and pa.types.is_integer(t):
            col = pc.cast(col, pa.string())
        elif pa.types.is_large_string(t) or str(t) == "string_view":
            col = pc.cast(col, pa.string())
        elif not pa.types.is_string(t):
            raise CorpusError(f"{label}: column '{names[field]}' must be strings, got {t}")
        if field == "title":
            col = pc.fill_null(col, "")
        else:
            bad = pc.or_kleene(pc.is_null(col), pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0))
            if pc.any(bad).as_py():
                row = offset + int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
                raise CorpusError(f"{label}: row {row}: field '{names[field]}' is null or empty")
        out.append(col)
    return pa.record_batch(out, schema=SCHEMA)


def _require_columns(names: list[str], label: str, columns: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our field -> source column for a columnar source; one line naming a missing id or text column."""
    mapped = source_names(columns, names)
    missing = [mapped[f] for f in FIELDS if mapped[f] not in names and f != "title"]
    if missing:
        raise CorpusError(f"{label}: missing column '{missing[0]}' (columns: {', '.join(names)})")
    return mapped


def _parquet_batches(path: Path, label: str, columns: Mapping[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"{label}: not a readable Parquet file ({_first_line(e)})") from None
    names = _require_columns(pf.schema_arrow.names, label, columns)
    present = [n for n in names.values() if n in pf.schema_arrow.names]
    offset = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=present):
        yield _table_batch(batch, label, offset, names)
        offset += batch.num_rows


def _arrow_dir_batches(path: Path, label: str, columns: Mapping[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    """Read a ``save_to_disk`` directory's Arrow stream files directly (listed in state.json).

    Plain pyarrow instead of ``datasets.load_from_disk``: no heavy import, and a 0-row dataset
    (which load_from_disk fails on) is reported as an empty corpus.
    """
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise CorpusError(
            f"{label}: expected one Dataset, found a DatasetDict (splits: {', '.join(splits)}); pass one split's directory"
        )
    try:
        files = [path / f["filename"] for f in json.loads((path / "state.json").read_text())["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorpusError(
            f"{label}: not a datasets.save_to_disk directory (state.json: {_first_line(e)})"
        ) from None
    offset = 0
    for f in files:
        try:
            reader = pa.ipc.open_stream(pa.memory_map(str(f), "r"))
        except (OSError, pa.ArrowException) as e:
            raise CorpusError(f"{label}: unreadable Arrow file {f.name} ({_first_line(e)})") from None
        names = _require_columns(reader.schema.names, label, columns)
        for batch in reader:
            for i in range(0, batch.num_rows, BATCH_ROWS):
                yield _table_batch(batch.slice(i, BATCH_ROWS), label, offset + i, names)
            offset += batch.num_rows


def _table_batches(table: pa.Table, label: str, columns: Mapping[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    """An in-memory Arrow table (a ``datasets.Dataset``'s), in batches."""
    names = _require_columns(table.schema.names, label, columns)
    offset = 0
    for batch in table.to_batches(max_chunksize=BATCH_ROWS):
        yield _table_batch(batch, label, offset, names)
        offset += batch.num_rows


# ----------------------------------------------------------------------------- conversion


def find_duplicate(ids: pa.ChunkedArray | pa.Array) -> tuple[str, int, int] | None:
    """The first repeated id (by position of its second occurrence) and its two rows, or None.

    Vectorised: the common case (no duplicates) is one ``count_distinct`` over the column.
    """
    if pc.count_distinct(ids).as_py() == len(ids):
        return None
    counts = pc.value_counts(ids)
    dups = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    seen: dict[str, int] = {}
    for i in np.flatnonzero(pc.is_in(ids, value_set=dups).to_numpy(zero_copy_only=False)):
        v = ids[int(i)].as_py()
        if v in seen:
            return v, seen[v], int(i)
        seen[v] = int(i)
    return None  # unreachable: count_distinct said there was one


def _source_batches(path: Path, label: str, line_of_row: list[int],
                    columns: Mapping[str, str] | None = None) -> Iterator[pa.RecordBatch]:
    if path.is_dir():
        return _arrow_dir_batches(path, label, columns)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_batches(path, label, line_of_row, columns)
    if suffix in TSV_SUFFIXES:
        return _tsv_batches(path, label, line_of_row, columns)
    if suffix in PARQUET_SUFFIXES:
        return _parquet_batches(path, label, columns)
    raise CorpusError(f"{label}: unsupported corpus format '{suffix}' (expected .jsonl, .json, .tsv, .parquet, "
                      "a datasets directory or a BEIR directory)")


def _convert(path: Path | Any, label: str, dest: Path, columns: Mapping[str, str] | None = None) -> None:
    """Stream the source into ``dest`` (Arrow IPC file) via a temp file + rename: never half-written."""
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    line_of_row: list[int] = []
    try:
        batches = (_table_batches(path.data.table, label, columns) if not isinstance(path, Path)
                   else _source_batches(path, label, line_of_row, columns))
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            for batch in batches:
                writer.write_batch(batch)
        _check_written(tmp, label, line_of_row)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _check_written(tmp: Path, label: str, line_of_row: list[int]) -> None:
    """Whole-corpus checks (emptiness, unique ids) on the memory-mapped result."""
    with pa.memory_map(str(tmp), "r") as src:
        ids = pa.ipc.open_file(src).read_all().column("id")
        if len(ids) == 0:
            raise CorpusError(f"{label}: corpus is empty")
        dup = find_duplicate(ids)
    if dup is not None:
        value, a, b = dup
        where = f"lines {line_of_row[a]} and {line_of_row[b]}" if line_of_row else f"rows {a} and {b}"
        raise CorpusError(f"{label}: duplicate id '{value}' ({where})")


def load_corpus(path: str | os.PathLike | Any, cache_dir: str | os.PathLike,
                columns: Mapping[str, str] | None = None) -> Corpus:
    """Load (converting and caching on first use) the corpus at ``path``, a BEIR directory (its corpus.jsonl)
    or an in-memory ``datasets.Dataset``; ``columns`` maps source column names (see the module doc)."""
    if hasattr(path, "_fingerprint") and hasattr(path, "data"):  # a datasets.Dataset, in memory
        if getattr(path, "_indices", None) is not None:  # after select/shuffle/filter: its rows, not the table's
            path = path.flatten_indices()
        fp = hashlib.sha256(json.dumps([CACHE_VERSION, path._fingerprint, dict(columns or {})]).encode()).hexdigest()
        return _cached(path, "dataset", fp[:20], Path(cache_dir), columns, Path(f"<datasets.Dataset {fp[:8]}>"))
    src = Path(path)
    if (src / "corpus.jsonl").is_file() and not (src / "state.json").exists():
        src = src / "corpus.jsonl"  # a BEIR directory
    if not src.exists():
        raise CorpusError(f"{path}: corpus file not found")
    fp = source_fingerprint(src)
    if columns:
        fp = hashlib.sha256(json.dumps([fp, dict(columns)]).encode()).hexdigest()[:20]
    return _cached(src, src.stem or "corpus", fp, Path(cache_dir), columns, src)


def _cached(source: Path | Any, stem: str, fp: str, cache: Path, columns: Mapping[str, str] | None,
            path: Path) -> Corpus:
    cache.mkdir(parents=True, exist_ok=True)
    dest = cache / f"{stem}-{fp}.arrow"
    if dest.is_file():
        try:
            return Corpus(dest, path, fp)
        except pa.ArrowException:
            pass  # unreadable cache (e.g. disk trouble): rebuild below
    _convert(source, str(path), dest, columns)
    return Corpus(dest, path, fp)


class Corpus:
    """A memory-mapped, validated corpus. Rows are ``{"id", "title", "text"}`` dicts.

    Pickles as its paths only (it re-maps the cache file on unpickling), so sending one to a Ray
    actor or a DataLoader worker is cheap.
    """

    def __init__(self, cache_path: Path, path: Path, fingerprint: str) -> None:
        self.cache_path = Path(cache_path)
        self.path = Path(path)
        self.fingerprint = fingerprint
        self._open()

    def _open(self) -> None:
        self._mmap = pa.memory_map(str(self.cache_path), "r")
        self.table: pa.Table = pa.ipc.open_file(self._mmap).read_all()  # zero-copy over the mmap
        self._ids: np.ndarray | None = None
        self._row_of: dict[str, int] | None = None

    def __getstate__(self) -> dict:
        return {"cache_path": self.cache_path, "path": self.path, "fingerprint": self.fingerprint}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict[str, str]:
        n = len(self)
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise IndexError(f"corpus row {i} out of range for {n} rows")
        return {f: self.table.column(f)[j].as_py() for f in FIELDS}

    def __repr__(self) -> str:
        return f"Corpus({str(self.path)!r}, rows={len(self)}, fingerprint={self.fingerprint!r})"

    @property
    def ids(self) -> np.ndarray:
        """All ids as a numpy object array of str (built once, ~0.1 s per 1M rows)."""
        if self._ids is None:
            self._ids = self.table.column("id").to_numpy()
        return self._ids

    def titles_texts(self, start: int, end: int) -> tuple[list[str], list[str]]:
        """Titles and texts of rows ``start:end`` (clipped to the corpus) for batch encoding."""
        part = self.table.slice(start, max(0, min(end, len(self)) - start))
        return part.column("title").to_pylist(), part.column("text").to_pylist()

    def row_of(self, doc_id: str) -> int:
        """Row of ``doc_id``; raises KeyError. The id→row dict is built on first use."""
        if self._row_of is None:
            self._row_of = {d: i for i, d in enumerate(self.ids)}
        return self._row_of[str(doc_id)]
