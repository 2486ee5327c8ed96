"""Tokenise a corpus once and keep the ids on disk as numpy memmaps.

Each passage is tokenised as the pair ``(title, text)`` like DPR (``[CLS] title [SEP] text [SEP]``
for BERT), truncated with ``longest_first`` (safe even when a title alone exceeds ``max_length``) and
right-padded to ``max_length``. The directory name is a hash of everything that changes the tokens
(corpus fingerprint, tokenizer class, vocab, lowercasing, ``max_length``, format version), so a new
tokenizer or length never reads a stale cache. Index refreshes re-encode the whole corpus many times:
reading ids from a memmap instead of re-tokenising is what makes that cheap.

Layout of ``cache_dir/tok-<key>/``: ``input_ids.npy`` int32 [N, max_length], ``lengths.npy`` int32 [N],
optional ``token_type_ids.npy`` int8 [N, max_length], ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from openbook.data.corpus import Corpus

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
TRUNCATION = "longest_first"
# Tokenizer init options that change the produced ids without changing the vocab.
_BEHAVIOUR_KWARGS = ("do_lower_case", "strip_accents", "tokenize_chinese_chars", "add_prefix_space")


def vocab_hash(tokenizer: Any) -> str:
    """sha256 of the sorted vocab (token → id); ~30 ms for a 30k BERT vocab."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def cache_key(corpus: Corpus, tokenizer: Any, max_length: int, prefix: str = "") -> str:
    """The hash naming the cache directory for this (corpus, tokenizer, max_length, passage prefix)."""
    init = getattr(tokenizer, "init_kwargs", {}) or {}
    parts = {
        "format": FORMAT_VERSION,
        "corpus": corpus.fingerprint,
        "tokenizer": type(tokenizer).__name__,
        "vocab": vocab_hash(tokenizer),
        "behaviour": {k: init.get(k) for k in _BEHAVIOUR_KWARGS if k in init},
        "special": [str(t) for t in tokenizer.all_special_tokens],
        "pad": tokenizer.pad_token_id,
        "max_length": int(max_length),
        "truncation": TRUNCATION,
        **({"prefix": prefix} if prefix else {}),  # absent when empty: caches made before prefixes stay valid
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


class TokenizedCorpus:
    """Read-only memmapped token ids of a corpus; ``batch(rows)`` builds model inputs.

    Pickles as its directory path only (re-mapped on unpickling): cheap to ship to Ray actors.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        self.meta: dict[str, Any] = json.loads((self.path / "meta.json").read_text())
        self.key: str = self.meta["key"]
        self.max_length: int = self.meta["max_length"]
        self.input_ids = np.load(self.path / "input_ids.npy", mmap_mode="r")
        self.lengths = np.load(self.path / "lengths.npy", mmap_mode="r")
        tt = self.path / "token_type_ids.npy"
        self.token_type_ids = np.load(tt, mmap_mode="r") if tt.exists() else None

    def __getstate__(self) -> dict:
        return {"path": self.path.absolute()}  # an actor of a joined cluster runs in another directory

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._open()

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def doc_ids(self) -> np.ndarray:
        """The corpus ids of the rows (memory-mapped ``doc_ids.npy``, written by :meth:`keep_doc_ids`)."""
        path = self.path / "doc_ids.npy"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no doc ids beside the token cache (keep_doc_ids was not called)")
        return np.load(path, mmap_mode="r")

    def keep_doc_ids(self, ids: np.ndarray) -> None:
        """Store the rows' corpus ids beside the tokens once (write-then-rename), so whoever encodes rows by
        path (refresh actors, on any node of a shared filesystem) reads their ids the same way."""
        ids = np.asarray(ids)
        ids = ids if ids.dtype.kind == "U" else ids.astype(str)
        if ids.shape != (len(self),):
            raise ValueError(f"{len(ids)} doc ids for {len(self)} tokenised rows")
        path = self.path / "doc_ids.npy"
        if path.is_file() and np.array_equal(np.load(path, mmap_mode="r"), ids):
            return
        tmp = path.with_name(f".doc_ids.{os.getpid()}-{uuid.uuid4().hex[:8]}.npy")
        with open(tmp, "wb") as f:
            np.save(f, ids, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"TokenizedCorpus({str(self.path)!r}, rows={len(self)}, max_length={self.max_length})"

    def batch(self, rows: np.ndarray | slice | list[int]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (+ ``token_type_ids`` when the tokenizer makes them) as
        LongTensors [B, T], with T the longest row in the batch (padding columns are not encoded).

        ``token_type_ids`` is omitted for tokenizers without them so the dict can be passed as
        ``**kwargs`` to models that do not accept that argument (T5, BART).
        """
        import torch  # lazy: `import openbook.data` stays cheap for CLI tools that never batch

        if not isinstance(rows, slice):
            rows = np.asarray(rows, dtype=np.int64)
        lengths = np.asarray(self.lengths[rows], dtype=np.int64)
        width = int(lengths.max()) if lengths.size else 0
        out = {
            "input_ids": torch.from_numpy(np.array(self.input_ids[rows, :width], dtype=np.int64)),
            "attention_mask": torch.from_numpy(
                (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
            ),
        }
        if self.token_type_ids is not None:
            out["token_type_ids"] = torch.from_numpy(
                np.array(self.token_type_ids[rows, :width], dtype=np.int64)
            )
        return out


def _encode(tokenizer: Any, titles: list[str], texts: list[str], max_length: int) -> dict[str, np.ndarray]:
    """One batch as fixed-width arrays (right padding is set by the caller, see ``_encode_into``)."""
    enc = tokenizer(
        titles, texts, truncation=TRUNCATION, max_length=max_length, padding="max_length",
        return_attention_mask=True, return_tensors="np",
    )  # fmt: skip
    return dict(enc)


def _encode_into(
    corpus: Corpus, tokenizer: Any, max_length: int, tmp: Path, batch_size: int, prefix: str = ""
) -> dict[str, Any]:
    """Tokenise every row into memmaps under ``tmp``; returns facts for meta.json."""
    n = len(corpus)
    ids = np.lib.format.open_memmap(tmp / "input_ids.npy", mode="w+", dtype=np.int32, shape=(n, max_length))
    lengths = np.lib.format.open_memmap(tmp / "lengths.npy", mode="w+", dtype=np.int32, shape=(n,))
    types = None
    bar = tqdm(total=n, desc="tokenising corpus", unit="doc", disable=None)  # None: off when not a tty
    # `lengths` + a prefix mask assume right padding; decoder tokenizers often default to left.
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    try:
        for start in range(0, n, batch_size):
            titles, texts = corpus.titles_texts(start, start + batch_size)
            titles = [prefix + t for t in titles] if prefix else titles
            end = start + len(titles)
            enc = _encode(tokenizer, titles, texts, max_length)
            ids[start:end] = enc["input_ids"]
            lengths[start:end] = enc["attention_mask"].sum(axis=1)
            if "token_type_ids" in enc:
                if types is None:  # created lazily: only tokenizers that return them get the file
                    shape = (n, max_length)
                    types = np.lib.format.open_memmap(
                        tmp / "token_type_ids.npy", mode="w+", dtype=np.int8, shape=shape
                    )
                types[start:end] = enc["token_type_ids"]
            bar.update(end - start)
    finally:
        tokenizer.padding_side = side
        bar.close()
    for arr in (ids, lengths, types):
        if arr is not None:
            arr.flush()
    return {"rows": n, "token_type_ids": types is not None, "max_len_seen": int(lengths.max())}


def _publish(tmp: Path, final: Path) -> None:
    """fsync the files, then rename the directory into place; if another process won, keep theirs."""
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "meta.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def tokenize_corpus(
    corpus: Corpus,
    tokenizer: Any,
    max_length: int,
    cache_dir: str | os.PathLike,
    batch_size: int = 10_000,
    prefix: str = "",
) -> TokenizedCorpus:
    """Tokenised ``corpus`` from ``cache_dir`` if present for this key, else computed and cached.
    ``prefix`` (retriever.passage_prefix, E5's "passage: ") is put before each title."""
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no pad token; set tokenizer.pad_token first")
    if max_length < 4:
        raise ValueError(f"max_length must be at least 4, got {max_length}")
    key = cache_key(corpus, tokenizer, max_length, prefix)
    final = Path(cache_dir) / f"tok-{key}"
    if (final / "meta.json").exists():
        return TokenizedCorpus(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        facts = _encode_into(corpus, tokenizer, max_length, tmp, batch_size, prefix)
        meta = {
            "key": key, "max_length": int(max_length), "corpus": str(corpus.path),
            "corpus_fingerprint": corpus.fingerprint, "tokenizer": type(tokenizer).__name__,
            "pad_token_id": tokenizer.pad_token_id, "format": FORMAT_VERSION, **facts,
        }  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return TokenizedCorpus(final)
