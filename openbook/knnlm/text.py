"""Token streams for kNN-LM: the text (Python's help text by default, or the user's files), its
train / valid / test split by paragraph, and the ids the LM reads.

The tiny LM reads the MiniLM WordPiece tokenizer's ids compacted to the pieces seen in training:
compacting matters on CPU (the help text uses ~3k of WordPiece's 30,522 ids, and the softmax costs in
proportion), and held-out pieces never seen in training become ``[UNK]`` (as in WikiText). A pretrained
LM (``lm.source`` a directory) reads its own tokenizer's ids unchanged; its end-of-text token ends
each paragraph.

User text (``text.source``): a directory of ``.txt`` files (one document each), a text file whose
blank-line-separated blocks are the paragraphs (WikiText's layout), or a ``datasets`` directory with a
``text`` column. With ``text.valid`` and ``text.test`` the held-out split is the user's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from openbook.data.world import pydoc_text
from openbook.errors import CorpusError
from openbook.knnlm.config import TextConfig

UNK, SEP = 0, 1  # compact ids; SEP ends every paragraph in a stream


@dataclass(frozen=True)
class TextData:
    train: np.ndarray  # int64 compact ids, paragraphs joined by SEP
    valid: np.ndarray  # held-out paragraphs 0, 2, 4, ... (for tuning λ, k, temperature)
    test: np.ndarray  # held-out paragraphs 1, 3, 5, ... (reported)
    pieces: np.ndarray  # WordPiece id of each compact id (UNK and SEP map to the tokenizer's own)

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)


def read_paragraphs(source: str, min_words: int = 1) -> list[str]:
    """Paragraphs of ``source``: 'pydoc', a directory of .txt files, a blank-line paragraph file or a datasets
    directory (see the module doc); those under ``min_words`` words are dropped."""
    if source == "pydoc":
        paras = [text for _, text in pydoc_text(min_words)]
    else:
        path = Path(source)
        if (path / "state.json").is_file():
            import datasets

            paras = [str(t) for t in datasets.load_from_disk(str(path))["text"]]
        elif path.is_dir():
            paras = [f.read_text(encoding="utf-8").strip() for f in sorted(path.glob("*.txt"))]
        elif path.is_file():
            paras = [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n")]
        else:
            raise CorpusError(f"text: {source} not found (a text file, a directory of .txt files or a datasets "
                              "directory)")
    paras = [p for p in paras if len(p.split()) >= min_words]
    if not paras:
        raise CorpusError(f"text: {source} has no paragraphs of {min_words} words or more")
    return paras


def split_paragraphs(cfg: TextConfig) -> tuple[list[str], list[str], list[str]]:
    """(train, valid, test) paragraph texts. The user's split when ``text.valid``/``text.test`` are given;
    otherwise every ``held_out_every``-th paragraph is held out, and the held-out ones alternate between
    valid and test.

    pydoc repeats paragraphs across topics (a third of the held-out ones also occur in training):
    held-out paragraphs found verbatim in training, or earlier in the held-out set, are dropped, so
    the datastore cannot simply hold the evaluation text.
    """
    paras = read_paragraphs(cfg.source, cfg.min_words)[: cfg.max_paragraphs]
    if cfg.valid is not None:
        return paras, read_paragraphs(cfg.valid), read_paragraphs(cfg.test)
    train = [p for i, p in enumerate(paras) if i % cfg.held_out_every != 0]
    seen = set(train)
    held = [p for p in dict.fromkeys(p for i, p in enumerate(paras) if i % cfg.held_out_every == 0) if p not in seen]
    return train, held[0::2], held[1::2]


def load_text(cfg: TextConfig, tokenizer=None, compact: bool = True,
              paragraphs: tuple[list[str], list[str], list[str]] | None = None) -> TextData:
    """The three streams. ``compact``: the tiny LM's compact vocabulary (else the tokenizer's ids as they are);
    ``paragraphs``: the Python API's own (train, valid, test) texts instead of ``cfg``'s source."""
    if tokenizer is None:
        from openbook.models.retriever import EncoderConfig, load_tokenizer

        tokenizer = load_tokenizer(EncoderConfig(source="minilm"))
    train, valid, test = paragraphs or split_paragraphs(cfg)
    enc = [tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"] if part else [] for part in (train, valid, test)]
    if not compact:
        end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        pieces = np.arange(len(tokenizer), dtype=np.int64)
        lookup, sep = pieces, end
    else:
        seen = np.unique(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in enc[0]]))
        special = np.array([tokenizer.unk_token_id, tokenizer.sep_token_id], dtype=np.int64)
        pieces = np.concatenate([special, seen[~np.isin(seen, special)]])
        lookup = np.full(max(len(tokenizer), int(pieces.max()) + 1), UNK, dtype=np.int64)
        lookup[pieces] = np.arange(len(pieces))
        sep = SEP

    def stream(paragraphs: list[list[int]]) -> np.ndarray:
        parts = [np.append(lookup[np.asarray(p, dtype=np.int64)], sep) for p in paragraphs]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return TextData(train=stream(enc[0]), valid=stream(enc[1]), test=stream(enc[2]), pieces=pieces)
