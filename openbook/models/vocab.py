"""A compact generator vocabulary: only the WordPieces that occur in the corpus and training questions.

A tiny generator trained from scratch never needs the 30k-token BERT vocabulary: the world's corpus
uses a few thousand WordPieces, and the output softmax over the full vocabulary costs more than the
rest of the tiny model together. ``VocabMap`` maps tokenizer ids to compact ids (tokens outside the
kept set become the tokenizer's [UNK]) and back, so retrieval, the token cache and the tokenizer keep
working in the tokenizer's ids and only the generator sees compact ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from openbook.data.tokcache import TokenizedCorpus


class VocabMap:
    def __init__(self, kept: Iterable[int], full_size: int, unk_id: int) -> None:
        orig = np.unique(np.fromiter(kept, dtype=np.int64))
        if orig.min() < 0 or orig.max() >= full_size or unk_id not in orig:
            raise ValueError("kept ids must lie in the tokenizer's vocabulary and include [UNK]")
        self.to_orig, self.unk_id = torch.from_numpy(orig), int(unk_id)
        self.to_compact = torch.full((full_size,), int(np.searchsorted(orig, unk_id)), dtype=torch.long)
        self.to_compact[self.to_orig] = torch.arange(len(orig))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"full_size": len(self.to_compact), "unk": self.unk_id,
                                    "kept": self.to_orig.tolist()}))

    @classmethod
    def load(cls, path: Path) -> VocabMap:
        d = json.loads(Path(path).read_text())
        return cls(d["kept"], d["full_size"], d["unk"])

    def __len__(self) -> int:
        return len(self.to_orig)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        """Tokenizer ids (any shape) -> compact ids."""
        return self.to_compact.to(ids.device)[ids]

    def decode(self, seqs: list[list[int]]) -> list[list[int]]:
        """Compact id sequences -> tokenizer ids (for ``tokenizer.batch_decode``)."""
        back = self.to_orig.tolist()
        return [[back[i] for i in s] for s in seqs]


def corpus_vocab(tokens: TokenizedCorpus, tokenizer, texts: Iterable[str], chunk: int = 65536) -> VocabMap:
    """Every id in the token cache, in ``texts`` (training questions and answers) and the specials."""
    kept = {int(i) for i in tokenizer.all_special_ids}
    for start in range(0, len(tokens), chunk):
        kept.update(np.unique(np.asarray(tokens.input_ids[start: start + chunk])).tolist())
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        kept.update(ids)
    return VocabMap(kept, len(tokenizer), tokenizer.unk_token_id)
