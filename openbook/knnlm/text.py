"""Token streams from ``pydoc_data.topics``: the MiniLM WordPiece tokenizer, a vocabulary compacted to
the word pieces seen in training, and a deterministic train / valid / test split by paragraph.

Compacting matters on CPU: the text uses ~3k of WordPiece's 30,522 ids, and the LM's softmax costs
in proportion to the vocabulary. Held-out pieces never seen in training become ``[UNK]`` (as in
WikiText), for the LM and the kNN-LM alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from openbook.data.world import pydoc_text
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


def split_paragraphs(cfg: TextConfig) -> tuple[list[str], list[str], list[str]]:
    """(train, valid, test) paragraph texts: every ``held_out_every``-th paragraph is held out, and the
    held-out ones alternate between valid and test.

    pydoc repeats paragraphs across topics (a third of the held-out ones also occur in training):
    held-out paragraphs found verbatim in training, or earlier in the held-out set, are dropped, so
    the datastore cannot simply hold the evaluation text.
    """
    paras = [text for _, text in pydoc_text(cfg.min_words)][: cfg.max_paragraphs]
    train = [p for i, p in enumerate(paras) if i % cfg.held_out_every != 0]
    seen = set(train)
    held = [p for p in dict.fromkeys(p for i, p in enumerate(paras) if i % cfg.held_out_every == 0) if p not in seen]
    return train, held[0::2], held[1::2]


def load_text(cfg: TextConfig, tokenizer=None) -> TextData:
    if tokenizer is None:
        from openbook.models.retriever import EncoderConfig, load_tokenizer

        tokenizer = load_tokenizer(EncoderConfig(source="minilm"))
    train, valid, test = split_paragraphs(cfg)
    enc = [tokenizer(part, add_special_tokens=False, verbose=False)["input_ids"] if part else [] for part in (train, valid, test)]
    seen = np.unique(np.concatenate([np.asarray(ids, dtype=np.int64) for ids in enc[0]]))
    special = np.array([tokenizer.unk_token_id, tokenizer.sep_token_id], dtype=np.int64)
    pieces = np.concatenate([special, seen[~np.isin(seen, special)]])
    lookup = np.full(max(len(tokenizer), int(pieces.max()) + 1), UNK, dtype=np.int64)
    lookup[pieces] = np.arange(len(pieces))

    def stream(paragraphs: list[list[int]]) -> np.ndarray:
        parts = [np.append(lookup[np.asarray(p, dtype=np.int64)], SEP) for p in paragraphs]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    return TextData(train=stream(enc[0]), valid=stream(enc[1]), test=stream(enc[2]), pieces=pieces)
