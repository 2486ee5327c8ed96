"""A real-text corpus from Python's bundled help topics (``pydoc_data.topics``), for REALM pretraining.

Each paragraph of ``pydoc_text()`` becomes one passage, or several when longer than ``words`` words
(cut at sentence ends where possible, never overlapping: an overlap would let a masked span be read
off the neighbouring chunk). The title is the help topic ("attribute-access", "try", ...), so the
passages of one topic share it. Topics differ between Python versions: the file is cached under a
name that includes the version and a hash of the text, and rewritten only when that changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path

from openbook.data.world import pydoc_text


def chunk_words(text: str, words: int) -> list[str]:
    """``text`` cut into pieces of at most ``words`` words, preferring sentence ends."""
    sentences = re.split(r"(?<=[.!?:])\s+", text)
    chunks: list[list[str]] = [[]]
    for sentence in sentences:
        toks = sentence.split()
        if chunks[-1] and len(chunks[-1]) + len(toks) > words:
            chunks.append([])
        while len(toks) > words:  # one very long sentence: hard cuts
            room = words - len(chunks[-1])
            chunks[-1].extend(toks[:room])
            toks = toks[room:]
            chunks.append([])
        chunks[-1].extend(toks)
    return [" ".join(c) for c in chunks if c]


def pydoc_passages(words: int = 64, min_words: int = 8) -> list[dict]:
    """Corpus rows ``{id, title, text}`` in a fixed order (topic, paragraph, chunk)."""
    rows, count = [], {}
    for title, para in pydoc_text(min_words):
        for chunk in chunk_words(para, words):
            n = count[title] = count.get(title, -1) + 1
            rows.append({"id": f"{title}/{n}", "title": title, "text": chunk})
    return rows


def build_pydoc_corpus(cache_dir: str | os.PathLike, words: int = 64) -> Path:
    """Write (or reuse) the pydoc corpus as JSONL under ``cache_dir``; returns its path."""
    if words < 8:
        raise ValueError(f"pydoc passages need at least 8 words, got {words}")
    lines = [json.dumps(r, ensure_ascii=False) for r in pydoc_passages(words)]
    digest = hashlib.sha256("\n".join(lines).encode()).hexdigest()[:12]
    version = "".join(map(str, sys.version_info[:2]))
    path = Path(cache_dir) / f"pydoc-py{version}-w{words}-{digest}" / "corpus.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".corpus.jsonl.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)  # readers see the whole file or none
    finally:
        tmp.unlink(missing_ok=True)
    return path
